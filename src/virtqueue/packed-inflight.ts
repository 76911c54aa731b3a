/**
 * Inflight I/O tracking for packed virtqueues (vhost-user.rst, "Inflight I/O tracking", QueueRegionPacked;
 * VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): the packed counterpart of inflight.ts.
 *
 * Layout (one region per queue, inflightQueueBytes(desc_num, true) bytes each, 64-byte aligned):
 *   u64 features | u16 version | u16 desc_num | u16 free_head | u16 old_free_head | u16 used_idx |
 *   u16 old_used_idx | u8 used_wrap_counter | u8 old_used_wrap_counter | u8 padding[7]      (32 bytes)
 *   desc[desc_num] of { u8 inflight; u8 padding; u16 next; u16 last; u16 num; u64 counter;
 *                       u16 id; u16 flags; u32 len; u64 addr }                                (32 bytes each)
 *
 * The entries are not ring slots. Every descriptor taken from the ring is copied (addr, len, id, flags)
 * into an entry off a free list (free_head, linked by next); a chain's entries stay linked in ring order,
 * and its first entry, the head, holds the chain's length (num), its last entry (last), the counter that
 * orders requests, and the inflight flag. A restarted backend resubmits from these copies, because a packed
 * ring does not keep an in-flight chain: a used descriptor is written over the slot at the device's used
 * position, whichever chain that slot belonged to (completions come out of order), and the driver then
 * reuses the slot. Nothing in the region says where the device reads next either; it is the used position
 * plus the slots of the chains in flight (each completion moves the used position by its chain's slots).
 *
 * free_head, used_idx and used_wrap_counter are the state being changed, the old_* fields the last
 * consistent one. Update order (the spec's, one used descriptor at a time as PackedQueue.pushUsed writes
 * them), chosen so a kill at any instruction leaves a region recovery reads right:
 *   chain taken:  its descriptors into entries from free_head on; head's num, last, counter, inflight = 1;
 *                 free_head past the chain; old_free_head = free_head: the commit (until it, recovery
 *                 rolls free_head back and the chain, still in the ring, is read again as new)
 *   chain used:   desc[last].next = free_head; free_head = head; used_idx, used_wrap_counter = new position;
 *                 (the used descriptor goes out: id, len, then flags); head's inflight = 0;
 *                 old_free_head = free_head; old_used_wrap_counter; old_used_idx
 * Recovery is the spec's "When reconnecting", made exact where the spec's test can be misled:
 *  - a completion was half recorded if used_idx AND used_wrap_counter differ from the old ones (a chain as
 *    long as the ring moves the used position by a whole lap: only the wrap counter changes);
 *  - it reached the driver if old_free_head already equals free_head (the last step had begun, which is
 *    after the used descriptor went out), else if the slot at the old used position no longer holds the
 *    driver's available descriptor of the old lap (the spec's test; alone it can be misled by a last step
 *    killed between old_used_wrap_counter and old_used_idx when the guest already refilled that slot);
 *  - then the old fields take the current values (kept), or the current ones the old (undone; free_head
 *    last, so a recovery killed half-way is settled the same way by the next one); the free list's entries
 *    are idle, and the heads still marked in flight are resubmitted in counter order.
 *
 * Stores are plain typed-array stores (kept in program order, see inflight.ts) except the two commits,
 * Atomics.store. The hot path never reads the region: it follows its own copy of the links (next, last,
 * the head of each buffer id), so a frontend scribbling on the region cannot mislead it; recovery reads
 * every field once and checks it.
 */

import {
  DESC_NUM_U16, INFLIGHT_VERSION, InflightCounter, PACKED_DESC_STATE_BYTES as ENTRY_BYTES, PACKED_HEADER_BYTES as HEADER_BYTES, VERSION_U16,
  inflightQueueBytes, queueRegionViews, regionInUse,
} from "./inflight.js";
import { VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, type PackedRingState } from "./packed.js";

