/**
 * Raw image file or block device through io_uring: READV/WRITEV straight between the file and the
 * guest's buffers (the iovecs point into mapped guest memory), FSYNC with DATASYNC for flush, and
 * FALLOCATE for discard and write-zeroes: Linux maps punch-hole and zero-range on a block device to
 * BLKDISCARD and BLKZEROOUT, so one path serves files and devices.
 */
import { IORING_FSYNC_DATASYNC, IORING_OP_FALLOCATE, IORING_OP_FSYNC, IORING_OP_READV, IORING_OP_WRITEV } from '../os/uring.js';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from '../os/libc.js';
import type { BlockBackend, IoContext } from './types.js';

/** The file backend of one worker; the fd is shared by all workers (opened once by the daemon). */
export class FileBackend implements BlockBackend {
  constructor(private readonly ctx: IoContext, private readonly fd: number, public sizeBytes: number, readonly readOnly: boolean) {}

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

  /** Punches a hole (keeps the size): the space goes back to the filesystem. */
  discard(tag: number, offset: number, len: number): void {
    this.fallocate(tag, offset, len, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
  }

  /** Zero-range (allocated zeros), or a punched hole when the guest allows unmapping. */
  writeZeroes(tag: number, offset: number, len: number, unmap: boolean): void {
    this.fallocate(tag, offset, len, (unmap ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE);
  }

  private fallocate(tag: number, offset: number, len: number, mode: number): void {
    if (this.readOnly) return this.ctx.completeInline(tag, -30 /* EROFS */);
    // IORING_OP_FALLOCATE takes the length in sqe->addr and the mode in sqe->len.
    this.ctx.ring.prep(IORING_OP_FALLOCATE, this.fd, len, mode, offset, 0, tag);
  }
}
