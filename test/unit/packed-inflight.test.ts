// Inflight I/O tracking for PACKED virtqueues (packed-inflight.ts), over plain memory: the QueueRegionPacked
// layout and its updates as chains are taken and used, and recovery from the region as a backend killed
// at each of its stores into it would leave it: the position the ring resumes at, the chains resubmitted
// (oldest first, from the region's copies of their descriptors), nothing completed twice, nothing lost.
// The real daemon killed with packed rings in flight is in inflight.test.ts.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../../src/memory/guest-memory.js';
import {
  DescriptorChain, POP_BAD_CHAIN, POP_EMPTY, VIRTQ_DESC_F_INDIRECT as INDIRECT, VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_WRITE as WRITE,
  type QueueOptions, type RingAddresses,
} from '../../src/virtqueue/queue.js';
import { PackedQueue, VIRTQ_DESC_F_AVAIL as AVAIL, decodePackedBase, encodePackedBase } from '../../src/virtqueue/packed.js';
import { PackedInflightQueue } from '../../src/virtqueue/packed-inflight.js';
import { INFLIGHT_ALIGNMENT, inflightQueueBytes, inflightRegionBytes } from '../../src/virtqueue/inflight.js';
import { FRESH, PackedDriver, packedRegionFields, type GuestBuf } from './packed-driver.js';

const ADDRS: RingAddresses = { descAddr: 0, availAddr: 0x800, usedAddr: 0x810 };
const OPTS: QueueOptions = { eventIdx: true, indirect: true };
/** Data buffers (the ring logic only checks they are guest memory), and one indirect table slot per buffer id. */
const DATA = 0x1000;
const TABLES = 0x3000;
const MEM_BYTES = 0x4000;

/** One region of guest memory over `bytes`, at guest address 0. */
function guestMemory(bytes = new Uint8Array(MEM_BYTES)): GuestMemory {
  return new GuestMemory([{ guestAddr: 0, size: bytes.length, userAddr: 0, mmapOffset: 0, hostAddr: 0, bytes }]);
}

/** A chain's buffers as popChain fills them. */
type Bufs = { addr: number; len: number; w: number }[];

/** Reads a popped chain's buffers as plain objects for deepEqual. */
function bufsOf(c: DescriptorChain): Bufs {
  const out: Bufs = [];
  for (let i = 0; i < c.count; i++) out.push({ addr: c.addr[i], len: c.len[i], w: c.writable[i] });
  return out;
}

/** A tracker that calls onStore before each of its stores into the region: every point a SIGKILL could stop the backend at. */
class StoreWatcher extends PackedInflightQueue {
  onStore: () => void = () => undefined;
  protected override store8(i: number, v: number): void {
    this.onStore();
    super.store8(i, v);
  }
  protected override store16(i: number, v: number): void {
    this.onStore();
    super.store16(i, v);
  }
  protected override store32(i: number, v: number): void {
    this.onStore();
    super.store32(i, v);
  }
  protected override commit16(i: number, v: number): void {
    this.onStore();
    super.commit16(i, v);
  }
}

/** Everything a kill would leave behind at one moment: guest memory, the region, and what the guest and the backend had. */
interface Snapshot {
  what: string;
  memory: Uint8Array;
  region: Uint8Array;
  /** The guest driver as it stood, over `memory`. */
  driver: PackedDriver;
  /** Buffer ids the backend had taken and not returned, in the order it took them. */
  taken: number[];
  /** What each published buffer id's chain holds. */
  bufs: Map<number, Bufs>;
}

/** A guest and a tracked backend on one packed ring doing scripted work, snapshotting before every store into the region. */
class Run {
  readonly mem = guestMemory();
  readonly region: Uint8Array;
  readonly drv: PackedDriver;
  readonly q: PackedQueue;
  readonly taken: number[] = [];
  readonly bufs = new Map<number, Bufs>();
  readonly snapshots: Snapshot[] = [];
  private readonly chain: DescriptorChain;
  /** Times the used position went past the ring's end. */
  laps = 0;
  private seq = 0;
  private what = 'start';
  private stores = 0;

