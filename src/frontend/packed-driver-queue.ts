/**
 * Driver side of a packed virtqueue (virtio 1.2, section 2.8): the mirror image of virtqueue/packed.ts,
 * written the way Linux's virtio_ring.c drives one.
 *
 * A chain takes the next free ring slots in order; allocDescriptors reserves them and hands out one handle
 * per descriptor (id + k * size for the chain's k-th descriptor: the first handle is the buffer id), so
 * the client can write descriptors by handle as it does for split rings. Every descriptor carries the id
 * and the AVAIL/USED bits of its slot's lap; the first one's flags are stored last (release), which
 * publishes the whole chain. A used descriptor is read at our used position once its AVAIL and USED bits
 * both equal our used wrap counter (Atomics.load: acquire); the position then skips the slots its chain
 * took. Allocation and publication must alternate (the client does both in one synchronous step).
 */
import { eventfdSignal } from '../os/libc.js';
import { VIRTQ_DESC_F_NEXT } from '../virtqueue/queue.js';
import {
  RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, encodePackedBase,
} from '../virtqueue/packed.js';
import { needEvent, type DriverRing, type RingLayout } from './driver-queue.js';

/** Byte sizes of a packed ring's parts: the descriptor ring and the two 4-byte event suppression areas. */
export function packedRingSizes(size: number): { desc: number; avail: number; used: number } {
  return { desc: 16 * size, avail: 4, used: 4 };
}

/** One packed virtqueue seen from the driver. */
export class PackedDriverQueue implements DriverRing {
  /** Number of ring slots (any size in 1..32768). */
  readonly size: number;
  /** Where the ring parts are: desc = descriptor ring, avail = driver event area, used = device event area. */
  readonly layout: RingLayout;
  /** Ring slots not reserved by a chain in flight. */
  freeCount: number;
  /** Slot our next chain starts at, and that lap's wrap counter (1 or 0). */
  nextAvail = 0;
  availWrap = 1;
  /** Slot of the next used descriptor we read, and the wrap counter it will carry. */
  lastUsed = 0;
  usedWrap = 1;
  private readonly descView: DataView;
  private readonly desc16: Uint16Array;
  /** Driver event suppression area (ours): [off_wrap, flags]. */
  private readonly driverEvent: Uint16Array;
  /** Device event suppression area (the device's): [off_wrap, flags]. */
  private readonly deviceEvent: Uint16Array;
  private readonly eventIdx: boolean;
  private readonly freeIds: Uint16Array;
  private freeIdCount: number;
  /** Slots each published id took (0: not in flight). */
  private readonly slotsOf: Uint16Array;
  /** The chain between allocDescriptors and publish: its id, length, and the first slot's flags (stored last). */
  private pendingId = -1;
  private pendingSlots = 0;
  private pendingHeadFlags = 0;
  /** Set once the device returned an id we never published: the ring can no longer be followed. */
  private lost = false;

  /** `memory` is the whole shared memory; `layout` gives the ring parts' offsets in it; `kickFd` is signalled to notify. */
  constructor(memory: Uint8Array, size: number, layout: RingLayout, eventIdx: boolean, private readonly kickFd: number) {
    if (!Number.isInteger(size) || size < 1 || size > 32768) throw new RangeError(`queue size must be an integer in 1..32768, got ${size}`);
    this.size = size;
    this.layout = layout;
    this.eventIdx = eventIdx;
    const base = memory.byteOffset;
    this.descView = new DataView(memory.buffer, base + layout.desc, 16 * size);
    this.desc16 = new Uint16Array(memory.buffer, base + layout.desc, 8 * size);
    this.driverEvent = new Uint16Array(memory.buffer, base + layout.avail, 2);
    this.deviceEvent = new Uint16Array(memory.buffer, base + layout.used, 2);
    this.freeIds = new Uint16Array(size);
    this.slotsOf = new Uint16Array(size);
    this.freeIdCount = 0;
    this.freeCount = size;
    this.reset();
  }

  /** Where this driver stands, in the packed vring base layout (after reset: 0x80008000, as QEMU sends). */
  get vringBase(): number {
    return encodePackedBase({ availIdx: this.nextAvail, availWrap: this.availWrap === 1, usedIdx: this.lastUsed, usedWrap: this.usedWrap === 1 });
  }

  /** Clears the ring and both event areas for a fresh start at slot 0 with wrap counters 1. */
  reset(): void {
    new Uint8Array(this.descView.buffer, this.descView.byteOffset, this.descView.byteLength).fill(0);
    this.driverEvent.fill(0);
    this.deviceEvent.fill(0);
    this.nextAvail = 0;
    this.availWrap = 1;
    this.lastUsed = 0;
    this.usedWrap = 1;
    this.slotsOf.fill(0);
    for (let i = 0; i < this.size; i++) this.freeIds[i] = this.size - 1 - i;
    this.freeIdCount = this.size;
    this.freeCount = this.size;
    this.pendingId = -1;
    this.lost = false;
    // With EVENT_IDX: interrupt us when the device writes the slot we read next.
    this.armInterrupts();
  }

  /** Reserves the next `n` slots and a buffer id; handles are id + k * size. Null if fewer slots or no id are free. */
  allocDescriptors(n: number): number[] | null {
    if (this.pendingId >= 0) throw new Error(`packed ring: chain ${this.pendingId} was allocated but never published`);
    if (n < 1 || n > this.freeCount || this.freeIdCount === 0) return null;
    const id = this.freeIds[--this.freeIdCount];
    this.freeCount -= n;
    this.pendingId = id;
    this.pendingSlots = n;
    this.pendingHeadFlags = 0;
    const out = new Array<number>(n);
    for (let k = 0; k < n; k++) out[k] = id + k * this.size;
    return out;
  }

