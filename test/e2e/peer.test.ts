// Reference end-to-end scenario against qemu-storage-daemon: proves the
// harness and gives the side-by-side baseline for serve.test.ts, which runs
// the very same steps against our daemon. See test/e2e/README.md.

import assert from 'node:assert/strict';
import * as path from 'node:path';
import { test } from 'node:test';

import {
  checkImagePattern,
  createSparseImage,
  runFioWorkloads,
  ensureGuestAssets,
  Guest,
  makeTempDir,
  requireTools,
  runPatternScenario,
  startQemuStorageDaemon,
  step,
  withDiagnostics,
  type DaemonHandle,
} from './guest.js';

const IMAGE_BYTES = 64 * 1024 * 1024;

test('qemu-storage-daemon (reference peer): O_DIRECT pattern scenario in a real guest', { timeout: 420_000 }, async () => {
  // Missing tools fail the test (with the apt package to install); never a silent skip.
  requireTools(['qemu-system-x86_64', 'qemu-storage-daemon', 'busybox', 'cpio', 'fio', 'ldd']);
  const assets = await step('build guest initramfs', () => ensureGuestAssets());
  const tmp = await makeTempDir('vhost-blk-e2e-peer-');
  let daemon: DaemonHandle | undefined;
  let guest: Guest | undefined;
  try {
    const image = path.join(tmp.path, 'disk.img');
    const socket = path.join(tmp.path, 'vhost-user-blk.sock');
    await createSparseImage(image, IMAGE_BYTES);

    daemon = await step('start qemu-storage-daemon', () => startQemuStorageDaemon({ socket, image, writable: true }));
    guest = await step('boot guest', () => Guest.boot({ socket, assets }));
    const g = guest;
    const regions = await step('pattern scenario', () => runPatternScenario(g, image));
    await step('fio verify workloads', () => runFioWorkloads(g));
    assert.equal(await step('power off', () => g.poweroff()), 0, 'QEMU exit code after poweroff');
    await step('check image on host', () => checkImagePattern(image, regions));
    assert.equal(await step('stop qemu-storage-daemon', () => daemon!.stop('SIGTERM')), 0, 'qemu-storage-daemon exit code');
  } catch (err) {
    throw withDiagnostics(err, [guest, daemon]);
  } finally {
    await guest?.dispose();
    await daemon?.stop('SIGKILL').catch(() => undefined);
    await tmp.cleanup();
  }
});