  constructor(readonly size: number, readonly descNum: number, record = true) {
    this.region = new Uint8Array(inflightQueueBytes(descNum, true));
    this.drv = new PackedDriver(this.mem, size, ADDRS);
    this.q = new PackedQueue(this.mem, size, ADDRS, OPTS, FRESH);
    const tracker = new StoreWatcher(this.region, size, descNum);
    assert.equal(this.q.trackInflight(tracker).recovered, false);
    if (record) tracker.onStore = () => this.snapshot(`${this.what}, before region store ${++this.stores}`);
    this.chain = new DescriptorChain(4 * size);
  }

  /** Copies everything a kill right now would leave. */
  snapshot(what: string): void {
    const memory = this.mem.regions[0].bytes.slice();
    this.snapshots.push({ what, memory, region: this.region.slice(), driver: this.drv.fork(guestMemory(memory)), taken: [...this.taken], bufs: new Map(this.bufs) });
  }

  /** True if the guest can publish a chain of `slots` slots now. */
  canSubmit(slots: number): boolean {
    return this.drv.inFlight().length < this.size && this.drv.freeSlots() >= slots;
  }

  /** The guest publishes `n` buffers (the first device-readable), as a direct chain or as one INDIRECT descriptor; returns the buffer id. */
  submit(n: number, indirect = false): number {
    const seq = this.seq++;
    const bufs: GuestBuf[] = Array.from({ length: n }, (_, k) => ({ addr: DATA + 0x40 * ((seq + k) % 64), len: 1 + ((seq * 7 + k) % 200), write: k > 0 }));
    const id = this.drv.takeId();
    if (indirect) {
      const table = TABLES + 0x40 * id;
      bufs.forEach((b, k) => this.drv.setDesc(table, k, { addr: b.addr, len: b.len, flags: b.write ? WRITE : 0 }, 0));
      this.drv.publishRaw([{ addr: table, len: 16 * n, flags: INDIRECT }], id);
    } else {
      this.drv.publishRaw(bufs.map((b, k) => ({ addr: b.addr, len: b.len, flags: (b.write ? WRITE : 0) | (k < n - 1 ? NEXT : 0) })), id);
    }
    this.bufs.set(id, bufs.map((b) => ({ addr: b.addr, len: b.len, w: b.write ? 1 : 0 })));
    return id;
  }

  /** The backend takes the next chain; its buffers must be what the guest published. */
  pop(): number {
    this.what = `taking the chain at slot ${this.q.lastAvailIdx}`;
    this.stores = 0;
    const id = this.q.popChain(this.chain);
    assert.ok(id >= 0, `pop: ${id} ${this.q.lastError}`);
    assert.deepEqual(bufsOf(this.chain), this.bufs.get(id));
    this.taken.push(id);
    return id;
  }

  /** The backend returns buffer `id`. */
  complete(id: number): void {
    this.what = `using buffer ${id} at slot ${this.q.usedIdx}`;
    this.stores = 0;
    const wrap = this.q.usedWrapCounter;
    this.q.pushUsed(id, 1);
    if (this.q.usedWrapCounter !== wrap) this.laps++;
    this.taken.splice(this.taken.indexOf(id), 1);
  }

  /** The guest takes what was used. */
  reap(): void {
    this.drv.takeUsed();
  }
}

/**
 * Restarts a backend from snapshot `s` with the stale vring base QEMU sends for a packed ring after a crash,
 * the guest having first taken what was used and, with `reuse`, filled every free slot with new one-slot
 * chains (so slots the dead backend had used are overwritten in the next lap). Checks the resubmitted
 * chains, then serves and completes everything and checks that every request the guest had out came back
 * exactly once, and that the positions and the region agree with the guest. With `killRecovery`, also
 * restarts from every point the recovery itself could have been killed at (before each of its stores).
 */
