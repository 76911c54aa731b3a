// End-to-end scenario against our daemon (`bin/vhost-blk serve`): the very
// same steps as peer.test.ts (the qemu-storage-daemon baseline), then a second
// guest boot against the same daemon process, then a clean SIGTERM shutdown.
// See test/e2e/README.md.

import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { test } from 'node:test';

import {
  checkImagePattern,
  createSparseImage,
  runFioWorkloads,
  runPatternScenario,
  runScenario,
  startVhostBlk,
  step,
  verifyPatternInGuest,
  type DaemonHandle,
} from './guest.js';

const IMAGE_BYTES = 64 * 1024 * 1024;

async function waitForSocket(daemon: DaemonHandle, timeoutMs: number): Promise<void> {
  const t0 = Date.now();
  for (;;) {
    if (daemon.proc.exitCode !== null || daemon.proc.signalCode !== null) {
      throw new Error(
        `vhost-blk exited (code ${daemon.proc.exitCode}, signal ${daemon.proc.signalCode}) after the first guest disconnected; ` +
          `it must keep serving`,
      );
    }
    try {
      if (fs.statSync(daemon.socket).isSocket()) return;
    } catch {
      /* not there (yet) */
    }
    if (Date.now() - t0 > timeoutMs) {
      throw new Error(`vhost-blk's socket ${daemon.socket} did not reappear within ${timeoutMs} ms after the first guest disconnected`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

test('vhost-blk serve: O_DIRECT pattern scenario, second boot, clean SIGTERM', { timeout: 540_000 }, () =>
  runScenario('serve', ['qemu-system-x86_64', 'busybox', 'cpio', 'fio', 'ldd'], async (s) => {
    const image = s.path('disk.img');
    const socket = s.path('vhost-user-blk.sock');
    await createSparseImage(image, IMAGE_BYTES);

    const d = await step('start vhost-blk serve', () => s.track(startVhostBlk(['--socket', socket, '--image', image])));

    // First guest: the full reference scenario.
    const g1 = await step('boot #1', () => s.boot({ socket }));
    const regions = await step('pattern scenario (boot #1)', () => runPatternScenario(g1, image));
    await step('fio verify workloads (boot #1)', () => runFioWorkloads(g1));
    assert.equal(await step('power off #1', () => g1.poweroff()), 0, 'QEMU exit code after poweroff #1');
    await step('check image on host', () => checkImagePattern(image, regions));

    // Second guest against the same daemon process: it must accept a new
    // front-end once the first one has disconnected.
    await step('daemon listens again', () => waitForSocket(d, 10_000));
    const g2 = await step('boot #2', () => s.boot({ socket }));
    await step('read back (boot #2)', () => verifyPatternInGuest(g2, regions));
    assert.equal(await step('power off #2', () => g2.poweroff()), 0, 'QEMU exit code after poweroff #2');

    const code = await step('SIGTERM vhost-blk', () => d.stop('SIGTERM', 15_000));
    assert.equal(code, 0, `vhost-blk exit code after SIGTERM (signal ${d.proc.signalCode})`);
    await step('check image on host after shutdown', () => checkImagePattern(image, regions));
  }));
