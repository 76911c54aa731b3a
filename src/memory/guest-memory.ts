/**
 * Guest physical memory as the frontend shared it: a set of regions, each mapped into this process.
 *
 * Pure logic over byte views: the mapping itself is done by the caller (see mapping.ts), so tests can
 * build a GuestMemory over plain ArrayBuffers with holes between regions. Every translation checks that
 * the whole range [addr, addr+len) lies inside one region; nothing here ever reads outside a region.
 */

/** One guest memory region as described by SET_MEM_TABLE / ADD_MEM_REG. */
export interface RegionDescriptor {
  /** Guest physical address of the first byte. */
  readonly guestAddr: number;
  /** Length in bytes. */
  readonly size: number;
  /** Address of the region in the frontend's own address space (ring addresses use these). */
  readonly userAddr: number;
  /** Offset of the region inside the shared fd. */
  readonly mmapOffset: number;
}

/** A region together with where it is visible to us. */
export interface MappedRegion extends RegionDescriptor {
  /** Address of the region's first byte in this process (for iovecs handed to the kernel); 0 in pure tests. */
  readonly hostAddr: number;
  /** The region's bytes; `bytes.length === size`. */
  readonly bytes: Uint8Array;
}

import type { DirtyLog } from './dirty-log.js';

/** Guest addresses must stay exact as JS numbers; larger ones are rejected as out of range. */
const MAX_ADDR = Number.MAX_SAFE_INTEGER;

/** Read-only table of mapped regions with checked address translation. */
export class GuestMemory {
  /** Regions sorted by guest address. */
  readonly regions: readonly MappedRegion[];
  /** Index of the region that satisfied the last lookup: most accesses hit the same one. */
  private lastHit = 0;
  /**
   * While the front-end migrates the guest: the dirty log that every write into guest memory is marked
   * in (write() and writeU8() do it themselves; writers through their own views call markDirty()).
   */
  dirtyLog: DirtyLog | null = null;

  constructor(regions: readonly MappedRegion[]) {
    const sorted = [...regions].sort((a, b) => a.guestAddr - b.guestAddr);
    for (let i = 0; i < sorted.length; i++) {
      const r = sorted[i];
      if (r.bytes.length !== r.size) throw new RangeError(`region at guest 0x${r.guestAddr.toString(16)}: view has ${r.bytes.length} bytes, size is ${r.size}`);
      if (r.size <= 0 || r.guestAddr < 0 || r.guestAddr + r.size > MAX_ADDR) throw new RangeError(`region at guest 0x${r.guestAddr.toString(16)} has an invalid size ${r.size}`);
      if (i > 0 && sorted[i - 1].guestAddr + sorted[i - 1].size > r.guestAddr) {
        throw new RangeError(`regions at guest 0x${sorted[i - 1].guestAddr.toString(16)} and 0x${r.guestAddr.toString(16)} overlap`);
      }
    }
    this.regions = sorted;
  }

  /** An empty memory: every translation fails. */
  static empty(): GuestMemory {
    return new GuestMemory([]);
  }

  /** Index of the region holding all of [gpa, gpa+len), or -1. `len` 0 is treated as 1. */
  findRegion(gpa: number, len: number): number {
    const regions = this.regions;
    const n = regions.length;
    if (n === 0) return -1;
    const end = gpa + (len > 0 ? len : 1);
    let r = regions[this.lastHit];
    if (r !== undefined && gpa >= r.guestAddr && end <= r.guestAddr + r.size) return this.lastHit;
    for (let i = 0; i < n; i++) {
      r = regions[i];
      if (gpa >= r.guestAddr && end <= r.guestAddr + r.size) {
        this.lastHit = i;
        return i;
      }
    }
    return -1;
  }

  /** Host address of guest range [gpa, gpa+len), or -1 if it is not wholly inside one region. */
  hostAddress(gpa: number, len: number): number {
    const i = this.findRegion(gpa, len);
    if (i < 0) return -1;
    const r = this.regions[i];
    return r.hostAddr + (gpa - r.guestAddr);
  }

  /** Guest address for a frontend virtual address range (as in SET_VRING_ADDR), or -1. */
  userToGuest(uaddr: number, len: number): number {
    const end = uaddr + (len > 0 ? len : 1);
    for (const r of this.regions) {
      if (uaddr >= r.userAddr && end <= r.userAddr + r.size) return r.guestAddr + (uaddr - r.userAddr);
    }
    return -1;
  }

  /**
   * A view of exactly [gpa, gpa+len), or null if the range is not inside one region.
   * Allocates: for ring setup and slow paths, not per request.
   */
  slice(gpa: number, len: number): Uint8Array | null {
    const i = this.findRegion(gpa, len);
    if (i < 0) return null;
    const r = this.regions[i];
    const off = gpa - r.guestAddr;
    return r.bytes.subarray(off, off + len);
  }

  /**
   * True when every byte of [gpa, gpa+len) is guest memory, possibly across regions that are adjacent
   * in guest physical space (hot-plugged DIMMs): a guest may hand us one buffer over such a seam.
   */
  covers(gpa: number, len: number): boolean {
    let addr = gpa;
    let left = len > 0 ? len : 1;
    while (left > 0) {
      const i = this.findRegion(addr, 1);
      if (i < 0) return false;
      const r = this.regions[i];
      const take = Math.min(left, r.guestAddr + r.size - addr);
      addr += take;
      left -= take;
    }
    return true;
  }

  /** Copies guest bytes into `out` (across adjacent regions); false (nothing copied) unless all are guest memory. */
  read(gpa: number, out: Uint8Array): boolean {
    if (!this.covers(gpa, out.length)) return false;
    this.eachPiece(gpa, out.length, (bytes, off, done, take) => out.set(bytes.subarray(off, off + take), done));
    return true;
  }

  /** Copies `data` into guest memory (across adjacent regions); false (nothing written) unless all are guest memory. */
  write(gpa: number, data: Uint8Array): boolean {
    if (!this.covers(gpa, data.length)) return false;
    this.eachPiece(gpa, data.length, (bytes, off, done, take) => bytes.set(data.subarray(done, done + take), off));
    this.markDirty(gpa, data.length);
    return true;
  }

  /** Marks [gpa, gpa+len) dirty in the migration log, if one is active; call after the bytes are written. */
  markDirty(gpa: number, len: number): void {
    if (this.dirtyLog !== null) this.dirtyLog.mark(gpa, len);
  }

  /** Calls `fn` for each region piece of a range already known to be covered. */
  private eachPiece(gpa: number, len: number, fn: (bytes: Uint8Array, offset: number, done: number, take: number) => void): void {
    let done = 0;
    while (done < len) {
      const r = this.regions[this.findRegion(gpa + done, 1)];
      const off = gpa + done - r.guestAddr;
      const take = Math.min(len - done, r.size - off);
      fn(r.bytes, off, done, take);
      done += take;
    }
  }

  /** Writes one byte; false if `gpa` is outside guest memory. */
  writeU8(gpa: number, value: number): boolean {
    const i = this.findRegion(gpa, 1);
    if (i < 0) return false;
    const r = this.regions[i];
    r.bytes[gpa - r.guestAddr] = value;
    this.markDirty(gpa, 1);
    return true;
  }
}
