// The real daemon process driven through the vhost-user-blk front-end library, as QEMU would drive it.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, mkdtempSync, openSync, rmSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VhostUserBlkClient, BlkRequestError, STATUS_NOT_WRITTEN } from '../../src/frontend/index.js';
import { Feature, RequestType, Status } from '../../src/blk/constants.js';
import { ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES } from '../../src/vhost-user/messages.js';
import { MiB, sleep, connectClient, pattern, readImage, startDaemon, stopDaemon, type Daemon } from './daemon-process.js';

const SERIAL = 'fe-test-serial-01';
const IMAGE_BYTES = 16 * MiB;

describe('file backend daemon through the front-end', { timeout: 30_000 }, () => {
  let dir: string;
  let image: string;
  let daemon: Daemon;
  let client: VhostUserBlkClient;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vblk-fe-'));
    image = join(dir, 'disk.raw');
    closeSync(openSync(image, 'w'));
    truncateSync(image, IMAGE_BYTES);
    daemon = await startDaemon(dir, ['--image', image, '--serial', SERIAL]);
    client = await connectClient(daemon.socket);
  });

  after(async () => {
    await client?.close();
    if (daemon) {
      const code = await stopDaemon(daemon);
      assert.equal(code, 0, `daemon exit code (log:\n${daemon.log.join('')})`);
    }
    rmSync(dir, { recursive: true, force: true });
  });

  test('negotiation: features, protocol features and the config space', () => {
    assert.equal(client.config.capacitySectors, IMAGE_BYTES / 512);
    assert.equal(client.config.capacityBytes, IMAGE_BYTES);
    assert.equal(client.config.blkSize, 512);
    assert.equal(client.config.numQueues, 1);
    assert.equal(client.config.writeback, 1);
    assert.ok(client.config.segMax >= 8, `seg_max ${client.config.segMax}`);
    assert.ok(client.config.sizeMax >= 4096, `size_max ${client.config.sizeMax}`);
    assert.equal(client.maxQueues, 1);
    for (const f of [Feature.VERSION_1, Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC, Feature.BLK_FLUSH, VHOST_USER_F_PROTOCOL_FEATURES]) {
      assert.ok(client.hasFeature(f), `feature bit ${f} negotiated`);
    }
    for (const p of [ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG, ProtocolFeature.MQ]) {
      assert.ok((client.protocolFeatures & (1n << BigInt(p))) !== 0n, `protocol feature ${p} negotiated`);
    }
  });

  test('writes at the first and the last sectors read back, and land in the image file', async () => {
    const head = pattern(64 * 1024, 1);
    const tailSector = IMAGE_BYTES / 512 - 16;
    const tail = pattern(8192, 2);
    await client.write(0, head);
    await client.write(tailSector, tail);
    assert.deepEqual(await client.read(0, head.length), head);
    assert.deepEqual(await client.read(tailSector, tail.length), tail);
    await client.flush();
    assert.deepEqual(readImage(image, 0, head.length), head);
    assert.deepEqual(readImage(image, tailSector * 512, tail.length), tail);
  });

  test('scatter-gather: 8 segments of 4 KiB out and in, one descriptor each', async () => {
    const segs = Array.from({ length: 8 }, (_, i) => pattern(4096, 100 + i));
    const w = await client.submit(0, { type: RequestType.OUT, sector: 1024, out: segs });
    assert.equal(w.status, Status.OK);
    assert.equal(w.usedLen, 1, 'a write reports only the status byte written');
    const r = await client.submit(0, { type: RequestType.IN, sector: 1024, inLengths: Array(8).fill(4096) });
    assert.equal(r.status, Status.OK);
    assert.equal(r.usedLen, 8 * 4096 + 1);
    assert.equal(r.data.length, 8);
    r.data.forEach((d, i) => assert.deepEqual(d, segs[i], `segment ${i}`));
    // Odd-sized segments summing to whole sectors are fine too.
    const odd = [pattern(100, 7), pattern(412, 8), pattern(1024, 9)];
    assert.equal((await client.submit(0, { type: RequestType.OUT, sector: 2048, out: odd })).status, Status.OK);
    assert.deepEqual(readImage(image, 1024 * 512, 8 * 4096), Buffer.concat(segs));
    assert.deepEqual(readImage(image, 2048 * 512, 1536), Buffer.concat(odd));
  });

  test('indirect descriptors carry a whole request in one ring slot', async () => {
    const segs = Array.from({ length: 4 }, (_, i) => pattern(2048, 200 + i));
    assert.equal((await client.submit(0, { type: RequestType.OUT, sector: 4096, out: segs, indirect: true })).status, Status.OK);
    const r = await client.submit(0, { type: RequestType.IN, sector: 4096, inLengths: [2048, 2048, 2048, 2048], indirect: true });
    assert.equal(r.status, Status.OK);
    assert.equal(r.usedLen, 4 * 2048 + 1);
    assert.deepEqual(Buffer.concat(r.data), Buffer.concat(segs));
    // 100 segments + header + status in a table: fits the 128-entry ring's chain limit.
    const many = Array.from({ length: 100 }, (_, i) => pattern(512, 300 + i));
    assert.equal((await client.submit(0, { type: RequestType.OUT, sector: 6144, out: many, indirect: true })).status, Status.OK);
    assert.deepEqual(readImage(image, 6144 * 512, 100 * 512), Buffer.concat(many));
  });

  test('a request with seg_max data segments completes (indirect table longer than the 128-entry ring)', async () => {
    // The daemon advertises seg_max = 254 (from its --queue-size 256), and a Linux guest on QEMU's default
    // 128-entry vhost-user-blk ring puts such requests in one indirect table of seg_max + 2 descriptors.
    const segMax = client.config.segMax;
    const many = Array.from({ length: segMax }, (_, i) => pattern(512, 400 + i));
    const w = await client.submit(0, { type: RequestType.OUT, sector: 8192, out: many, indirect: true });
    assert.equal(w.status, Status.OK, `write of ${segMax} segments: used len ${w.usedLen}, status ${w.status}`);
    const back = await client.submit(0, { type: RequestType.IN, sector: 8192, inLengths: Array(segMax).fill(512), indirect: true });
    assert.equal(back.status, Status.OK);
    assert.deepEqual(Buffer.concat(back.data), Buffer.concat(many));
  });

  test('flush succeeds and GET_ID returns the serial', async () => {
    await client.flush();
    assert.equal(await client.getId(), SERIAL);
    const raw = await client.submit(0, { type: RequestType.GET_ID, inLengths: [20] });
    assert.equal(raw.status, Status.OK);
    assert.equal(raw.usedLen, 21);
    assert.equal(raw.data[0].subarray(0, SERIAL.length).toString(), SERIAL);
  });

  test('bad requests fail cleanly: past the end (IOERR), unknown type (UNSUPP), partial sector (IOERR)', async () => {
    const cap = client.config.capacitySectors;
    await assert.rejects(client.read(cap - 1, 1024), (e: unknown) => e instanceof BlkRequestError && e.status === Status.IOERR && /IOERR/.test(e.message));
    await assert.rejects(client.write(cap, Buffer.alloc(512)), /IOERR/);
    const past = await client.submit(0, { type: RequestType.IN, sector: cap, inLengths: [512] });
    assert.equal(past.status, Status.IOERR);
    const huge = await client.submit(0, { type: RequestType.IN, sector: 2n ** 63n, inLengths: [512] });
    assert.equal(huge.status, Status.IOERR, 'a sector number near 2^64 does not wrap around');
    const unknown = await client.submit(0, { type: 99, inLengths: [512] });
    assert.equal(unknown.status, Status.UNSUPP);
    const partial = await client.submit(0, { type: RequestType.IN, sector: 0, inLengths: [100] });
    assert.equal(partial.status, Status.IOERR);
    assert.notEqual(partial.status, STATUS_NOT_WRITTEN);
    // And the queue still serves good requests.
    assert.deepEqual(await client.read(0, 4096), pattern(64 * 1024, 1).subarray(0, 4096));
  });

  test('many concurrent requests (more than the ring holds) all complete correctly', async () => {
    const n = 600;
    const base = 16384;
    await Promise.all(Array.from({ length: n }, (_, i) => client.write(base + i * 8, pattern(4096, 1000 + i))));
    const reads = await Promise.all(Array.from({ length: n }, (_, i) => client.read(base + i * 8, 4096)));
    reads.forEach((r, i) => assert.ok(r.equals(pattern(4096, 1000 + i)), `read ${i}`));
    assert.equal(client.outstandingRequests, 0);
    assert.deepEqual(client.anomalies, []);
  });

  test('the back-end signals the call eventfd on completions', async () => {
    client.callSignals(0);
    await client.write(64, pattern(512, 5));
    let signals = 0n;
    for (let i = 0; i < 100 && signals === 0n; i++) {
      signals = client.callSignals(0);
      if (signals === 0n) await sleep(10);
    }
    assert.ok(signals > 0n, 'call eventfd was signalled');
  });

  test('stopQueue returns the avail index; a stopped ring is not served; restartQueue resumes it', async () => {
    await client.write(128, pattern(4096, 11));
    const base = await client.stopQueue(0);
    assert.equal(base, client.ring(0).availIdx, 'GET_VRING_BASE reports every chain made available');
    assert.equal(client.isRunning(0), false);
    // Made available while stopped: must wait for the restart.
    let done = false;
    const pending = client.write(136, pattern(4096, 12)).then(() => { done = true; });
    await sleep(100);
    assert.equal(done, false, 'a stopped ring must not be processed');
    await client.restartQueue(0, base);
    await pending;
    assert.deepEqual(await client.read(128, 8192), Buffer.concat([pattern(4096, 11), pattern(4096, 12)]));
    // A second stop/restart cycle with nothing pending.
    const base2 = await client.stopQueue(0);
    assert.equal(base2, client.ring(0).availIdx);
    await client.restartQueue(0, base2);
    await client.flush();
  });

  test('disconnect and reconnect: the daemon listens again and the data is still there', async () => {
    await client.write(256, pattern(4096, 21));
    await client.close();
    client = await connectClient(daemon.socket);
    assert.deepEqual(await client.read(256, 4096), pattern(4096, 21));
    assert.deepEqual(await client.read(0, 4096), pattern(64 * 1024, 1).subarray(0, 4096));
    // An abrupt disconnect (no GET_VRING_BASE) with requests in flight, then another reconnect.
    const inflight = Array.from({ length: 64 }, (_, i) => client.read(i * 8, 4096).catch(() => null));
    await client.close({ graceful: false });
    await Promise.all(inflight);
    client = await connectClient(daemon.socket);
    assert.deepEqual(await client.read(256, 4096), pattern(4096, 21));
    assert.equal(daemon.proc.exitCode, null, 'daemon still running');
  });

  test('without EVENT_IDX and INDIRECT_DESC, and with a tiny ring, I/O still works', async () => {
    await client.close();
    client = await connectClient(daemon.socket, { eventIdx: false, indirect: false, queueSize: 4, memoryBytes: 4 * MiB });
    assert.equal(client.hasFeature(Feature.RING_EVENT_IDX), false);
    assert.equal(client.hasFeature(Feature.RING_INDIRECT_DESC), false);
    const writes = Array.from({ length: 40 }, (_, i) => client.write(32768 - 40 * 8 + i * 8, pattern(4096, 500 + i)));
    await Promise.all(writes);
    const reads = await Promise.all(Array.from({ length: 40 }, (_, i) => client.read(32768 - 40 * 8 + i * 8, 4096)));
    reads.forEach((r, i) => assert.ok(r.equals(pattern(4096, 500 + i)), `read ${i}`));
    client.callSignals(0);
    await client.flush();
    let signals = 0n;
    for (let i = 0; i < 100 && signals === 0n; i++) {
      signals = client.callSignals(0);
      if (signals === 0n) await sleep(10);
    }
    assert.ok(signals > 0n, 'call eventfd signalled without EVENT_IDX');
    assert.deepEqual(client.anomalies, []);
  });
});