/** u16 indices of the header fields after version and desc_num (which both layouts share). */
const FREE_HEAD_U16 = 6;
const OLD_FREE_HEAD_U16 = 7;
const USED_IDX_U16 = 8;
const OLD_USED_IDX_U16 = 9;
/** Byte offsets of the wrap counters. */
const USED_WRAP_U8 = 20;
const OLD_USED_WRAP_U8 = 21;
/** u16 offsets inside an entry (entry e starts at byte HEADER_BYTES + ENTRY_BYTES * e). */
const NEXT = 1;
const LAST = 2;
const NUM = 3;
/** u32 offsets inside an entry: counter (lo, hi), id | flags << 16 (the ring's own word), len, addr (lo, hi). */
const COUNTER = 2;
const ID_FLAGS = 4;
const LEN = 5;
const ADDR = 6;
const TWO_32 = 2 ** 32;
/** owner[] marks during recovery. */
const UNSEEN = -1;
const FREE = -2;

/** A chain a previous backend took and never completed, as the driver wrote its descriptors. */
export interface RecoveredChain {
  /** Its buffer id (the last descriptor's). */
  id: number;
  /** Ring slots it took: its number of descriptors. */
  slots: number;
  /** Each descriptor's address, length and flags (NEXT, WRITE, INDIRECT as in the ring). */
  addr: Float64Array;
  len: Uint32Array;
  flags: Uint16Array;
}

/** What recovery found in a packed queue's region. */
export interface PackedInflightRecovery {
  /** False for a fresh region (now initialized): the frontend's SET_VRING_BASE state stands. */
  recovered: boolean;
  /** Where the ring resumes: the region's used position, avail = used + the slots of the chains in flight. */
  state: PackedRingState;
  /** Chains to resubmit, oldest (lowest counter) first. */
  resubmit: RecoveredChain[];
  /** 1 if the last completion reached the ring but not wholly the region (now recorded), else 0. */
  settledCompletions: number;
}

/** The ring's flags word at a slot, read by recovery to tell whether a used descriptor went out. */
export type RingFlagsAt = (slot: number) => number;

/** One packed queue's part of the inflight region, over a view of shared memory. */
export class PackedInflightQueue {
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  private readonly counter = new InflightCounter();
  /** Our copy of each entry's next link (desc_num ends the free list): the only links the hot path follows. */
  private readonly next: Uint16Array;
  /** Our copy of desc[head].last for each head entry in flight. */
  private readonly lastOf: Uint16Array;
  /** The head entry of each buffer id in flight. */
  private readonly headOf: Uint16Array;
  /** Our copy of free_head. */
  private freeHead = 0;
  /** The used position beforeUsed recorded, for afterUsed to make the old one. */
  private pendingUsedIdx = 0;
  private pendingUsedWrap = 0;

  /**
   * `region` is this queue's part of the region (at least inflightQueueBytes(descNum, true) bytes, 8-byte
   * aligned), `ringSize` the ring's SET_VRING_NUM and `descNum` the queue size the frontend described the
   * region with. Throws RangeError if they do not fit.
   */
  constructor(region: Uint8Array, readonly ringSize: number, readonly descNum: number) {
    ({ u8: this.u8, u16: this.u16, u32: this.u32 } = queueRegionViews(region, ringSize, descNum, inflightQueueBytes(descNum, true)));
    this.next = new Uint16Array(descNum);
    this.lastOf = new Uint16Array(descNum);
    this.headOf = new Uint16Array(ringSize);
  }

