/**
 * Unit tests for the split virtqueue device logic, with a tiny in-test "driver" playing the guest.
 *
 * Guest memory: ring-memory.ts (two regions with poisoned holes); the descriptor table sits at the end of
 * region A, so an index >= size would land in the hole.
 */

import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory, type MappedRegion } from "../../src/memory/guest-memory.js";
import { GuestAccess, HOLE, REGION_B, TAIL, makeRingMemory, poisonSum, type RingMemory } from "./ring-memory.js";
import {
  DescriptorChain,
  POP_BAD_CHAIN,
  POP_EMPTY,
  POP_RING_BROKEN,
  SplitQueue,
  VIRTQ_DESC_F_INDIRECT as INDIRECT,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as WRITE,
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_USED_F_NO_NOTIFY,
  type RingAddresses,
  type SplitQueueOptions,
} from "../../src/virtqueue/split.js";

const SIZE = 16;
const ADDRS: RingAddresses = { descAddr: HOLE - 16 * SIZE, availAddr: 0x0400, usedAddr: 0x0800 };
const ALL: SplitQueueOptions = { eventIdx: true, indirect: true };

/** The ring memory, poisoned with valid-looking split descriptors (flags 0: no NEXT). */
function makeMemory(): RingMemory {
  return makeRingMemory(0);
}

/** Plays the guest driver: writes descriptors and avail entries, reads back the used ring. */
class Driver extends GuestAccess {
  availIdx: number;
  usedSeen: number;
  constructor(
    mem: GuestMemory,
    readonly size: number,
    readonly addrs: RingAddresses,
    startIdx = 0,
  ) {
    super(mem);
    this.availIdx = startIdx;
    this.usedSeen = startIdx;
    this.w16(addrs.availAddr + 2, startIdx);
    this.w16(addrs.usedAddr + 2, startIdx);
  }
  /** Writes entry i of a descriptor table at `table`; `addrHi` sets the upper 32 address bits explicitly. */
  setDesc(table: number, i: number, addr: number, len: number, flags: number, next = 0, addrHi?: number): void {
    this.setDescWords(table, i, addr, len, flags, next, addrHi);
  }
  /** Writes entry i of the queue's own descriptor table. */
  desc(i: number, addr: number, len: number, flags: number, next = 0, addrHi?: number): void {
    this.setDesc(this.addrs.descAddr, i, addr, len, flags, next, addrHi);
  }
  /** Puts `head` in the next avail slot and publishes the new avail idx. */
  publish(head: number): void {
    this.w16(this.addrs.availAddr + 4 + 2 * (this.availIdx % this.size), head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.w16(this.addrs.availAddr + 2, this.availIdx);
  }
  setAvailIdx(v: number): void {
    this.availIdx = v & 0xffff;
    this.w16(this.addrs.availAddr + 2, this.availIdx);
  }
  setAvailFlags(v: number): void {
    this.w16(this.addrs.availAddr, v);
  }
  setUsedEvent(v: number): void {
    this.w16(this.addrs.availAddr + 4 + 2 * this.size, v & 0xffff);
  }
  usedIdx(): number {
    return this.r16(this.addrs.usedAddr + 2);
  }
  usedFlags(): number {
    return this.r16(this.addrs.usedAddr);
  }
  availEvent(): number {
    return this.r16(this.addrs.usedAddr + 4 + 8 * this.size);
  }
  /** Used elements published since the last call, in ring order. */
  takeUsed(): { id: number; len: number }[] {
    const out: { id: number; len: number }[] = [];
    const idx = this.usedIdx();
    while (this.usedSeen !== idx) {
      const e = this.addrs.usedAddr + 4 + 8 * (this.usedSeen % this.size);
      out.push({ id: this.r32(e), len: this.r32(e + 4) });
      this.usedSeen = (this.usedSeen + 1) & 0xffff;
    }
    return out;
  }
}

/** Fresh memory, driver and queue with the standard layout. */
function setup(opts: SplitQueueOptions = ALL, startIdx = 0): RingMemory & { drv: Driver; q: SplitQueue } {
  const s = makeMemory();
  const drv = new Driver(s.mem, SIZE, ADDRS, startIdx);
  const q = new SplitQueue(s.mem, SIZE, ADDRS, opts, startIdx);
  return { ...s, drv, q };
}

/** Reads the chain's buffers as plain objects for deepEqual. */
function bufs(c: DescriptorChain): { addr: number; len: number; w: number }[] {
  const out = [];
  for (let i = 0; i < c.count; i++) out.push({ addr: c.addr[i], len: c.len[i], w: c.writable[i] });
  return out;
}

describe("round trips", () => {
  test("3-descriptor virtio-blk style chain: header readable, data and status writable", () => {
    const { drv, q } = setup();
    drv.desc(3, REGION_B + 0x000, 16, NEXT, 7);
    drv.desc(7, REGION_B + 0x1000, 512, NEXT | WRITE, 1);
    drv.desc(1, REGION_B + 0x2000, 1, WRITE);
    assert.equal(q.hasAvailable(), false);
    drv.publish(3);
    assert.equal(q.hasAvailable(), true);

    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), 3);
    assert.equal(c.head, 3);
    assert.deepEqual(bufs(c), [
      { addr: REGION_B, len: 16, w: 0 },
      { addr: REGION_B + 0x1000, len: 512, w: 1 },
      { addr: REGION_B + 0x2000, len: 1, w: 1 },
    ]);
    assert.equal(q.lastAvailIdx, 1);
    assert.equal(q.popChain(c), POP_EMPTY);
    assert.equal(q.hasAvailable(), false);

    q.pushUsed(3, 513);
    assert.equal(q.usedIdx, 1);
    assert.equal(drv.usedIdx(), 1);
    assert.deepEqual(drv.takeUsed(), [{ id: 3, len: 513 }]);
  });

