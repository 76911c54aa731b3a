// Faults in the backend: `serve --inject-faults` fails, delays or shortens exactly the matching requests,
// a full filesystem under the image gives IOERR until space returns, and the socket's owner and mode.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlkRequestError, type VhostUserBlkClient } from '../../src/frontend/index.js';
import { Status } from '../../src/blk/constants.js';
import { parseFaultSpec, FaultOp, FaultSpecError } from '../../src/backend/faults.js';
import { BIN, MiB, sleep, connectClient, pattern, readImage, startDaemon, stopDaemon, type Daemon } from './daemon-process.js';

const SECTOR = 512;
const sectorOf = (bytes: number) => bytes / SECTOR;

/** Asserts that `p` fails with the virtio-blk status IOERR. */
async function assertIoErr(p: Promise<unknown>, what: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => err instanceof BlkRequestError && err.status === Status.IOERR, `${what} must fail with IOERR`);
}

/** Waits (up to 3 s) for a daemon log line: worker log lines reach stderr asynchronously. */
async function waitForLog(d: Daemon, re: RegExp): Promise<void> {
  for (const deadline = Date.now() + 3000; !re.test(d.log.join('')); await sleep(20)) {
    if (Date.now() > deadline) assert.fail(`the daemon did not log ${re} within 3 s; its log:\n${d.log.join('')}`);
  }
}

