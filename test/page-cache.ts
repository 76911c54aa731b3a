// Host page-cache state of a file range, through cachestat(2) (Linux 6.5+). The e2e and conformance
// tests use it to observe writethrough from outside the backend: a write the backend acknowledged in
// writethrough mode must leave no dirty page behind in the image, while in writeback mode the data
// may sit dirty in the host page cache until a flush.
import koffi from 'koffi';
import { closeSync, openSync } from 'node:fs';

const libc = koffi.load('libc.so.6');
// glibc's syscall() ignores the variadic register count, so a fixed prototype is safe.
const cachestatSyscall = libc.func('long syscall(long nr, int fd, void *range, void *cstat, uint32_t flags)');
/** cachestat's number in the x86-64 (and the generic, arm64) system call table. */
const SYS_CACHESTAT = 451;
const ENOSYS = 38;

/** Page-cache pages of a file range (struct cachestat, first three fields). */
export interface PageCacheState {
  /** Pages in the page cache. */
  cached: number;
  /** Pages modified and not yet written back. */
  dirty: number;
  /** Pages being written back right now. */
  writeback: number;
}

/**
 * Page-cache state of bytes [offset, offset + len) of the file at `path`, or null when the host kernel
 * has no cachestat (before Linux 6.5): callers then report that the check could not run.
 */
export function pageCacheState(path: string, offset: number, len: number): PageCacheState | null {
  const fd = openSync(path, 'r');
  try {
    const range = new BigUint64Array([BigInt(offset), BigInt(len)]);
    const out = new BigUint64Array(5);
    if (Number(cachestatSyscall(SYS_CACHESTAT, fd, range, out, 0)) < 0) {
      const errno = koffi.errno();
      if (errno === ENOSYS) return null;
      throw new Error(`cachestat(${path}, ${offset}, ${len}) failed: errno ${errno}`);
    }
    return { cached: Number(out[0]), dirty: Number(out[1]), writeback: Number(out[2]) };
  } finally {
    closeSync(fd);
  }
}