function restartFrom(s: Snapshot, size: number, descNum: number, reuse: boolean, killRecovery = false): void {
  const memory = s.memory.slice();
  const region = s.region.slice();
  const mem = guestMemory(memory);
  const drv = s.driver.fork(mem);
  const bufs = new Map(s.bufs);
  const what = `${s.what}${reuse ? ' (the guest reused freed slots first)' : ''}`;
  const out = drv.inFlight();
  const seen = drv.takeUsed().map((u) => u.id);
  if (reuse) {
    while (drv.freeSlots() > 0 && drv.inFlight().length < size) {
      const id = drv.takeId();
      drv.publishRaw([{ addr: DATA, len: 1000 + id, flags: WRITE }], id);
      bufs.set(id, [{ addr: DATA, len: 1000 + id, w: 1 }]);
      out.push(id);
    }
  }
  const q = new PackedQueue(mem, size, ADDRS, OPTS, FRESH);
  const tracker = new StoreWatcher(region, size, descNum);
  const killed: Snapshot[] = [];
  if (killRecovery) tracker.onStore = () => killed.push({ ...s, what: `${what}, then killed before recovery store ${killed.length + 1}`, region: region.slice() });
  const r = q.trackInflight(tracker);
  tracker.onStore = () => undefined;
  assert.equal(r.recovered, true, what);
  // What the dead backend took and the guest never saw used, in the order it took them.
  const expected = s.taken.filter((id) => !seen.includes(id));
  assert.deepEqual(r.resubmit.map((c) => c.id), expected, `${what}: the chains resubmitted, oldest first`);

  const chain = new DescriptorChain(4 * size);
  const served: number[] = [];
  for (let id = q.popChain(chain); id !== POP_EMPTY; id = q.popChain(chain)) {
    assert.ok(id >= 0, `${what}: pop ${id}: ${q.lastError}`);
    assert.deepEqual(bufsOf(chain), bufs.get(id), `${what}: buffer ${id}'s chain`);
    served.push(id);
  }
  assert.deepEqual(served.slice(0, expected.length), expected, `${what}: resubmitted chains come first`);
  for (const id of served.slice().reverse()) q.pushUsed(id, 1);
  const later = drv.takeUsed().map((u) => u.id);
  assert.deepEqual([...seen, ...later].sort((a, b) => a - b), out.sort((a, b) => a - b), `${what}: every request came back exactly once`);
  assert.deepEqual(drv.inFlight(), [], what);
  const guest = { availIdx: drv.nextAvail, availWrap: drv.availWrap === 1, usedIdx: drv.lastUsed, usedWrap: drv.usedWrap === 1 };
  assert.deepEqual(decodePackedBase(q.vringBase), guest, `${what}: the backend stands where the guest does`);
  // The region recorded it all: one more restart finds nothing in flight, at the same position.
  const again = new PackedQueue(mem, size, ADDRS, OPTS, FRESH).trackInflight(new PackedInflightQueue(region, size, descNum));
  assert.deepEqual({ resubmit: again.resubmit, state: again.state, settled: again.settledCompletions }, { resubmit: [], state: guest, settled: 0 }, what);
  for (const k of killed) restartFrom(k, size, descNum, false);
}

/** Deterministic pseudo-random numbers in [0, 1) (mulberry32). */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** `steps` random steps: the guest publishes chains of 1-3 slots (some indirect), the backend takes them and returns them out of order. */
function randomRun(size: number, descNum: number, steps: number, seed: number): Run {
  const run = new Run(size, descNum);
  const next = rng(seed);
  for (let i = 0; i < steps; i++) {
    const r = next();
    const n = 1 + Math.floor(next() * 3);
    const indirect = next() < 0.25;
    if (r < 0.35 && run.canSubmit(indirect ? 1 : n)) run.submit(n, indirect);
    else if (r < 0.6 && run.q.hasAvailable()) run.pop();
    else if (r < 0.85 && run.taken.length > 0) run.complete(run.taken[Math.floor(next() * run.taken.length)]);
    else run.reap();
  }
  run.snapshot('after the last step');
  return run;
}

/** Checks every snapshot of `run`, restarting both ways. */
function restartFromEverySnapshot(run: Run): void {
  for (const s of run.snapshots) {
    restartFrom(s, run.size, run.descNum, false, true);
    restartFrom(s, run.size, run.descNum, true);
  }
}

