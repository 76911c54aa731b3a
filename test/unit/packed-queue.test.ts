/**
 * Unit tests for the packed virtqueue device logic (virtio 1.2, 2.8), with a small in-test driver
 * playing the guest the way Linux's virtio_ring.c does, and for how the vhost-user session carries a
 * packed ring's state in SET_VRING_BASE / GET_VRING_BASE.
 *
 * Guest memory: ring-memory.ts (two regions with poisoned holes); the ring sits at the end of region A.
 */

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import {
  DescriptorChain, POP_BAD_CHAIN, POP_EMPTY, POP_RING_BROKEN, VIRTQ_DESC_F_INDIRECT as INDIRECT, VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as WRITE, type QueueOptions, type RingAddresses,
} from "../../src/virtqueue/queue.js";
import {
  PackedQueue, RING_EVENT_FLAGS_DESC as DESC, RING_EVENT_FLAGS_DISABLE as DISABLE, RING_EVENT_FLAGS_ENABLE as ENABLE,
  VIRTQ_DESC_F_AVAIL as AVAIL, VIRTQ_DESC_F_USED as USED, decodePackedBase, encodePackedBase,
} from "../../src/virtqueue/packed.js";
import { VhostUserConnection } from "../../src/frontend/connection.js";
import { SessionTestDevice, startRing0, withSession as withDeviceSession } from "./session-harness.js";
import type { RingStart } from "../../src/vhost-user/backend.js";
import {
  FrontendRequest as R, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES, encodeVringState,
} from "../../src/vhost-user/messages.js";
import { HOLE, REGION_B, TAIL, makeRingMemory, poisonSum, type RingMemory } from "./ring-memory.js";
import { FRESH, PackedDriver, type GuestBuf, type RawDesc } from "./packed-driver.js";

const SIZE = 16;
const ADDRS: RingAddresses = { descAddr: HOLE - 16 * SIZE, availAddr: 0x0400, usedAddr: 0x0800 };
const ALL: QueueOptions = { eventIdx: true, indirect: true };
/** Default indirect table address. */
const T = REGION_B + 0x8000;

/** The ring memory, poisoned with descriptors that look available (AVAIL set, in a lap with wrap counter 1). */
function makeMemory(): RingMemory {
  return makeRingMemory(AVAIL);
}

/** Fresh memory, driver and queue with the standard layout, the ring starting at `state`. */
function setup(opts: QueueOptions = ALL, base = FRESH): RingMemory & { drv: PackedDriver; q: PackedQueue } {
  const s = makeMemory();
  const drv = new PackedDriver(s.mem, SIZE, ADDRS, decodePackedBase(base));
  const q = new PackedQueue(s.mem, SIZE, ADDRS, opts, base);
  return { ...s, drv, q };
}

/** Reads the chain's buffers as plain objects for deepEqual. */
function bufs(c: DescriptorChain): { addr: number; len: number; w: number }[] {
  const out = [];
  for (let i = 0; i < c.count; i++) out.push({ addr: c.addr[i], len: c.len[i], w: c.writable[i] });
  return out;
}

describe("packed: round trips", () => {
  test("3-descriptor virtio-blk chain: header readable, data and status writable", () => {
    const { drv, q } = setup();
    assert.equal(q.hasAvailable(), false);
    const id = drv.submit([{ addr: REGION_B, len: 16 }, { addr: REGION_B + 0x1000, len: 512, write: true }, { addr: REGION_B + 0x2000, len: 1, write: true }]);
    assert.equal(q.hasAvailable(), true);
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), id, q.lastError);
    assert.equal(c.head, id);
    assert.deepEqual(bufs(c), [
      { addr: REGION_B, len: 16, w: 0 },
      { addr: REGION_B + 0x1000, len: 512, w: 1 },
      { addr: REGION_B + 0x2000, len: 1, w: 1 },
    ]);
    assert.equal(q.lastAvailIdx, 3, "the chain took three ring slots");
    assert.equal(q.popChain(c), POP_EMPTY);
    assert.equal(q.hasAvailable(), false);
    assert.deepEqual(drv.takeUsed(), [], "nothing is used before pushUsed");

    q.pushUsed(id, 513);
    assert.equal(q.usedIdx, 3, "the used position skips the whole chain");
    assert.equal(drv.flagsAt(0), AVAIL | USED | WRITE, "used flags: AVAIL = USED = wrap counter 1, WRITE as bytes were written");
    assert.deepEqual(drv.takeUsed(), [{ id, len: 513 }]);
    const empty = drv.submit([{ addr: REGION_B, len: 1, write: true }]);
    assert.equal(q.popChain(c), empty);
    q.pushUsed(empty, 0);
    assert.equal(drv.flagsAt(3), AVAIL | USED, "no WRITE flag when nothing was written");
    assert.deepEqual(drv.takeUsed(), [{ id: empty, len: 0 }]);
  });

  test("64-bit buffer addresses are reassembled from both words", () => {
    const base = 2 ** 40;
    const bytes = new Uint8Array(0x10000);
    const mem = new GuestMemory([{ guestAddr: base, size: 0x10000, userAddr: 0, mmapOffset: 0, hostAddr: 0, bytes }]);
    const addrs = { descAddr: base, availAddr: base + 0x1000, usedAddr: base + 0x2000 };
    const drv = new PackedDriver(mem, 4, addrs);
    const q = new PackedQueue(mem, 4, addrs, ALL, FRESH);
    const id = drv.submit([{ addr: base + 0x8000, len: 100, write: true }]);
    const c = new DescriptorChain(4);
    assert.equal(q.popChain(c), id, q.lastError);
    assert.deepEqual(bufs(c), [{ addr: base + 0x8000, len: 100, w: 1 }]);
  });

  test("the buffer id comes from the LAST descriptor of a chain", () => {
    const { drv, q } = setup();
    // Only the last descriptor carries the id (the others hold garbage the device must ignore).
    drv.publishRaw([{ addr: REGION_B, len: 16, flags: NEXT }, { addr: REGION_B + 16, len: 1, flags: WRITE }], 9);
    drv.setDesc(ADDRS.descAddr, 0, { addr: REGION_B, len: 16, flags: NEXT | AVAIL }, 0xbeef);
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), 9, q.lastError);
    q.pushUsed(9, 1);
    assert.deepEqual(drv.takeUsed(), [{ id: 9, len: 1 }]);
  });

  test("a chain is not taken before its first descriptor is made available (it is published last)", () => {
    const { drv, q } = setup();
    drv.submit([{ addr: REGION_B, len: 16 }, { addr: REGION_B + 16, len: 1, write: true }]);
    const headFlags = drv.flagsAt(0);
    drv.w16(ADDRS.descAddr + 14, 0); // as if the driver had not written the head yet
    const c = new DescriptorChain(SIZE);
    assert.equal(q.hasAvailable(), false);
    assert.equal(q.popChain(c), POP_EMPTY);
    drv.w16(ADDRS.descAddr + 14, headFlags);
    assert.equal(q.popChain(c), 0, q.lastError);
    assert.equal(c.count, 2);
  });
});