describe('null backend daemon (1 GiB, 2 queues) through the front-end', { timeout: 30_000 }, () => {
  let dir: string;
  let daemon: Daemon;
  let client: VhostUserBlkClient;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vblk-fe-null-'));
    daemon = await startDaemon(dir, ['--backend', 'null', '--size', '1G', '--num-queues', '2']);
    client = await connectClient(daemon.socket, { numQueues: 2 });
  });

  after(async () => {
    await client?.close();
    if (daemon) {
      const code = await stopDaemon(daemon);
      assert.equal(code, 0, `daemon exit code (log:\n${daemon.log.join('')})`);
    }
    rmSync(dir, { recursive: true, force: true });
  });

  test('capacity and queue count', () => {
    assert.equal(client.config.capacityBytes, 2 ** 30);
    assert.equal(client.config.numQueues, 2);
    assert.equal(client.maxQueues, 2);
    assert.equal(client.numQueues, 2);
  });

  test('reads, writes and flushes complete OK on both queues', async () => {
    const last = client.config.capacitySectors - 8;
    for (const q of [0, 1]) {
      await client.write(0, pattern(4096, q), q);
      await client.write(last, pattern(4096, q + 10), q);
      assert.equal((await client.read(0, 4096, q)).length, 4096);
      assert.equal((await client.read(last, 4096, q)).length, 4096);
      await client.flush(q);
      assert.equal(await client.getId(q), 'vhost-blk-null');
    }
    const both = await Promise.all(Array.from({ length: 400 }, (_, i) => client.submit(i % 2, { type: RequestType.IN, sector: i * 2048, inLengths: [MiB] })));
    for (const r of both) {
      assert.equal(r.status, Status.OK);
      assert.equal(r.usedLen, MiB + 1);
    }
    await assert.rejects(client.read(client.config.capacitySectors, 512, 1), /IOERR/);
    assert.deepEqual(client.anomalies, []);
  });
});