describe('packed inflight region layout', () => {
  test('queue regions are a 32-byte header plus 32 bytes per descriptor, on 64-byte boundaries, as DPDK sizes them', () => {
    assert.equal(INFLIGHT_ALIGNMENT, 64);
    assert.equal(inflightQueueBytes(1, true), 64);
    assert.equal(inflightQueueBytes(128, true), 4160);
    assert.equal(inflightQueueBytes(256, true), 8256);
    assert.equal(inflightRegionBytes(4, 256, true), 4 * 8256);
    assert.equal(inflightRegionBytes(4, 256), 4 * 4160, 'split rings keep their layout');
    for (let qs = 1; qs <= 1024; qs++) {
      const b = inflightQueueBytes(qs, true);
      assert.ok(b % 64 === 0 && b >= 32 + 32 * qs && b < 32 + 32 * qs + 64, `queue size ${qs}: ${b} bytes`);
      // DPDK: RTE_ALIGN_MUL_CEIL(sizeof(desc) * queue_size + 8 + 2 * 6 + 9, 64), the 29 header bytes unpadded: the same number.
      assert.equal(b, Math.ceil((32 * qs + 29) / 64) * 64, `queue size ${qs}`);
    }
  });

  test('a fresh region is initialized: every entry on the free list, the used position from SET_VRING_BASE, which stands', () => {
    const mem = guestMemory();
    const base = encodePackedBase({ availIdx: 5, availWrap: false, usedIdx: 5, usedWrap: false });
    const region = new Uint8Array(inflightQueueBytes(10, true)).fill(0xee); // whatever was there is cleared
    region.fill(0, 0, 32);
    const q = new PackedQueue(mem, 8, ADDRS, OPTS, base);
    const r = q.trackInflight(new PackedInflightQueue(region, 8, 10));
    assert.deepEqual(r, { recovered: false, state: decodePackedBase(base), resubmit: [], settledCompletions: 0 });
    assert.equal(q.vringBase, base);
    const f = packedRegionFields(region);
    assert.deepEqual(
      [f.features, f.version, f.descNum, f.freeHead, f.oldFreeHead, f.usedIdx, f.oldUsedIdx, f.usedWrap, f.oldUsedWrap],
      [0n, 1, 10, 0, 0, 5, 5, 0, 0],
    );
    for (let e = 0; e < 10; e++) {
      assert.deepEqual(f.desc(e), { inflight: 0, next: e + 1, last: 0, num: 0, counter: 0n, id: 0, flags: 0, len: 0, addr: 0n }, `entry ${e}`);
    }
  });

  test('taking a chain copies its descriptors into entries off the free list; returning it puts them back and moves both positions', () => {
    const run = new Run(8, 8, false);
    const f = () => packedRegionFields(run.region);
    const a = run.submit(2);
    const b = run.submit(3, true);
    assert.equal(run.pop(), a);
    const [a0, a1] = run.bufs.get(a)!;
    assert.deepEqual(f().desc(0), { inflight: 1, next: 1, last: 1, num: 2, counter: 0n, id: a, flags: NEXT | AVAIL, len: a0.len, addr: BigInt(a0.addr) });
    assert.deepEqual(f().desc(1), { inflight: 0, next: 2, last: 0, num: 0, counter: 0n, id: a, flags: WRITE | AVAIL, len: a1.len, addr: BigInt(a1.addr) });
    assert.deepEqual([f().freeHead, f().oldFreeHead], [2, 2]);
    assert.equal(run.pop(), b);
    assert.deepEqual(f().desc(2), { inflight: 1, next: 3, last: 2, num: 1, counter: 1n, id: b, flags: INDIRECT | AVAIL, len: 48, addr: BigInt(TABLES + 0x40 * b) });
    assert.deepEqual([f().freeHead, f().oldFreeHead], [3, 3]);

    run.complete(a);
    // a's entries go back on the front of the free list, its last one linked to the old front.
    assert.deepEqual([f().freeHead, f().oldFreeHead, f().desc(1).next], [0, 0, 3]);
    assert.deepEqual([f().usedIdx, f().oldUsedIdx, f().usedWrap, f().oldUsedWrap], [2, 2, 1, 1]);
    assert.deepEqual(f().inflightEntries(8), [2]);
    // The next chain reuses them.
    const c = run.submit(1);
    assert.equal(run.pop(), c);
    assert.deepEqual([f().desc(0).inflight, f().desc(0).num, f().desc(0).counter, f().desc(0).id, f().freeHead], [1, 1, 2n, c, 1]);
  });

  test('the ring size must fit the region, and the region its queue size', () => {
    assert.throws(() => new PackedInflightQueue(new Uint8Array(inflightQueueBytes(8, true)), 16, 8), /ring size 16/);
    assert.throws(() => new PackedInflightQueue(new Uint8Array(inflightQueueBytes(8)), 8, 8), /inflight queue region is 192 bytes, 8 descriptors need 320/);
    assert.throws(() => new PackedInflightQueue(new Uint8Array(inflightQueueBytes(8, true)), 8, 0), /not in 1\.\.65535/);
  });
});