  /**
   * Reads the region back when a ring starts: initializes a fresh one at `base` (the SET_VRING_BASE
   * state), or finishes or undoes a half-recorded update (reading the ring's flags through `flagsAt`),
   * frees the free list's entries and lists the chains to resubmit, with the position to resume at.
   * Throws RangeError on a region it cannot trust, before writing anything to it.
   */
  recover(base: PackedRingState, flagsAt: RingFlagsAt): PackedInflightRecovery {
    if (!regionInUse(this.u16, this.descNum)) {
      this.initialize(base);
      return { recovered: false, state: base, resubmit: [], settledCompletions: 0 };
    }
    const descNum = this.descNum;
    const commit = this.halfRecordedCompletion(flagsAt);
    // After settling, the current fields are these either way.
    const freeHead = commit ? this.u16[FREE_HEAD_U16] : this.u16[OLD_FREE_HEAD_U16];
    const usedIdx = commit ? this.u16[USED_IDX_U16] : this.u16[OLD_USED_IDX_U16];
    const usedWrap = commit ? this.u8[USED_WRAP_U8] : this.u8[OLD_USED_WRAP_U8];
    const owner = new Int32Array(descNum).fill(UNSEEN);
    const free = this.walkFreeList(freeHead, owner);
    const heads: number[] = [];
    for (let e = 0; e < descNum; e++) {
      if (owner[e] === UNSEEN && this.u8[this.inflightByte(e)] !== 0) heads.push(e);
    }
    const chains = new Map<number, RecoveredChain>();
    let slots = 0;
    const ids = new Uint8Array(this.ringSize);
    for (const h of heads) {
      const c = this.readChain(h, owner);
      if (ids[c.id] !== 0) throw new RangeError(`inflight region has two chains in flight with buffer id ${c.id}`);
      ids[c.id] = 1;
      chains.set(h, c);
      slots += c.slots;
    }
    if (slots > this.ringSize) throw new RangeError(`inflight region has ${slots} descriptors in flight, more than the ring size ${this.ringSize}`);
    // Every chain the ring can still hold must find entries: a free list cut short would run dry.
    if (free + slots < this.ringSize) throw new RangeError(`inflight free list has ${free} entries and ${slots} are in flight, fewer than the ring size ${this.ringSize}`);

    // Checked: now the writes.
    this.settle(commit);
    for (let e = 0; e < descNum; e++) if (owner[e] === FREE) this.store8(this.inflightByte(e), 0);
    this.freeHead = freeHead;
    const order = this.counter.resumeAfter(heads, this.u32, (h) => this.entryU32(h) + COUNTER);
    const resubmit = order.map((h) => chains.get(h)!);
    let availIdx = usedIdx + slots;
    let availWrap = usedWrap === 1;
    if (availIdx >= this.ringSize) {
      availIdx -= this.ringSize;
      availWrap = !availWrap;
    }
    return { recovered: true, state: { availIdx, availWrap, usedIdx, usedWrap: usedWrap === 1 }, resubmit, settledCompletions: commit ? 1 : 0 };
  }

  /**
   * Checks the header's positions and says whether the update in progress (if any) is a completion that
   * reached the driver and must be kept (true), or anything else, to be undone (false).
   */
  private halfRecordedCompletion(flagsAt: RingFlagsAt): boolean {
    const freeHead = this.u16[FREE_HEAD_U16];
    const oldFreeHead = this.u16[OLD_FREE_HEAD_U16];
    const usedIdx = this.u16[USED_IDX_U16];
    const oldUsedIdx = this.u16[OLD_USED_IDX_U16];
    const usedWrap = this.u8[USED_WRAP_U8];
    const oldUsedWrap = this.u8[OLD_USED_WRAP_U8];
    for (const [what, v] of [['free_head', freeHead], ['old_free_head', oldFreeHead]] as const) {
      if (v > this.descNum) throw new RangeError(`inflight ${what} ${v} is beyond the ${this.descNum} descriptor states`);
    }
    for (const [what, v] of [['used_idx', usedIdx], ['old_used_idx', oldUsedIdx]] as const) {
      if (v >= this.ringSize) throw new RangeError(`inflight ${what} ${v} is not below ring size ${this.ringSize}`);
    }
    if (usedWrap > 1 || oldUsedWrap > 1) throw new RangeError(`inflight used wrap counters ${usedWrap}, ${oldUsedWrap} are not 0 or 1`);
    // The wrap counter too: a chain as long as the ring moves the used position by a whole lap.
    if (usedIdx === oldUsedIdx && usedWrap === oldUsedWrap) return false;
    if (freeHead === oldFreeHead) return true;
    // The old used slot still holds what the driver made available in the old lap: the used descriptor never went out.
    const flags = flagsAt(oldUsedIdx);
    const wrap = oldUsedWrap === 1;
    const stillAvailable = ((flags & VIRTQ_DESC_F_AVAIL) !== 0) === wrap && ((flags & VIRTQ_DESC_F_USED) !== 0) !== wrap;
    return !stillAvailable;
  }