  test("64-bit buffer addresses are reassembled from both words", () => {
    // One region high up in the address space: 2^40 + something.
    const base = 2 ** 40;
    const bytes = new Uint8Array(0x10000);
    const mem = new GuestMemory([{ guestAddr: base, size: 0x10000, userAddr: 0, mmapOffset: 0, hostAddr: 0, bytes }]);
    const addrs = { descAddr: base, availAddr: base + 0x1000, usedAddr: base + 0x2000 };
    const drv = new Driver(mem, 4, addrs);
    const q = new SplitQueue(mem, 4, addrs, ALL, 0);
    drv.desc(0, base + 0x8000, 100, WRITE);
    drv.publish(0);
    const c = new DescriptorChain(4);
    assert.equal(q.popChain(c), 0);
    assert.deepEqual(bufs(c), [{ addr: base + 0x8000, len: 100, w: 1 }]);
  });

  test("indirect chain: one descriptor pointing at a table of three", () => {
    const { drv, q } = setup();
    const table = REGION_B + 0x8000;
    drv.setDesc(table, 0, REGION_B + 0x100, 16, NEXT, 2);
    drv.setDesc(table, 2, REGION_B + 0x1000, 4096, NEXT | WRITE, 1);
    drv.setDesc(table, 1, REGION_B + 0x3000, 1, WRITE);
    // WRITE on the descriptor that points at the table means nothing and must be ignored.
    drv.desc(5, table, 48, INDIRECT | WRITE);
    drv.publish(5);
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), 5);
    assert.deepEqual(bufs(c), [
      { addr: REGION_B + 0x100, len: 16, w: 0 },
      { addr: REGION_B + 0x1000, len: 4096, w: 1 },
      { addr: REGION_B + 0x3000, len: 1, w: 1 },
    ]);
    q.pushUsed(5, 4097);
    assert.deepEqual(drv.takeUsed(), [{ id: 5, len: 4097 }]);
  });

  test("indirect table at an unaligned address, after a direct prefix", () => {
    const { drv, q } = setup();
    const table = REGION_B + 0x8003; // the spec sets no alignment for indirect tables
    drv.setDesc(table, 0, REGION_B + 0x1000, 512, NEXT | WRITE, 1);
    drv.setDesc(table, 1, REGION_B + 0x3000, 1, WRITE);
    drv.desc(0, REGION_B + 0x100, 16, NEXT, 4);
    drv.desc(4, table, 32, INDIRECT);
    drv.publish(0);
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), 0);
    assert.deepEqual(bufs(c), [
      { addr: REGION_B + 0x100, len: 16, w: 0 },
      { addr: REGION_B + 0x1000, len: 512, w: 1 },
      { addr: REGION_B + 0x3000, len: 1, w: 1 },
    ]);
  });

  test("indirect table with as many entries as the queue size is accepted", () => {
    // QEMU sets seg_max = queue size - 2, so header + segments + status fill exactly `size` entries.
    const { drv, q } = setup();
    const table = REGION_B + 0x8000;
    for (let i = 0; i < SIZE; i++) drv.setDesc(table, i, REGION_B + 0x100 * i, 8, (i < SIZE - 1 ? NEXT : 0) | (i > 0 ? WRITE : 0), i + 1);
    drv.desc(2, table, 16 * SIZE, INDIRECT);
    drv.publish(2);
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), 2, q.lastError);
    assert.equal(c.count, SIZE);
  });

  test("batch of chains across the 16-bit index wrap, completed out of order", () => {
    const start = 65530;
    const { drv, q } = setup(ALL, start);
    assert.equal(q.lastAvailIdx, start);
    assert.equal(q.usedIdx, start);
    const c = new DescriptorChain(SIZE);
    let serial = 0;
    for (let round = 0; round < 6; round++) {
      // 5 chains x 3 descriptors = 15 of the 16 descriptors, reused every round.
      const expected: number[] = [];
      for (let k = 0; k < 5; k++) {
        const h = (3 * k + round) % SIZE;
        const d1 = (h + 1) % SIZE;
        const d2 = (h + 2) % SIZE;
        const tag = serial++;
        drv.desc(h, REGION_B + 0x100 * tag, 16, NEXT, d1);
        drv.desc(d1, REGION_B + 0x4000 + tag, 512, NEXT | WRITE, d2);
        drv.desc(d2, REGION_B + 0x8000 + tag, 1, WRITE);
        drv.publish(h);
        expected.push(h);
      }
      const got: number[] = [];
      for (;;) {
        const h = q.popChain(c);
        if (h === POP_EMPTY) break;
        assert.ok(h >= 0, q.lastError);
        assert.equal(c.count, 3);
        assert.equal(c.addr[0], REGION_B + 0x100 * (serial - 5 + got.length));
        got.push(h);
      }
      assert.deepEqual(got, expected);
      // Complete in reverse: the used ring records ids in completion order.
      for (let k = got.length - 1; k >= 0; k--) q.pushUsed(got[k], 1000 + k);
      assert.deepEqual(
        drv.takeUsed(),
        got.map((id, k) => ({ id, len: 1000 + k })).reverse(),
      );
    }
    assert.equal(q.lastAvailIdx, (start + 30) & 0xffff);
    assert.equal(q.lastAvailIdx, 24);
    assert.equal(q.usedIdx, 24);
    assert.equal(drv.usedIdx(), 24);
  });

  test("a completely full avail ring (size entries pending) is served", () => {
    const { drv, q } = setup(ALL, 65535 - 3);
    for (let i = 0; i < SIZE; i++) {
      drv.desc(i, REGION_B + 16 * i, 16, WRITE);
      drv.publish(i);
    }
    const c = new DescriptorChain(1);
    for (let i = 0; i < SIZE; i++) {
      assert.equal(q.popChain(c), i, q.lastError);
      q.pushUsed(i, i);
    }
    assert.equal(q.popChain(c), POP_EMPTY);
    assert.equal(q.broken, false);
    assert.equal(drv.takeUsed().length, SIZE);
  });

  test("pushUsed rejects a head outside the queue (caller bug, not guest input)", () => {
    const { q } = setup();
    assert.throws(() => q.pushUsed(SIZE, 0), RangeError);
    assert.throws(() => q.pushUsed(-1, 0), RangeError);
    assert.equal(q.usedIdx, 0);
  });
});