describe('fault spec parsing', () => {
  test('rules with kinds, operations, ranges and defaults', () => {
    assert.deepEqual(parseFaultSpec('eio:read@1M-2M'), [{ kind: 'eio', ops: FaultOp.read, start: MiB, end: 2 * MiB, delayUs: 0 }]);
    assert.deepEqual(parseFaultSpec('enospc'), [{ kind: 'enospc', ops: FaultOp.write | FaultOp['write-zeroes'], start: 0, end: -1, delayUs: 0 }]);
    assert.deepEqual(parseFaultSpec('delay=5ms:write+flush@4096-, short'), [
      { kind: 'delay', ops: FaultOp.write | FaultOp.flush, start: 4096, end: -1, delayUs: 5000 },
      { kind: 'short', ops: FaultOp.read | FaultOp.write, start: 0, end: -1, delayUs: 0 },
    ]);
    assert.equal(parseFaultSpec('eio:any')[0].ops, 31);
    assert.equal(parseFaultSpec('delay=200us')[0].delayUs, 200);
  });

  const bad: Array<[string, RegExp]> = [
    ['', /empty rule/],
    ['eio,,short', /empty rule/],
    ['boom', /unknown kind 'boom'/],
    ['eio:reed', /unknown operation 'reed'/],
    ['eio@2M-1M', /range is empty/],
    ['eio@x-1M', /'x' is not a byte offset/],
    ['eio@1M', /range must be START-END/],
    ['delay', /delay needs a duration/],
    ['delay=5', /delay needs a duration/],
    ['delay=61s', /between 1us and 60s/],
    ['eio=3', /eio takes no '=' argument/],
  ];
  for (const [spec, msg] of bad) {
    test(`refuses '${spec}'`, () => assert.throws(() => parseFaultSpec(spec), (e: unknown) => e instanceof FaultSpecError && msg.test((e as Error).message)));
  }

  test('serve refuses a bad spec before opening the socket, naming the option', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vblk-faults-cli-'));
    try {
      const r = spawnSync(process.execPath, [BIN, 'serve', '--socket', join(dir, 's'), '--backend', 'null', '--inject-faults', 'eio:sometimes'], { encoding: 'utf8' });
      assert.equal(r.status, 2, r.stderr);
      assert.match(r.stderr, /--inject-faults: fault rule 'eio:sometimes': unknown operation 'sometimes'/);
      assert.throws(() => statSync(join(dir, 's')), /ENOENT/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('injected faults reach the frontend as IOERR for exactly the matching requests', { timeout: 60_000 }, () => {
  const IMAGE_BYTES = 32 * MiB;
  let dir: string;
  let image: string;
  let daemon: Daemon;
  let client: VhostUserBlkClient;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vblk-faults-'));
    image = join(dir, 'disk.raw');
    closeSync(openSync(image, 'w'));
    truncateSync(image, IMAGE_BYTES);
    daemon = await startDaemon(dir, ['--image', image, '--inject-faults',
      'eio:read@1M-2M,enospc:write@4M-5M,eio:flush+discard@8M-9M,short@12M-13M,delay=40ms:read@16M-17M']);
    client = await connectClient(daemon.socket);
  });

  after(async () => {
    await client?.close();
    if (daemon) assert.equal(await stopDaemon(daemon), 0, `daemon exit code (log:\n${daemon.log.join('')})`);
    rmSync(dir, { recursive: true, force: true });
  });

  test('eio on reads of [1M, 2M): reads touching it fail, reads beside it and writes into it succeed', async () => {
    await assertIoErr(client.read(sectorOf(MiB), 4096), 'read at 1M');
    await assertIoErr(client.read(sectorOf(MiB) - 1, 1024), 'read straddling 1M');
    await assertIoErr(client.read(sectorOf(2 * MiB) - 1, 512), 'last sector before 2M');
    assert.equal((await client.read(sectorOf(MiB) - 8, 4096)).length, 4096);
    assert.equal((await client.read(sectorOf(2 * MiB), 4096)).length, 4096);
    const data = pattern(4096, 1);
    await client.write(sectorOf(MiB) + 8, data);
    assert.deepEqual(readImage(image, MiB + 4096, 4096), data);
  });

  test('enospc on writes of [4M, 5M): those writes fail and change nothing; others land', async () => {
    await assertIoErr(client.write(sectorOf(4 * MiB), pattern(8192, 2)), 'write at 4M');
    assert.deepEqual(readImage(image, 4 * MiB, 8192), Buffer.alloc(8192));
    const data = pattern(8192, 3);
    await client.write(sectorOf(5 * MiB), data);
    assert.deepEqual(readImage(image, 5 * MiB, 8192), data);
  });

  test('eio on flush fails every flush; discard fails only in [8M, 9M)', async () => {
    await assertIoErr(client.flush(), 'flush');
    await assertIoErr(client.discard(sectorOf(8 * MiB), 8), 'discard at 8M');
    await client.discard(sectorOf(10 * MiB), 8);
  });

  test('short reads and writes in [12M, 13M) are finished, never acknowledged half done', async () => {
    const data = pattern(64 * 1024, 4);
    await client.write(sectorOf(12 * MiB), data);
    assert.deepEqual(readImage(image, 12 * MiB, data.length), data, 'a write reported short must be completed');
    assert.deepEqual(await client.read(sectorOf(12 * MiB), data.length), data, 'a read reported short must be completed');
  });

  test('delayed reads in [16M, 17M) take the delay; others do not', async () => {
    let t0 = performance.now();
    await client.read(sectorOf(16 * MiB), 4096);
    const delayed = performance.now() - t0;
    t0 = performance.now();
    await client.read(sectorOf(18 * MiB), 4096);
    const direct = performance.now() - t0;
    assert.ok(delayed >= 38, `delayed read took ${delayed.toFixed(1)} ms, expected >= 40`);
    assert.ok(direct < delayed, `undelayed read took ${direct.toFixed(1)} ms`);
  });

  test('the daemon logged each failure and is still serving', async () => {
    assert.equal(daemon.proc.exitCode, null);
    await waitForLog(daemon, /fault injection on/);
    await waitForLog(daemon, /read at byte 1048576 failed: errno 5/);
    await waitForLog(daemon, /write at byte 4194304 failed: errno 28/);
    assert.equal((await client.read(0, 512)).length, 512);
  });
});

describe('a full filesystem under the image', { timeout: 60_000 }, () => {
  const isRoot = process.getuid?.() === 0;
  let dir: string;
  let mnt: string;
  let daemon: Daemon | undefined;
  let client: VhostUserBlkClient | undefined;

  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'vblk-enospc-'));
    mnt = join(dir, 'mnt');
    mkdirSync(mnt);
  });

  after(async () => {
    await client?.close();
    if (daemon) await stopDaemon(daemon);
    if (isRoot) spawnSync('umount', [mnt]);
    rmSync(dir, { recursive: true, force: true });
  });

  test('ENOSPC comes back as IOERR, and writes succeed again once space returns', { skip: isRoot ? false : 'mounting a small tmpfs needs root' }, async () => {
    // 4 MiB of filesystem under a 16 MiB sparse image: a 3 MiB filler leaves about 1 MiB to write.
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4M', 'tmpfs', mnt]);
    const image = join(mnt, 'disk.raw');
    closeSync(openSync(image, 'w'));
    truncateSync(image, 16 * MiB);
    const filler = join(mnt, 'filler');
    writeFileSync(filler, Buffer.alloc(3 * MiB, 1));
    daemon = await startDaemon(dir, ['--image', image]);
    client = await connectClient(daemon.socket);
    const chunk = pattern(256 * 1024, 5);
    let failedAt = -1;
    for (let i = 0; i < 16 && failedAt < 0; i++) {
      try {
        await client.write(sectorOf(i * chunk.length), chunk);
      } catch (err) {
        assert.ok(err instanceof BlkRequestError && err.status === Status.IOERR, `write ${i} failed with ${err}`);
        failedAt = i;
      }
    }
    assert.ok(failedAt > 0, `writes must fail once the 4 MiB filesystem is full (failed at ${failedAt})`);
    await waitForLog(daemon, /failed: errno 28/);
    rmSync(filler);
    await client.write(sectorOf(failedAt * chunk.length), chunk);
    assert.deepEqual(await client.read(sectorOf(failedAt * chunk.length), chunk.length), chunk);
    assert.deepEqual(readImage(image, failedAt * chunk.length, chunk.length), chunk);
    assert.equal(daemon.proc.exitCode, null);
  });
});

