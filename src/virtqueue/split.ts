/**
 * Device side of a split virtqueue (OASIS virtio 1.2, section 2.7), as pure logic over guest memory views.
 *
 * The guest is untrusted: every index and address it hands us is checked before use, malformed chains are
 * reported (never thrown), and nothing here ever reads or writes outside the guest memory regions. The hot
 * paths (popChain / pushUsed) allocate nothing: views are built once at construction and chains are
 * filled into caller-owned preallocated DescriptorChain objects.
 *
 * Ordering with the guest: avail.idx is read with Atomics.load (acquire: ring entries and descriptors read
 * afterwards are at least as new), used.idx / avail_event / used.flags are written with Atomics.store
 * (release, and a full fence on x86, which shouldNotify/enableNotifications rely on before re-reading
 * guest fields). Atomics works on non-shared typed arrays too, so plain mmap'ed ArrayBuffers are fine.
 */

import type { DirtyLog } from "../memory/dirty-log.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import type { InflightQueue, InflightRecovery } from "./inflight.js";
import {
  DescriptorChain, HOST_IS_LITTLE_ENDIAN, MAX_INDIRECT_ENTRIES, MAX_QUEUE_SIZE, POP_BAD_CHAIN, POP_EMPTY, POP_RING_BROKEN,
  VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, hex, locateRingPart, type QueueOptions, type RingAddresses, type VirtQueue,
} from "./queue.js";

// The shared pieces stay importable from here, where they lived before packed rings came.
export {
  DescriptorChain, MAX_INDIRECT_ENTRIES, MAX_QUEUE_SIZE, POP_BAD_CHAIN, POP_EMPTY, POP_RING_BROKEN, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE, type RingAddresses,
} from "./queue.js";

/** avail.flags bit: the driver asks us not to interrupt it (only meaningful without EVENT_IDX). */
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
/** used.flags bit: we ask the driver not to kick us (only meaningful without EVENT_IDX). */
export const VRING_USED_F_NO_NOTIFY = 1;

/** Negotiated features that change how the queue is read. */
export type SplitQueueOptions = QueueOptions;

/** Names a descriptor in error messages; only called on failure so the walk itself builds no strings. */
function descName(indirectView: DataView | null, i: number): string {
  return indirectView === null ? `descriptor ${i}` : `indirect descriptor ${i}`;
}

/** Device-side state and logic for one split virtqueue. */
export class SplitQueue implements VirtQueue {
  /** Number of descriptors / ring entries (power of two). */
  readonly size: number;
  /** Set once the ring is found corrupt; from then on popChain returns POP_RING_BROKEN. */
  broken = false;
  /** Reason for the last POP_BAD_CHAIN / POP_RING_BROKEN, for logging. */
  lastError = "";

  private readonly mem: GuestMemory;
  private readonly eventIdx: boolean;
  private readonly indirect: boolean;
  /** size - 1: ring slot of a free-running 16-bit index. */
  private readonly mask: number;
  /** Descriptor table as u32 words: [addr lo, addr hi, len, flags | next << 16] per descriptor. */
  private readonly desc32: Uint32Array;
  /** Avail ring as u16: [flags, idx, ring[size], used_event]. */
  private readonly avail16: Uint16Array;
  /** Used ring as u16: [flags, idx, ...elems, avail_event at 2 + 4*size]. */
  private readonly used16: Uint16Array;
  /** Used ring as u32: elem i is {id at 1 + 2i, len at 2 + 2i}. */
  private readonly used32: Uint32Array;
  /** u16 index of used_event inside avail16. */
  private readonly usedEventIndex: number;
  /** u16 index of avail_event inside used16. */
  private readonly availEventIndex: number;
  /** One DataView per guest region, for indirect tables which may sit anywhere with any alignment. */
  private readonly regionViews: DataView[];

