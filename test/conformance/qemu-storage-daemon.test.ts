// The conformance suite against the reference backend, qemu-storage-daemon's vhost-user-blk export, on a
// fresh sparse image: whatever passes here and fails on our daemon is our bug.
import { test } from 'node:test';
import { accessSync, constants } from 'node:fs';
import { delimiter, dirname, join } from 'node:path';
import { defineConformanceSuite, spawnBackend, ABRUPT_INFLIGHT, INFLIGHT_STOP, LOG_BASE_TOO_SMALL, LOG_BASE_NO_FD } from './suite.js';

/** Path of an executable on $PATH, or undefined. */
function which(cmd: string): string | undefined {
  for (const d of (process.env.PATH ?? '').split(delimiter).concat(['/usr/bin', '/usr/local/bin'])) {
    if (!d) continue;
    try {
      accessSync(join(d, cmd), constants.X_OK);
      return join(d, cmd);
    } catch { /* not here */ }
  }
  return undefined;
}

const QSD = which('qemu-storage-daemon');

if (!QSD) {
  test('vhost-user-blk conformance: qemu-storage-daemon', { skip: 'qemu-storage-daemon is not installed (apt-get install qemu-system-common)' }, () => {});
} else {
  defineConformanceSuite('qemu-storage-daemon', (image, { numQueues, readOnly }) => {
    const socket = join(dirname(image), 'qsd.sock');
    // QEMU option syntax: a comma inside a value is written twice.
    const esc = (s: string) => s.replace(/,/g, ',,');
    return spawnBackend({
      name: 'qemu-storage-daemon',
      command: QSD,
      args: [
        '--blockdev', `driver=file,node-name=file0,filename=${esc(image)}`,
        '--export', `type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=${esc(socket)},writable=${readOnly ? 'off' : 'on'},num-queues=${numQueues}`,
      ],
      socket,
    });
  }, {
    knownFailures: {
      // QEMU 7.2: a front-end that closes the socket while requests are in flight makes the daemon abort with
      // "util/vhost-user-server.c:79: vhost_user_server_ref: Assertion `!server->wait_idle' failed".
      [ABRUPT_INFLIGHT]: 'qemu-storage-daemon (QEMU 7.2) aborts on an abrupt disconnect with requests in flight (vhost_user_server_ref: Assertion !server->wait_idle)',
      // QEMU 7.2 (libvhost-user): GET_VRING_BASE answers at once, without draining the requests it took; they
      // complete later, into a stopped ring, and the SET_VRING_* of the restart then finds the connection closed.
      [INFLIGHT_STOP]: 'qemu-storage-daemon (QEMU 7.2) answers GET_VRING_BASE without draining in-flight requests, and drops the connection at the restart',
      // QEMU 7.2 (libvhost-user) maps whatever log SET_LOG_BASE describes without comparing it with guest
      // memory or the fd's size, and answers every SET_LOG_BASE with the mmap size it was sent.
      [LOG_BASE_TOO_SMALL]: 'qemu-storage-daemon (QEMU 7.2, libvhost-user) accepts a SET_LOG_BASE log smaller than guest memory needs, or larger than its fd',
      // libvhost-user vu_panic()s on a SET_LOG_BASE without an fd: the device is marked broken and its rings stop.
      [LOG_BASE_NO_FD]: 'qemu-storage-daemon (QEMU 7.2, libvhost-user) panics the device on SET_LOG_BASE without an fd: the rings stop serving',
    },
  });
}
