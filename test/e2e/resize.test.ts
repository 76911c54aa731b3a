// End-to-end live resize: a guest runs against `bin/vhost-blk serve`; `vhost-blk resize` grows the image,
// and the guest sees the new size without a reboot (QEMU gets CONFIG_CHANGE_MSG on the backend request
// channel, re-reads the config space and interrupts the guest). Then the guest writes and reads back a
// pattern in the new area with O_DIRECT, which the host finds in the image. A second growth comes from
// SIGHUP after the image was extended on the host. See test/e2e/README.md.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';

import {
  checkImagePattern,
  compareRegion,
  createSparseImage,
  Guest,
  REPO_ROOT,
  runScenario,
  startVhostBlk,
  step,
  writeRegion,
  type PatternRegion,
} from './guest.js';

const MiB = 1024 * 1024;
const KiB = 1024;
const OLD_BYTES = 64 * MiB;
const NEW_BYTES = 96 * MiB;
const HUP_BYTES = 128 * MiB;

/** Runs `vhost-blk resize ...args`; resolves with the exit code and output. */
function runResize(args: string[]): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, [path.join(REPO_ROOT, 'bin', 'vhost-blk'), 'resize', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    proc.stdout.setEncoding('utf8').on('data', (d: string) => { output += d; });
    proc.stderr.setEncoding('utf8').on('data', (d: string) => { output += d; });
    proc.once('error', reject);
    proc.once('exit', (code) => resolve({ code, output }));
  });
}

/** The guest's idea of the disk size, in 512-byte sectors. */
async function guestSectors(guest: Guest): Promise<number> {
  const out = (await guest.check('cat /sys/block/vda/size')).trim().split('\n').pop()!.trim();
  const n = Number(out);
  if (!Number.isSafeInteger(n)) throw new Error(`cannot parse /sys/block/vda/size: ${JSON.stringify(out)}`);
  return n;
}

/** Polls the guest until /sys/block/vda/size says `sectors`; returns how long it took. */
async function waitForGuestSize(guest: Guest, sectors: number, timeoutMs: number): Promise<number> {
  const t0 = Date.now();
  let last = -1;
  while (Date.now() - t0 < timeoutMs) {
    last = await guestSectors(guest);
    if (last === sectors) return Date.now() - t0;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`the guest still sees ${last} sectors after ${timeoutMs} ms, expected ${sectors}`);
}

/** The kernel's own record of the change, read from dmesg. */
async function assertCapacityChangeLogged(guest: Guest, from: number, to: number): Promise<void> {
  // Timestamps stripped: run() drops lines that look like kernel console messages.
  const out = await guest.check(`dmesg | grep "detected capacity change" | sed 's/^\\[[^]]*\\] *//' || true`);
  assert.match(out, new RegExp(`vda: detected capacity change from ${from} to ${to}`), `guest dmesg:\n${out}`);
}

test('vhost-blk resize: the guest sees the new size live and uses the new area', { timeout: 540_000 }, () =>
  runScenario('resize', ['qemu-system-x86_64', 'busybox', 'cpio', 'fio', 'ldd'], async (s) => {
    const image = s.path('disk.img');
    const socket = s.path('vhost-user-blk.sock');
    await createSparseImage(image, OLD_BYTES);
    const d = await step('start vhost-blk serve', () => s.track(startVhostBlk(['--socket', socket, '--image', image])));
    const g = await step('boot', () => s.boot({ socket }));
    assert.equal(await step('size before', () => guestSectors(g)), OLD_BYTES / 512, 'the guest sees the image size at boot');

    const resized = await step('vhost-blk resize', () => runResize(['--socket', socket, '--size', `${NEW_BYTES / MiB}M`]));
    assert.equal(resized.code, 0, `vhost-blk resize failed:\n${resized.output}`);
    assert.match(resized.output, /disk grown from 67108864 to 100663296 bytes; the frontend was notified/);
    assert.equal(fs.statSync(image).size, NEW_BYTES, 'the image file was grown');
    await step('guest sees the new size', () => waitForGuestSize(g, NEW_BYTES / 512, 30_000));
    await step('kernel logged the change', () => assertCapacityChangeLogged(g, OLD_BYTES / 512, NEW_BYTES / 512));

    // O_DIRECT in the new area: right past the old end, further in, and the very last block.
    const regions: PatternRegion[] = [
      { bs: 4 * KiB, count: 4, diskOffset: OLD_BYTES, patternOffset: 0 },
      { bs: 64 * KiB, count: 4, diskOffset: OLD_BYTES + 8 * MiB, patternOffset: 1 * MiB },
      { bs: 4 * KiB, count: 1, diskOffset: NEW_BYTES - 4 * KiB, patternOffset: 600 * KiB },
    ];
    await step('write the new area (O_DIRECT)', async () => { for (const r of regions) await writeRegion(g, r); });
    await step('read the new area back (O_DIRECT)', async () => {
      await g.check('sync; echo 3 > /proc/sys/vm/drop_caches');
      for (const r of regions) await compareRegion(g, r);
    });

    // An operator grows the file himself and tells the daemon with SIGHUP.
    await step('grow the image on the host', async () => fs.truncateSync(image, HUP_BYTES));
    d.proc.kill('SIGHUP');
    await step('guest sees the SIGHUP size', () => waitForGuestSize(g, HUP_BYTES / 512, 30_000));
    await step('kernel logged the second change', () => assertCapacityChangeLogged(g, NEW_BYTES / 512, HUP_BYTES / 512));
    const last: PatternRegion = { bs: 4 * KiB, count: 2, diskOffset: HUP_BYTES - 8 * KiB, patternOffset: 800 * KiB };
    await step('write and read the last blocks after SIGHUP', async () => {
      await writeRegion(g, last);
      await compareRegion(g, last);
    });

    const shrink = await step('shrinking is refused', () => runResize(['--socket', socket, '--size', '32M']));
    assert.equal(shrink.code, 1, shrink.output);
    assert.match(shrink.output, /shrinking is refused/);
    assert.equal(await guestSectors(g), HUP_BYTES / 512, 'a refused shrink leaves the guest alone');

    assert.equal(await step('power off', () => g.poweroff()), 0, 'QEMU exit code after poweroff');
    await step('check the image on the host', () => checkImagePattern(image, [...regions, last]));
    const code = await step('SIGTERM vhost-blk', () => d.stop('SIGTERM', 15_000));
    assert.equal(code, 0, `vhost-blk exit code after SIGTERM (signal ${d.proc.signalCode})`);
  }));