describe('who may connect: the socket file', { timeout: 30_000 }, () => {
  test('mode 0600 by default; --socket-mode and --socket-group widen it; an unknown group is refused', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vblk-sockperm-'));
    try {
      let d = await startDaemon(dir, ['--backend', 'null']);
      assert.equal(statSync(d.socket).mode & 0o777, 0o600);
      assert.equal(await stopDaemon(d), 0);
      d = await startDaemon(dir, ['--backend', 'null', '--socket-mode', '0660', '--socket-group', '1234']);
      const st = statSync(d.socket);
      assert.equal(st.mode & 0o777, 0o660);
      if (process.getuid?.() === 0) assert.equal(st.gid, 1234);
      assert.equal(await stopDaemon(d), 0);
      const r = spawnSync(process.execPath, [BIN, 'serve', '--socket', join(dir, 's2'), '--backend', 'null', '--socket-group', 'no-such-group-x'], { encoding: 'utf8' });
      assert.equal(r.status, 2);
      assert.match(r.stderr, /--socket-group: no group named 'no-such-group-x'/);
      assert.throws(() => statSync(join(dir, 's2')), /ENOENT/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('a stop that waits on a held request', { timeout: 30_000 }, () => {
  test('names the request in the log every 5 s until it completes; the request still completes whole', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vblk-stopwatch-'));
    const image = join(dir, 'disk.raw');
    const data = pattern(4096, 9);
    writeFileSync(image, Buffer.concat([Buffer.alloc(MiB), data, Buffer.alloc(3 * MiB - 4096)]));
    const daemon = await startDaemon(dir, ['--image', image, '--inject-faults', 'delay=6s:read@1M-2M']);
    const client = await connectClient(daemon.socket, { requestTimeoutMs: 20_000, replyTimeoutMs: 20_000 });
    try {
      const read = client.read(sectorOf(MiB), 4096);
      await sleep(200);
      const t0 = performance.now();
      const stopped = client.stopQueue(0);
      // The stop must wait for the read (the guest gets every completion before GET_VRING_BASE answers),
      // and while it waits the log says which request holds it and where.
      for (const deadline = Date.now() + 8000; !/stop still waiting/.test(daemon.log.join('')); await sleep(50)) {
        if (Date.now() > deadline) assert.fail(`no stop-watch line within 8 s; log:\n${daemon.log.join('')}`);
      }
      assert.match(daemon.log.join(''),
        /queue 0 stop still waiting for 1 request\(s\): slot \d+ \(head \d+, read at byte 1048576, 4096 bytes left, tag \d+\); backend: held by delay rules: tags \d+; 0 SQE\(s\) unsubmitted/);
      assert.deepEqual(await read, data, 'the held read completed with the image data');
      await stopped;
      assert.ok(performance.now() - t0 >= 5000, 'the stop waited for the held read');
    } finally {
      await client.close();
      assert.equal(await stopDaemon(daemon), 0, `daemon exit code (log:\n${daemon.log.join('')})`);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
