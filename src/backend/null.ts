/**
 * The null backend (as Linux's null_blk and SPDK's null bdev): reads complete without touching the
 * buffers, writes are dropped, flush succeeds at once. It measures the protocol and ring path alone.
 */
import type { BlockBackend, IoContext } from './types.js';

/** Null backend of one worker. */
export class NullBackend implements BlockBackend {
  constructor(private readonly ctx: IoContext, public sizeBytes: number, readonly readOnly: boolean) {}

  /** Reports the whole read done; like null_blk, the buffer keeps what the guest had in it. */
  readv(tag: number, _offset: number, _iovAddr: number, _iovCnt: number, len: number): void {
    this.ctx.completeInline(tag, len);
  }

  /** Drops the data, reporting it all written. */
  writev(tag: number, _offset: number, _iovAddr: number, _iovCnt: number, len: number): void {
    this.ctx.completeInline(tag, len);
  }

  /** Nothing to make durable. */
  flush(tag: number): void {
    this.ctx.completeInline(tag, 0);
  }

  /** Nothing to deallocate. */
  discard(tag: number): void {
    this.ctx.completeInline(tag, 0);
  }

  /** Nothing to zero. */
  writeZeroes(tag: number): void {
    this.ctx.completeInline(tag, 0);
  }
}
