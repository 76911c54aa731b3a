// The real daemon process serving PACKED virtqueues, driven through the front-end library (which drives
// packed rings as Linux does): many laps around the ring with direct, scatter-gather and indirect chains,
// out-of-order completions, GET/SET_VRING_BASE with the packed base layout, a device reset, two queues,
// both event suppression modes, and a malformed chain.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, mkdtempSync, openSync, rmSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VhostUserBlkClient, type ClientOptions } from '../../src/frontend/index.js';
import { Feature, RequestType, Status } from '../../src/blk/constants.js';
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../../src/virtqueue/queue.js';
import { decodePackedBase, encodePackedBase } from '../../src/virtqueue/packed.js';
import { MiB, connectClient, pattern, readImage, startDaemon, stopDaemon } from './daemon-process.js';

const IMAGE_BYTES = 16 * MiB;
const SECTORS = IMAGE_BYTES / 512;
/** What a fresh packed ring's vring base is: slot 0, both wrap counters 1. */
const FRESH = 0x80008000;

/** Writes `count` requests of assorted shapes (1..8 data segments, some indirect), `depth` at a time, then reads each back. */
async function writeAndVerify(client: VhostUserBlkClient, queue: number, count: number, depth: number, seed: number): Promise<void> {
  const jobs = Array.from({ length: count }, (_, i) => {
    const segs = 1 + ((i * 7 + seed) % 8);
    const sector = ((i * 97 + seed * 13) % (SECTORS / 64)) * 64; // 32 KiB slots: a request never spans two
    return { sector, data: Array.from({ length: segs }, (_, k) => pattern(512 * (1 + (k % 2)), seed * 1000 + i * 10 + k)), indirect: i % 3 === 0 };
  });
  // Requests in one batch write disjoint slots, so every read-back is deterministic.
  for (let at = 0; at < count; at += depth) {
    const batch = jobs.slice(at, at + depth).filter((j, k, all) => all.findIndex((o) => o.sector === j.sector) === k);
    const writes = await Promise.all(batch.map((j) => client.submit(queue, { type: RequestType.OUT, sector: j.sector, out: j.data, indirect: j.indirect })));
    for (const w of writes) assert.equal(w.status, Status.OK);
    const reads = await Promise.all(batch.map((j) => client.submit(queue, { type: RequestType.IN, sector: j.sector, inLengths: j.data.map((d) => d.length), indirect: !j.indirect })));
    reads.forEach((r, k) => {
      assert.equal(r.status, Status.OK);
      assert.equal(r.usedLen, batch[k].data.reduce((n, d) => n + d.length, 0) + 1);
      r.data.forEach((d, s) => assert.deepEqual(d, batch[k].data[s], `request ${at + k} segment ${s}`));
    });
  }
}

/** Runs `fn` with a fresh daemon on a fresh image and a packed client; the daemon must exit 0 and never find a ring broken. */
async function withPackedDaemon(opts: ClientOptions, daemonArgs: string[], fn: (client: VhostUserBlkClient, image: string) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'vblk-packed-'));
  const image = join(dir, 'disk.raw');
  closeSync(openSync(image, 'w'));
  truncateSync(image, IMAGE_BYTES);
  const daemon = await startDaemon(dir, ['--image', image, ...daemonArgs]);
  let client: VhostUserBlkClient | undefined;
  try {
    client = await connectClient(daemon.socket, { packed: true, ...opts });
    await fn(client, image);
  } finally {
    await client?.close();
    const code = await stopDaemon(daemon);
    assert.equal(code, 0, `daemon exit code (log:\n${daemon.log.join('')})`);
    assert.doesNotMatch(daemon.log.join(''), /ring is broken|internal error/, 'the daemon found no ring broken');
    rmSync(dir, { recursive: true, force: true });
  }
}

