/**
 * Block backends as a queue worker sees them: they queue I/O and report completions by tag.
 *
 * A backend instance lives in one worker thread and submits into that worker's io_uring, so a batch of
 * requests costs one system call. Backends that finish without I/O (null) complete through the
 * context's inline queue, which the worker drains in its loop: never re-entrantly.
 */
import type { IoUring } from '../os/uring.js';
import type { FaultRule } from './faults.js';

/** What a backend needs from the worker that hosts it. */
export interface IoContext {
  /** The worker's ring; a CQE's user_data is the request tag. */
  readonly ring: IoUring;
  /** Reports `res` (bytes or -errno) for `tag` on the worker's next completion pass. */
  completeInline(tag: number, res: number): void;
}

/** A disk as seen by the virtio-blk request processor. Offsets and lengths are bytes. */
export interface BlockBackend {
  /**
   * Capacity in bytes (a multiple of 512). The worker raises it when the disk is grown live, before the
   * guest hears of the new size; requests are checked against it as they start.
   */
  sizeBytes: number;
  /** Writes are refused. */
  readonly readOnly: boolean;
  /** Reads `len` bytes into `iovCnt` iovecs at native address `iovAddr`; completes with bytes read or -errno. */
  readv(tag: number, offset: number, iovAddr: number, iovCnt: number, len: number): void;
  /** Writes `len` bytes from `iovCnt` iovecs at native address `iovAddr`; completes with bytes written or -errno. */
  writev(tag: number, offset: number, iovAddr: number, iovCnt: number, len: number): void;
  /** Makes every completed write durable; completes with 0 or -errno. */
  flush(tag: number): void;
  /** Deallocates `len` bytes at `offset` (reads then return zeros); completes with 0 or -errno. */
  discard(tag: number, offset: number, len: number): void;
  /** Zeroes `len` bytes at `offset`, deallocating them when `unmap`; completes with 0 or -errno (-EOPNOTSUPP when refused). */
  writeZeroes(tag: number, offset: number, len: number, unmap: boolean): void;
  /** Sees each completion of a tag below 2^30 first; true when the backend took it over (fault injection). */
  interceptCompletion?(tag: number, res: number): boolean;
  /** For diagnostics: requests the backend itself holds back (fault injection), in words. */
  describeHeld?(): string;
}

/** A serializable description from which each worker builds its own backend instance. */
export type BackendSpec =
  | { kind: 'file'; fd: number; sizeBytes: number; readOnly: boolean; faults?: FaultRule[] }
  | { kind: 'null'; sizeBytes: number; readOnly: boolean; faults?: FaultRule[] };