describe("packed: wrap-around and wrap counters", () => {
  for (const size of [16, 10]) {
    test(`chains crossing the ring end, many laps, completed out of order (size ${size}${size & (size - 1) ? ", not a power of two" : ""})`, () => {
      const { mem } = makeMemory();
      const addrs = { ...ADDRS, descAddr: HOLE - 16 * size };
      const drv = new PackedDriver(mem, size, addrs);
      const q = new PackedQueue(mem, size, addrs, ALL, FRESH);
      const c = new DescriptorChain(size);
      let serial = 0;
      let slotsDone = 0;
      for (let round = 0; round < 12; round++) {
        // Chains of 1, 2 and 3 slots (6 of the ring's slots), so chain ends land everywhere, across the ring end too.
        const ids: number[] = [];
        for (const len of [3, 1, 2]) {
          const tag = serial++;
          const chain: GuestBuf[] = [{ addr: REGION_B + 0x100 * tag, len: 16 }];
          for (let k = 1; k < len; k++) chain.push({ addr: REGION_B + 0x8000 + tag, len: k, write: true });
          ids.push(drv.submit(chain));
        }
        const got: number[] = [];
        for (;;) {
          const id = q.popChain(c);
          if (id === POP_EMPTY) break;
          assert.ok(id >= 0, q.lastError);
          assert.equal(c.addr[0], REGION_B + 0x100 * (serial - 3 + got.length), "chains come out in ring order");
          got.push(id);
        }
        assert.deepEqual(got, ids);
        // Complete in reverse: the used descriptors record ids in completion order.
        for (let k = got.length - 1; k >= 0; k--) q.pushUsed(got[k], 1000 + k);
        assert.deepEqual(drv.takeUsed(), got.map((id, k) => ({ id, len: 1000 + k })).reverse());
        slotsDone += 6;
        const laps = Math.floor(slotsDone / size);
        assert.equal(q.lastAvailIdx, slotsDone % size);
        assert.equal(q.usedIdx, slotsDone % size);
        assert.equal(q.availWrapCounter, laps % 2 === 0, `avail wrap counter after ${slotsDone} slots`);
        assert.equal(q.usedWrapCounter, laps % 2 === 0, `used wrap counter after ${slotsDone} slots`);
        assert.equal(drv.lastUsed, q.usedIdx, "driver and device agree on the used position");
      }
      assert.equal(q.broken, false);
    });
  }

  test("a full ring (every slot available) is served, then the next lap with wrap counter 0", () => {
    const { drv, q } = setup();
    const c = new DescriptorChain(1);
    for (let lap = 0; lap < 3; lap++) {
      const ids = [];
      for (let i = 0; i < SIZE; i++) ids.push(drv.submit([{ addr: REGION_B + 16 * i, len: 16, write: true }]));
      for (const id of ids) assert.equal(q.popChain(c), id, q.lastError);
      assert.equal(q.popChain(c), POP_EMPTY);
      for (const id of ids) q.pushUsed(id, id);
      assert.equal(drv.takeUsed().length, SIZE);
      assert.equal(q.availWrapCounter, lap % 2 === 1);
      // In a lap with wrap counter 0 the used flags are AVAIL = USED = 0.
      assert.equal(drv.flagsAt(5) & (AVAIL | USED), lap % 2 === 0 ? AVAIL | USED : 0);
    }
  });

  test("out-of-order completion: used descriptors are written at the device's used position, each skipping its chain", () => {
    const { drv, q } = setup();
    const a = drv.submit([{ addr: REGION_B, len: 1, write: true }]); // slot 0
    const b = drv.submit([{ addr: REGION_B, len: 16 }, { addr: REGION_B + 16, len: 1, write: true }]); // slots 1-2
    const d = drv.submit([{ addr: REGION_B, len: 16 }, { addr: REGION_B + 32, len: 8, write: true }, { addr: REGION_B + 48, len: 1, write: true }]); // 3-5
    const c = new DescriptorChain(SIZE);
    assert.deepEqual([q.popChain(c), q.popChain(c), q.popChain(c)], [a, b, d]);
    q.pushUsed(d, 9); // written at slot 0, next used slot 3
    assert.equal(q.usedIdx, 3);
    q.pushUsed(a, 1); // slot 3, next 4
    assert.equal(q.usedIdx, 4);
    q.pushUsed(b, 1); // slot 4, next 6
    assert.equal(q.usedIdx, 6);
    assert.deepEqual(drv.takeUsed(), [{ id: d, len: 9 }, { id: a, len: 1 }, { id: b, len: 1 }]);
    assert.equal(q.usedIdx, q.lastAvailIdx, "every consumed slot was handed back");
  });

  test("an id comes back free after completion and may be reused at once", () => {
    const { drv, q } = setup();
    const c = new DescriptorChain(SIZE);
    for (let i = 0; i < 40; i++) {
      drv.publishRaw([{ addr: REGION_B, len: 1, flags: WRITE }], 7);
      assert.equal(q.popChain(c), 7, q.lastError);
      q.pushUsed(7, 1);
      assert.deepEqual(drv.takeUsed(), [{ id: 7, len: 1 }]);
    }
  });

  test("pushUsed rejects an id that is not in flight (caller bug, not guest input)", () => {
    const { drv, q } = setup();
    assert.throws(() => q.pushUsed(0, 0), /buffer id 0 is not in flight/);
    assert.throws(() => q.pushUsed(SIZE, 0), RangeError);
    assert.throws(() => q.pushUsed(-1, 0), RangeError);
    const id = drv.submit([{ addr: REGION_B, len: 1, write: true }]);
    assert.equal(q.popChain(new DescriptorChain(SIZE)), id);
    q.pushUsed(id, 1);
    assert.throws(() => q.pushUsed(id, 1), RangeError, "a second completion of the same id");
    assert.equal(q.usedIdx, 1);
  });
});

