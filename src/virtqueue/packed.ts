/**
 * Device side of a packed virtqueue (OASIS virtio 1.2, section 2.8), as pure logic over guest memory views.
 *
 * One ring of 16-byte descriptors (addr u64, len u32, id u16, flags u16) carries both directions. The
 * driver makes a descriptor available by setting its AVAIL flag to its wrap counter and USED to the
 * opposite; we hand a buffer back by overwriting the slot at our own used position with the buffer id,
 * the written length and AVAIL = USED = our used wrap counter. A chain is laid out in consecutive slots
 * (NEXT set on all but the last, possibly running over the ring's end, which toggles the wrap counter)
 * and its buffer id sits in the LAST descriptor. Completions may come in any order; each one advances
 * the used position by the number of slots its chain took, which popChain remembers per buffer id.
 *
 * The guest is untrusted, as in split.ts: every id, length and address is checked, malformed chains are
 * reported (never thrown), nothing outside the guest memory regions is ever read or written, and the hot
 * paths allocate nothing.
 *
 * Ordering with the guest: a chain's first descriptor is published last by the driver, so its flags are
 * read with Atomics.load (acquire) before anything else of the chain; a used descriptor's id and len are
 * written first and its flags last with Atomics.store (release, a full fence on x86, which shouldNotify
 * and enableNotifications rely on before reading the driver's event suppression area).
 *
 * With inflight tracking (packed-inflight.ts) every chain taken is recorded before popChain returns it,
 * and every used descriptor is bracketed by the tracker's updates, one at a time.
 */

import type { DirtyLog } from "../memory/dirty-log.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import type { PackedInflightQueue, PackedInflightRecovery, RecoveredChain } from "./packed-inflight.js";
import {
  DescriptorChain, HOST_IS_LITTLE_ENDIAN, MAX_INDIRECT_ENTRIES, MAX_QUEUE_SIZE, POP_BAD_CHAIN, POP_EMPTY, POP_RING_BROKEN,
  VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, hex, locateRingPart, type QueueOptions, type RingAddresses, type VirtQueue,
} from "./queue.js";

/** Packed descriptor flag: equals the driver's wrap counter in a descriptor it made available. */
export const VIRTQ_DESC_F_AVAIL = 1 << 7;
/** Packed descriptor flag: equals AVAIL in a used descriptor (and the device's wrap counter). */
export const VIRTQ_DESC_F_USED = 1 << 15;
/** Event suppression flags: notify on every event. */
export const RING_EVENT_FLAGS_ENABLE = 0;
/** Event suppression flags: do not notify. */
export const RING_EVENT_FLAGS_DISABLE = 1;
/** Event suppression flags (only with EVENT_IDX): notify when the descriptor at off_wrap is reached. */
export const RING_EVENT_FLAGS_DESC = 2;

/** Bit 15 of an off_wrap field and of each half of the vring base: the wrap counter. */
const WRAP_BIT = 0x8000;
/** Bits 0-14: a ring position. */
const POS_MASK = 0x7fff;
const TWO_32 = 4294967296;

/** A packed ring's position: where the device reads next, where it writes its next used descriptor, and their wrap counters. */
export interface PackedRingState {
  /** Ring slot of the next descriptor to read. */
  availIdx: number;
  /** Wrap counter that slot's AVAIL flag must equal. */
  availWrap: boolean;
  /** Ring slot of the next used descriptor to write. */
  usedIdx: number;
  /** Wrap counter written into used descriptors' AVAIL and USED flags. */
  usedWrap: boolean;
}

/**
 * The state as SET_VRING_BASE / GET_VRING_BASE carry it for packed rings: last avail index in bits 0-14,
 * its wrap counter in bit 15, used index in bits 16-30, its wrap counter in bit 31. This is QEMU's layout
 * (hw/virtio/virtio.c virtio_queue_packed_get_last_avail_idx, which vhost.c sends as is).
 */