  /** Gives a completed chain's id and slots back (the used position already moved past them in reap). */
  freeDescriptors(handles: readonly number[]): void {
    this.freeIds[this.freeIdCount++] = handles[0] % this.size;
    this.freeCount += handles.length;
  }

  /** Writes the pending chain's descriptor named by `handle` into its slot, with the id and its lap's AVAIL/USED bits. */
  writeDescriptor(handle: number, addr: number | bigint, len: number, flags: number, _next: number): void {
    const id = handle % this.size;
    const k = Math.floor(handle / this.size);
    if (id !== this.pendingId || k >= this.pendingSlots) throw new RangeError(`packed ring: descriptor handle ${handle} is not part of the chain being written`);
    let slot = this.nextAvail + k;
    let wrap = this.availWrap;
    if (slot >= this.size) {
      slot -= this.size;
      wrap ^= 1;
    }
    const p = 16 * slot;
    this.descView.setBigUint64(p, BigInt(addr), true);
    this.descView.setUint32(p + 8, len >>> 0, true);
    this.descView.setUint16(p + 12, id, true);
    const f = (flags & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | (wrap === 1 ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED);
    // The first descriptor's flags are what makes the chain visible: stored by publish, after the rest.
    if (k === 0) this.pendingHeadFlags = f;
    else this.descView.setUint16(p + 14, f, true);
  }

  /** Writes the pending chain in order (NEXT set on all but the last). */
  writeChain(handles: readonly number[], addrs: readonly number[], lens: readonly number[], flags: readonly number[]): void {
    const last = handles.length - 1;
    for (let k = 0; k <= last; k++) this.writeDescriptor(handles[k], addrs[k], lens[k], flags[k] | (k < last ? VIRTQ_DESC_F_NEXT : 0), 0);
  }

  /** Packed indirect entries: read in order, whole; only WRITE means something (no NEXT, no id). */
  writeIndirectEntry(table: DataView, i: number, _count: number, addr: number, len: number, flags: number): void {
    table.setBigUint64(16 * i, BigInt(addr), true);
    table.setUint32(16 * i + 8, len, true);
    table.setUint16(16 * i + 12, 0, true);
    table.setUint16(16 * i + 14, flags, true);
  }

  /** Publishes the pending chain (`head` is its id) and kicks the device unless its event area says not to. */
  publish(head: number): void {
    if (head !== this.pendingId) throw new RangeError(`packed ring: chain ${head} is not the one being written (${this.pendingId})`);
    const n = this.pendingSlots;
    const first = this.nextAvail;
    this.slotsOf[head] = n;
    this.pendingId = -1;
    let next = first + n;
    if (next >= this.size) {
      next -= this.size;
      this.availWrap ^= 1;
    }
    this.nextAvail = next;
    // Release: every other field of the chain is visible before its first descriptor's flags.
    Atomics.store(this.desc16, 8 * first + 7, this.pendingHeadFlags);
    if (this.kickNeeded(n)) eventfdSignal(this.kickFd);
  }

  /** Kicks the device unconditionally. */
  kick(): void {
    eventfdSignal(this.kickFd);
  }

  /** Linux's virtqueue_kick_prepare_packed for `added` slots just published (the store above was a full fence). */
  private kickNeeded(added: number): boolean {
    const flags = Atomics.load(this.deviceEvent, 1);
    if (flags !== RING_EVENT_FLAGS_DESC) return flags !== RING_EVENT_FLAGS_DISABLE;
    const offWrap = Atomics.load(this.deviceEvent, 0);
    let event = offWrap & 0x7fff;
    if (offWrap >>> 15 !== this.availWrap) event -= this.size;
    return needEvent(event & 0xffff, this.nextAvail, (this.nextAvail - added) & 0xffff);
  }

  /** Calls `fn(id, len)` for every new used descriptor; returns how many there were. */
  reap(fn: (id: number, len: number) => void): number {
    let n = 0;
    while (!this.lost) {
      const flags = Atomics.load(this.desc16, 8 * this.lastUsed + 7);
      const avail = (flags & VIRTQ_DESC_F_AVAIL) !== 0 ? 1 : 0;
      const used = (flags & VIRTQ_DESC_F_USED) !== 0 ? 1 : 0;
      if (avail !== used || used !== this.usedWrap) break;
      const p = 16 * this.lastUsed;
      const id = this.descView.getUint16(p + 12, true);
      const len = this.descView.getUint32(p + 8, true);
      const slots = id < this.size ? this.slotsOf[id] : 0;
      // An id we never published cannot say how far to move: report it once and stop reading this ring.
      if (slots === 0) {
        this.lost = true;
        fn(id, len);
        return n + 1;
      }
      this.slotsOf[id] = 0;
      let next = this.lastUsed + slots;
      if (next >= this.size) {
        next -= this.size;
        this.usedWrap ^= 1;
      }
      this.lastUsed = next;
      n++;
      fn(id, len);
    }
    if (n > 0) this.armInterrupts();
    return n;
  }

  /** Asks for a call at the next used descriptor (EVENT_IDX: at our used position; else for every one). */
  private armInterrupts(): void {
    if (this.eventIdx) {
      Atomics.store(this.driverEvent, 0, this.lastUsed | (this.usedWrap << 15));
      Atomics.store(this.driverEvent, 1, RING_EVENT_FLAGS_DESC);
    } else {
      Atomics.store(this.driverEvent, 1, RING_EVENT_FLAGS_ENABLE);
    }
  }
}