interface BadCase {
  name: string;
  /** Writes the chain (direct descriptors / tables) and returns the head to publish. */
  build(drv: Driver): number;
  /** What lastError must say, besides the head. */
  reason: RegExp;
  opts?: SplitQueueOptions;
  capacity?: number;
}

const T = REGION_B + 0x8000; // default indirect table address

const badCases: BadCase[] = [
  {
    name: "buffer entirely in the hole between regions",
    build: (d) => (d.desc(2, HOLE + 0x100, 16, 0), 2),
    reason: /descriptor 2: buffer \[0x10100, \+16\) is not inside guest memory/,
  },
  {
    name: "buffer straddling the end of region A into the hole",
    build: (d) => (d.desc(2, HOLE - 8, 16, 0), 2),
    reason: /descriptor 2: buffer .* not inside guest memory/,
  },
  {
    name: "buffer past the end of all memory",
    build: (d) => (d.desc(2, TAIL + 0x1000, 16, WRITE), 2),
    reason: /buffer .* not inside guest memory/,
  },
  {
    name: "buffer address beyond 2^53 (high word set)",
    build: (d) => (d.desc(2, REGION_B, 16, 0, 0, 0xffffffff), 2),
    reason: /buffer .* not inside guest memory/,
  },
  {
    name: "second buffer of a chain outside memory",
    build: (d) => (d.desc(0, REGION_B, 16, NEXT, 1), d.desc(1, HOLE, 16, WRITE), 0),
    reason: /descriptor 1: buffer/,
  },
  {
    name: "next >= queue size",
    build: (d) => (d.desc(4, REGION_B, 16, NEXT, SIZE), 4),
    reason: new RegExp(`descriptor 4: next ${SIZE} is not below queue size ${SIZE}`),
  },
  {
    name: "next = 0xffff",
    build: (d) => (d.desc(4, REGION_B, 16, NEXT, 0xffff), 4),
    reason: /next 65535 is not below queue size/,
  },
  {
    name: "chain loop",
    build: (d) => (d.desc(0, REGION_B, 16, NEXT, 1), d.desc(1, REGION_B + 16, 16, NEXT, 0), 0),
    reason: /more than 16 descriptors \(loop/,
  },
  {
    name: "self loop of writable descriptors",
    build: (d) => (d.desc(9, REGION_B, 16, NEXT | WRITE, 9), 9),
    reason: /more than 16 descriptors \(loop/,
  },
  {
    name: "chain longer than the DescriptorChain capacity",
    build: (d) => (d.desc(0, REGION_B, 16, NEXT, 1), d.desc(1, REGION_B, 16, NEXT | WRITE, 2), d.desc(2, REGION_B, 1, WRITE), 0),
    capacity: 2,
    reason: /more than 2 descriptors \(a loop, or longer than the chain capacity\)/,
  },
  {
    name: "readable descriptor after a writable one",
    build: (d) => (d.desc(0, REGION_B, 16, NEXT | WRITE, 1), d.desc(1, REGION_B, 16, 0), 0),
    reason: /descriptor 1 is device-readable but follows a device-writable one/,
  },
  {
    name: "INDIRECT without the feature negotiated",
    build: (d) => (d.setDesc(T, 0, REGION_B, 16, 0), d.desc(3, T, 16, INDIRECT), 3),
    opts: { eventIdx: true, indirect: false },
    reason: /descriptor 3 has INDIRECT but indirect descriptors were not negotiated/,
  },
  {
    name: "INDIRECT together with NEXT",
    build: (d) => (d.setDesc(T, 0, REGION_B, 16, 0), d.desc(3, T, 16, INDIRECT | NEXT, 4), d.desc(4, REGION_B, 1, WRITE), 3),
    reason: /descriptor 3 has both INDIRECT and NEXT/,
  },
  {
    name: "nested INDIRECT inside an indirect table",
    build: (d) => (d.setDesc(T, 0, T + 0x100, 16, INDIRECT), d.setDesc(T + 0x100, 0, REGION_B, 16, 0), d.desc(3, T, 16, INDIRECT), 3),
    reason: /indirect descriptor 0 has INDIRECT inside an indirect table/,
  },
  {
    name: "indirect table length 0",
    build: (d) => (d.desc(3, T, 0, INDIRECT), 3),
    reason: /indirect table length 0 is not a non-zero multiple of 16/,
  },
  {
    name: "indirect table length not a multiple of 16",
    build: (d) => (d.setDesc(T, 0, REGION_B, 16, 0), d.desc(3, T, 20, INDIRECT), 3),
    reason: /indirect table length 20 is not a non-zero multiple of 16/,
  },
  {
    name: "indirect table with more than 32768 entries",
    build: (d) => (d.desc(3, REGION_B, 32769 * 16, INDIRECT), 3),
    reason: /indirect table has 32769 entries, more than 32768/,
  },
  {
    name: "indirect table in the hole (poison there looks valid)",
    build: (d) => (d.desc(3, HOLE + 0x100, 32, INDIRECT), 3),
    reason: /indirect table \[0x10100, \+32\) is not wholly inside one guest memory region/,
  },
  {
    name: "indirect table straddling region A's end into the hole",
    build: (d) => (d.setDesc(HOLE - 16, 0, REGION_B, 16, 0), d.desc(3, HOLE - 16, 32, INDIRECT), 3),
    reason: /indirect table .* not wholly inside/,
  },
  {
    name: "indirect entry next >= table size (entry after the table is poison)",
    build: (d) => (d.setDesc(HOLE - 32, 0, REGION_B, 16, NEXT, 1), d.setDesc(HOLE - 32, 1, REGION_B, 16, NEXT, 2), d.desc(3, HOLE - 32, 32, INDIRECT), 3),
    reason: /indirect descriptor 1: next 2 is not below indirect table size 2/,
  },
  {
    name: "loop inside an indirect table",
    build: (d) => (d.setDesc(T, 0, REGION_B, 16, NEXT, 1), d.setDesc(T, 1, REGION_B, 16, NEXT, 0), d.desc(3, T, 32, INDIRECT), 3),
    capacity: 64,
    reason: /more than 64 descriptors \(a loop, or longer than the chain capacity\)/,
  },
  {
    name: "indirect table with more buffers than the chain capacity",
    build: (d) => {
      for (let i = 0; i <= SIZE; i++) d.setDesc(T, i, REGION_B, 8, i < SIZE ? NEXT : 0, i + 1);
      d.desc(3, T, 16 * (SIZE + 1), INDIRECT);
      return 3;
    },
    capacity: SIZE,
    reason: /more than 16 descriptors \(a loop, or longer than the chain capacity\)/,
  },
  {
    name: "indirect buffer outside memory",
    build: (d) => (d.setDesc(T, 0, REGION_B, 16, NEXT, 1), d.setDesc(T, 1, TAIL, 16, WRITE), d.desc(3, T, 32, INDIRECT), 3),
    reason: /indirect descriptor 1: buffer \[0x30000, \+16\) is not inside guest memory/,
  },
  {
    name: "readable after writable inside an indirect table",
    build: (d) => (d.setDesc(T, 0, REGION_B, 16, NEXT | WRITE, 1), d.setDesc(T, 1, REGION_B, 16, 0), d.desc(3, T, 32, INDIRECT), 3),
    reason: /indirect descriptor 1 is device-readable but follows a device-writable one/,
  },
  {
    name: "readable indirect entries after a writable direct prefix",
    build: (d) => (d.setDesc(T, 0, REGION_B, 16, 0), d.desc(0, REGION_B, 16, NEXT | WRITE, 3), d.desc(3, T, 16, INDIRECT), 0),
    reason: /indirect descriptor 0 is device-readable but follows a device-writable one/,
  },
];

describe("malformed chains give POP_BAD_CHAIN and the queue keeps serving", () => {
  for (const bc of badCases) {
    test(bc.name, () => {
      const { drv, q, backing } = setup(bc.opts ?? ALL, 100);
      const poison = poisonSum(backing);
      const head = bc.build(drv);
      drv.publish(head);
      const c = new DescriptorChain(bc.capacity ?? SIZE);
      assert.equal(q.popChain(c), POP_BAD_CHAIN, `expected BAD_CHAIN, lastError=${q.lastError}`);
      assert.equal(c.head, head);
      assert.equal(c.count, 0);
      assert.match(q.lastError, new RegExp(`head ${head}\\b`));
      assert.match(q.lastError, bc.reason);
      assert.equal(q.broken, false);
      assert.equal(q.lastAvailIdx, 101, "the bad entry must be consumed");

      // The caller returns the head with len 0, and the next good chain still works.
      q.pushUsed(c.head, 0);
      assert.deepEqual(drv.takeUsed(), [{ id: head, len: 0 }]);
      drv.desc(15, REGION_B + 0x40, 8, WRITE);
      drv.publish(15);
      assert.equal(q.popChain(c), 15, q.lastError);
      assert.deepEqual(bufs(c), [{ addr: REGION_B + 0x40, len: 8, w: 1 }]);
      assert.equal(poisonSum(backing), poison, "nothing may be written outside guest memory");
    });
  }
});

describe("corrupt rings give POP_RING_BROKEN and stop the queue", () => {
  test("avail idx jumps by more than the queue size", () => {
    const { drv, q } = setup(ALL, 65530);
    drv.desc(0, REGION_B, 16, WRITE);
    drv.setAvailIdx(65530 + SIZE + 1);
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), POP_RING_BROKEN);
    assert.equal(q.broken, true);
    assert.match(q.lastError, /avail idx 11 is 17 entries ahead of last avail idx 65530, more than queue size 16/);
    // Even after the guest "fixes" the index the queue stays stopped until it is re-created.
    drv.setAvailIdx(65531);
    assert.equal(q.popChain(c), POP_RING_BROKEN);
    assert.equal(q.hasAvailable(), false);
    assert.equal(q.lastAvailIdx, 65530);
  });

  test("avail idx moves backwards", () => {
    const { drv, q } = setup(ALL, 10);
    drv.setAvailIdx(9);
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), POP_RING_BROKEN);
    assert.equal(q.broken, true);
    assert.match(q.lastError, /65535 entries ahead/);
  });

  test("head index from the avail ring >= size (it would index poison)", () => {
    const { drv, q } = setup();
    drv.publish(SIZE);
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), POP_RING_BROKEN);
    assert.equal(q.broken, true);
    assert.match(q.lastError, /avail ring slot 0 holds head 16, not below queue size 16/);
    // Repair the ring completely: a queue that were not stopped would now serve head 0.
    drv.desc(0, REGION_B, 16, WRITE);
    drv.w16(ADDRS.availAddr + 4, 0);
    assert.equal(q.popChain(c), POP_RING_BROKEN);
    assert.equal(q.hasAvailable(), false);
  });
});

