// Faults in the backend, seen from a real guest: `serve --inject-faults` fails reads of one range and
// writes of another with EIO; the guest's own virtio-blk driver reports I/O errors for exactly those
// sectors, everything else reads and writes fine, and the daemon keeps serving.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { createSparseImage, runScenario, startVhostBlk, step } from './guest.js';

const MiB = 1024 * 1024;

test('vhost-blk serve --inject-faults: the guest sees IOERR for exactly the faulty ranges', { timeout: 300_000 }, () =>
  runScenario('faults', ['qemu-system-x86_64', 'busybox', 'cpio', 'ldd'], async (s) => {
    const image = s.path('disk.img');
    const socket = s.path('vhost-user-blk.sock');
    await createSparseImage(image, 32 * MiB);
    const daemon = await step('start vhost-blk serve', () => s.track(startVhostBlk(['--socket', socket, '--image', image, '--inject-faults', 'eio:read@8M-9M,eio:write@16M-17M'])));
    const g = await step('boot', () => s.boot({ socket }));
    const dd = (args: string) => g.run(`dd ${args} bs=4096 count=1 2>&1`);

    // Around the faulty read range: the blocks just before and after it read fine.
    assert.equal((await dd('if=/dev/vda of=/dev/null iflag=direct skip=2047')).status, 0, 'read of the block before 8M');
    assert.equal((await dd('if=/dev/vda of=/dev/null iflag=direct skip=2304')).status, 0, 'read of the block at 9M');
    const badRead = await dd('if=/dev/vda of=/dev/null iflag=direct skip=2048');
    assert.notEqual(badRead.status, 0, `a read at 8M must fail in the guest: ${badRead.output}`);
    assert.match(badRead.output, /I\/O error|Input\/output error/i);

    const badWrite = await dd('if=/dev/zero of=/dev/vda oflag=direct seek=4096');
    assert.notEqual(badWrite.status, 0, `a write at 16M must fail in the guest: ${badWrite.output}`);
    assert.equal((await dd('if=/dev/zero of=/dev/vda oflag=direct seek=4352')).status, 0, 'write at 17M');
    // Reads of the write-faulty range and writes to the read-faulty range are not affected.
    assert.equal((await dd('if=/dev/vda of=/dev/null iflag=direct skip=4096')).status, 0, 'read at 16M');
    assert.equal((await dd('if=/dev/zero of=/dev/vda oflag=direct seek=2048')).status, 0, 'write at 8M');

    // The guest kernel names the failing sectors: 8M = sector 16384, 16M = sector 32768.
    // (Timestamps stripped: the harness drops console lines that look like kernel messages.)
    const dmesg = await g.check("dmesg | sed 's/^\\[[ 0-9.]*\\] //'");
    assert.match(dmesg, /I\/O error, dev vda, sector 16384 op 0x0:\(READ\)/);
    assert.match(dmesg, /I\/O error, dev vda, sector 32768 op 0x1:\(WRITE\)/);
    const errorSectors = [...dmesg.matchAll(/I\/O error, dev vda, sector (\d+)/g)].map((m) => Number(m[1]));
    for (const sector of errorSectors) {
      const inRead = sector >= 16384 && sector < 18432;
      const inWrite = sector >= 32768 && sector < 34816;
      assert.ok(inRead || inWrite, `an I/O error at sector ${sector}, outside the injected ranges:\n${dmesg}`);
    }
    assert.equal(await step('power off', () => g.poweroff()), 0);
    assert.equal(daemon.proc.exitCode, null, 'the daemon is still running');
    assert.ok(daemon.output.some((l) => /read at byte 8388608 failed: errno 5/.test(l)), 'the daemon logged the failed read');
    assert.equal(await step('SIGTERM vhost-blk', () => daemon.stop('SIGTERM', 15_000)), 0);
  }));
