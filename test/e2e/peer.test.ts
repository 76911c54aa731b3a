// Reference end-to-end scenario against qemu-storage-daemon: proves the
// harness and gives the side-by-side baseline for serve.test.ts, which runs
// the very same steps against our daemon. See test/e2e/README.md.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  checkImagePattern,
  createSparseImage,
  runFioWorkloads,
  runPatternScenario,
  runScenario,
  startQemuStorageDaemon,
  step,
} from './guest.js';

const IMAGE_BYTES = 64 * 1024 * 1024;

test('qemu-storage-daemon (reference peer): O_DIRECT pattern scenario in a real guest', { timeout: 420_000 }, () =>
  runScenario('peer', ['qemu-system-x86_64', 'qemu-storage-daemon', 'busybox', 'cpio', 'fio', 'ldd'], async (s) => {
    const image = s.path('disk.img');
    const socket = s.path('vhost-user-blk.sock');
    await createSparseImage(image, IMAGE_BYTES);

    const daemon = await step('start qemu-storage-daemon', () => s.track(startQemuStorageDaemon({ socket, image, writable: true })));
    const g = await step('boot guest', () => s.boot({ socket }));
    const regions = await step('pattern scenario', () => runPatternScenario(g, image));
    await step('fio verify workloads', () => runFioWorkloads(g));
    assert.equal(await step('power off', () => g.poweroff()), 0, 'QEMU exit code after poweroff');
    await step('check image on host', () => checkImagePattern(image, regions));
    assert.equal(await step('stop qemu-storage-daemon', () => daemon.stop('SIGTERM')), 0, 'qemu-storage-daemon exit code');
  }));