describe('packed: recovery from a backend killed at any of its stores into the region (and from a recovery killed at any of its own)', () => {
  test('random work, 8-slot ring: every kill point restarts right', () => {
    const run = randomRun(8, 8, 160, 1);
    assert.ok(run.snapshots.length > 500, `${run.snapshots.length} kill points`);
    assert.ok(run.laps >= 3, `the used position went round the ring ${run.laps} times`);
    restartFromEverySnapshot(run);
  });

  test('random work, a 6-slot ring in a region of 9 descriptor states', () => {
    restartFromEverySnapshot(randomRun(6, 9, 160, 2));
  });

  test('chains as long as the ring: a used descriptor moves the used position by a whole lap', () => {
    const run = new Run(4, 4);
    // A one-slot chain first, so the long ones start mid-ring and run over its end.
    const first = run.submit(1);
    run.pop();
    run.complete(first);
    run.reap();
    for (let lap = 0; lap < 3; lap++) {
      const id = run.submit(4, false);
      assert.equal(run.pop(), id);
      run.complete(id);
      run.reap();
    }
    run.snapshot('after the last lap');
    restartFromEverySnapshot(run);
  });
});

/** The backend "dies" right after its used descriptor went out, before the region caught up (afterUsed throws). */
class DiesAfterUsedDescriptor extends PackedInflightQueue {
  override afterUsed(): void {
    throw new Error('killed');
  }
}

/** A 4-slot ring with buffer a in slots 0-2 and b in slot 3, both taken by a backend tracking with `tracker`. */
function twoInFlight(make: (region: Uint8Array) => PackedInflightQueue) {
  const mem = guestMemory();
  const region = new Uint8Array(inflightQueueBytes(4, true));
  const drv = new PackedDriver(mem, 4, ADDRS);
  const q = new PackedQueue(mem, 4, ADDRS, OPTS, FRESH);
  q.trackInflight(make(region));
  const a = drv.submit([{ addr: DATA, len: 16 }, { addr: DATA + 0x100, len: 512, write: true }, { addr: DATA + 0x300, len: 1, write: true }]);
  const b = drv.submit([{ addr: DATA + 0x400, len: 1, write: true }]);
  const chain = new DescriptorChain(8);
  assert.equal(q.popChain(chain), a);
  assert.equal(q.popChain(chain), b);
  return { mem, region, drv, q, a, b };
}

/** A backend restarting on `mem` and `region` with the stale base QEMU sends, and what it pops. */
function restart(mem: GuestMemory, region: Uint8Array) {
  const q = new PackedQueue(mem, 4, ADDRS, OPTS, FRESH);
  const recovery = q.trackInflight(new PackedInflightQueue(region, 4, 4));
  const chain = new DescriptorChain(8);
  const popped: { id: number; bufs: Bufs }[] = [];
  let id: number;
  while ((id = q.popChain(chain)) >= 0) popped.push({ id, bufs: bufsOf(chain) });
  assert.equal(id, POP_EMPTY, q.lastError);
  return { q, recovery, popped };
}

const A_BUFS: Bufs = [{ addr: DATA, len: 16, w: 0 }, { addr: DATA + 0x100, len: 512, w: 1 }, { addr: DATA + 0x300, len: 1, w: 1 }];

