/**
 * Driver side of a split virtqueue (virtio 1.2, section 2.7): the mirror image of virtqueue/split.ts.
 *
 * We own the descriptor table and the available ring and only read the used ring. Ordering: descriptors
 * and avail ring slots are plain stores, published by an Atomics.store of avail.idx (release); used.idx
 * is read with Atomics.load (acquire) before the used elements it covers. The kick decision re-reads
 * used.flags / avail_event after that store, which is a full fence on x86 (virtio 2.7.13, "the driver
 * MUST perform a suitable memory barrier before reading").
 */
import { eventfdSignal } from '../os/libc.js';
import { VIRTQ_DESC_F_NEXT, VRING_USED_F_NO_NOTIFY } from '../virtqueue/split.js';

/** Byte sizes of the three ring parts for a queue of `size` entries (event fields included). */
export function ringSizes(size: number): { desc: number; avail: number; used: number } {
  return { desc: 16 * size, avail: 6 + 2 * size, used: 6 + 8 * size };
}

/** vring_need_event: has `newIdx` moved past `eventIdx` since `oldIdx` (all free-running u16)? */
export function needEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

/** Where a queue's rings sit in the shared memory (offsets = guest physical addresses). */
export interface RingLayout {
  /** Descriptor table, 16-byte aligned. */
  desc: number;
  /** Available ring, 2-byte aligned. */
  avail: number;
  /** Used ring, 4-byte aligned. */
  used: number;
}

/** What the client needs from a driver-side ring, split (DriverQueue) or packed (PackedDriverQueue). */
export interface DriverRing {
  /** Number of descriptors. */
  readonly size: number;
  /** Descriptors (ring slots) currently not part of any chain. */
  readonly freeCount: number;
  /** Where the ring parts are (offsets in the shared memory = guest physical addresses). */
  readonly layout: RingLayout;
  /** The vring base for SET_VRING_BASE that starts the device where this driver stands. */
  readonly vringBase: number;
  /** Clears the rings for a fresh start. Memory must not be in use by a device. */
  reset(): void;
  /**
   * Takes `n` descriptors, or null if fewer are free. The first handle is the id completions come back
   * with (reap, publish); every handle names one descriptor for writeDescriptor / writeChain.
   */
  allocDescriptors(n: number): number[] | null;
  /** Gives the descriptors of a completed chain back. */
  freeDescriptors(handles: readonly number[]): void;
  /** Writes one descriptor (`next` only means something in split rings). */
  writeDescriptor(handle: number, addr: number | bigint, len: number, flags: number, next: number): void;
  /** Writes a chain over `handles` in order (NEXT set on all but the last). */
  writeChain(handles: readonly number[], addrs: readonly number[], lens: readonly number[], flags: readonly number[]): void;
  /** Writes entry i of an indirect table of `count` entries in this ring's descriptor format. */
  writeIndirectEntry(table: DataView, i: number, count: number, addr: number, len: number, flags: number): void;
  /** Makes chain `head` (the first handle) available and kicks the device unless it asked not to be. */
  publish(head: number): void;
  /** Kicks the device unconditionally. */
  kick(): void;
  /** Calls `fn(id, len)` for every new used element; returns how many there were. */
  reap(fn: (id: number, len: number) => void): number;
}

/** One split virtqueue seen from the driver. */
export class DriverQueue implements DriverRing {
  /** Number of entries (a power of two). */
  readonly size: number;
  /** Descriptors currently not part of any chain. */
  freeCount: number;
  /** Our next avail index (free-running u16): what the device's GET_VRING_BASE reports once it caught up. */
  availIdx = 0;
  /** Next used index we will read (free-running u16). */
  lastUsed = 0;
  private readonly mask: number;
  private readonly descView: DataView;
  private readonly avail16: Uint16Array;
  private readonly used16: Uint16Array;
  private readonly used32: Uint32Array;
  private readonly freeStack: Uint16Array;
  private readonly eventIdx: boolean;

  /** Where the rings are (offsets in the shared memory = guest physical addresses). */
  readonly layout: RingLayout;

  /** `memory` is the whole shared memory; `layout` gives the rings' offsets in it; `kickFd` is signalled to notify. */
  constructor(memory: Uint8Array, size: number, layout: RingLayout, eventIdx: boolean, private readonly kickFd: number) {
    this.layout = layout;
    if (!Number.isInteger(size) || size < 1 || size > 32768 || (size & (size - 1)) !== 0) throw new RangeError(`queue size must be a power of two in 1..32768, got ${size}`);
    this.size = size;
    this.mask = size - 1;
    this.eventIdx = eventIdx;
    const s = ringSizes(size);
    const base = memory.byteOffset;
    this.descView = new DataView(memory.buffer, base + layout.desc, s.desc);
    this.avail16 = new Uint16Array(memory.buffer, base + layout.avail, s.avail / 2);
    this.used16 = new Uint16Array(memory.buffer, base + layout.used, s.used / 2);
    this.used32 = new Uint32Array(memory.buffer, base + layout.used, 1 + 2 * size);
    this.freeStack = new Uint16Array(size);
    for (let i = 0; i < size; i++) this.freeStack[i] = size - 1 - i;
    this.freeCount = size;
  }