export function encodePackedBase(s: PackedRingState): number {
  const avail = (s.availIdx & POS_MASK) | (s.availWrap ? WRAP_BIT : 0);
  const used = (s.usedIdx & POS_MASK) | (s.usedWrap ? WRAP_BIT : 0);
  return (avail + used * 65536) >>> 0;
}

/** The inverse of encodePackedBase. A fresh ring (QEMU after reset) is 0x80008000: slot 0, both counters 1. */
export function decodePackedBase(base: number): PackedRingState {
  const used = base >>> 16;
  return { availIdx: base & POS_MASK, availWrap: (base & WRAP_BIT) !== 0, usedIdx: used & POS_MASK, usedWrap: (used & WRAP_BIT) !== 0 };
}

/** Device-side state and logic for one packed virtqueue. */
export class PackedQueue implements VirtQueue {
  /** Number of descriptors in the ring (any size in 1..32768: packed rings need no power of two). */
  readonly size: number;
  /** Set once the ring is found corrupt; from then on popChain returns POP_RING_BROKEN. */
  broken = false;
  /** Reason for the last POP_BAD_CHAIN / POP_RING_BROKEN, for logging. */
  lastError = "";

  private readonly mem: GuestMemory;
  private readonly eventIdx: boolean;
  private readonly indirect: boolean;
  /** The ring as u32 words: [addr lo, addr hi, len, id | flags << 16] per descriptor. */
  private readonly desc32: Uint32Array;
  /** The ring as u16: id at 8i + 6, flags at 8i + 7. */
  private readonly desc16: Uint16Array;
  /** Driver event suppression area (written by the driver): [off_wrap, flags]; says when to interrupt it. */
  private readonly driverEvent: Uint16Array;
  /** Device event suppression area (written by us): [off_wrap, flags]; says when the driver should kick. */
  private readonly deviceEvent: Uint16Array;
  /** One DataView per guest region, for indirect tables which may sit anywhere with any alignment. */
  private readonly regionViews: DataView[];
  /** Ring slots taken by each buffer id in flight (0: not in flight): what its completion advances the used position by. */
  private readonly slotsOf: Uint16Array;

  private availPos: number;
  /** 1 or 0, so it compares directly with a flag bit. */
  private availWrap: number;
  private usedPos: number;
  private usedWrap: number;
  /** Ring slots handed back since the last shouldNotify: the range the driver's event offset is checked against. */
  private usedSinceSignal = 0;
  /** False until the first notification decision: the first one after (re)connect is always sent in DESC mode. */
  private signalledValid = false;
  /** Ring slots taken by the chains in flight (the sum of slotsOf): never more than the ring holds. */
  private outstanding = 0;

  /** Inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), or null when the frontend did not set it up. */
  private inflight: PackedInflightQueue | null = null;
  /** Chains a previous backend took and never completed, oldest first: popChain hands them out before new ones. */
  private resubmit: RecoveredChain[] = [];
  private resubmitPos = 0;

  /** While migrating with VHOST_VRING_F_LOG: the log our ring writes are marked in, else null. */
  private ringLog: DirtyLog | null = null;
  /** Guest address of the descriptor ring, where used descriptors are logged. */
  private readonly descGpa: number;
  /** Guest address the device event suppression area is logged at (log_guest_addr). */
  private deviceLogAddr = 0;