describe("notifications with EVENT_IDX", () => {
  test("shouldNotify follows used_event (vring_need_event), ignoring avail flags", () => {
    const { drv, q } = setup({ eventIdx: true, indirect: false });
    drv.setUsedEvent(1000); // far away: would not ask for an interrupt
    q.pushUsed(0, 0); // used idx 1
    assert.equal(q.shouldNotify(), true, "the first decision after (re)connect always notifies");

    drv.setUsedEvent(1); // interrupt once used idx moves past 1
    q.pushUsed(0, 0); // 2
    assert.equal(q.shouldNotify(), true);

    drv.setUsedEvent(5);
    q.pushUsed(0, 0); // 3
    assert.equal(q.shouldNotify(), false);
    q.pushUsed(0, 0); // 4
    q.pushUsed(0, 0); // 5
    assert.equal(q.shouldNotify(), false, "used idx 5 has not moved past used_event 5 yet");
    drv.setAvailFlags(VRING_AVAIL_F_NO_INTERRUPT); // must be ignored with EVENT_IDX
    q.pushUsed(0, 0); // 6
    assert.equal(q.shouldNotify(), true);
    assert.equal(q.shouldNotify(), false, "nothing new since the last decision");

    drv.setUsedEvent(2); // already behind
    q.pushUsed(0, 0);
    assert.equal(q.shouldNotify(), false);
  });

  test("vring_need_event across the 16-bit wrap", () => {
    const { drv, q } = setup({ eventIdx: true, indirect: false }, 65534);
    q.pushUsed(0, 0); // 65535
    assert.equal(q.shouldNotify(), true); // first decision
    drv.setUsedEvent(0);
    q.pushUsed(0, 0); // 0
    q.pushUsed(0, 0); // 1
    assert.equal(q.usedIdx, 1);
    assert.equal(q.shouldNotify(), true, "used idx went 65535 -> 1, stepping past used_event 0");
    drv.setUsedEvent(65535); // just behind: already signalled
    q.pushUsed(0, 0); // 2
    assert.equal(q.shouldNotify(), false);
  });

  test("enableNotifications writes avail_event and reports buffers that raced in", () => {
    const { drv, q } = setup({ eventIdx: true, indirect: false }, 300);
    drv.desc(0, REGION_B, 16, WRITE);
    drv.publish(0);
    drv.publish(0);
    const c = new DescriptorChain(SIZE);
    // The driver's kick decision for publishing one buffer when avail.idx is `idx` (virtio 1.2, 2.7.10).
    const driverKicks = (idx: number) => ((idx + 1 - drv.availEvent() - 1) & 0xffff) < 1;
    q.disableNotifications();
    assert.equal(drv.usedFlags(), 0, "EVENT_IDX does not use used.flags");
    assert.equal(drv.availEvent(), 299, "disable puts avail_event one behind the next index");
    assert.equal(driverKicks(300), false, "so the driver's next buffer does not kick");
    assert.equal(q.popChain(c), 0);
    assert.equal(q.popChain(c), 0);
    assert.equal(q.enableNotifications(), false);
    assert.equal(drv.availEvent(), 302);
    assert.equal(driverKicks(302), true, "after enable the driver's next buffer kicks");
    assert.equal(drv.usedFlags(), 0);

    // A buffer published while we were not watching: enable must say so.
    q.disableNotifications();
    drv.publish(0);
    assert.equal(q.enableNotifications(), true);
    assert.equal(drv.availEvent(), 302);
    assert.equal(q.popChain(c), 0);
    assert.equal(q.enableNotifications(), false);
    assert.equal(drv.availEvent(), 303);
  });
});