  /** Next avail index to consume (free-running u16). */
  private lastAvail: number;
  /** Last avail.idx we read from the guest: lets popChain skip the atomic load while entries remain. */
  private shadowAvail: number;
  /** Next used index to publish (free-running u16). */
  private nextUsed: number;
  /** used idx at the last shouldNotify call: the "old" of vring_need_event. */
  private signalledUsed: number;
  /** False until the first notification decision: the first one after (re)connect is always sent. */
  private signalledValid = false;

  /** Scratch for the descriptor being decoded: instance fields instead of an object keep popChain allocation-free. */
  private dAddr = 0;
  private dLen = 0;
  private dFlags = 0;
  private dNext = 0;

  /** Inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), or null when the frontend did not set it up. */
  private inflight: InflightQueue | null = null;
  /** Heads a previous backend took and never completed, oldest first: popChain hands them out before new ones. */
  private resubmit: Uint16Array = new Uint16Array(0);
  private resubmitPos = 0;

  /** While migrating with VHOST_VRING_F_LOG: the log our used ring writes are marked in, else null. */
  private ringLog: DirtyLog | null = null;
  /** Guest address the used ring is logged at (log_guest_addr). */
  private usedLogAddr = 0;

  /** Throws RangeError with a clear message if size is not a power of two in 1..32768, or any ring part is misaligned or not wholly inside ONE guest memory region. */
  constructor(mem: GuestMemory, size: number, addrs: RingAddresses, opts: SplitQueueOptions, lastAvailIdx: number) {
    if (!HOST_IS_LITTLE_ENDIAN) throw new RangeError("SplitQueue needs a little-endian host: ring views are native typed arrays");
    if (!Number.isInteger(size) || size < 1 || size > MAX_QUEUE_SIZE || (size & (size - 1)) !== 0) {
      throw new RangeError(`queue size must be a power of two in 1..${MAX_QUEUE_SIZE}, got ${size}`);
    }
    if (!Number.isInteger(lastAvailIdx) || lastAvailIdx < 0 || lastAvailIdx > 0xffff) {
      throw new RangeError(`last avail index must be a u16, got ${lastAvailIdx}`);
    }
    this.mem = mem;
    this.size = size;
    this.mask = size - 1;
    this.eventIdx = opts.eventIdx;
    this.indirect = opts.indirect;

    // The event fields only exist when EVENT_IDX is negotiated, so only then must they be mapped.
    const eventBytes = opts.eventIdx ? 2 : 0;
    const descBytes = 16 * size;
    const availBytes = 4 + 2 * size + eventBytes;
    const usedBytes = 4 + 8 * size + eventBytes;

    const descOff = locateRingPart(mem, "descriptor table", addrs.descAddr, descBytes, 16);
    const availOff = locateRingPart(mem, "avail ring", addrs.availAddr, availBytes, 2);
    const usedOff = locateRingPart(mem, "used ring", addrs.usedAddr, usedBytes, 4);

    const dr = mem.regions[descOff.region];
    this.desc32 = new Uint32Array(dr.bytes.buffer, descOff.byteOffset, 4 * size);
    const ar = mem.regions[availOff.region];
    this.avail16 = new Uint16Array(ar.bytes.buffer, availOff.byteOffset, availBytes >>> 1);
    const ur = mem.regions[usedOff.region];
    this.used16 = new Uint16Array(ur.bytes.buffer, usedOff.byteOffset, usedBytes >>> 1);
    this.used32 = new Uint32Array(ur.bytes.buffer, usedOff.byteOffset, 1 + 2 * size);
    this.usedEventIndex = 2 + size;
    this.availEventIndex = 2 + 4 * size;

    this.regionViews = mem.regions.map((r) => new DataView(r.bytes.buffer, r.bytes.byteOffset, r.bytes.byteLength));

    this.lastAvail = lastAvailIdx;
    this.shadowAvail = lastAvailIdx;
    // After a reconnect the guest's used.idx is the truth (the previous backend may have completed requests).
    this.nextUsed = Atomics.load(this.used16, 1);
    this.signalledUsed = this.nextUsed;
  }

  /** Next avail index we will consume: what GET_VRING_BASE returns. */
  get lastAvailIdx(): number {
    return this.lastAvail;
  }