test('packed virtqueues: the daemon through the front-end, one connection, step by step', { timeout: 60_000 }, async (t) => {
  await withPackedDaemon({ numQueues: 2, queueSize: 64 }, ['--num-queues', '2'], async (client, image) => {
    await t.test('RING_PACKED, EVENT_IDX and INDIRECT_DESC are negotiated; the rings are packed', () => {
      for (const f of [Feature.RING_PACKED, Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC]) assert.ok(client.hasFeature(f), `feature bit ${f}`);
      assert.equal(client.packedRing(0).size, 64);
      assert.throws(() => client.ring(0), /packed ring/);
    });

    await t.test('hundreds of requests: many laps around a 64-slot ring, 16 in flight, direct and indirect', async () => {
      const ring = client.packedRing(0);
      await writeAndVerify(client, 0, 400, 16, 1);
      assert.equal(ring.freeCount, ring.size, 'every slot came back');
      assert.equal(ring.lastUsed, ring.nextAvail, 'the used position caught up with the avail one');
      assert.ok(client.callSignals(0) > 0n, 'the daemon interrupted the driver (EVENT_IDX, descriptor event mode)');
    });

    await t.test('the data lands in the image file', async () => {
      const data = pattern(64 * 1024, 77);
      await client.write(SECTORS - 128, data);
      await client.flush();
      assert.deepEqual(readImage(image, (SECTORS - 128) * 512, data.length), data);
    });

    await t.test('two packed queues at once', async () => {
      await Promise.all([writeAndVerify(client, 0, 64, 8, 2), writeAndVerify(client, 1, 64, 8, 3)]);
    });

    await t.test('GET_VRING_BASE returns both positions and wrap counters; SET_VRING_BASE resumes from them, in a lap with wrap counter 0', async () => {
      for (let round = 0; round < 6; round++) {
        const ring = client.packedRing(0);
        // Move the ring by an odd number of slots each round, so the stops land everywhere and in both laps.
        for (let i = 0; i < 7 + round; i++) await client.write(i * 8, pattern(512, round * 100 + i));
        const expected = encodePackedBase({ availIdx: ring.nextAvail, availWrap: ring.availWrap === 1, usedIdx: ring.lastUsed, usedWrap: ring.usedWrap === 1 });
        const base = await client.stopQueue(0);
        assert.equal(base, expected, `round ${round}: the device stopped where the driver stands (${JSON.stringify(decodePackedBase(base))})`);
        await client.restartQueue(0, base);
        const back = await client.read(0, 512);
        assert.deepEqual(back, pattern(512, round * 100));
      }
      const bases = new Set<boolean>();
      for (let i = 0; i < 20; i++) {
        await client.flush();
        bases.add(client.packedRing(0).availWrap === 0);
      }
      assert.ok(bases.has(true) && bases.has(false), 'the ring went through laps with both wrap counters');
    });

    await t.test('device reset: the rings restart from a fresh packed base (0x80008000) and I/O goes on', async () => {
      await client.reinitialize();
      assert.equal(client.packedRing(0).vringBase, FRESH);
      await writeAndVerify(client, 0, 40, 8, 4);
      assert.equal(decodePackedBase(await client.stopQueue(1)).availIdx, 0, 'queue 1 had no requests since the reset');
      await client.restartQueue(1, FRESH);
      await writeAndVerify(client, 1, 20, 4, 5);
    });

    await t.test('a malformed chain (a buffer outside guest memory) comes back with used len 0, and the queue goes on', async () => {
      const buf = client.allocDma(4096);
      try {
        const r = await client.submitRawChain(0, [
          { addr: buf.gpa, len: 16, flags: VIRTQ_DESC_F_NEXT },
          { addr: 2n ** 40n, len: 512, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT },
          { addr: buf.gpa + 16, len: 1, flags: VIRTQ_DESC_F_WRITE },
        ]);
        assert.equal(r.usedLen, 0);
      } finally {
        buf.free();
      }
      await writeAndVerify(client, 0, 16, 4, 6);
    });
  });
});

describe('packed virtqueues without EVENT_IDX (flag-only event suppression)', { timeout: 60_000 }, () => {
  test('I/O and call notifications work on a 16-slot packed ring', async () => {
    await withPackedDaemon({ eventIdx: false, queueSize: 16 }, [], async (client) => {
      assert.ok(client.hasFeature(Feature.RING_PACKED));
      assert.ok(!client.hasFeature(Feature.RING_EVENT_IDX));
      await writeAndVerify(client, 0, 120, 6, 7);
      assert.ok(client.callSignals(0) > 0n, 'the daemon interrupted the driver (ENABLE mode)');
    });
  });
});

describe('packed rings of any size (virtio 1.2 asks no power of two of them)', { timeout: 60_000 }, () => {
  for (const queueSize of [100, 13]) {
    test(`a ${queueSize}-slot packed ring serves many laps of chains, direct and indirect`, async () => {
      await withPackedDaemon({ queueSize }, [], async (client) => {
        // 120 requests of up to 10 slots each go round a 13-slot ring many times, wrapping mid-chain.
        await writeAndVerify(client, 0, 120, Math.max(1, Math.min(6, Math.floor(queueSize / 10))), 11);
      });
    });
  }
  test('split rings must still be a power of two: the front-end library refuses a 100-slot one', async () => {
    await assert.rejects(VhostUserBlkClient.connect('/nonexistent/socket', { queueSize: 100 }), /queueSize must be a power of two in 1\.\.32768, got 100/);
  });
});

describe('packed virtqueues across memory table changes (the worker rebuilds each ring from its vring base)', { timeout: 60_000 }, () => {
  test('ADD_MEM_REG / REM_MEM_REG while the ring stands mid-lap: I/O goes on where it was', async () => {
    const memory: ClientOptions = { queueSize: 16, memoryBytes: 40 * MiB, memoryRegions: [{ guestAddr: 0, offset: 0, size: 32 * MiB }], memoryMessages: 'add-mem-reg' };
    await withPackedDaemon(memory, [], async (client) => {
      const hot = { guestAddr: 16 * 1024 * MiB, offset: 36 * MiB, size: 4 * MiB };
      const ring = client.packedRing(0);
      const wraps = new Set<number>();
      for (let round = 0; round < 6; round++) {
        // An odd number of slots per round: the table changes find the ring at ever other slots, in both laps.
        await writeAndVerify(client, 0, 3 + round, 1, 10 + round);
        wraps.add(ring.availWrap);
        await client.addMemoryRegion(hot);
        await writeAndVerify(client, 0, 2, 2, 20 + round);
        await client.removeMemoryRegion(hot.guestAddr);
      }
      assert.equal(wraps.size, 2, 'the table changed in laps with both wrap counters');
      await writeAndVerify(client, 0, 10, 4, 30);
    });
  });
});