describe("notifications without EVENT_IDX", () => {
  test("shouldNotify respects VRING_AVAIL_F_NO_INTERRUPT", () => {
    const { drv, q } = setup({ eventIdx: false, indirect: false });
    drv.setUsedEvent(0); // must be ignored
    assert.equal(q.shouldNotify(), false, "nothing published yet");
    q.pushUsed(0, 0);
    assert.equal(q.shouldNotify(), true);
    drv.setAvailFlags(VRING_AVAIL_F_NO_INTERRUPT);
    q.pushUsed(0, 0);
    assert.equal(q.shouldNotify(), false);
    drv.setAvailFlags(0);
    assert.equal(q.shouldNotify(), false, "nothing new since the last decision");
    q.pushUsed(0, 0);
    assert.equal(q.shouldNotify(), true);
  });

  test("disable/enable toggle VRING_USED_F_NO_NOTIFY and leave avail_event alone", () => {
    const { drv, q } = setup({ eventIdx: false, indirect: false });
    drv.w16(ADDRS.usedAddr + 4 + 8 * SIZE, 0xbeef);
    q.disableNotifications();
    assert.equal(drv.usedFlags(), VRING_USED_F_NO_NOTIFY);
    assert.equal(q.enableNotifications(), false);
    assert.equal(drv.usedFlags(), 0);
    q.disableNotifications();
    drv.desc(0, REGION_B, 16, WRITE);
    drv.publish(0);
    assert.equal(q.enableNotifications(), true);
    assert.equal(drv.usedFlags(), 0);
    assert.equal(drv.availEvent(), 0xbeef);
  });
});