  /**
   * Clears the rings for a fresh start at `index` (default 0): avail.idx, used.idx, used_event and
   * avail_event all set to it, as in a ring that has already carried that many chains. Memory must not be
   * in use by a device.
   */
  reset(index = 0): void {
    new Uint8Array(this.descView.buffer, this.descView.byteOffset, this.descView.byteLength).fill(0);
    this.avail16.fill(0);
    this.used16.fill(0);
    const idx = index & 0xffff;
    this.avail16[1] = idx;
    this.avail16[2 + this.size] = idx;
    this.used16[1] = idx;
    this.used16[2 + 4 * this.size] = idx;
    this.availIdx = idx;
    this.lastUsed = idx;
  }

  /** For split rings the vring base is the next avail index. */
  get vringBase(): number {
    return this.availIdx;
  }

  /** Split indirect entries: flags (NEXT on all but the last) and the next index. */
  writeIndirectEntry(table: DataView, i: number, count: number, addr: number, len: number, flags: number): void {
    const more = i < count - 1;
    table.setBigUint64(16 * i, BigInt(addr), true);
    table.setUint32(16 * i + 8, len, true);
    table.setUint16(16 * i + 12, flags | (more ? VIRTQ_DESC_F_NEXT : 0), true);
    table.setUint16(16 * i + 14, more ? i + 1 : 0, true);
  }

  /** Takes `n` free descriptor indices, or null if fewer are free. */
  allocDescriptors(n: number): number[] | null {
    if (n < 1 || n > this.freeCount) return null;
    const out = new Array<number>(n);
    for (let i = 0; i < n; i++) out[i] = this.freeStack[--this.freeCount];
    return out;
  }

  /** Gives descriptor indices back. */
  freeDescriptors(indices: readonly number[]): void {
    for (const i of indices) this.freeStack[this.freeCount++] = i;
  }

  /** Writes descriptor `i`: address (guest physical; bigint for any 64-bit value), length, flags, next. */
  writeDescriptor(i: number, addr: number | bigint, len: number, flags: number, next: number): void {
    const p = 16 * i;
    this.descView.setBigUint64(p, BigInt(addr), true);
    this.descView.setUint32(p + 8, len >>> 0, true);
    this.descView.setUint16(p + 12, flags, true);
    this.descView.setUint16(p + 14, next, true);
  }

  /** Writes a chain over `indices` in order (NEXT set on all but the last). */
  writeChain(indices: readonly number[], addrs: readonly number[], lens: readonly number[], flags: readonly number[]): void {
    const last = indices.length - 1;
    for (let k = 0; k <= last; k++) {
      this.writeDescriptor(indices[k], addrs[k], lens[k], flags[k] | (k < last ? VIRTQ_DESC_F_NEXT : 0), k < last ? indices[k + 1] : 0);
    }
  }

  /** Makes chain `head` available and kicks the device unless it asked not to be. */
  publish(head: number): void {
    const old = this.availIdx;
    this.avail16[2 + (old & this.mask)] = head;
    const next = (old + 1) & 0xffff;
    this.availIdx = next;
    // Release: the ring slot and descriptors above are visible before the new index.
    Atomics.store(this.avail16, 1, next);
    if (this.kickNeeded(old, next)) eventfdSignal(this.kickFd);
  }

  /** Sets avail.idx to any value (hostile tests: an index far ahead of what was made available). */
  publishRawIndex(idx: number): void {
    this.availIdx = idx & 0xffff;
    Atomics.store(this.avail16, 1, this.availIdx);
    eventfdSignal(this.kickFd);
  }

  /** Kicks the device unconditionally. */
  kick(): void {
    eventfdSignal(this.kickFd);
  }

  private kickNeeded(oldIdx: number, newIdx: number): boolean {
    if (this.eventIdx) return needEvent(Atomics.load(this.used16, 2 + 4 * this.size), newIdx, oldIdx);
    return (Atomics.load(this.used16, 0) & VRING_USED_F_NO_NOTIFY) === 0;
  }

  /** Calls `fn(id, len)` for every new used element; returns how many there were. */
  reap(fn: (id: number, len: number) => void): number {
    const usedIdx = Atomics.load(this.used16, 1);
    let n = 0;
    while (this.lastUsed !== usedIdx) {
      const e = 1 + 2 * (this.lastUsed & this.mask);
      const id = this.used32[e];
      const len = this.used32[e + 1];
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
      n++;
      fn(id, len);
    }
    // Ask for a call at the next completion (only read by devices that negotiated EVENT_IDX).
    if (this.eventIdx && n > 0) Atomics.store(this.avail16, 2 + this.size, this.lastUsed);
    return n;
  }

  /** used.idx as the device last published it. */
  deviceUsedIdx(): number {
    return Atomics.load(this.used16, 1);
  }
}
