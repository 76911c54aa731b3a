/**
 * The "guest RAM" of the front-end: one memfd mapped shared here and handed to the back-end with
 * SET_MEM_TABLE, plus a first-fit allocator that carves rings and request buffers out of it.
 *
 * Guest physical addresses are offsets into the memfd (the region starts at guest address 0); the
 * back-end gets our mapping address as the region's user address, which is what SET_VRING_ADDR uses.
 */
import { closeQuietly, ftruncate, memfdCreate, mmap, munmap, view, MAP_SHARED, PROT_READ, PROT_WRITE } from '../os/libc.js';

/** Page size used for allocation granularity and alignment. */
export const PAGE_SIZE = 4096;

/** A memfd of `size` bytes mapped read/write and shared into this process. */
export class SharedMemory {
  /** The memfd (owned; sent to the back-end, which maps its own copy). */
  readonly fd: number;
  /** Address of our mapping: the region's user address. */
  readonly addr: number;
  /** Size in bytes. */
  readonly size: number;
  /** All of the memory as bytes; index = guest physical address. Invalid after close(). */
  readonly bytes: Uint8Array;
  private closed = false;

  private constructor(fd: number, addr: number, size: number) {
    this.fd = fd;
    this.addr = addr;
    this.size = size;
    this.bytes = new Uint8Array(view(addr, size));
  }

  /** Creates and maps a zero-filled memfd of `size` bytes (a positive multiple of the page size). */
  static create(size: number, name = 'vhost-user-frontend'): SharedMemory {
    if (!Number.isSafeInteger(size) || size <= 0 || size % PAGE_SIZE !== 0) {
      throw new RangeError(`shared memory size must be a positive multiple of ${PAGE_SIZE}, got ${size}`);
    }
    const fd = memfdCreate(name);
    try {
      ftruncate(fd, size);
      const addr = mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      return new SharedMemory(fd, addr, size);
    } catch (err) {
      closeQuietly(fd);
      throw err;
    }
  }

  /** Unmaps the memory and closes the memfd; every view of it becomes invalid. Safe to call twice. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    munmap(this.addr, this.size);
    closeQuietly(this.fd);
  }
}

/**
 * First-fit allocator of page-granular extents over [base, base+size): a sorted free list, coalesced on
 * free. Small and predictable; request buffers come and go in FIFO-ish order, so the list stays short.
 */
export class ExtentAllocator {
  /** Free extents sorted by start: starts[i], lens[i]. */
  private readonly starts: number[] = [];
  private readonly lens: number[] = [];
  /** Bytes currently free. */
  freeBytes: number;

  /** Manages [base, base+size); both must be page aligned. */
  constructor(readonly base: number, readonly size: number) {
    if (base % PAGE_SIZE !== 0 || size % PAGE_SIZE !== 0 || size <= 0) throw new RangeError(`allocator range ${base}+${size} is not page aligned`);
    this.starts.push(base);
    this.lens.push(size);
    this.freeBytes = size;
  }

  /** Rounds a request up to whole pages: what alloc() really takes. */
  static roundUp(len: number): number {
    return Math.ceil(Math.max(len, 1) / PAGE_SIZE) * PAGE_SIZE;
  }

  /** Allocates `len` bytes (rounded up to pages), page aligned; returns the start, or -1 if nothing fits. */
  alloc(len: number): number {
    const need = ExtentAllocator.roundUp(len);
    for (let i = 0; i < this.starts.length; i++) {
      if (this.lens[i] < need) continue;
      const start = this.starts[i];
      if (this.lens[i] === need) {
        this.starts.splice(i, 1);
        this.lens.splice(i, 1);
      } else {
        this.starts[i] += need;
        this.lens[i] -= need;
      }
      this.freeBytes -= need;
      return start;
    }
    return -1;
  }

  /**
   * Takes exactly [start, start+len) (rounded out to whole pages) if all of it is free: returns the page
   * aligned extent actually taken (give it back with free(extent.start, extent.len)), or null (nothing taken).
   */
  reserve(start: number, len: number): { start: number; len: number } | null {
    const first = Math.floor(start / PAGE_SIZE) * PAGE_SIZE;
    const end = Math.ceil((start + Math.max(len, 1)) / PAGE_SIZE) * PAGE_SIZE;
    for (let i = 0; i < this.starts.length; i++) {
      const s = this.starts[i];
      const e = s + this.lens[i];
      if (first < s || end > e) continue;
      // Split [s, e) into [s, first) and [end, e).
      const tail = e - end;
      if (first === s) {
        if (tail === 0) {
          this.starts.splice(i, 1);
          this.lens.splice(i, 1);
        } else {
          this.starts[i] = end;
          this.lens[i] = tail;
        }
      } else {
        this.lens[i] = first - s;
        if (tail > 0) {
          this.starts.splice(i + 1, 0, end);
          this.lens.splice(i + 1, 0, tail);
        }
      }
      this.freeBytes -= end - first;
      return { start: first, len: end - first };
    }
    return null;
  }

  /** Returns an extent given by alloc(start of, same len); throws on a double or foreign free. */
  free(start: number, len: number): void {
    const size = ExtentAllocator.roundUp(len);
    const end = start + size;
    if (start < this.base || end > this.base + this.size) throw new RangeError(`free of ${start}+${size} outside the allocator`);
    // Binary search for the first free extent starting after `start`.
    let lo = 0;
    let hi = this.starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.starts[mid] <= start) lo = mid + 1;
      else hi = mid;
    }
    const prev = lo - 1;
    if (prev >= 0 && this.starts[prev] + this.lens[prev] > start) throw new RangeError(`double free of ${start}+${size}`);
    if (lo < this.starts.length && end > this.starts[lo]) throw new RangeError(`double free of ${start}+${size}`);
    this.freeBytes += size;
    const joinPrev = prev >= 0 && this.starts[prev] + this.lens[prev] === start;
    const joinNext = lo < this.starts.length && this.starts[lo] === end;
    if (joinPrev && joinNext) {
      this.lens[prev] += size + this.lens[lo];
      this.starts.splice(lo, 1);
      this.lens.splice(lo, 1);
    } else if (joinPrev) {
      this.lens[prev] += size;
    } else if (joinNext) {
      this.starts[lo] = start;
      this.lens[lo] += size;
    } else {
      this.starts.splice(lo, 0, start);
      this.lens.splice(lo, 0, size);
    }
  }

  /** Largest single extent that alloc() could return right now. */
  largestFree(): number {
    let m = 0;
    for (const l of this.lens) if (l > m) m = l;
    return m;
  }
}