  /** For split rings GET_VRING_BASE carries the next avail index alone (used.idx is in guest memory). */
  get vringBase(): number {
    return this.lastAvail;
  }

  /** Next used index we will publish (equals used.idx in guest memory). */
  get usedIdx(): number {
    return this.nextUsed;
  }

  /** True if the driver has made buffers available that we have not consumed yet (false once broken). */
  hasAvailable(): boolean {
    if (this.broken) return false;
    if (this.resubmitPos < this.resubmit.length) return true;
    this.shadowAvail = Atomics.load(this.avail16, 1);
    return this.shadowAvail !== this.lastAvail;
  }

  /** Takes the next available chain into `chain`: >= 0 head index on success, else POP_EMPTY / POP_BAD_CHAIN / POP_RING_BROKEN. */
  popChain(chain: DescriptorChain): number {
    if (this.broken) return POP_RING_BROKEN;
    if (this.resubmitPos < this.resubmit.length) return this.popResubmitted(chain);
    const last = this.lastAvail;
    if (last === this.shadowAvail) {
      this.shadowAvail = Atomics.load(this.avail16, 1);
      if (last === this.shadowAvail) return POP_EMPTY;
    }
    const pending = (this.shadowAvail - last) & 0xffff;
    if (pending > this.size) {
      return this.breakRing(`avail idx ${this.shadowAvail} is ${pending} entries ahead of last avail idx ${last}, more than queue size ${this.size}`);
    }
    const head = this.avail16[2 + (last & this.mask)];
    if (head >= this.size) {
      return this.breakRing(`avail ring slot ${last & this.mask} holds head ${head}, not below queue size ${this.size}`);
    }
    // Consume the entry before walking: a bad chain is still returned to the guest (len 0) so it can recover.
    this.lastAvail = (last + 1) & 0xffff;
    if (this.inflight !== null) this.inflight.started(head);
    return this.takeChain(chain, head);
  }

  /** Walks the chain at `head` into `chain`: `head`, or POP_BAD_CHAIN (reason in lastError). */
  private takeChain(chain: DescriptorChain, head: number): number {
    chain.head = head;
    chain.count = 0;
    const err = this.walk(chain, head);
    if (err !== null) {
      chain.count = 0;
      this.lastError = `chain at head ${head}: ${err}`;
      return POP_BAD_CHAIN;
    }
    return head;
  }

  /** The next head a previous backend left in flight: already consumed from the avail ring, and still marked in flight. */
  private popResubmitted(chain: DescriptorChain): number {
    const head = this.resubmit[this.resubmitPos++];
    return this.takeChain(chain, head);
  }

  /**
   * Turns on inflight tracking with this queue's part of the frontend's inflight region, before the first
   * pop: recovers it against used.idx, and, when a previous backend left state there, restarts at used.idx +
   * requests in flight (not at the SET_VRING_BASE index, which after a crash is only used.idx) with those
   * requests queued for popChain ahead of new ones. Throws RangeError on a region it cannot trust.
   */
  trackInflight(tracker: InflightQueue): InflightRecovery {
    if (tracker.ringSize !== this.size) throw new RangeError(`inflight tracker is for ${tracker.ringSize} descriptors, the ring has ${this.size}`);
    const r = tracker.recover(this.nextUsed);
    if (r.recovered) {
      this.lastAvail = this.shadowAvail = r.lastAvailIdx;
      this.resubmit = Uint16Array.from(r.resubmit);
      this.resubmitPos = 0;
    }
    this.inflight = tracker;
    return r;
  }

  /** Marks used ring writes in `log` (null: stop), the used ring logged at guest address `usedLogAddr`. */
  setRingLog(log: DirtyLog | null, usedLogAddr: number): void {
    this.ringLog = log;
    this.usedLogAddr = usedLogAddr;
  }

  /** Marks bytes [offset, offset+len) of the used ring dirty, when the ring is logged. */
  private logUsed(offset: number, len: number): void {
    if (this.ringLog !== null) this.ringLog.mark(this.usedLogAddr + offset, len);
  }