describe("construction", () => {
  test("rejects sizes that are not a power of two in 1..32768", () => {
    const { mem } = makeMemory();
    for (const size of [0, 3, 6, 100, 32769, 65536, 1.5, -1, NaN]) {
      assert.throws(() => new SplitQueue(mem, size, ADDRS, ALL, 0), { name: "RangeError", message: /power of two/ }, `size ${size}`);
    }
  });

  test("accepts the smallest and largest sizes", () => {
    const { mem } = makeMemory();
    assert.equal(new SplitQueue(mem, 1, { descAddr: 0, availAddr: 0x100, usedAddr: 0x200 }, ALL, 0).size, 1);
    const big = new GuestMemory([
      { guestAddr: 0, size: 0x100000, userAddr: 0, mmapOffset: 0, hostAddr: 0, bytes: new Uint8Array(0x100000) },
    ]);
    const addrs = { descAddr: 0, availAddr: 0x80000, usedAddr: 0x90000 };
    const q = new SplitQueue(big, 32768, addrs, ALL, 0);
    assert.equal(q.size, 32768);
    const drv = new Driver(big, 32768, addrs);
    drv.desc(32767, 0xf0000, 64, WRITE);
    drv.publish(32767);
    assert.equal(q.popChain(new DescriptorChain(4)), 32767);
  });

  test("rejects misaligned rings", () => {
    const { mem } = makeMemory();
    assert.throws(() => new SplitQueue(mem, SIZE, { ...ADDRS, descAddr: 0x1008 }, ALL, 0), /descriptor table at guest 0x1008 is not 16-byte aligned/);
    assert.throws(() => new SplitQueue(mem, SIZE, { ...ADDRS, availAddr: 0x401 }, ALL, 0), /avail ring at guest 0x401 is not 2-byte aligned/);
    assert.throws(() => new SplitQueue(mem, SIZE, { ...ADDRS, usedAddr: 0x802 }, ALL, 0), /used ring at guest 0x802 is not 4-byte aligned/);
  });

  test("rejects rings outside memory or spanning the hole", () => {
    const { mem } = makeMemory();
    const bad: [Partial<RingAddresses>, RegExp][] = [
      [{ descAddr: HOLE }, /descriptor table \[0x10000, 0x10100\) is not wholly inside one guest memory region/],
      [{ descAddr: 0x50000 }, /descriptor table .* not wholly inside/],
      [{ descAddr: HOLE - 0x80 }, /descriptor table \[0xff80, 0x10080\) is not wholly inside/],
      [{ availAddr: HOLE - 8 }, /avail ring .* not wholly inside/],
      [{ usedAddr: TAIL - 64 }, /used ring \[0x2ffc0, .* not wholly inside/],
      [{ usedAddr: -4 }, /used ring address -4 is not a valid guest physical address/],
    ];
    for (const [patch, re] of bad) {
      assert.throws(() => new SplitQueue(mem, SIZE, { ...ADDRS, ...patch }, ALL, 0), { name: "RangeError", message: re });
    }
  });

  test("rejects a ring split across two adjacent regions", () => {
    const mk = (guestAddr: number): MappedRegion => ({ guestAddr, size: 0x1000, userAddr: 0, mmapOffset: 0, hostAddr: 0, bytes: new Uint8Array(0x1000) });
    const mem = new GuestMemory([mk(0), mk(0x1000)]);
    const ok = { descAddr: 0x1000, availAddr: 0x1100, usedAddr: 0x1200 };
    assert.equal(new SplitQueue(mem, SIZE, ok, ALL, 0).size, SIZE);
    assert.throws(() => new SplitQueue(mem, SIZE, { ...ok, descAddr: 0xf80 }, ALL, 0), /descriptor table .* not wholly inside one guest memory region/);
  });

  test("the event fields only need to be mapped when EVENT_IDX is negotiated", () => {
    const { mem } = makeMemory();
    const availAddr = HOLE - (4 + 2 * SIZE); // ring[] ends exactly at the end of region A
    const addrs = { descAddr: 0, availAddr, usedAddr: 0x800 };
    assert.equal(new SplitQueue(mem, SIZE, addrs, { eventIdx: false, indirect: true }, 0).size, SIZE);
    assert.throws(() => new SplitQueue(mem, SIZE, addrs, { eventIdx: true, indirect: true }, 0), /avail ring .* not wholly inside/);
  });

  test("rejects a last avail index that is not a u16", () => {
    const { mem } = makeMemory();
    for (const v of [-1, 65536, 0.5]) assert.throws(() => new SplitQueue(mem, SIZE, ADDRS, ALL, v), /last avail index must be a u16/);
  });

  test("picks up used.idx from guest memory (reconnect) and lastAvailIdx from SET_VRING_BASE", () => {
    const { mem } = makeMemory();
    const drv = new Driver(mem, SIZE, ADDRS, 0);
    drv.w16(ADDRS.usedAddr + 2, 41);
    drv.setAvailIdx(43);
    drv.w16(ADDRS.availAddr + 4 + 2 * (42 % SIZE), 7);
    drv.desc(7, REGION_B, 16, WRITE);
    const q = new SplitQueue(mem, SIZE, ADDRS, ALL, 42);
    assert.equal(q.usedIdx, 41);
    assert.equal(q.lastAvailIdx, 42);
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), 7);
    q.pushUsed(7, 9);
    assert.equal(drv.usedIdx(), 42);
    assert.equal(drv.r32(ADDRS.usedAddr + 4 + 8 * (41 % SIZE)), 7);
  });

  test("DescriptorChain rejects a bad capacity", () => {
    assert.throws(() => new DescriptorChain(0), RangeError);
    assert.throws(() => new DescriptorChain(1.5), RangeError);
    assert.equal(new DescriptorChain(3).addr.length, 3);
  });
});