describe("packed: indirect descriptors", () => {
  test("one INDIRECT descriptor pointing at a table of three takes one ring slot", () => {
    const { drv, q } = setup();
    // WRITE on the descriptor that points at the table means nothing and must be ignored (2.8.19).
    const id = drv.submitIndirect(T, [{ addr: REGION_B + 0x100, len: 16 }, { addr: REGION_B + 0x1000, len: 4096, write: true }, { addr: REGION_B + 0x3000, len: 1, write: true }], WRITE);
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), id, q.lastError);
    assert.deepEqual(bufs(c), [
      { addr: REGION_B + 0x100, len: 16, w: 0 },
      { addr: REGION_B + 0x1000, len: 4096, w: 1 },
      { addr: REGION_B + 0x3000, len: 1, w: 1 },
    ]);
    assert.equal(q.lastAvailIdx, 1);
    q.pushUsed(id, 4097);
    assert.equal(q.usedIdx, 1);
    assert.deepEqual(drv.takeUsed(), [{ id, len: 4097 }]);
  });

  test("the table is read whole and in order: NEXT and ids inside it are ignored", () => {
    const { drv, q } = setup();
    drv.setDesc(T, 0, { addr: REGION_B + 0x100, len: 16, flags: NEXT }, 77);
    drv.setDesc(T, 1, { addr: REGION_B + 0x200, len: 512, flags: WRITE }, 0xffff); // no NEXT, yet entry 2 still counts
    drv.setDesc(T, 2, { addr: REGION_B + 0x300, len: 1, flags: WRITE | NEXT }, 3);
    drv.publishRaw([{ addr: T, len: 48, flags: INDIRECT }], 2);
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), 2, q.lastError);
    assert.deepEqual(bufs(c).map((b) => b.addr), [REGION_B + 0x100, REGION_B + 0x200, REGION_B + 0x300]);
  });

  test("indirect table at an unaligned address, after a direct prefix, across the ring end", () => {
    const { drv, q } = setup(ALL, encodePackedBase({ availIdx: SIZE - 1, availWrap: true, usedIdx: SIZE - 1, usedWrap: true }));
    const table = REGION_B + 0x8003; // the spec sets no alignment for indirect tables
    drv.setDesc(table, 0, { addr: REGION_B + 0x1000, len: 512, flags: WRITE }, 0);
    drv.setDesc(table, 1, { addr: REGION_B + 0x3000, len: 1, flags: WRITE }, 0);
    drv.publishRaw([{ addr: REGION_B + 0x100, len: 16, flags: NEXT }, { addr: table, len: 32, flags: INDIRECT }], 4);
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), 4, q.lastError);
    assert.deepEqual(bufs(c), [
      { addr: REGION_B + 0x100, len: 16, w: 0 },
      { addr: REGION_B + 0x1000, len: 512, w: 1 },
      { addr: REGION_B + 0x3000, len: 1, w: 1 },
    ]);
    assert.equal(q.lastAvailIdx, 1);
    assert.equal(q.availWrapCounter, false, "the chain ran over the ring end");
    q.pushUsed(4, 513);
    assert.equal(q.usedIdx, 1);
    assert.equal(q.usedWrapCounter, false);
    assert.deepEqual(drv.takeUsed(), [{ id: 4, len: 513 }]);
  });

  test("an indirect table with more entries than the ring is served when the chain capacity allows it", () => {
    const { drv, q } = setup();
    const n = SIZE * 2;
    const id = drv.submitIndirect(T, Array.from({ length: n }, (_, i) => ({ addr: REGION_B + 8 * i, len: 8, write: i > 0 })));
    const c = new DescriptorChain(n);
    assert.equal(q.popChain(c), id, q.lastError);
    assert.equal(c.count, n);
  });
});

interface BadCase {
  name: string;
  /** Publishes the chain (id 5 unless it says otherwise); returns the ring slots it takes. */
  build(drv: PackedDriver): number;
  /** What lastError must say, given the ring slot of the chain's first descriptor. */
  reason: (first: number) => RegExp;
  opts?: QueueOptions;
  capacity?: number;
}