  /** Marks the ring unusable: the guest broke an invariant we cannot recover from without a reset. */
  private breakRing(reason: string): number {
    this.broken = true;
    this.lastError = reason;
    return POP_RING_BROKEN;
  }

  /** Reads descriptor `i` of the queue's own table into the scratch fields. */
  private readDirect(i: number): void {
    const d = this.desc32;
    const w = 4 * i;
    this.dAddr = d[w] + d[w + 1] * 4294967296;
    this.dLen = d[w + 2];
    const fn = d[w + 3];
    this.dFlags = fn & 0xffff;
    this.dNext = fn >>> 16;
  }

  /** Reads descriptor `i` of an indirect table at byte `off` of `view` into the scratch fields. */
  private readIndirect(view: DataView, off: number, i: number): void {
    const p = off + 16 * i;
    this.dAddr = view.getUint32(p, true) + view.getUint32(p + 4, true) * 4294967296;
    this.dLen = view.getUint32(p + 8, true);
    this.dFlags = view.getUint16(p + 12, true);
    this.dNext = view.getUint16(p + 14, true);
  }

  /**
   * Walks the chain starting at `head`, filling `chain`; returns null on success or the reason it is malformed.
   * Error strings are only built on failure, so the success path allocates nothing.
   */
  private walk(chain: DescriptorChain, head: number): string | null {
    const size = this.size;
    let view: DataView | null = null; // non-null while inside an indirect table
    let tableOff = 0;
    let tableEntries = size;
    let i = head;
    let count = 0;
    let seenWritable = false;
    for (;;) {
      if (view === null) this.readDirect(i);
      else this.readIndirect(view, tableOff, i);
      const flags = this.dFlags;

      if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
        if (!this.indirect) return `${descName(view, i)} has INDIRECT but indirect descriptors were not negotiated`;
        if (view !== null) return `${descName(view, i)} has INDIRECT inside an indirect table (nesting is forbidden)`;
        if ((flags & VIRTQ_DESC_F_NEXT) !== 0) return `${descName(view, i)} has both INDIRECT and NEXT`;
        const len = this.dLen;
        if (len === 0 || len % 16 !== 0) return `${descName(view, i)}: indirect table length ${len} is not a non-zero multiple of 16`;
        if (len / 16 > MAX_INDIRECT_ENTRIES) return `${descName(view, i)}: indirect table has ${len / 16} entries, more than ${MAX_INDIRECT_ENTRIES}`;
        const r = this.mem.findRegion(this.dAddr, len);
        if (r < 0) return `${descName(view, i)}: indirect table [${hex(this.dAddr)}, +${len}) is not wholly inside one guest memory region`;
        // The WRITE flag of the descriptor pointing at the table carries no meaning (spec 2.7.5.3.2): ignored.
        view = this.regionViews[r];
        tableOff = this.dAddr - this.mem.regions[r].guestAddr;
        tableEntries = len / 16;
        i = 0;
        continue;
      }

      const writable = (flags & VIRTQ_DESC_F_WRITE) !== 0;
      if (writable) seenWritable = true;
      else if (seenWritable) return `${descName(view, i)} is device-readable but follows a device-writable one`;
      // A direct chain longer than the table must loop. An indirect table may hold more entries than
      // the ring (Linux sizes requests by seg_max, not by the ring size); the chain capacity bounds it.
      if (view === null && count >= size) return `more than ${size} descriptors (loop, or longer than the queue size)`;
      if (count >= chain.capacity) return `more than ${chain.capacity} descriptors (a loop, or longer than the chain capacity)`;
      // One region is the common case; a buffer may also run across regions adjacent in guest space.
      if (this.mem.findRegion(this.dAddr, this.dLen) < 0 && !this.mem.covers(this.dAddr, this.dLen)) {
        return `${descName(view, i)}: buffer [${hex(this.dAddr)}, +${this.dLen}) is not inside guest memory`;
      }
      chain.addr[count] = this.dAddr;
      chain.len[count] = this.dLen;
      chain.writable[count] = writable ? 1 : 0;
      count++;
      chain.count = count;

      if ((flags & VIRTQ_DESC_F_NEXT) === 0) return null;
      const next = this.dNext;
      if (next >= tableEntries) {
        return view === null
          ? `${descName(view, i)}: next ${next} is not below queue size ${size}`
          : `${descName(view, i)}: next ${next} is not below indirect table size ${tableEntries}`;
      }
      i = next;
    }
  }

  /** Returns chain `head` to the driver with `writtenLen` bytes written: writes the used element, then publishes used.idx. */
  pushUsed(head: number, writtenLen: number): void {
    if (!(head >= 0 && head < this.size)) throw new RangeError(`pushUsed: head ${head} is not below queue size ${this.size}`);
    // Inflight tracking brackets the used ring update (see inflight.ts for why in this order).
    const inflight = this.inflight;
    if (inflight !== null) inflight.beforeUsed(head);
    const u = this.nextUsed;
    const e = 1 + 2 * (u & this.mask);
    this.used32[e] = head;
    this.used32[e + 1] = writtenLen >>> 0;
    this.nextUsed = (u + 1) & 0xffff;
    // Migration: the element is logged before the index publishes it, the index once it is written.
    if (this.ringLog !== null) this.logUsed(4 * e, 8);
    // Release: the element above must be visible before the driver can see the new index.
    Atomics.store(this.used16, 1, this.nextUsed);
    if (this.ringLog !== null) this.logUsed(2, 2);
    if (inflight !== null) inflight.afterUsed(head, this.nextUsed);
  }

  /** After a batch of pushUsed: true if the driver wants an interrupt now (EVENT_IDX or avail.flags rules). */
  shouldNotify(): boolean {
    const newUsed = this.nextUsed;
    const old = this.signalledUsed;
    const valid = this.signalledValid;
    this.signalledUsed = newUsed;
    this.signalledValid = true;
    if (this.eventIdx) {
      // The first decision after (re)connect always notifies: the previous backend may have published entries it never
      // signalled, and vring_need_event over our own range alone would never cover them.
      if (!valid) return true;
      const usedEvent = Atomics.load(this.avail16, this.usedEventIndex);
      // vring_need_event: did used idx step past used_event while moving from old to newUsed (mod 2^16)? False if nothing moved.
      return ((newUsed - usedEvent - 1) & 0xffff) < ((newUsed - old) & 0xffff);
    }
    // Nothing published since the last decision: nothing to tell the driver about.
    if (newUsed === old) return false;
    return (Atomics.load(this.avail16, 0) & VRING_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /** Asks the driver to stop kicking while we are busy polling the queue anyway. */
  disableNotifications(): void {
    // With EVENT_IDX, avail_event one behind the next index means the driver's next buffer does not
    // cross it (vring_need_event is false), so it does not kick; left at lastAvail it would.
    if (this.eventIdx) Atomics.store(this.used16, this.availEventIndex, (this.lastAvail - 1) & 0xffff);
    else Atomics.store(this.used16, 0, VRING_USED_F_NO_NOTIFY);
    if (this.ringLog !== null) this.logNotifyField();
  }

  /** Marks the field enable/disableNotifications writes: avail_event with EVENT_IDX, else used.flags. */
  private logNotifyField(): void {
    if (this.eventIdx) this.logUsed(2 * this.availEventIndex, 2);
    else this.logUsed(0, 2);
  }

  /** Re-arms driver kicks; returns true if buffers are already available (a kick may have been suppressed: keep processing). */
  enableNotifications(): boolean {
    if (this.eventIdx) Atomics.store(this.used16, this.availEventIndex, this.lastAvail);
    else Atomics.store(this.used16, 0, 0);
    if (this.ringLog !== null) this.logNotifyField();
    // The store above is a full fence, so this re-read cannot miss a buffer added before the driver saw it.
    return this.hasAvailable();
  }
}