describe('packed: the half-written used descriptor, and slots the guest reused', () => {
  test("killed between a used descriptor's id and len and its flags: it never went out; the chain whose slot it overwrote comes back whole", () => {
    const { mem, region, drv, q, a, b } = twoInFlight((r) => new DiesAfterUsedDescriptor(r, 4, 4));
    const slot0 = drv.r16(ADDRS.descAddr + 14);
    // b's used descriptor goes to slot 0, a's first slot; then the flags are put back as they were: the store that never happened.
    assert.throws(() => q.pushUsed(b, 1), /killed/);
    drv.w16(ADDRS.descAddr + 14, slot0);
    assert.equal(drv.r16(ADDRS.descAddr + 12), b, "slot 0 holds b's id now, not a's descriptor");
    assert.deepEqual(drv.takeUsed(), [], 'the guest sees nothing used');
    const r = restart(mem, region);
    assert.deepEqual(r.recovery.resubmit.map((c) => c.id), [a, b]);
    assert.equal(r.recovery.settledCompletions, 0);
    assert.deepEqual(r.popped, [{ id: a, bufs: A_BUFS }, { id: b, bufs: [{ addr: DATA + 0x400, len: 1, w: 1 }] }], "a's chain is the region's copy, not the ring's slot 0");
    assert.deepEqual(r.recovery.state, { availIdx: 0, availWrap: false, usedIdx: 0, usedWrap: true });
  });

  test('killed after a used descriptor went out, and the guest already reused its slot in the next lap: the completion stands', () => {
    const { mem, region, drv, q, a, b } = twoInFlight((r) => new DiesAfterUsedDescriptor(r, 4, 4));
    assert.throws(() => q.pushUsed(b, 1), /killed/);
    assert.deepEqual(drv.takeUsed(), [{ id: b, len: 1 }]);
    // The slot b's completion freed is slot 0 (a's first): the guest fills it with c, in the lap with wrap counter 0.
    const c = drv.submit([{ addr: DATA + 0x500, len: 7, write: true }]);
    assert.equal(c, b, 'test setup: the freed id is reused');
    const r = restart(mem, region);
    assert.equal(r.recovery.settledCompletions, 1, 'the half-recorded completion was kept');
    assert.deepEqual(r.recovery.resubmit.map((x) => x.id), [a]);
    assert.deepEqual(r.popped, [{ id: a, bufs: A_BUFS }, { id: c, bufs: [{ addr: DATA + 0x500, len: 7, w: 1 }] }]);
    for (const { id } of r.popped) r.q.pushUsed(id, 1);
    assert.deepEqual(drv.takeUsed().map((u) => u.id).sort(), [a, c].sort(), 'a and c complete once each, b is not completed again');
  });
});

