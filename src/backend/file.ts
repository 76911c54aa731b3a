/**
 * Raw image file or block device through io_uring: READV/WRITEV straight between the file and the
 * guest's buffers (the iovecs point into mapped guest memory), FSYNC with DATASYNC for flush.
 */
import { IORING_FSYNC_DATASYNC, IORING_OP_FSYNC, IORING_OP_READV, IORING_OP_WRITEV } from '../os/uring.js';
import type { BlockBackend, IoContext } from './types.js';

/** The file backend of one worker; the fd is shared by all workers (opened once by the daemon). */
export class FileBackend implements BlockBackend {
  constructor(private readonly ctx: IoContext, private readonly fd: number, readonly sizeBytes: number, readonly readOnly: boolean) {}

  /** Queues a READV SQE. */
  readv(tag: number, offset: number, iovAddr: number, iovCnt: number): void {
    this.ctx.ring.prep(IORING_OP_READV, this.fd, iovAddr, iovCnt, offset, 0, tag);
  }

  /** Queues a WRITEV SQE (read-only disks never get here: the request layer refuses first). */
  writev(tag: number, offset: number, iovAddr: number, iovCnt: number): void {
    if (this.readOnly) return this.ctx.completeInline(tag, -30 /* EROFS */);
    this.ctx.ring.prep(IORING_OP_WRITEV, this.fd, iovAddr, iovCnt, offset, 0, tag);
  }

  /** Queues an fdatasync. */
  flush(tag: number): void {
    this.ctx.ring.prep(IORING_OP_FSYNC, this.fd, 0, 0, 0, IORING_FSYNC_DATASYNC, tag);
  }
}
