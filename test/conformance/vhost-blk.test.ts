// The conformance suite against our daemon (`bin/vhost-blk serve`), on a fresh sparse image.
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { defineConformanceSuite, spawnBackend } from './suite.js';

const REPO = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const BIN = join(REPO, 'bin', 'vhost-blk');

defineConformanceSuite('vhost-blk', (image, { numQueues, readOnly }) => {
  const socket = join(dirname(image), 'vhost-blk.sock');
  return spawnBackend({
    name: 'vhost-blk',
    command: process.execPath,
    args: [BIN, 'serve', '--socket', socket, '--image', image, '--num-queues', String(numQueues), ...(readOnly ? ['--readonly'] : [])],
    socket,
  });
});
