/**
 * Guest memory for the ring fuzzers: several regions at chosen guest addresses with holes between them,
 * each backed by its own ArrayBuffer, optionally with guard bytes on both sides of the region inside that
 * buffer. The guards hold "poison" (well-formed descriptors pointing into region 0), so code that read
 * past a region would see plausible data and act differently from the reference model, and code that
 * wrote past it would change them (checked with guardsIntact()).
 *
 * Reads and writes here are the fuzzer's own, independent of GuestMemory: the reference model and the
 * checks must not trust the code under test.
 */
import { GuestMemory, type MappedRegion } from '../../src/memory/guest-memory.js';

/** Guard bytes on each side of a region (a multiple of 16, so ring alignment inside a region is kept). */
export const GUARD_BYTES = 256;

/** Where one region sits in guest physical and (fake) host address space. */
export interface RegionPlan {
  guestAddr: number;
  size: number;
  hostAddr: number;
}

/** The regions, their backing buffers and checked-by-hand access to them. */
export class GuestSpace {
  /** Each region's bytes (a view of exactly `size` bytes). */
  readonly bytes: Uint8Array[];
  /** Region placements, sorted by guest address. */
  readonly plans: readonly RegionPlan[];
  /** A GuestMemory over the same bytes, for the code under test. */
  readonly mem: GuestMemory;
  /** Copy of each region's guard bytes right after setup (empty without guards). */
  private readonly guardCopies: Uint8Array[];
  private readonly backings: Uint8Array[];

  /** Allocates the regions; `guard` adds poisoned guard bytes around each one. */
  constructor(plans: readonly RegionPlan[], guard: boolean, poisonTarget: number) {
    this.plans = [...plans].sort((a, b) => a.guestAddr - b.guestAddr);
    const g = guard ? GUARD_BYTES : 0;
    this.backings = this.plans.map((p) => new Uint8Array(p.size + 2 * g));
    this.bytes = this.plans.map((p, i) => this.backings[i].subarray(g, g + p.size));
    if (guard) {
      for (const b of this.backings) {
        const dv = new DataView(b.buffer);
        // A 16-byte readable descriptor to `poisonTarget` every 16 bytes of both guards, next = 1.
        for (const start of [0, b.length - g]) {
          for (let off = start; off + 16 <= start + g; off += 16) {
            dv.setUint32(off, poisonTarget % 2 ** 32, true);
            dv.setUint32(off + 4, Math.floor(poisonTarget / 2 ** 32), true);
            dv.setUint32(off + 8, 16, true);
            dv.setUint16(off + 12, 0, true);
            dv.setUint16(off + 14, 1, true);
          }
        }
      }
    }
    this.guardCopies = this.backings.map((b) => (g ? Uint8Array.from([...b.subarray(0, g), ...b.subarray(b.length - g)]) : new Uint8Array(0)));
    const mapped: MappedRegion[] = this.plans.map((p, i) => ({
      guestAddr: p.guestAddr, size: p.size, userAddr: 0x7f00_0000_0000 + i * 2 ** 32, mmapOffset: 0, hostAddr: p.hostAddr, bytes: this.bytes[i],
    }));
    this.mem = new GuestMemory(mapped);
  }

  /** Index of the region holding guest address `gpa`, or -1. */
  regionAt(gpa: number): number {
    for (let i = 0; i < this.plans.length; i++) {
      const p = this.plans[i];
      if (gpa >= p.guestAddr && gpa < p.guestAddr + p.size) return i;
    }
    return -1;
  }

  /** Index of the region holding all of [gpa, gpa+len), or -1 (len 0 counts as 1, as for descriptors). */
  regionHolding(gpa: number, len: number): number {
    const i = this.regionAt(gpa);
    if (i < 0) return -1;
    const p = this.plans[i];
    return gpa + Math.max(len, 1) <= p.guestAddr + p.size ? i : -1;
  }