/** Publishes raw descriptors as buffer 5 and returns how many slots they take. */
function raw(drv: PackedDriver, descs: RawDesc[]): number {
  drv.publishRaw(descs, 5);
  return descs.length;
}

/** Slot k of a chain starting at `first`, in a ring of SIZE. */
const slot = (first: number, k: number) => (first + k) % SIZE;

const badCases: BadCase[] = [
  {
    name: "buffer entirely in the hole between regions",
    build: (d) => raw(d, [{ addr: HOLE + 0x100, len: 16, flags: 0 }]),
    reason: (f) => new RegExp(`descriptor ${f}: buffer \\[0x10100, \\+16\\) is not inside guest memory`),
  },
  {
    name: "buffer straddling the end of region A into the hole",
    build: (d) => raw(d, [{ addr: HOLE - 8, len: 16, flags: 0 }]),
    reason: () => /buffer \[0xfff8, \+16\) is not inside guest memory/,
  },
  {
    name: "buffer past the end of all memory",
    build: (d) => raw(d, [{ addr: TAIL + 0x1000, len: 16, flags: WRITE }]),
    reason: () => /buffer .* not inside guest memory/,
  },
  {
    name: "buffer address beyond 2^53 (high word set)",
    build: (d) => raw(d, [{ addr: REGION_B, len: 16, flags: 0, addrHi: 0xffffffff }]),
    reason: () => /buffer .* not inside guest memory/,
  },
  {
    name: "bad first descriptor of a 3-slot chain: the whole chain is still consumed",
    build: (d) => raw(d, [{ addr: HOLE, len: 16, flags: NEXT }, { addr: REGION_B, len: 8, flags: NEXT | WRITE }, { addr: REGION_B, len: 1, flags: WRITE }]),
    reason: (f) => new RegExp(`descriptor ${f}: buffer`),
  },
  {
    name: "second buffer of a chain outside memory (across the ring end)",
    build: (d) => raw(d, [{ addr: REGION_B, len: 16, flags: NEXT }, { addr: HOLE, len: 16, flags: WRITE }]),
    reason: (f) => new RegExp(`descriptor ${slot(f, 1)}: buffer`),
  },
  {
    name: "readable descriptor after a writable one",
    build: (d) => raw(d, [{ addr: REGION_B, len: 16, flags: NEXT | WRITE }, { addr: REGION_B, len: 16, flags: 0 }]),
    reason: (f) => new RegExp(`descriptor ${slot(f, 1)} is device-readable but follows a device-writable one`),
  },
  {
    name: "chain longer than the DescriptorChain capacity",
    build: (d) => raw(d, [{ addr: REGION_B, len: 16, flags: NEXT }, { addr: REGION_B, len: 16, flags: NEXT | WRITE }, { addr: REGION_B, len: 1, flags: WRITE }]),
    capacity: 2,
    reason: () => /more than 2 descriptors \(longer than the chain capacity\)/,
  },
  {
    name: "INDIRECT without the feature negotiated",
    build: (d) => (d.setDesc(T, 0, { addr: REGION_B, len: 16, flags: 0 }, 0), raw(d, [{ addr: T, len: 16, flags: INDIRECT }])),
    opts: { eventIdx: true, indirect: false },
    reason: (f) => new RegExp(`descriptor ${f} has INDIRECT but indirect descriptors were not negotiated`),
  },
  {
    name: "INDIRECT together with NEXT (the chain it continues into is consumed too)",
    build: (d) => (d.setDesc(T, 0, { addr: REGION_B, len: 16, flags: 0 }, 0), raw(d, [{ addr: T, len: 16, flags: INDIRECT | NEXT }, { addr: REGION_B, len: 1, flags: WRITE }])),
    reason: (f) => new RegExp(`descriptor ${f} has both INDIRECT and NEXT`),
  },
  {
    name: "nested INDIRECT inside an indirect table",
    build: (d) => (d.setDesc(T, 0, { addr: T + 0x100, len: 16, flags: INDIRECT }, 0), d.setDesc(T + 0x100, 0, { addr: REGION_B, len: 16, flags: 0 }, 0), raw(d, [{ addr: T, len: 16, flags: INDIRECT }])),
    reason: () => /indirect descriptor 0 has INDIRECT inside an indirect table/,
  },
  {
    name: "indirect table length 0",
    build: (d) => raw(d, [{ addr: T, len: 0, flags: INDIRECT }]),
    reason: (f) => new RegExp(`descriptor ${f}: indirect table length 0 is not a non-zero multiple of 16`),
  },
  {
    name: "indirect table length not a multiple of 16",
    build: (d) => raw(d, [{ addr: T, len: 20, flags: INDIRECT }]),
    reason: () => /indirect table length 20 is not a non-zero multiple of 16/,
  },
  {
    name: "indirect table with more than 32768 entries",
    build: (d) => raw(d, [{ addr: REGION_B, len: 32769 * 16, flags: INDIRECT }]),
    reason: () => /indirect table has 32769 entries, more than 32768/,
  },
  {
    name: "indirect table in the hole (poison there looks valid)",
    build: (d) => raw(d, [{ addr: HOLE + 0x100, len: 32, flags: INDIRECT }]),
    reason: () => /indirect table \[0x10100, \+32\) is not wholly inside one guest memory region/,
  },
  {
    name: "indirect table straddling region A's end into the hole",
    build: (d) => raw(d, [{ addr: HOLE - 16 * SIZE - 16, len: 32 + 16 * SIZE, flags: INDIRECT }]),
    reason: () => /indirect table .* not wholly inside/,
  },
  {
    name: "indirect buffer outside memory",
    build: (d) => (d.setDesc(T, 0, { addr: REGION_B, len: 16, flags: 0 }, 0), d.setDesc(T, 1, { addr: TAIL, len: 16, flags: WRITE }, 0), raw(d, [{ addr: T, len: 32, flags: INDIRECT }])),
    reason: () => /indirect descriptor 1: buffer \[0x30000, \+16\) is not inside guest memory/,
  },
  {
    name: "readable after writable inside an indirect table",
    build: (d) => (d.setDesc(T, 0, { addr: REGION_B, len: 16, flags: WRITE }, 0), d.setDesc(T, 1, { addr: REGION_B, len: 16, flags: 0 }, 0), raw(d, [{ addr: T, len: 32, flags: INDIRECT }])),
    reason: () => /indirect descriptor 1 is device-readable but follows a device-writable one/,
  },
  {
    name: "readable indirect entries after a writable direct prefix",
    build: (d) => (d.setDesc(T, 0, { addr: REGION_B, len: 16, flags: 0 }, 0), raw(d, [{ addr: REGION_B, len: 16, flags: NEXT | WRITE }, { addr: T, len: 16, flags: INDIRECT }])),
    reason: () => /indirect descriptor 0 is device-readable but follows a device-writable one/,
  },
  {
    name: "indirect table with more buffers than the chain capacity",
    build: (d) => {
      for (let i = 0; i <= SIZE; i++) d.setDesc(T, i, { addr: REGION_B, len: 8, flags: 0 }, 0);
      return raw(d, [{ addr: T, len: 16 * (SIZE + 1), flags: INDIRECT }]);
    },
    capacity: SIZE,
    reason: () => /more than 16 descriptors \(longer than the chain capacity\)/,
  },
];