  /**
   * Makes the old fields the current ones (`commit`) or the current ones the old ones, in an order that
   * leaves a region the next recovery settles the same way if this one is killed half-way: a commit in
   * the writer's order (old_free_head first), a rollback with free_head last (free_head equal to
   * old_free_head while the positions still differ would read as a completion that went out).
   */
  private settle(commit: boolean): void {
    if (commit) {
      this.store16(OLD_FREE_HEAD_U16, this.u16[FREE_HEAD_U16]);
      this.store8(OLD_USED_WRAP_U8, this.u8[USED_WRAP_U8]);
      this.store16(OLD_USED_IDX_U16, this.u16[USED_IDX_U16]);
    } else {
      this.store8(USED_WRAP_U8, this.u8[OLD_USED_WRAP_U8]);
      this.store16(USED_IDX_U16, this.u16[OLD_USED_IDX_U16]);
      this.store16(FREE_HEAD_U16, this.u16[OLD_FREE_HEAD_U16]);
    }
  }

  /** Follows the free list from `head`, marking its entries FREE in `owner` and copying their links; returns its length. */
  private walkFreeList(head: number, owner: Int32Array): number {
    let n = 0;
    for (let e = head; e !== this.descNum; n++) {
      if (e > this.descNum) throw new RangeError(`inflight free list reaches entry ${e}, beyond the ${this.descNum} descriptor states`);
      if (owner[e] !== UNSEEN) throw new RangeError(`inflight free list loops back to entry ${e}`);
      owner[e] = FREE;
      const next = this.u16[this.entryU16(e) + NEXT];
      this.next[e] = next;
      e = next;
    }
    return n;
  }

  /** Reads the chain whose head entry is `head`, marking its entries in `owner` and copying its links. */
  private readChain(head: number, owner: Int32Array): RecoveredChain {
    const slots = this.u16[this.entryU16(head) + NUM];
    if (slots < 1 || slots > this.ringSize) throw new RangeError(`inflight entry ${head} is in flight with ${slots} descriptors, not in 1..${this.ringSize}`);
    const c: RecoveredChain = { id: 0, slots, addr: new Float64Array(slots), len: new Uint32Array(slots), flags: new Uint16Array(slots) };
    let e = head;
    for (let k = 0; ; k++) {
      if (e >= this.descNum) throw new RangeError(`inflight chain at entry ${head} reaches entry ${e}, beyond the ${this.descNum} descriptor states`);
      if (owner[e] !== UNSEEN) throw new RangeError(`inflight chain at entry ${head} reaches entry ${e}, which is ${owner[e] === FREE ? "free" : `in the chain at entry ${owner[e]}`}`);
      owner[e] = head;
      const u = this.entryU32(e);
      c.addr[k] = this.u32[u + ADDR] + this.u32[u + ADDR + 1] * TWO_32;
      c.len[k] = this.u32[u + LEN];
      c.flags[k] = this.u32[u + ID_FLAGS] >>> 16;
      if (k === slots - 1) break;
      const next = this.u16[this.entryU16(e) + NEXT];
      this.next[e] = next;
      e = next;
    }
    const last = this.u16[this.entryU16(head) + LAST];
    if (last !== e) throw new RangeError(`inflight chain at entry ${head} ends at entry ${e}, but its last says ${last}`);
    // The buffer id sits in the last descriptor, as in the ring.
    c.id = this.u32[this.entryU32(e) + ID_FLAGS] & 0xffff;
    if (c.id >= this.ringSize) throw new RangeError(`inflight chain at entry ${head} has buffer id ${c.id}, not below ring size ${this.ringSize}`);
    this.headOf[c.id] = head;
    this.lastOf[head] = e;
    return c;
  }

  /** A fresh region: every entry on the free list in order, the used position at `base`'s; the version goes in last. */
  private initialize(base: PackedRingState): void {
    this.u8.fill(0);
    this.u16[DESC_NUM_U16] = this.descNum;
    for (let e = 0; e < this.descNum; e++) {
      this.u16[this.entryU16(e) + NEXT] = e + 1;
      this.next[e] = e + 1;
    }
    this.u16[USED_IDX_U16] = this.u16[OLD_USED_IDX_U16] = base.usedIdx;
    this.u8[USED_WRAP_U8] = this.u8[OLD_USED_WRAP_U8] = base.usedWrap ? 1 : 0;
    Atomics.store(this.u16, VERSION_U16, INFLIGHT_VERSION);
    this.freeHead = 0;
    this.counter.reset();
  }

