/**
 * The dirty page log of live migration (vhost-user "Migration"): one bit per 4 KiB page of guest physical
 * memory, set for every page the back-end writes while the front-end migrates the guest.
 *
 * The front-end owns the bitmap and clears bits concurrently (QEMU swaps whole u64 words with zero when
 * it syncs), so every bit is set with an atomic OR: a plain read-modify-write could bring back a bit the
 * front-end just cleared, or lose one. Pure logic over a byte view, so tests can use plain memory.
 */

/** Size of a logged page (VHOST_LOG_PAGE). */
export const DIRTY_LOG_PAGE = 4096;
/** Guest bytes one byte of bitmap covers. */
const BYTE_SPAN = DIRTY_LOG_PAGE * 8;

/** Bytes of bitmap that cover guest physical addresses [0, end), rounded up to whole u64 words as QEMU sizes it. */
export function dirtyLogBytes(end: number): number {
  return Math.ceil(end / (BYTE_SPAN * 8)) * 8;
}

/** Guest bytes, from address 0, that a bitmap of `bytes` bytes covers. */
export function dirtyLogCoverage(bytes: number): number {
  return bytes * BYTE_SPAN;
}

/** A dirty bitmap over guest physical memory. */
export class DirtyLog {
  /** Guest bytes the bitmap covers, from address 0. */
  readonly coveredBytes: number;
  /** Marks that fell (partly) past the end of the bitmap: pages that could not be logged. */
  missed = 0;

  /** `bits` is the log as the front-end shared it (mapped shared memory in the daemon). */
  constructor(private readonly bits: Uint8Array) {
    this.coveredBytes = dirtyLogCoverage(bits.length);
  }

  /** Sets the bit of every page that [gpa, gpa + len) touches; nothing for len 0. */
  mark(gpa: number, len: number): void {
    if (len <= 0) return;
    let page = Math.floor(gpa / DIRTY_LOG_PAGE);
    let last = Math.floor((gpa + len - 1) / DIRTY_LOG_PAGE);
    const lastLogged = this.bits.length * 8 - 1;
    if (last > lastLogged) {
      // Never a store outside the front-end's bitmap; counted, so the worker can say so.
      this.missed++;
      last = lastLogged;
    }
    const bits = this.bits;
    while (page <= last) {
      const byte = Math.floor(page / 8);
      const bit = page % 8;
      // A whole byte's worth of pages at once: large reads mark 8 pages per atomic operation.
      if (bit === 0 && last - page >= 7) {
        Atomics.or(bits, byte, 0xff);
        page += 8;
      } else {
        Atomics.or(bits, byte, 1 << bit);
        page++;
      }
    }
  }

  /** True if the page holding `gpa` is marked (for tests and diagnostics). */
  isDirty(gpa: number): boolean {
    const page = Math.floor(gpa / DIRTY_LOG_PAGE);
    const byte = Math.floor(page / 8);
    return byte < this.bits.length && (Atomics.load(this.bits, byte) & (1 << (page % 8))) !== 0;
  }
}