describe("indirect tables longer than the ring (Linux sizes requests by seg_max)", () => {
  test("an indirect table with more entries than the queue size is served when the chain capacity allows it", () => {
    const { drv, q } = setup();
    const n = SIZE * 2;
    for (let i = 0; i < n; i++) drv.setDesc(T, i, REGION_B, 8, i < n - 1 ? NEXT : 0, i + 1);
    drv.desc(3, T, 16 * n, INDIRECT);
    drv.publish(3);
    const c = new DescriptorChain(n);
    assert.equal(q.popChain(c), 3, q.lastError);
    assert.equal(c.count, n);
  });
});

describe("buffers across adjacent regions (hot-plugged DIMMs)", () => {
  test("a buffer running from one region into the next, adjacent in guest space, is accepted", () => {
    const backing = new ArrayBuffer(0x30000);
    // Two regions adjacent in guest space (0x0..0x10000, 0x10000..0x20000) but apart in the backing.
    const mem = new GuestMemory([
      { guestAddr: 0, size: 0x10000, userAddr: 0x7f0000000000, mmapOffset: 0, hostAddr: 0, bytes: new Uint8Array(backing, 0, 0x10000) },
      { guestAddr: 0x10000, size: 0x10000, userAddr: 0x7f0000100000, mmapOffset: 0, hostAddr: 0, bytes: new Uint8Array(backing, 0x20000, 0x10000) },
    ]);
    const addrs = { descAddr: 0x1000, availAddr: 0x2000, usedAddr: 0x3000 };
    const drv = new Driver(mem, SIZE, addrs, 0);
    const q = new SplitQueue(mem, SIZE, addrs, ALL, 0);
    drv.desc(0, 0xf000, 0x2000, 0); // [0xf000, 0x11000) crosses the seam at 0x10000
    drv.publish(0);
    const c = new DescriptorChain(SIZE);
    assert.equal(q.popChain(c), 0, q.lastError);
    assert.deepEqual(bufs(c), [{ addr: 0xf000, len: 0x2000, w: 0 }]);
    // GuestMemory reads and writes across the seam land in both backing pieces.
    const data = new Uint8Array(0x2000).map((_, i) => (i * 13) & 0xff);
    assert.equal(mem.write(0xf000, data), true);
    assert.deepEqual(new Uint8Array(backing, 0xf000, 0x1000), data.subarray(0, 0x1000));
    assert.deepEqual(new Uint8Array(backing, 0x20000, 0x1000), data.subarray(0x1000));
    const back = new Uint8Array(0x2000);
    assert.equal(mem.read(0xf000, back), true);
    assert.deepEqual(back, data);
  });

  test("a buffer across a hole is still refused, and nothing is written", () => {
    const { mem, backing } = makeMemory();
    const before = poisonSum(backing);
    assert.equal(mem.covers(HOLE - 8, 16), false);
    assert.equal(mem.write(HOLE - 8, new Uint8Array(16).fill(0xaa)), false);
    assert.equal(poisonSum(backing), before);
  });
});