describe("packed: malformed chains give POP_BAD_CHAIN, are consumed whole, and the queue keeps serving", () => {
  // Start two slots before the ring end, in a lap with wrap counter 0: multi-slot chains cross the end.
  const start = encodePackedBase({ availIdx: SIZE - 2, availWrap: false, usedIdx: SIZE - 2, usedWrap: false });
  for (const bc of badCases) {
    test(bc.name, () => {
      const { drv, q, backing } = setup(bc.opts ?? ALL, start);
      const poison = poisonSum(backing);
      const slots = bc.build(drv);
      const c = new DescriptorChain(bc.capacity ?? SIZE);
      assert.equal(q.popChain(c), POP_BAD_CHAIN, `expected BAD_CHAIN, lastError=${q.lastError}`);
      assert.equal(c.head, 5);
      assert.equal(c.count, 0);
      assert.match(q.lastError, new RegExp(`^buffer 5 at ring slot ${SIZE - 2}: `));
      assert.match(q.lastError, bc.reason(SIZE - 2));
      assert.equal(q.broken, false);
      assert.equal(q.lastAvailIdx, (SIZE - 2 + slots) % SIZE, "every slot of the bad chain must be consumed");

      // The caller returns the id with len 0; the used position skips the whole chain, and a good chain still works.
      q.pushUsed(c.head, 0);
      assert.deepEqual(drv.takeUsed(), [{ id: 5, len: 0 }]);
      assert.equal(q.usedIdx, q.lastAvailIdx);
      const id = drv.submit([{ addr: REGION_B + 0x40, len: 8, write: true }]);
      assert.equal(q.popChain(c), id, q.lastError);
      assert.deepEqual(bufs(c), [{ addr: REGION_B + 0x40, len: 8, w: 1 }]);
      assert.equal(poisonSum(backing), poison, "nothing may be written outside guest memory");
    });
  }
});

describe("packed: corrupt rings give POP_RING_BROKEN and stop the queue", () => {
  /** Pops once expecting a broken ring with `reason`, then checks the queue stays stopped. */
  function expectBroken(q: PackedQueue, reason: RegExp): void {
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), POP_RING_BROKEN, `expected RING_BROKEN, got ${q.lastError}`);
    assert.equal(q.broken, true);
    assert.match(q.lastError, reason);
    assert.equal(q.popChain(c), POP_RING_BROKEN);
    assert.equal(q.hasAvailable(), false);
  }

  for (const id of [SIZE, 0xffff]) {
    test(`buffer id ${id} is not below the queue size`, () => {
      const { drv, q } = setup();
      drv.publishRaw([{ addr: REGION_B, len: 16, flags: WRITE }], id);
      expectBroken(q, new RegExp(`chain at ring slot 0 has buffer id ${id}, not below queue size ${SIZE}`));
      assert.equal(q.lastAvailIdx, 0);
    });
  }

  test("a buffer id that is already in flight", () => {
    const { drv, q } = setup();
    drv.publishRaw([{ addr: REGION_B, len: 16, flags: WRITE }], 3);
    assert.equal(q.popChain(new DescriptorChain(SIZE)), 3);
    drv.publishRaw([{ addr: REGION_B, len: 16, flags: NEXT }, { addr: REGION_B, len: 1, flags: WRITE }], 3);
    expectBroken(q, /chain at ring slot 1 has buffer id 3, which is already in flight/);
    // The first request still completes normally.
    q.pushUsed(3, 1);
    assert.deepEqual(drv.takeUsed(), [{ id: 3, len: 1 }]);
  });

  test("a chain longer than the queue size (NEXT on every slot)", () => {
    const { drv, q } = setup();
    drv.publishRaw(Array.from({ length: SIZE }, () => ({ addr: REGION_B, len: 8, flags: NEXT })), 1);
    expectBroken(q, /chain at ring slot 0 is longer than the queue size 16/);
  });

  test("NEXT running into a slot the driver never made available", () => {
    const { drv, q } = setup(ALL, encodePackedBase({ availIdx: 4, availWrap: true, usedIdx: 4, usedWrap: true }));
    drv.publishRaw([{ addr: REGION_B, len: 8, flags: NEXT }], 1);
    expectBroken(q, /chain at ring slot 4: slot 5 follows a NEXT flag but the driver has not made it available/);
  });

  test("NEXT running into a slot still holding the previous lap's descriptor", () => {
    const { drv, q } = setup();
    const c = new DescriptorChain(SIZE);
    // Lap 1 (wrap 1) fills every slot; lap 2 (wrap 0) then publishes a chain whose NEXT runs into stale slot 1.
    for (let i = 0; i < SIZE; i++) {
      const id = drv.submit([{ addr: REGION_B, len: 8, write: true }]);
      assert.equal(q.popChain(c), id);
      q.pushUsed(id, 8);
    }
    drv.takeUsed();
    drv.publishRaw([{ addr: REGION_B, len: 8, flags: NEXT }], 1);
    expectBroken(q, /slot 1 follows a NEXT flag but the driver has not made it available/);
  });

  test("a chain in a slot the device still holds (the driver lapped the used position)", () => {
    const { drv, q } = setup();
    const c = new DescriptorChain(SIZE);
    // Every slot taken by two-slot chains and none returned; then the driver makes slot 0 available again
    // in the next lap, with a buffer id that is free.
    for (let i = 0; i < SIZE / 2; i++) {
      const id = drv.submit([{ addr: REGION_B, len: 8 }, { addr: REGION_B + 8, len: 8, write: true }]);
      assert.equal(q.popChain(c), id);
    }
    drv.setDesc(ADDRS.descAddr, 0, { addr: REGION_B, len: 8, flags: WRITE | USED }, SIZE / 2);
    assert.equal(q.hasAvailable(), true);
    expectBroken(q, /chain at ring slot 0 takes 1 slots while 16 are in flight, more than the queue size 16/);
    // What was taken still completes.
    q.pushUsed(0, 8);
    assert.deepEqual(drv.takeUsed(), [{ id: 0, len: 8 }]);
  });
});