describe('packed: recovery details', () => {
  test('the counter order is compared as a u64, high word first', () => {
    const { mem, region, drv, a, b } = twoInFlight((r) => new PackedInflightQueue(r, 4, 4));
    const f = packedRegionFields(region);
    // Entries: a's head is entry 0, b's is entry 3. a gets a counter above 2^32, b one just below it: b is older.
    const dv = new DataView(region.buffer);
    dv.setBigUint64(32 + 32 * 0 + 8, 2n ** 32n + 1n, true);
    dv.setBigUint64(32 + 32 * 3 + 8, 2n ** 32n - 1n, true);
    assert.deepEqual(f.inflightEntries(4), [0, 3]);
    const r = restart(mem, region);
    assert.deepEqual(r.recovery.resubmit.map((c) => c.id), [b, a]);
    // Counters go on above the newest: b's entry, freed, goes to the next chain with 2^32 + 2.
    r.q.pushUsed(b, 1);
    drv.takeUsed();
    const c = drv.submit([{ addr: DATA, len: 1, write: true }]);
    assert.equal(r.q.popChain(new DescriptorChain(8)), c);
    assert.deepEqual([packedRegionFields(region).desc(3).inflight, packedRegionFields(region).desc(3).counter], [1, 2n ** 32n + 2n]);
  });

  test('a resubmitted chain that is malformed comes back as POP_BAD_CHAIN, and the queue goes on', () => {
    const { mem, region, drv, a, b } = twoInFlight((r) => new PackedInflightQueue(r, 4, 4));
    // a's second descriptor, as the region kept it, now points outside guest memory.
    new DataView(region.buffer).setBigUint64(32 + 32 * 1 + 24, 2n ** 40n, true);
    const q = new PackedQueue(mem, 4, ADDRS, OPTS, FRESH);
    q.trackInflight(new PackedInflightQueue(region, 4, 4));
    const chain = new DescriptorChain(8);
    assert.equal(q.popChain(chain), POP_BAD_CHAIN);
    assert.equal(chain.head, a);
    assert.match(q.lastError, /resubmitted buffer 0: descriptor 1: buffer \[0x10000000000, \+512\) is not inside guest memory/);
    assert.equal(q.popChain(chain), b);
    q.pushUsed(a, 0);
    q.pushUsed(b, 1);
    assert.deepEqual(drv.takeUsed(), [{ id: a, len: 0 }, { id: b, len: 1 }]);
    assert.equal(q.broken, false);
  });

  test('rebuilt mid-way (a new memory table): chains not yet resubmitted are found again, at the same position', () => {
    const { mem, region, drv, a, b } = twoInFlight((r) => new PackedInflightQueue(r, 4, 4));
    const first = new PackedQueue(mem, 4, ADDRS, OPTS, FRESH);
    first.trackInflight(new PackedInflightQueue(region, 4, 4));
    const chain = new DescriptorChain(8);
    assert.equal(first.popChain(chain), a);
    first.pushUsed(a, 1);
    // The worker rebuilds the queue from its vring base once nothing is in flight in the processor.
    const again = new PackedQueue(mem, 4, ADDRS, OPTS, first.vringBase);
    const r = again.trackInflight(new PackedInflightQueue(region, 4, 4));
    assert.deepEqual(r.resubmit.map((c) => c.id), [b]);
    assert.equal(again.vringBase, first.vringBase);
    assert.equal(again.popChain(chain), b);
    again.pushUsed(b, 1);
    assert.deepEqual(drv.takeUsed().map((u) => u.id), [a, b]);
  });

  test('a region that cannot be trusted is refused, and left as it was', () => {
    // 8 slots: a takes entries 0-1, b entry 2, c entries 3-5; b is returned, so the free list is 2, 6, 7.
    const setup = () => {
      const run = new Run(8, 8, false);
      const a = run.submit(2);
      const b = run.submit(1);
      const c = run.submit(3);
      for (let i = 0; i < 3; i++) run.pop();
      run.complete(b);
      return { run, a, b, c };
    };
    const { run: probe, a } = setup();
    const f0 = packedRegionFields(probe.region);
    assert.deepEqual([f0.freeHead, f0.desc(2).next, f0.desc(6).next, f0.desc(7).next], [2, 6, 7, 8], 'test setup: the free list');
    assert.deepEqual(f0.inflightEntries(8), [0, 3], 'test setup: the heads in flight');
    const e = (n: number, field: number) => 32 + 32 * n + field;
    const cases: Array<[string, (f: ReturnType<typeof packedRegionFields>) => void, RegExp]> = [
      ['unknown version', (f) => f.set16(8, 7), /version 7 is not 1/],
      ['other queue size', (f) => f.set16(10, 16), /holds 16 descriptor states, the frontend says 8/],
      ['free_head out of the region', (f) => f.set16(12, 9), /free_head 9 is beyond the 8 descriptor states/],
      ['used_idx out of the ring', (f) => f.set16(16, 8), /used_idx 8 is not below ring size 8/],
      ['a wrap counter neither 0 nor 1', (f) => f.set8(20, 2), /wrap counters 2, 1 are not 0 or 1/],
      ['a free list that loops', (f) => f.set16(e(7, 2), 2), /free list loops back to entry 2/],
      ['a free list leaving the region', (f) => f.set16(e(7, 2), 9), /free list reaches entry 9, beyond/],
      ['a head with no descriptors', (f) => f.set16(e(0, 6), 0), /entry 0 is in flight with 0 descriptors/],
      ['a chain running into a free entry', (f) => f.set16(e(0, 2), 6), /chain at entry 0 reaches entry 6, which is free/],
      ['a chain running into another', (f) => f.set16(e(3, 2), 0), /chain at entry 3 reaches entry 0, which is in the chain at entry 0/],
      ['a chain whose last disagrees', (f) => f.set16(e(0, 4), 5), /chain at entry 0 ends at entry 1, but its last says 5/],
      ['two chains with one buffer id', (f) => f.set16(e(5, 16), a), /two chains in flight with buffer id/],
      ['a buffer id out of the ring', (f) => f.set16(e(1, 16), 8), /buffer id 8, not below ring size 8/],
      ['a free list cut short', (f) => f.set16(e(2, 2), 8), /free list has 1 entries and 5 are in flight, fewer than the ring size 8/],
    ];
    for (const [what, corrupt, re] of cases) {
      const { run } = setup();
      corrupt(packedRegionFields(run.region));
      const before = run.region.slice();
      const q = new PackedQueue(run.mem, 8, ADDRS, OPTS, FRESH);
      assert.throws(() => q.trackInflight(new PackedInflightQueue(run.region, 8, 8)), { name: 'RangeError', message: re }, what);
      assert.deepEqual(run.region, before, `${what}: the region is not written`);
    }
  });
});
