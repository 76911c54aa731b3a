/**
 * The front-end side of vhost-user dirty page logging (live migration, vhost-user spec "Migration"): the
 * log a front-end shares with VHOST_USER_SET_LOG_BASE, its sizing, and reading it back.
 *
 * The log is a bitmap over guest physical memory, one bit per 4 KiB page: the back-end sets bit
 * (gpa / 4096) % 8 of byte gpa / 4096 / 8 for every guest page it writes. It covers guest addresses 0 up to
 * the end of the highest memory region, in whole 64-bit words, as QEMU sizes it.
 *
 * Generic vhost-user: nothing here knows about virtio-blk. The pure functions (sizing, marking, reading,
 * snapshot diffs) work on plain byte arrays; DirtyLogArea is the shared memfd itself.
 */
import { DIRTY_LOG_PAGE, dirtyLogBytes as bytesCovering } from '../memory/dirty-log.js';
import { closeQuietly, ftruncate, memfdCreate, mmap, munmap, view, MAP_SHARED, PROT_READ, PROT_WRITE } from '../os/libc.js';
import { FrontendRequest, encodeLog } from '../vhost-user/messages.js';
import { VhostUserConnection, VhostUserError } from './connection.js';

/** Bytes of guest memory one log bit stands for (VHOST_LOG_PAGE). */
export const LOG_PAGE_SIZE = DIRTY_LOG_PAGE;
/** Guest bytes one 64-bit log word covers (VHOST_LOG_CHUNK): 64 pages. */
export const LOG_CHUNK_BYTES = LOG_PAGE_SIZE * 64;

/** A guest memory range as the log sees it: guest physical start and length in bytes. */
export interface GuestRange {
  /** Guest physical address of the first byte. */
  guestAddr: number;
  /** Length in bytes. */
  size: number;
}

/**
 * Log size in bytes for guest memory `regions`, as QEMU computes it: enough 64-bit words to cover every
 * guest address up to the last byte of the highest region (ceil((last + 1) / 256 KiB) words of 8 bytes).
 */
export function dirtyLogBytes(regions: readonly GuestRange[]): number {
  let end = 0;
  for (const r of regions) {
    if (!Number.isSafeInteger(r.guestAddr) || !Number.isSafeInteger(r.size) || r.guestAddr < 0 || r.size <= 0) {
      throw new RangeError(`bad guest range 0x${r.guestAddr.toString(16)} + ${r.size}`);
    }
    end = Math.max(end, r.guestAddr + r.size);
  }
  if (end === 0) throw new RangeError('a dirty log needs at least one memory region');
  // One sizing rule for both sides: the daemon checks a log against guest memory with the same function.
  return bytesCovering(end);
}

/** Guest page number (log bit index) of guest physical address `gpa`. */
export function logPage(gpa: number): number {
  return Math.floor(gpa / LOG_PAGE_SIZE);
}

/** True if page `page`'s bit is set in `log` (false past its end). */
export function isPageDirty(log: Uint8Array, page: number): boolean {
  const byte = Math.floor(page / 8);
  return byte < log.length && (log[byte] & (1 << (page % 8))) !== 0;
}

/** Page numbers whose bit is set in `log`, ascending. */
export function dirtyPagesOf(log: Uint8Array): number[] {
  const pages: number[] = [];
  for (let i = 0; i < log.length; i++) {
    const b = log[i];
    if (b === 0) continue;
    for (let bit = 0; bit < 8; bit++) if (b & (1 << bit)) pages.push(i * 8 + bit);
  }
  return pages;
}

/**
 * Whether the back-end's reply to SET_LOG_BASE (sent when VHOST_USER_PROTOCOL_F_LOG_SHMFD is negotiated)
 * says it took the log. The spec gives the reply no meaning and QEMU ignores its payload, so back-ends
 * differ: no payload (DPDK), a u64 0 for success and anything else for a refusal (this project's
 * daemon), or the request's own first word, the mmap size, sent back (libvhost-user, whatever happened).
 * Accepted: an empty payload, 0, or `mmapSize` itself; anything else is a refusal.
 */
export function logBaseReplyAccepted(reply: Uint8Array, mmapSize: number): { accepted: boolean; value: bigint | null } {
  if (reply.length === 0) return { accepted: true, value: null };
  if (reply.length !== 8) return { accepted: false, value: null };
  const value = Buffer.from(reply.buffer, reply.byteOffset, 8).readBigUInt64LE(0);
  return { accepted: value === 0n || value === BigInt(mmapSize), value };
}

/** A copy of guest memory, region by region, with each region's guest physical address. */
export interface MemorySnapshot {
  /** The regions, each a copy of its bytes. */
  readonly regions: ReadonlyArray<{ readonly guestAddr: number; readonly bytes: Buffer }>;
}

/**
 * Guest pages (numbers, ascending) whose bytes differ between two snapshots of the same layout: what a
 * complete dirty log must have marked, if only the back-end wrote in between.
 */