/** Publishes, pops and completes `n` one-slot chains, one after the other, and lets the driver take them back. */
function completeOneSlotChains(drv: PackedDriver, q: PackedQueue, n: number): void {
  const c = new DescriptorChain(SIZE);
  for (let i = 0; i < n; i++) {
    const id = drv.submit([{ addr: REGION_B, len: 1, write: true }]);
    assert.equal(q.popChain(c), id);
    q.pushUsed(id, 1);
  }
  drv.takeUsed();
}

describe("packed: event suppression", () => {
  test("shouldNotify follows the driver area: DISABLE, ENABLE, and DESC with EVENT_IDX", () => {
    const { drv, q } = setup();
    const complete = (n: number) => completeOneSlotChains(drv, q, n);
    drv.setDriverEvent(0x8000 | 12, DESC); // far away: would not ask for an interrupt
    complete(1); // used position 1
    assert.equal(q.shouldNotify(), true, "the first decision after (re)connect always notifies");
    assert.equal(q.shouldNotify(), false, "nothing new since the last decision");

    drv.setDriverEvent(0, DISABLE);
    complete(2); // 3
    assert.equal(q.shouldNotify(), false);
    drv.setDriverEvent(0, ENABLE);
    complete(1); // 4
    assert.equal(q.shouldNotify(), true);

    drv.setDriverEvent(0x8000 | 6, DESC); // interrupt once the used descriptor at slot 6 (wrap 1) is written
    complete(1); // wrote slot 4
    assert.equal(q.shouldNotify(), false);
    complete(2); // wrote slots 5 and 6
    assert.equal(q.shouldNotify(), true);
    complete(1); // slot 7: past the event already signalled
    assert.equal(q.shouldNotify(), false);
  });

  test("DESC event offsets across the ring end: the wrap counter says which lap", () => {
    const base = encodePackedBase({ availIdx: 13, availWrap: true, usedIdx: 13, usedWrap: true });
    const { drv, q } = setup(ALL, base);
    const complete = (n: number) => completeOneSlotChains(drv, q, n);
    complete(1); // slot 13
    assert.equal(q.shouldNotify(), true, "first decision");
    drv.setDriverEvent(1, DESC); // slot 1 of the NEXT lap (wrap 0)
    complete(2); // slots 14, 15; now at slot 0, wrap 0
    assert.equal(q.usedWrapCounter, false);
    assert.equal(q.shouldNotify(), false, "slot 1 of the next lap is not reached yet");
    complete(1); // slot 0
    assert.equal(q.shouldNotify(), false);
    complete(1); // slot 1 (wrap 0): the event
    assert.equal(q.shouldNotify(), true);

    drv.setDriverEvent(0x8000 | 15, DESC); // slot 15 of a lap with wrap counter 1: the previous one, long passed
    complete(3); // slots 2-4 (wrap 0)
    assert.equal(q.shouldNotify(), false);
    complete(SIZE - 1); // slots 5-15 (wrap 0), then 0-3 of the next lap (wrap 1)
    assert.equal(q.usedWrapCounter, true);
    assert.equal(q.shouldNotify(), false, "slot 15 of this wrap-1 lap is not reached yet");
    complete(12); // slots 4-15 (wrap 1)
    assert.equal(q.shouldNotify(), true, "slot 15 with wrap counter 1 was written in this batch");
  });

  test("without EVENT_IDX a DESC mode counts as ENABLE, and DISABLE still holds", () => {
    const { drv, q } = setup({ eventIdx: false, indirect: false });
    const c = new DescriptorChain(SIZE);
    assert.equal(q.shouldNotify(), false, "nothing published yet");
    drv.setDriverEvent(0x8000 | 9, DESC);
    const id = drv.submit([{ addr: REGION_B, len: 1, write: true }]);
    assert.equal(q.popChain(c), id);
    q.pushUsed(id, 1);
    assert.equal(q.shouldNotify(), true);
    drv.setDriverEvent(0, DISABLE);
    drv.takeUsed();
    const id2 = drv.submit([{ addr: REGION_B, len: 1, write: true }]);
    assert.equal(q.popChain(c), id2);
    q.pushUsed(id2, 1);
    assert.equal(q.shouldNotify(), false);
  });

  test("with EVENT_IDX, enableNotifications asks for a kick at our next slot; disable writes DISABLE", () => {
    const { drv, q } = setup(ALL, encodePackedBase({ availIdx: 14, availWrap: true, usedIdx: 14, usedWrap: true }));
    const c = new DescriptorChain(SIZE);
    q.disableNotifications();
    assert.equal(drv.deviceEvent().flags, DISABLE);
    const a = drv.submit([{ addr: REGION_B, len: 16 }, { addr: REGION_B, len: 1, write: true }]); // slots 14, 15
    assert.equal(drv.needsKick(2), false, "no kick while disabled");
    assert.equal(q.popChain(c), a);
    assert.equal(q.enableNotifications(), false);
    assert.deepEqual(drv.deviceEvent(), { offWrap: 0, flags: DESC }, "slot 0 of the lap with wrap counter 0");
    drv.submit([{ addr: REGION_B, len: 1, write: true }]);
    assert.equal(drv.needsKick(1), true, "the driver's next buffer lands on the event slot: it kicks");

    // A buffer published while we were not watching: enable must say so.
    q.disableNotifications();
    assert.equal(q.enableNotifications(), true);
    assert.equal(q.popChain(c) >= 0, true, q.lastError);
    assert.equal(q.enableNotifications(), false);
    assert.deepEqual(drv.deviceEvent(), { offWrap: 1, flags: DESC });
  });

  test("without EVENT_IDX, enableNotifications writes ENABLE and leaves off_wrap alone", () => {
    const { drv, q } = setup({ eventIdx: false, indirect: true });
    drv.w16(ADDRS.usedAddr, 0xbeef);
    q.disableNotifications();
    assert.deepEqual(drv.deviceEvent(), { offWrap: 0xbeef, flags: DISABLE });
    assert.equal(q.enableNotifications(), false);
    assert.deepEqual(drv.deviceEvent(), { offWrap: 0xbeef, flags: ENABLE });
    drv.submit([{ addr: REGION_B, len: 1, write: true }]);
    assert.equal(drv.needsKick(1), true);
    q.disableNotifications();
    assert.equal(q.enableNotifications(), true);
  });
});

