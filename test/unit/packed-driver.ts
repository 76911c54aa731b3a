/**
 * Packed ring test helpers: a guest driver for the ring unit tests, playing it the way Linux's
 * virtio_ring.c does, over any GuestMemory (see ring-memory.ts); and the packed inflight region decoded
 * by hand from the spec's struct layout.
 */

import assert from "node:assert/strict";
import type { GuestMemory } from "../../src/memory/guest-memory.js";
import {
  VIRTQ_DESC_F_INDIRECT as INDIRECT, VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_WRITE as WRITE, type RingAddresses,
} from "../../src/virtqueue/queue.js";
import {
  RING_EVENT_FLAGS_DESC as DESC, RING_EVENT_FLAGS_DISABLE as DISABLE, VIRTQ_DESC_F_AVAIL as AVAIL, VIRTQ_DESC_F_USED as USED,
  decodePackedBase, type PackedRingState,
} from "../../src/virtqueue/packed.js";
import { GuestAccess } from "./ring-memory.js";

/** What QEMU sends for a packed ring after a device reset: slot 0, both wrap counters 1. */
export const FRESH = 0x80008000;

/** One buffer of a chain as the guest describes it. */
export interface GuestBuf {
  addr: number;
  len: number;
  /** Device-writable (default: device-readable). */
  write?: boolean;
}

/** A descriptor exactly as written to the ring (the driver adds the AVAIL/USED bits of its slot). */
export interface RawDesc {
  addr: number;
  len: number;
  flags: number;
  /** Upper 32 address bits written as given (to build addresses beyond 2^53). */
  addrHi?: number;
}

/** One used descriptor as the driver reads it. */
export interface UsedElem {
  id: number;
  len: number;
}

/** Plays the guest driver of one packed virtqueue, as Linux's virtio_ring.c does. */
export class PackedDriver extends GuestAccess {
  /** Slot the next chain starts at, and the wrap counter of that lap. */
  nextAvail: number;
  availWrap: number;
  /** Slot of the next used descriptor to read, and the wrap counter it will carry. */
  lastUsed: number;
  usedWrap: number;
  /** Ring slots of each published buffer id, freed when the id comes back used. */
  private readonly slotsOf = new Map<number, number>();
  private readonly freeIds: number[] = [];

  constructor(mem: GuestMemory, readonly size: number, readonly addrs: RingAddresses, state: PackedRingState = decodePackedBase(FRESH)) {
    super(mem);
    this.nextAvail = state.availIdx;
    this.availWrap = state.availWrap ? 1 : 0;
    this.lastUsed = state.usedIdx;
    this.usedWrap = state.usedWrap ? 1 : 0;
    for (let i = 0; i < size; i++) this.freeIds.push(i);
  }

  /** Writes a 16-byte descriptor at `table` entry i (the ring or an indirect table). */
  setDesc(table: number, i: number, d: RawDesc, id: number): void {
    this.setDescWords(table, i, d.addr, d.len, id, d.flags, d.addrHi);
  }

  /** Flags of ring slot i. */
  flagsAt(i: number): number {
    return this.r16(this.addrs.descAddr + 16 * i + 14);
  }

  /**
   * Publishes `descs` in consecutive slots as one chain with buffer id `id` (in every descriptor, as
   * Linux does): each slot gets the AVAIL/USED bits of its lap, and the first slot's flags go last.
   */
  publishRaw(descs: RawDesc[], id: number): void {
    let outstanding = descs.length;
    for (const n of this.slotsOf.values()) outstanding += n;
    assert.ok(outstanding <= this.size, "test bug: the driver would overwrite slots it has not taken back yet");
    const head = this.nextAvail;
    let headFlags = 0;
    descs.forEach((d, k) => {
      const bits = this.availWrap ? AVAIL : USED;
      const flags = d.flags | bits;
      this.setDesc(this.addrs.descAddr, this.nextAvail, { ...d, flags: k === 0 ? 0 : flags }, id);
      if (k === 0) headFlags = flags;
      if (++this.nextAvail === this.size) {
        this.nextAvail = 0;
        this.availWrap ^= 1;
      }
    });
    this.w16(this.addrs.descAddr + 16 * head + 14, headFlags);
    this.slotsOf.set(id, descs.length);
    const free = this.freeIds.indexOf(id);
    if (free >= 0) this.freeIds.splice(free, 1);
  }

  /** Takes a free buffer id (lowest first). */
  takeId(): number {
    assert.ok(this.freeIds.length > 0, "test bug: no free buffer id");
    return this.freeIds.shift()!;
  }

  /** Writes `bufs` as a chain of direct descriptors, publishes it and returns its buffer id. */
  submit(bufs: GuestBuf[]): number {
    const id = this.takeId();
    this.publishRaw(bufs.map((b, k) => ({ addr: b.addr, len: b.len, flags: (b.write ? WRITE : 0) | (k < bufs.length - 1 ? NEXT : 0) })), id);
    return id;
  }

  /** Writes `bufs` into an indirect table at `table` (flags WRITE or 0, as Linux), publishes one INDIRECT descriptor and returns its id. */
  submitIndirect(table: number, bufs: GuestBuf[], ringFlags = 0): number {
    bufs.forEach((b, k) => this.setDesc(table, k, { addr: b.addr, len: b.len, flags: b.write ? WRITE : 0 }, 0));
    const id = this.takeId();
    this.publishRaw([{ addr: table, len: 16 * bufs.length, flags: INDIRECT | ringFlags }], id);
    return id;
  }