  /** Throws RangeError with a clear message if size or base is invalid, or any ring part is misaligned or not wholly inside ONE guest memory region. */
  constructor(mem: GuestMemory, size: number, addrs: RingAddresses, opts: QueueOptions, base: number) {
    if (!HOST_IS_LITTLE_ENDIAN) throw new RangeError("PackedQueue needs a little-endian host: ring views are native typed arrays");
    if (!Number.isInteger(size) || size < 1 || size > MAX_QUEUE_SIZE) {
      throw new RangeError(`queue size must be an integer in 1..${MAX_QUEUE_SIZE}, got ${size}`);
    }
    if (!Number.isInteger(base) || base < 0 || base > 0xffffffff) throw new RangeError(`packed vring base must be a u32, got ${base}`);
    const state = decodePackedBase(base);
    if (state.availIdx >= size || state.usedIdx >= size) {
      throw new RangeError(`packed vring base ${hex(base)}: avail index ${state.availIdx} and used index ${state.usedIdx} must be below queue size ${size}`);
    }
    this.mem = mem;
    this.size = size;
    this.eventIdx = opts.eventIdx;
    this.indirect = opts.indirect;

    const descOff = locateRingPart(mem, "descriptor ring", addrs.descAddr, 16 * size, 16);
    const driverOff = locateRingPart(mem, "driver event suppression area", addrs.availAddr, 4, 4);
    const deviceOff = locateRingPart(mem, "device event suppression area", addrs.usedAddr, 4, 4);
    const ring = mem.regions[descOff.region].bytes.buffer;
    this.desc32 = new Uint32Array(ring, descOff.byteOffset, 4 * size);
    this.desc16 = new Uint16Array(ring, descOff.byteOffset, 8 * size);
    this.driverEvent = new Uint16Array(mem.regions[driverOff.region].bytes.buffer, driverOff.byteOffset, 2);
    this.deviceEvent = new Uint16Array(mem.regions[deviceOff.region].bytes.buffer, deviceOff.byteOffset, 2);
    this.regionViews = mem.regions.map((r) => new DataView(r.bytes.buffer, r.bytes.byteOffset, r.bytes.byteLength));
    this.slotsOf = new Uint16Array(size);

    this.descGpa = addrs.descAddr;
    this.availPos = state.availIdx;
    this.availWrap = state.availWrap ? 1 : 0;
    this.usedPos = state.usedIdx;
    this.usedWrap = state.usedWrap ? 1 : 0;
  }

  /** Ring slot of the next descriptor we will read. */
  get lastAvailIdx(): number {
    return this.availPos;
  }

  /** Ring slot of the next used descriptor we will write. */
  get usedIdx(): number {
    return this.usedPos;
  }

  /** The wrap counter the next available descriptor must carry. */
  get availWrapCounter(): boolean {
    return this.availWrap === 1;
  }

  /** The wrap counter our next used descriptor will carry. */
  get usedWrapCounter(): boolean {
    return this.usedWrap === 1;
  }

  /** Both positions and wrap counters, in the layout of encodePackedBase. */
  get vringBase(): number {
    return encodePackedBase({ availIdx: this.availPos, availWrap: this.availWrap === 1, usedIdx: this.usedPos, usedWrap: this.usedWrap === 1 });
  }

  /** True if `flags` mark a descriptor the driver made available in the lap whose wrap counter is `wrap` (0 or 1). */
  private static isAvailable(flags: number, wrap: number): boolean {
    return ((flags >>> 7) & 1) === wrap && (flags >>> 15) !== wrap;
  }

  /** True if the driver has made buffers available that we have not consumed yet (false once broken). */
  hasAvailable(): boolean {
    if (this.broken) return false;
    if (this.resubmitPos < this.resubmit.length) return true;
    return PackedQueue.isAvailable(Atomics.load(this.desc16, 8 * this.availPos + 7), this.availWrap);
  }