describe("packed: vring base (SET_VRING_BASE / GET_VRING_BASE layout)", () => {
  test("encoding: avail index bits 0-14, avail wrap bit 15, used index bits 16-30, used wrap bit 31", () => {
    assert.deepEqual(decodePackedBase(FRESH), { availIdx: 0, availWrap: true, usedIdx: 0, usedWrap: true });
    assert.equal(encodePackedBase({ availIdx: 0x1234, availWrap: false, usedIdx: 0x7fff, usedWrap: true }), 0xffff1234);
    assert.equal(encodePackedBase({ availIdx: 5, availWrap: true, usedIdx: 3, usedWrap: false }), 0x00038005);
    for (const v of [0, FRESH, 0x7fff7fff, 0xffffffff, 0x12348765]) assert.equal(encodePackedBase(decodePackedBase(v)), v);
  });

  test("a fresh queue reports the base it was given; after work it reports where it stands", () => {
    const { drv, q } = setup();
    assert.equal(q.vringBase, FRESH);
    const c = new DescriptorChain(SIZE);
    for (let i = 0; i < 7; i++) {
      const id = drv.submit([{ addr: REGION_B, len: 16 }, { addr: REGION_B, len: 1, write: true }]);
      assert.equal(q.popChain(c), id);
      if (i < 6) q.pushUsed(id, 1);
    }
    // 14 slots read in lap 1; 12 handed back.
    assert.equal(q.vringBase, encodePackedBase({ availIdx: 14, availWrap: true, usedIdx: 12, usedWrap: true }));
    q.pushUsed(6, 1);
    for (let i = 0; i < 2; i++) {
      drv.takeUsed();
      const id = drv.submit([{ addr: REGION_B, len: 16 }, { addr: REGION_B, len: 1, write: true }]);
      assert.equal(q.popChain(c), id);
      q.pushUsed(id, 1);
    }
    assert.equal(q.vringBase, 0x00020002, "slot 2 of the lap with wrap counter 0, on both sides");
  });

  test("a queue rebuilt from vringBase (GET then SET_VRING_BASE) carries on where the old one stopped", () => {
    const { mem, drv, q } = setup();
    const c = new DescriptorChain(SIZE);
    for (let i = 0; i < 11; i++) {
      const id = drv.submit([{ addr: REGION_B, len: 16 }, { addr: REGION_B, len: 1, write: true }]);
      assert.equal(q.popChain(c), id);
      q.pushUsed(id, 1);
      assert.deepEqual(drv.takeUsed(), [{ id, len: 1 }]);
    }
    const base = q.vringBase;
    assert.equal(base, 0x00060006, "22 slots: slot 6 of the second lap");
    const q2 = new PackedQueue(mem, SIZE, ADDRS, ALL, base);
    for (let i = 0; i < 20; i++) {
      const id = drv.submit([{ addr: REGION_B + i, len: 16 }, { addr: REGION_B, len: 1, write: true }]);
      assert.equal(q2.popChain(c), id, q2.lastError);
      assert.equal(c.addr[0], REGION_B + i);
      q2.pushUsed(id, 1);
      assert.deepEqual(drv.takeUsed(), [{ id, len: 1 }]);
    }
  });

  test("bases whose indices are not below the queue size, or that are not a u32, are refused", () => {
    const { mem } = makeMemory();
    for (const base of [encodePackedBase({ availIdx: SIZE, availWrap: true, usedIdx: 0, usedWrap: true }), encodePackedBase({ availIdx: 0, availWrap: true, usedIdx: 0x7fff, usedWrap: true })]) {
      assert.throws(() => new PackedQueue(mem, SIZE, ADDRS, ALL, base), { name: "RangeError", message: /must be below queue size 16/ });
    }
    for (const base of [-1, 2 ** 32, 1.5]) assert.throws(() => new PackedQueue(mem, SIZE, ADDRS, ALL, base), /packed vring base must be a u32/);
  });
});