  /** Used descriptors published since the last call, in ring order; their ids become free again. */
  takeUsed(): UsedElem[] {
    const out: UsedElem[] = [];
    // Only while buffers are out: a test ring may start in a lap with wrap counter 0 over zeroed slots,
    // which look used (AVAIL = USED = 0) though the device never wrote them.
    while (this.slotsOf.size > 0) {
      const slot = this.addrs.descAddr + 16 * this.lastUsed;
      const flags = this.r16(slot + 14);
      const avail = (flags & AVAIL) !== 0 ? 1 : 0;
      const used = (flags & USED) !== 0 ? 1 : 0;
      if (avail !== used || used !== this.usedWrap) return out;
      const id = this.r16(slot + 12);
      out.push({ id, len: this.r32(slot + 8) });
      const n = this.slotsOf.get(id);
      assert.ok(n !== undefined, `the device returned buffer id ${id}, which was never published`);
      this.slotsOf.delete(id);
      this.freeIds.push(id);
      this.freeIds.sort((a, b) => a - b);
      this.lastUsed += n;
      if (this.lastUsed >= this.size) {
        this.lastUsed -= this.size;
        this.usedWrap ^= 1;
      }
    }
    return out;
  }

  /** Ring slots not held by a chain published and not yet seen used: what the driver may publish next. */
  freeSlots(): number {
    let held = 0;
    for (const n of this.slotsOf.values()) held += n;
    return this.size - held;
  }

  /** Buffer ids published and not yet seen used. */
  inFlight(): number[] {
    return [...this.slotsOf.keys()];
  }

  /** A driver in this one's exact state over `mem` (a copy of this one's memory): what the guest would see there. */
  fork(mem: GuestMemory): PackedDriver {
    const d = new PackedDriver(mem, this.size, this.addrs, {
      availIdx: this.nextAvail, availWrap: this.availWrap === 1, usedIdx: this.lastUsed, usedWrap: this.usedWrap === 1,
    });
    for (const [id, n] of this.slotsOf) d.slotsOf.set(id, n);
    d.freeIds.splice(0, d.freeIds.length, ...this.freeIds);
    return d;
  }

  /** Writes the driver event suppression area (when the device should interrupt us). */
  setDriverEvent(offWrap: number, flags: number): void {
    this.w16(this.addrs.availAddr, offWrap);
    this.w16(this.addrs.availAddr + 2, flags);
  }

  /** The device event suppression area (when we should kick). */
  deviceEvent(): { offWrap: number; flags: number } {
    return { offWrap: this.r16(this.addrs.usedAddr), flags: this.r16(this.addrs.usedAddr + 2) };
  }

  /** Linux's virtqueue_kick_prepare_packed: must we kick after publishing `added` slots ending at nextAvail? */
  needsKick(added: number): boolean {
    const { offWrap, flags } = this.deviceEvent();
    if (flags !== DESC) return flags !== DISABLE;
    const now = this.nextAvail;
    const old = (now - added) & 0xffff;
    let event = offWrap & 0x7fff;
    if (offWrap >>> 15 !== this.availWrap) event -= this.size;
    return ((now - event - 1) & 0xffff) < ((now - old) & 0xffff);
  }
}

/** One DescStatePacked, as the spec lays it out. */
export interface PackedDescState {
  inflight: number;
  next: number;
  last: number;
  num: number;
  counter: bigint;
  id: number;
  flags: number;
  len: number;
  addr: bigint;
}

/**
 * A queue's QueueRegionPacked decoded by hand from vhost-user.rst (independently of packed-inflight.ts):
 * 29 bytes of header fields padded to 32, then 32-byte DescStatePacked entries.
 */
export function packedRegionFields(region: Uint8Array) {
  const dv = new DataView(region.buffer, region.byteOffset, region.byteLength);
  const at = (e: number) => 32 + 32 * e;
  return {
    features: dv.getBigUint64(0, true),
    version: dv.getUint16(8, true),
    descNum: dv.getUint16(10, true),
    freeHead: dv.getUint16(12, true),
    oldFreeHead: dv.getUint16(14, true),
    usedIdx: dv.getUint16(16, true),
    oldUsedIdx: dv.getUint16(18, true),
    usedWrap: dv.getUint8(20),
    oldUsedWrap: dv.getUint8(21),
    desc: (e: number): PackedDescState => ({
      inflight: dv.getUint8(at(e)),
      next: dv.getUint16(at(e) + 2, true),
      last: dv.getUint16(at(e) + 4, true),
      num: dv.getUint16(at(e) + 6, true),
      counter: dv.getBigUint64(at(e) + 8, true),
      id: dv.getUint16(at(e) + 16, true),
      flags: dv.getUint16(at(e) + 18, true),
      len: dv.getUint32(at(e) + 20, true),
      addr: dv.getBigUint64(at(e) + 24, true),
    }),
    /** Entries marked in flight (heads of chains in flight, once recovery or the writer is done). */
    inflightEntries: (descNum: number): number[] => Array.from({ length: descNum }, (_, e) => e).filter((e) => dv.getUint8(at(e)) !== 0),
    /** Little-endian writers at a byte offset, to corrupt the region in tests. */
    set8: (off: number, v: number) => dv.setUint8(off, v),
    set16: (off: number, v: number) => dv.setUint16(off, v, true),
  };
}
