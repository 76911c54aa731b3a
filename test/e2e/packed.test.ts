// End-to-end: a guest whose vhost-user-blk-pci disk uses packed virtqueues (packed=on) against our
// daemon. Boot #1 negotiates EVENT_IDX and INDIRECT_DESC (Linux's default), so event suppression runs in
// descriptor (off_wrap) mode and multi-segment requests come as indirect tables; it runs the O_DIRECT
// pattern scenario (with a device reset: the rings restart from a fresh packed vring base) and fio's
// verified workloads. Boot #2 turns EVENT_IDX off (plain ENABLE/DISABLE suppression) and reads the data
// back. Each boot proves the guest really negotiated VIRTIO_F_RING_PACKED (feature bit 34) and that
// the daemon served a packed ring, and the guest kernel must log no I/O error. See test/e2e/README.md.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  checkImagePattern,
  createSparseImage,
  Guest,
  runFioVerify,
  runFioWorkloads,
  runPatternScenario,
  runScenario,
  startVhostBlk,
  step,
  verifyPatternInGuest,
  virtioDeviceOf,
  type DaemonHandle,
} from './guest.js';

const IMAGE_BYTES = 64 * 1024 * 1024;
const MiB = 1024 * 1024;
const RING_PACKED = 34;
const RING_INDIRECT_DESC = 28;
const RING_EVENT_IDX = 29;

/** The feature bits the guest's driver negotiated for `disk`: /sys/.../features is one '0'/'1' per bit, bit 0 first. */
async function negotiatedFeatures(guest: Guest, disk = 'vda'): Promise<string> {
  const dev = await virtioDeviceOf(guest, disk);
  const bits = (await guest.check(`cat /sys/bus/virtio/devices/${dev}/features`)).trim().split('\n').pop()!.trim();
  assert.match(bits, /^[01]{64}$/, `features of ${dev}`);
  return bits;
}

/** Kernel log lines (timestamps stripped) that report I/O or virtqueue trouble. */
async function kernelErrors(guest: Guest): Promise<string[]> {
  // The timestamps go: run() drops output lines that look like kernel messages.
  const log = await guest.check("dmesg | sed 's/^\\[[ 0-9.]*\\] //'");
  return log.split('\n').filter((l) => /I\/O error|blk_update_request|critical (medium|target)|virtio.*(error|broken|bad)|hung_task|BUG:|WARNING:/i.test(l));
}

/** How many times the daemon's log says a worker started a packed ring (the worker logs every ring start at debug level). */
function packedStarts(daemon: DaemonHandle): number {
  return daemon.output.filter((l) => /queue \d+ started: packed/.test(l)).length;
}

test('vhost-blk serve: a packed-ring guest (packed=on) runs verified workloads, with and without EVENT_IDX', { timeout: 600_000 }, () =>
  runScenario('packed', ['qemu-system-x86_64', 'busybox', 'cpio', 'fio', 'ldd'], async (s) => {
    const image = s.path('disk.img');
    const socket = s.path('vhost-user-blk.sock');
    await createSparseImage(image, IMAGE_BYTES);
    const d = await step('start vhost-blk serve', () => s.track(startVhostBlk(['--socket', socket, '--image', image, '--log-level', 'debug'])));

    // Boot #1: packed, with EVENT_IDX and INDIRECT_DESC.
    const g1 = await step('boot #1 (packed=on)', () => s.boot({ socket, extraDeviceArgs: ',packed=on' }));
    const f1 = await step('negotiated features #1', () => negotiatedFeatures(g1));
    assert.equal(f1[RING_PACKED], '1', `the guest did not negotiate VIRTIO_F_RING_PACKED: ${f1}`);
    assert.equal(f1[RING_EVENT_IDX], '1', `boot #1 should use EVENT_IDX: ${f1}`);
    assert.equal(f1[RING_INDIRECT_DESC], '1', `boot #1 should use INDIRECT_DESC: ${f1}`);
    assert.ok(packedStarts(d) >= 1, 'the daemon never started a packed ring');
    const regions = await step('pattern scenario (boot #1)', () => runPatternScenario(g1, image));
    // The unbind/bind in the scenario reset the device: its ring must have restarted packed.
    assert.ok(packedStarts(d) >= 2, `after the device reset the daemon started ${packedStarts(d)} packed rings, expected at least 2`);
    await step('fio verify workloads (boot #1)', () => runFioWorkloads(g1));
    assert.deepEqual(await step('kernel log (boot #1)', () => kernelErrors(g1)), [], 'the guest kernel logged I/O trouble');
    assert.equal(await step('power off #1', () => g1.poweroff()), 0, 'QEMU exit code after poweroff #1');
    await step('check image on host', () => checkImagePattern(image, regions));

    // Boot #2: packed without EVENT_IDX: the driver and we suppress notifications with flags only.
    const startsBefore = packedStarts(d);
    const g2 = await step('boot #2 (packed=on,event_idx=off)', () => s.boot({ socket, extraDeviceArgs: ',packed=on,event_idx=off' }));
    const f2 = await step('negotiated features #2', () => negotiatedFeatures(g2));
    assert.equal(f2[RING_PACKED], '1', `the guest did not negotiate VIRTIO_F_RING_PACKED: ${f2}`);
    assert.equal(f2[RING_EVENT_IDX], '0', `boot #2 must run without EVENT_IDX: ${f2}`);
    assert.ok(packedStarts(d) > startsBefore, 'the daemon did not start a packed ring for boot #2');
    await step('read back (boot #2)', () => verifyPatternInGuest(g2, regions));
    await step('fio verify (boot #2)', () => runFioVerify(g2, { offset: 48 * MiB, size: 8 * MiB, bs: '4k-64k', iodepth: 16, rw: 'randrw' }));
    assert.deepEqual(await step('kernel log (boot #2)', () => kernelErrors(g2)), [], 'the guest kernel logged I/O trouble');
    assert.equal(await step('power off #2', () => g2.poweroff()), 0, 'QEMU exit code after poweroff #2');

    assert.ok(!d.output.some((l) => /ring is broken|bad descriptor chain/.test(l)), 'the daemon found a malformed packed ring');
    const code = await step('SIGTERM vhost-blk', () => d.stop('SIGTERM', 15_000));
    assert.equal(code, 0, `vhost-blk exit code after SIGTERM (signal ${d.proc.signalCode})`);
    await step('check image on host after shutdown', () => checkImagePattern(image, regions));
  }));