  /** Takes the next available chain into `chain`: >= 0 buffer id on success, else POP_EMPTY / POP_BAD_CHAIN / POP_RING_BROKEN. */
  popChain(chain: DescriptorChain): number {
    if (this.broken) return POP_RING_BROKEN;
    if (this.resubmitPos < this.resubmit.length) return this.popResubmitted(chain);
    const size = this.size;
    const start = this.availPos;
    let pos = start;
    let wrap = this.availWrap;
    // Acquire: the driver writes this flags word last, after every other field of the chain.
    if (!PackedQueue.isAvailable(Atomics.load(this.desc16, 8 * pos + 7), wrap)) return POP_EMPTY;
    chain.count = 0;
    let taken = 0;
    let id = 0;
    let err: string | null = null;
    for (;;) {
      const word = this.desc32[4 * pos + 3];
      const flags = word >>> 16;
      // The driver marks every descriptor of a chain available before the first (2.8.21.1); one that is
      // not means the NEXT flags run into slots it never filled, and the chain's end cannot be known.
      if (taken > 0 && !PackedQueue.isAvailable(flags, wrap)) {
        return this.breakRing(`chain at ring slot ${start}: slot ${pos} follows a NEXT flag but the driver has not made it available`);
      }
      taken++;
      // After a malformed descriptor the walk goes on, only to find where the chain ends and its buffer id.
      if (err === null) {
        const w = 4 * pos;
        err = this.take(chain, this.desc32[w] + this.desc32[w + 1] * TWO_32, this.desc32[w + 2], flags, pos);
      }
      id = word & 0xffff;
      pos++;
      if (pos === size) {
        pos = 0;
        wrap ^= 1;
      }
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) break;
      if (taken === size) return this.breakRing(`chain at ring slot ${start} is longer than the queue size ${size}`);
    }
    if (id >= size) return this.breakRing(`chain at ring slot ${start} has buffer id ${id}, not below queue size ${size}`);
    if (this.slotsOf[id] !== 0) return this.breakRing(`chain at ring slot ${start} has buffer id ${id}, which is already in flight`);
    // The driver reuses slots only once they come back used: more in flight means it overwrote a chain we hold.
    if (this.outstanding + taken > size) {
      return this.breakRing(`chain at ring slot ${start} takes ${taken} slots while ${this.outstanding} are in flight, more than the queue size ${size}`);
    }
    // Consumed even when malformed: the caller returns it (len 0) so the driver gets its buffer id back.
    this.availPos = pos;
    this.availWrap = wrap;
    this.slotsOf[id] = taken;
    this.outstanding += taken;
    if (this.inflight !== null) this.inflight.started(id, this.desc32, start, taken);
    chain.head = id;
    if (err !== null) {
      chain.count = 0;
      this.lastError = `buffer ${id} at ring slot ${start}: ${err}`;
      return POP_BAD_CHAIN;
    }
    return id;
  }

  /** The next chain a previous backend left in flight, from the descriptors the inflight region kept of it. */
  private popResubmitted(chain: DescriptorChain): number {
    const c = this.resubmit[this.resubmitPos++];
    chain.head = c.id;
    chain.count = 0;
    for (let k = 0; k < c.slots; k++) {
      const err = this.take(chain, c.addr[k], c.len[k], c.flags[k], k);
      if (err !== null) {
        chain.count = 0;
        this.lastError = `resubmitted buffer ${c.id}: ${err}`;
        return POP_BAD_CHAIN;
      }
    }
    return c.id;
  }

  /**
   * Turns on inflight tracking with this queue's part of the frontend's inflight region, before the first
   * pop. When a previous backend left state there, the queue resumes at the region's used position and
   * wrap counter, and reads next after the chains it left in flight, which popChain hands out first: the
   * SET_VRING_BASE state is stale then (after a crash QEMU cannot read a packed ring's position from guest
   * memory, and sends what it last knew). Throws RangeError on a region it cannot trust.
   */
  trackInflight(tracker: PackedInflightQueue): PackedInflightRecovery {
    if (tracker.ringSize !== this.size) throw new RangeError(`inflight tracker is for ${tracker.ringSize} descriptors, the ring has ${this.size}`);
    const here = { availIdx: this.availPos, availWrap: this.availWrap === 1, usedIdx: this.usedPos, usedWrap: this.usedWrap === 1 };
    const r = tracker.recover(here, (slot) => Atomics.load(this.desc16, 8 * slot + 7));
    if (r.recovered) {
      this.availPos = r.state.availIdx;
      this.availWrap = r.state.availWrap ? 1 : 0;
      this.usedPos = r.state.usedIdx;
      this.usedWrap = r.state.usedWrap ? 1 : 0;
      this.slotsOf.fill(0);
      this.outstanding = 0;
      for (const c of r.resubmit) {
        this.slotsOf[c.id] = c.slots;
        this.outstanding += c.slots;
      }
      this.resubmit = r.resubmit;
      this.resubmitPos = 0;
    }
    this.inflight = tracker;
    return r;
  }

  /** Marks the ring unusable: the guest broke an invariant we cannot recover from without a reset. */
  private breakRing(reason: string): number {
    this.broken = true;
    this.lastError = reason;
    return POP_RING_BROKEN;
  }

  /**
   * Adds one descriptor (a buffer, or an indirect table's buffers) to `chain`; returns null or why it is
   * malformed. `slot` names it in messages: its ring slot, or its place in a resubmitted chain.
   */
  private take(chain: DescriptorChain, addr: number, len: number, flags: number, slot: number): string | null {
    if ((flags & VIRTQ_DESC_F_INDIRECT) === 0) return this.addBuffer(chain, addr, len, (flags & VIRTQ_DESC_F_WRITE) !== 0, slot, false);
    if (!this.indirect) return `descriptor ${slot} has INDIRECT but indirect descriptors were not negotiated`;
    if ((flags & VIRTQ_DESC_F_NEXT) !== 0) return `descriptor ${slot} has both INDIRECT and NEXT`;
    if (len === 0 || len % 16 !== 0) return `descriptor ${slot}: indirect table length ${len} is not a non-zero multiple of 16`;
    const entries = len / 16;
    if (entries > MAX_INDIRECT_ENTRIES) return `descriptor ${slot}: indirect table has ${entries} entries, more than ${MAX_INDIRECT_ENTRIES}`;
    const r = this.mem.findRegion(addr, len);
    if (r < 0) return `descriptor ${slot}: indirect table [${hex(addr)}, +${len}) is not wholly inside one guest memory region`;
    // The WRITE flag of the descriptor pointing at the table carries no meaning (2.8.19): ignored.
    const view = this.regionViews[r];
    const off = addr - this.mem.regions[r].guestAddr;
    for (let k = 0; k < entries; k++) {
      const p = off + 16 * k;
      const f = view.getUint16(p + 14, true);
      // The table is read in order, whole: NEXT and the id mean nothing inside it (2.8.19), only WRITE does.
      if ((f & VIRTQ_DESC_F_INDIRECT) !== 0) return `indirect descriptor ${k} has INDIRECT inside an indirect table (nesting is forbidden)`;
      const a = view.getUint32(p, true) + view.getUint32(p + 4, true) * TWO_32;
      const err = this.addBuffer(chain, a, view.getUint32(p + 8, true), (f & VIRTQ_DESC_F_WRITE) !== 0, k, true);
      if (err !== null) return err;
    }
    return null;
  }

  /** Appends one buffer to `chain` after checking order, capacity and that it is guest memory; returns null or why not. */
  private addBuffer(chain: DescriptorChain, addr: number, len: number, writable: boolean, i: number, inTable: boolean): string | null {
    const n = chain.count;
    if (!writable && n > 0 && chain.writable[n - 1] === 1) return `${descName(inTable, i)} is device-readable but follows a device-writable one`;
    if (n >= chain.capacity) return `more than ${chain.capacity} descriptors (longer than the chain capacity)`;
    // One region is the common case; a buffer may also run across regions adjacent in guest space.
    if (this.mem.findRegion(addr, len) < 0 && !this.mem.covers(addr, len)) {
      return `${descName(inTable, i)}: buffer [${hex(addr)}, +${len}) is not inside guest memory`;
    }
    chain.addr[n] = addr;
    chain.len[n] = len;
    chain.writable[n] = writable ? 1 : 0;
    chain.count = n + 1;
    return null;
  }

  /** Returns buffer `id` to the driver with `writtenLen` bytes written: id and len first, then the flags that publish them. */
  pushUsed(id: number, writtenLen: number): void {
    const slots = id >= 0 && id < this.size ? this.slotsOf[id] : 0;
    if (slots === 0) throw new RangeError(`pushUsed: buffer id ${id} is not in flight`);
    const pos = this.usedPos;
    const wrap = this.usedWrap;
    let next = pos + slots;
    let nextWrap = wrap;
    if (next >= this.size) {
      next -= this.size;
      nextWrap ^= 1;
    }
    // Inflight tracking brackets the used descriptor (see packed-inflight.ts for why in this order).
    const inflight = this.inflight;
    if (inflight !== null) inflight.beforeUsed(id, next, nextWrap);
    this.desc32[4 * pos + 2] = writtenLen >>> 0;
    this.desc16[8 * pos + 6] = id;
    // WRITE tells the driver the length is meaningful (2.8.4); AVAIL = USED = our wrap counter marks it used.
    const flags = (wrap === 1 ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0) | (writtenLen > 0 ? VIRTQ_DESC_F_WRITE : 0);
    // Release: id and len above must be visible before the driver can see the flags.
    Atomics.store(this.desc16, 8 * pos + 7, flags);
    // Migration: the used descriptor's page once all of it is written (the flags store publishes it).
    if (this.ringLog !== null) this.ringLog.mark(this.descGpa + 16 * pos, 16);
    if (inflight !== null) inflight.afterUsed(id);
    this.slotsOf[id] = 0;
    this.outstanding -= slots;
    this.usedPos = next;
    this.usedWrap = nextWrap;
    this.usedSinceSignal += slots;
  }

  /** After a batch of pushUsed: true if the driver wants an interrupt now (driver event suppression area, 2.8.10). */
  shouldNotify(): boolean {
    const moved = this.usedSinceSignal;
    const valid = this.signalledValid;
    this.usedSinceSignal = 0;
    this.signalledValid = true;
    // Nothing published since the last decision: nothing to tell the driver about.
    if (moved === 0) return false;
    const flags = Atomics.load(this.driverEvent, 1);
    if (flags === RING_EVENT_FLAGS_DISABLE) return false;
    // ENABLE, or a mode the driver may not use here: a spurious interrupt is harmless, a missing one hangs it.
    if (flags !== RING_EVENT_FLAGS_DESC || !this.eventIdx) return true;
    // The first decision after (re)connect always notifies: the previous backend may have published entries it never signalled.
    if (!valid || moved >= this.size) return true;
    const offWrap = Atomics.load(this.driverEvent, 0);
    // Positions count from the start of our current lap; an event slot of the other lap sits one ring size before it.
    let event = offWrap & POS_MASK;
    if (offWrap >>> 15 !== this.usedWrap) event -= this.size;
    const now = this.usedPos;
    // vring_need_event: did the used position step past `event` while moving `moved` slots up to `now` (mod 2^16)?
    return ((now - event - 1) & 0xffff) < moved;
  }

  /** Asks the driver to stop kicking while we are busy polling the queue anyway. */
  disableNotifications(): void {
    Atomics.store(this.deviceEvent, 1, RING_EVENT_FLAGS_DISABLE);
    if (this.ringLog !== null) this.ringLog.mark(this.deviceLogAddr, 4);
  }

  /** Marks used descriptors and device event area writes in `log` (null: stop), the area logged at `usedLogAddr`. */
  setRingLog(log: DirtyLog | null, usedLogAddr: number): void {
    this.ringLog = log;
    this.deviceLogAddr = usedLogAddr;
  }

  /** Re-arms driver kicks; returns true if buffers are already available (a kick may have been suppressed: keep processing). */
  enableNotifications(): boolean {
    if (this.eventIdx) {
      // Kick us when the slot we read next is made available (QEMU's device does the same).
      Atomics.store(this.deviceEvent, 0, this.availPos | (this.availWrap << 15));
      Atomics.store(this.deviceEvent, 1, RING_EVENT_FLAGS_DESC);
    } else {
      Atomics.store(this.deviceEvent, 1, RING_EVENT_FLAGS_ENABLE);
    }
    if (this.ringLog !== null) this.ringLog.mark(this.deviceLogAddr, 4);
    // The store above is a full fence, so this re-read cannot miss a buffer added before the driver read the area.
    return this.hasAvailable();
  }
}

/** Names a descriptor in error messages; only called on failure so the walk itself builds no strings. */
function descName(inTable: boolean, i: number): string {
  return inTable ? `indirect descriptor ${i}` : `descriptor ${i}`;
}
