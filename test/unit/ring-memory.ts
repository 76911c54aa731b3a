/**
 * Guest memory for the ring unit tests (split and packed), with poisoned holes, and byte access helpers
 * for the in-test drivers.
 *
 * Layout (guest address == offset in one backing ArrayBuffer):
 *   region A  [0x00000, 0x10000)   rings; tests put the descriptor table at its very end, so an index >= size lands in the hole
 *   hole      [0x10000, 0x20000)   NOT guest memory, but filled with valid-looking descriptors ("poison")
 *   region B  [0x20000, 0x30000)   data buffers, indirect tables
 *   tail      [0x30000, 0x40000)   poison again
 * An implementation that read past a region (through the shared backing buffer) would see well-formed
 * descriptors there and succeed where it must fail; poisonSum proves nothing was written there.
 */

import assert from "node:assert/strict";
import { GuestMemory, type MappedRegion } from "../../src/memory/guest-memory.js";

/** Start of the first region (rings). */
export const REGION_A = 0x00000;
/** Start of the unmapped hole between the regions. */
export const HOLE = 0x10000;
/** Start of the second region (buffers, tables). */
export const REGION_B = 0x20000;
/** Start of the unmapped area after the last region. */
export const TAIL = 0x30000;
/** Size of each region, hole and tail. */
export const REGION_SIZE = 0x10000;

/** The test memory and the buffer behind it (holes included). */
export interface RingMemory {
  backing: ArrayBuffer;
  mem: GuestMemory;
}

/**
 * Builds the two-region memory described above. Every 16 bytes of the hole and tail hold a descriptor of
 * a readable 16-byte buffer at 0x1000 with flags `poisonFlags` in the last u16 (split: flags; packed: the
 * flags word, where AVAIL makes it look available).
 */
export function makeRingMemory(poisonFlags: number): RingMemory {
  const backing = new ArrayBuffer(0x40000);
  const dv = new DataView(backing);
  for (const start of [HOLE, TAIL]) {
    for (let off = start; off < start + REGION_SIZE; off += 16) {
      dv.setUint32(off, 0x1000, true);
      dv.setUint32(off + 4, 0, true);
      dv.setUint32(off + 8, 16, true);
      dv.setUint16(off + 12, 0, true);
      dv.setUint16(off + 14, poisonFlags, true);
    }
  }
  const region = (guestAddr: number): MappedRegion => ({
    guestAddr, size: REGION_SIZE, userAddr: 0x7f0000000000 + guestAddr, mmapOffset: 0, hostAddr: 0, bytes: new Uint8Array(backing, guestAddr, REGION_SIZE),
  });
  return { backing, mem: new GuestMemory([region(REGION_A), region(REGION_B)]) };
}

/** Checksum of the poisoned areas: must not change, proving nothing was written outside guest memory. */
export function poisonSum(backing: ArrayBuffer): number {
  const b = new Uint8Array(backing);
  let s = 0;
  for (let i = HOLE; i < HOLE + REGION_SIZE; i++) s = (s * 31 + b[i]) >>> 0;
  for (let i = TAIL; i < TAIL + REGION_SIZE; i++) s = (s * 31 + b[i]) >>> 0;
  return s;
}

/** Little-endian reads and writes of guest memory for test drivers; a range outside memory is a test bug. */
export class GuestAccess {
  constructor(readonly mem: GuestMemory) {}

  /** A DataView of exactly [gpa, gpa+len). */
  view(gpa: number, len: number): DataView {
    const s = this.mem.slice(gpa, len);
    assert.ok(s, `test bug: guest range 0x${gpa.toString(16)}+${len} not in memory`);
    return new DataView(s.buffer, s.byteOffset, s.byteLength);
  }
  /** Writes a u16. */
  w16(gpa: number, v: number): void {
    this.view(gpa, 2).setUint16(0, v, true);
  }
  /** Writes a u32. */
  w32(gpa: number, v: number): void {
    this.view(gpa, 4).setUint32(0, v, true);
  }
  /** Reads a u16. */
  r16(gpa: number): number {
    return this.view(gpa, 2).getUint16(0, true);
  }
  /** Reads a u32. */
  r32(gpa: number): number {
    return this.view(gpa, 4).getUint32(0, true);
  }

  /** Writes 16-byte descriptor i of `table`: addr, len, the u16 at byte 12 (split: flags, packed: id) and at byte 14 (split: next, packed: flags). */
  setDescWords(table: number, i: number, addr: number, len: number, u16a: number, u16b: number, addrHi?: number): void {
    const v = this.view(table + 16 * i, 16);
    v.setUint32(0, addr % 2 ** 32, true);
    v.setUint32(4, addrHi ?? Math.floor(addr / 2 ** 32), true);
    v.setUint32(8, len, true);
    v.setUint16(12, u16a, true);
    v.setUint16(14, u16b, true);
  }
}