  /** True if every byte of [gpa, gpa+max(len,1)) is in some region (regions may be adjacent). */
  covered(gpa: number, len: number): boolean {
    if (!Number.isSafeInteger(gpa) || gpa < 0) return false;
    let addr = gpa;
    const end = gpa + Math.max(len, 1);
    while (addr < end) {
      const i = this.regionAt(addr);
      if (i < 0) return false;
      addr = this.plans[i].guestAddr + this.plans[i].size;
    }
    return true;
  }

  /** Copies guest bytes [gpa, gpa+len) into a new array, or null if any byte is not guest memory. */
  read(gpa: number, len: number): Uint8Array | null {
    if (len > 0 && !this.covered(gpa, len)) return null;
    const out = new Uint8Array(len);
    for (let k = 0; k < len; ) {
      const i = this.regionAt(gpa + k);
      const off = gpa + k - this.plans[i].guestAddr;
      const take = Math.min(len - k, this.plans[i].size - off);
      out.set(this.bytes[i].subarray(off, off + take), k);
      k += take;
    }
    return out;
  }

  /** Writes `data` at `gpa` as far as it lands in guest memory (bytes outside are dropped: the guest's own writes). */
  write(gpa: number, data: Uint8Array): void {
    for (let k = 0; k < data.length; k++) {
      const i = this.regionAt(gpa + k);
      if (i >= 0) this.bytes[i][gpa + k - this.plans[i].guestAddr] = data[k];
    }
  }

  /** Little-endian u16 at `gpa` (which must be guest memory). */
  u16(gpa: number): number {
    const b = this.read(gpa, 2)!;
    return b[0] | (b[1] << 8);
  }

  /** Little-endian u32 at `gpa` (which must be guest memory). */
  u32(gpa: number): number {
    const b = this.read(gpa, 4)!;
    return (b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24)) >>> 0;
  }

  /** Writes a little-endian value of `width` bytes (1, 2, 4; 8 takes `hi` as the upper word). */
  put(gpa: number, width: number, value: number, hi = 0): void {
    const b = new Uint8Array(width);
    const dv = new DataView(b.buffer);
    if (width === 1) dv.setUint8(0, value & 0xff);
    else if (width === 2) dv.setUint16(0, value & 0xffff, true);
    else if (width === 4) dv.setUint32(0, value >>> 0, true);
    else {
      dv.setUint32(0, value >>> 0, true);
      dv.setUint32(4, hi >>> 0, true);
    }
    this.write(gpa, b);
  }

  /** A copy of every region's bytes, to diff against after a device step. */
  snapshot(): Uint8Array[] {
    return this.bytes.map((b) => b.slice());
  }

  /** Guest addresses of bytes that differ from `before` (compared a word at a time: this runs after every step). */
  changedSince(before: Uint8Array[]): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.bytes.length; i++) {
      const now = this.bytes[i];
      const was = before[i];
      const words = now.length >>> 2;
      // Both views start 4-byte aligned: the guard size is a multiple of 4 and slice() copies start at 0.
      const now32 = new Uint32Array(now.buffer, now.byteOffset, words);
      const was32 = new Uint32Array(was.buffer, was.byteOffset, words);
      for (let w = 0; w < words; w++) {
        if (now32[w] === was32[w]) continue;
        for (let j = 4 * w; j < 4 * w + 4; j++) if (now[j] !== was[j]) out.push(this.plans[i].guestAddr + j);
      }
      for (let j = 4 * words; j < now.length; j++) if (now[j] !== was[j]) out.push(this.plans[i].guestAddr + j);
    }
    return out;
  }

  /** True while no guard byte changed since setup. */
  guardsIntact(): boolean {
    const g = this.guardCopies[0]?.length ? GUARD_BYTES : 0;
    if (g === 0) return true;
    for (let i = 0; i < this.backings.length; i++) {
      const b = this.backings[i];
      const c = this.guardCopies[i];
      for (let k = 0; k < g; k++) if (b[k] !== c[k] || b[b.length - g + k] !== c[g + k]) return false;
    }
    return true;
  }
}