  /**
   * Records the chain popChain took as buffer `id`: `slots` descriptors from ring slot `start` on (wrapping
   * at the ring's end) of the ring `desc32` (u32 words, 4 per descriptor). The descriptors are still the
   * driver's there: it may not touch them before they are used.
   */
  started(id: number, desc32: Uint32Array, start: number, slots: number): void {
    const head = this.freeHead;
    let e = head;
    let last = head;
    let s = start;
    for (let k = 0; k < slots; k++) {
      // recover() leaves enough entries for a full ring and popChain never takes more: an internal error.
      if (e >= this.descNum) throw new Error(`inflight free list ran dry recording buffer ${id}`);
      const w = 4 * s;
      const u = this.entryU32(e);
      this.store32(u + ID_FLAGS, desc32[w + 3]);
      this.store32(u + LEN, desc32[w + 2]);
      this.store32(u + ADDR, desc32[w]);
      this.store32(u + ADDR + 1, desc32[w + 1]);
      last = e;
      e = this.next[e];
      if (++s === this.ringSize) s = 0;
    }
    const h16 = this.entryU16(head);
    const h32 = this.entryU32(head);
    this.store16(h16 + NUM, slots);
    this.store16(h16 + LAST, last);
    this.store32(h32 + COUNTER, this.counter.lo);
    this.store32(h32 + COUNTER + 1, this.counter.hi);
    this.counter.bump();
    this.store8(this.inflightByte(head), 1);
    this.store16(FREE_HEAD_U16, e);
    // The commit: from here on recovery finds the chain in flight.
    this.commit16(OLD_FREE_HEAD_U16, e);
    this.freeHead = e;
    this.headOf[id] = head;
    this.lastOf[head] = last;
  }

  /** Before buffer `id`'s used descriptor goes out: its entries back on the free list, and the used position it moves to. */
  beforeUsed(id: number, usedIdx: number, usedWrap: number): void {
    const head = this.headOf[id];
    const last = this.lastOf[head];
    this.store16(this.entryU16(last) + NEXT, this.freeHead);
    this.next[last] = this.freeHead;
    this.store16(FREE_HEAD_U16, head);
    this.freeHead = head;
    this.store16(USED_IDX_U16, usedIdx);
    this.store8(USED_WRAP_U8, usedWrap);
    this.pendingUsedIdx = usedIdx;
    this.pendingUsedWrap = usedWrap;
  }

  /** After buffer `id`'s used descriptor went out: its head is idle, and the old fields catch up. */
  afterUsed(id: number): void {
    this.store8(this.inflightByte(this.headOf[id]), 0);
    // First: from here on recovery knows the used descriptor went out, whatever the two below hold.
    this.commit16(OLD_FREE_HEAD_U16, this.freeHead);
    this.store8(OLD_USED_WRAP_U8, this.pendingUsedWrap);
    this.store16(OLD_USED_IDX_U16, this.pendingUsedIdx);
  }

  /** Every store into the region goes through these four, in the order above (tests stop at any of them). */
  protected store8(i: number, v: number): void {
    this.u8[i] = v;
  }

  /** A plain u16 store into the region. */
  protected store16(i: number, v: number): void {
    this.u16[i] = v;
  }

  /** A plain u32 store into the region. */
  protected store32(i: number, v: number): void {
    this.u32[i] = v;
  }

  /** A commit point: Atomics.store, so no store after it in program order can become visible before it. */
  protected commit16(i: number, v: number): void {
    Atomics.store(this.u16, i, v);
  }

  private inflightByte(e: number): number {
    return HEADER_BYTES + ENTRY_BYTES * e;
  }

  private entryU16(e: number): number {
    return (HEADER_BYTES + ENTRY_BYTES * e) >>> 1;
  }

  private entryU32(e: number): number {
    return (HEADER_BYTES + ENTRY_BYTES * e) >>> 2;
  }
}