export function changedPages(before: MemorySnapshot, after: MemorySnapshot): number[] {
  const pages = new Set<number>();
  for (const a of before.regions) {
    const b = after.regions.find((r) => r.guestAddr === a.guestAddr && r.bytes.length === a.bytes.length);
    if (!b) throw new RangeError(`the snapshots differ in layout: no ${a.bytes.length}-byte region at 0x${a.guestAddr.toString(16)} in the second`);
    // Compare page by page (aligned on guest pages, which regions are).
    for (let off = 0; off < a.bytes.length; off += LOG_PAGE_SIZE) {
      const end = Math.min(off + LOG_PAGE_SIZE, a.bytes.length);
      if (a.bytes.compare(b.bytes, off, end, off, end) !== 0) pages.add(logPage(a.guestAddr + off));
    }
  }
  return [...pages].sort((x, y) => x - y);
}

/**
 * A dirty log in a memfd, mapped here: what the front-end hands to the back-end with SET_LOG_BASE (the
 * fd, mmap size `size`, offset 0) and reads back.
 */
export class DirtyLogArea {
  /** The memfd (owned: close() closes it; the back-end maps its own copy). */
  readonly fd: number;
  /** Log size in bytes (the memfd's size and SET_LOG_BASE's mmap_size). */
  readonly size: number;
  /** The bitmap, a view of the shared mapping; invalid after close(). */
  readonly bytes: Uint8Array;
  private readonly words: BigUint64Array;
  private readonly addr: number;
  private closed = false;

  private constructor(fd: number, addr: number, size: number) {
    this.fd = fd;
    this.addr = addr;
    this.size = size;
    const buffer = view(addr, size);
    this.bytes = new Uint8Array(buffer);
    this.words = new BigUint64Array(buffer, 0, Math.floor(size / 8));
  }

  /** Creates a zeroed log of `size` bytes (a positive multiple of 8, as dirtyLogBytes gives) in a fresh memfd. */
  static create(size: number): DirtyLogArea {
    if (!Number.isSafeInteger(size) || size <= 0 || size % 8 !== 0) throw new RangeError(`a dirty log is a positive multiple of 8 bytes, got ${size}`);
    const fd = memfdCreate('vhost-user-dirty-log');
    try {
      ftruncate(fd, size);
      return new DirtyLogArea(fd, mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), size);
    } catch (err) {
      closeQuietly(fd);
      throw err;
    }
  }

  /** Guest bytes the log covers: pages 0 .. size * 8 - 1. */
  get coveredBytes(): number {
    return this.size * 8 * LOG_PAGE_SIZE;
  }

  /** Page numbers whose bit is set now, ascending (a read: bits stay set). */
  pages(): number[] {
    this.checkOpen();
    return dirtyPagesOf(this.bytes);
  }

  /**
   * Reads and clears the log as QEMU syncs it: each 64-bit word swapped with 0 by Atomics.exchange (a
   * locked xchg), so a bit the back-end sets meanwhile is either returned now or stays for the next
   * call, never lost. Returns the page numbers that were set, ascending.
   */
  takePages(): number[] {
    this.checkOpen();
    const pages: number[] = [];
    for (let w = 0; w < this.words.length; w++) {
      if (this.words[w] === 0n) continue;
      const bits = Atomics.exchange(this.words, w, 0n);
      for (let bit = 0; bit < 64; bit++) if ((bits >> BigInt(bit)) & 1n) pages.push(w * 64 + bit);
    }
    return pages;
  }

  /** Clears every bit (atomically per 64-bit word, see takePages). */
  clear(): void {
    this.takePages();
  }

  /** Sets the bits of `pages` (atomically per word), ignoring pages past the end; returns how many did not fit. */
  addPages(pages: readonly number[]): number {
    this.checkOpen();
    let lost = 0;
    for (const p of pages) {
      const w = Math.floor(p / 64);
      if (w >= this.words.length) { lost++; continue; }
      Atomics.or(this.words, w, 1n << BigInt(p % 64));
    }
    return lost;
  }

  /** True once close() ran. */
  get isClosed(): boolean {
    return this.closed;
  }

  /** Unmaps the log and closes the memfd. Safe to call twice. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    munmap(this.addr, this.size);
    closeQuietly(this.fd);
  }

  private checkOpen(): void {
    if (this.closed) throw new Error('the dirty log is closed');
  }
}

/**
 * Sends SET_LOG_BASE for `log` (its fd, mmap size log.size, offset 0) on `conn` and reads the reply the
 * back-end sends when VHOST_USER_PROTOCOL_F_LOG_SHMFD is negotiated; throws VhostUserError when the reply
 * is a refusal (see logBaseReplyAccepted).
 */
export async function sendLogBase(conn: VhostUserConnection, log: DirtyLogArea, timeoutMs: number): Promise<void> {
  const reply = await conn.request(FrontendRequest.SET_LOG_BASE, encodeLog({ mmapSize: log.size, mmapOffset: 0 }), { fds: [log.fd], expectReply: true, timeoutMs });
  const r = logBaseReplyAccepted(reply, log.size);
  if (!r.accepted) {
    throw new VhostUserError(`SET_LOG_BASE of a ${log.size}-byte log refused by the back-end (reply ${r.value === null ? `of ${reply.length} bytes` : r.value})`, FrontendRequest.SET_LOG_BASE, r.value ?? undefined);
  }
}