describe("packed: construction", () => {
  test("any size in 1..32768 is accepted, power of two or not; others are refused", () => {
    const { mem } = makeMemory();
    for (const size of [1, 3, 100, 256]) assert.equal(new PackedQueue(mem, size, { descAddr: 0x1000, availAddr: 0x400, usedAddr: 0x800 }, ALL, FRESH).size, size);
    for (const size of [0, 32769, 1.5, -1, NaN]) {
      assert.throws(() => new PackedQueue(mem, size, ADDRS, ALL, FRESH), { name: "RangeError", message: /queue size must be an integer in 1..32768/ }, `size ${size}`);
    }
  });

  test("refuses misaligned ring parts", () => {
    const { mem } = makeMemory();
    assert.throws(() => new PackedQueue(mem, SIZE, { ...ADDRS, descAddr: 0x1008 }, ALL, FRESH), /descriptor ring at guest 0x1008 is not 16-byte aligned/);
    assert.throws(() => new PackedQueue(mem, SIZE, { ...ADDRS, availAddr: 0x402 }, ALL, FRESH), /driver event suppression area at guest 0x402 is not 4-byte aligned/);
    assert.throws(() => new PackedQueue(mem, SIZE, { ...ADDRS, usedAddr: 0x801 }, ALL, FRESH), /device event suppression area at guest 0x801 is not 4-byte aligned/);
  });

  test("refuses ring parts outside memory or spanning the hole", () => {
    const { mem } = makeMemory();
    const bad: [Partial<RingAddresses>, RegExp][] = [
      [{ descAddr: HOLE }, /descriptor ring \[0x10000, 0x10100\) is not wholly inside one guest memory region/],
      [{ descAddr: HOLE - 0x80 }, /descriptor ring \[0xff80, 0x10080\) is not wholly inside/],
      [{ availAddr: HOLE }, /driver event suppression area .* not wholly inside/],
      [{ usedAddr: TAIL }, /device event suppression area .* not wholly inside/],
      [{ usedAddr: -4 }, /device event suppression area address -4 is not a valid guest physical address/],
    ];
    for (const [patch, re] of bad) assert.throws(() => new PackedQueue(mem, SIZE, { ...ADDRS, ...patch }, ALL, FRESH), { name: "RangeError", message: re });
  });
});

/** The harness's recording device, offering VERSION_1 and RING_PACKED. */
class RecordingDevice extends SessionTestDevice {
  override readonly features = (1n << 32n) | (1n << 34n);
  override readonly protocolFeatures = 1n << BigInt(ProtocolFeature.REPLY_ACK);
}

describe("vhost-user session: packed vring base", () => {
  /** Runs `body` against a session with a RecordingDevice, negotiating `features` and a 1 MiB memory table. */
  function withSession(features: bigint, body: (conn: VhostUserConnection, dev: RecordingDevice) => Promise<void>): Promise<void> {
    const dev = new RecordingDevice();
    return withDeviceSession(dev, features | (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES)), dev.protocolFeatures, body);
  }

  /** Starts ring 0 (kick fd + enable) and returns what the device was given. */
  async function start(conn: VhostUserConnection, dev: RecordingDevice): Promise<RingStart> {
    await startRing0(conn);
    assert.equal(dev.starts.length, 1);
    return dev.starts[0];
  }

  test("with RING_PACKED, all 32 bits of SET_VRING_BASE reach the data plane and GET_VRING_BASE returns all 32", async () => {
    await withSession((1n << 32n) | (1n << 34n), async (conn, dev) => {
      await conn.request(R.SET_VRING_BASE, encodeVringState(0, FRESH), { needReply: true });
      const ring = await start(conn, dev);
      assert.equal(ring.packed, true);
      assert.equal(ring.lastAvailIdx, FRESH);
      assert.equal(ring.descUserAddr, 0x7000_0000_0000);
      dev.stopBase = 0x00058005;
      const reply = await conn.request(R.GET_VRING_BASE, encodeVringState(0, 0), { expectReply: true });
      assert.equal(reply.readUInt32LE(0), 0);
      assert.equal(reply.readUInt32LE(4), 0x00058005);
    });
  });

  test("without RING_PACKED, a base that does not fit 16 bits is refused and the ring is split", async () => {
    await withSession(1n << 32n, async (conn, dev) => {
      await assert.rejects(conn.request(R.SET_VRING_BASE, encodeVringState(0, FRESH), { needReply: true }), /refused/);
      await conn.request(R.SET_VRING_BASE, encodeVringState(0, 0x8000), { needReply: true });
      const ring = await start(conn, dev);
      assert.equal(ring.packed, false);
      assert.equal(ring.lastAvailIdx, 0x8000);
    });
  });
});
