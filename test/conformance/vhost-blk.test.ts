// The conformance suite against our daemon (`bin/vhost-blk serve`), on a fresh sparse image: split rings, then packed rings.
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { defineConformanceSuite, spawnBackend, type StartBackend } from './suite.js';

const REPO = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const BIN = join(REPO, 'bin', 'vhost-blk');

/** Starts `bin/vhost-blk serve` on `image`. */
const startVhostBlk: StartBackend = (image, { numQueues, readOnly }) => {
  const socket = join(dirname(image), 'vhost-blk.sock');
  return spawnBackend({
    name: 'vhost-blk',
    command: process.execPath,
    args: [BIN, 'serve', '--socket', socket, '--image', image, '--num-queues', String(numQueues), ...(readOnly ? ['--readonly'] : [])],
    socket,
  });
};

defineConformanceSuite('vhost-blk', startVhostBlk);
// The same suite with packed virtqueues (VIRTIO_F_RING_PACKED) on every ring.
defineConformanceSuite('vhost-blk, packed rings', startVhostBlk, { packed: true });
