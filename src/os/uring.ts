/**
 * io_uring set up by raw syscalls, with its SQ and CQ rings driven from TypeScript through views on
 * the kernel's shared mappings. One FFI call (io_uring_enter) submits a whole batch and waits.
 *
 * Not thread safe: one ring per thread, used only by the thread that created it.
 */
import {
  SysError, allocNative, lastErrno, mmap, munmap, native, ptr, view, closeQuietly,
  MAP_POPULATE, MAP_SHARED, PROT_READ, PROT_WRITE, SYS_io_uring_enter, SYS_io_uring_setup,
} from './libc.js';

/** io_uring opcodes we use. */
export const IORING_OP_NOP = 0;
export const IORING_OP_READV = 1;
export const IORING_OP_WRITEV = 2;
export const IORING_OP_FSYNC = 3;
export const IORING_OP_TIMEOUT = 11;
export const IORING_OP_FALLOCATE = 17;
export const IORING_OP_READ = 22;
export const IORING_OP_WRITE = 23;
/** fsync_flags: data only (fdatasync). */
export const IORING_FSYNC_DATASYNC = 1;

const IORING_ENTER_GETEVENTS = 1;
const IORING_SETUP_CLAMP = 1 << 4;
const IORING_SETUP_COOP_TASKRUN = 1 << 8;
const IORING_SETUP_SINGLE_ISSUER = 1 << 12;
const IORING_SETUP_DEFER_TASKRUN = 1 << 13;
const IORING_FEAT_SINGLE_MMAP = 1;
const IORING_OFF_SQ_RING = 0;
const IORING_OFF_CQ_RING = 0x8000000;
const IORING_OFF_SQES = 0x10000000;
const SQE_SIZE = 64;
const CQE_SIZE = 16;
const EINTR = 4;
const EAGAIN = 11;
const EBUSY = 16;
const TWO_32 = 2 ** 32;
/** Submit attempts before prep() gives up on a full SQ instead of overwriting an unsubmitted SQE. */
const MAKE_ROOM_ATTEMPTS = 1000;

/** Called for each completion: `userData` as submitted, `res` is the result or -errno. */
export type CompletionHandler = (userData: number, res: number) => void;

/** An io_uring instance. */
export class IoUring {
  /** Ring file descriptor. */
  readonly fd: number;
  /** Number of SQ entries. */
  readonly sqEntries: number;
  private readonly sqHead: Uint32Array;
  private readonly sqTail: Uint32Array;
  private readonly sqArray: Uint32Array;
  private readonly sqMask: number;
  private readonly sqes32: Uint32Array;
  private readonly cqHead: Uint32Array;
  private readonly cqTail: Uint32Array;
  private readonly cqes32: Uint32Array;
  private readonly cqesI32: Int32Array;
  private readonly cqMask: number;
  private readonly mappings: Array<[number, number]> = [];
  /** SQEs written since the last enter. */
  private pending = 0;
  /** Our copy of the SQ tail: the shared one is published in submit(). */
  private localTail: number;

  /** Creates a ring with at least `entries` SQEs (rounded up by the kernel, CQ twice that). */
  constructor(entries: number) {
    const params = allocNative(4096);
    const p32 = new Uint32Array(params.buffer, 0, 30);
    let fd = -1;
    // Prefer the modes that cut kernel work for a single-threaded submitter; older kernels refuse them.
    const flagSets = [
      IORING_SETUP_CLAMP | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
      IORING_SETUP_CLAMP | IORING_SETUP_COOP_TASKRUN,
      IORING_SETUP_CLAMP,
    ];
    for (const flags of flagSets) {
      p32.fill(0);
      p32[2] = flags;
      fd = Number(native.ioUringSetup(SYS_io_uring_setup, entries, ptr(params.addr)));
      if (fd >= 0) break;
      if (lastErrno() !== 22 /* EINVAL */) break;
    }
    if (fd < 0) {
      const errno = lastErrno();
      munmap(params.addr, 4096);
      throw new SysError('io_uring_setup', errno, `${entries} entries`);
    }
    this.fd = fd;
    try {
      const sqEntries = p32[0];
      const cqEntries = p32[1];
      const features = p32[5];
      // struct io_sqring_offsets at byte 40, io_cqring_offsets at byte 80.
      const sq = { head: p32[10], tail: p32[11], mask: p32[12], entries: p32[13], flags: p32[14], dropped: p32[15], array: p32[16] };
      const cq = { head: p32[20], tail: p32[21], mask: p32[22], entries: p32[23], overflow: p32[24], cqes: p32[25] };
      const sqRingSize = sq.array + sqEntries * 4;
      const cqRingSize = cq.cqes + cqEntries * CQE_SIZE;
      let sqRingAddr: number;
      let cqRingAddr: number;
      if (features & IORING_FEAT_SINGLE_MMAP) {
        const size = Math.max(sqRingSize, cqRingSize);
        sqRingAddr = cqRingAddr = this.map(size, IORING_OFF_SQ_RING);
      } else {
        sqRingAddr = this.map(sqRingSize, IORING_OFF_SQ_RING);
        cqRingAddr = this.map(cqRingSize, IORING_OFF_CQ_RING);
      }
      const sqesAddr = this.map(sqEntries * SQE_SIZE, IORING_OFF_SQES);
      const sqRing = view(sqRingAddr, sqRingSize);
      const cqRing = sqRingAddr === cqRingAddr ? sqRing : view(cqRingAddr, cqRingSize);
      this.sqHead = new Uint32Array(sqRing, sq.head, 1);
      this.sqTail = new Uint32Array(sqRing, sq.tail, 1);
      this.sqMask = new Uint32Array(sqRing, sq.mask, 1)[0];
      this.sqArray = new Uint32Array(sqRing, sq.array, sqEntries);
      const sqes = view(sqesAddr, sqEntries * SQE_SIZE);
      this.sqes32 = new Uint32Array(sqes);
      this.cqHead = new Uint32Array(cqRing, cq.head, 1);
      this.cqTail = new Uint32Array(cqRing, cq.tail, 1);
      this.cqMask = new Uint32Array(cqRing, cq.mask, 1)[0];
      this.cqes32 = new Uint32Array(cqRing, cq.cqes, cqEntries * 4);
      this.cqesI32 = new Int32Array(cqRing, cq.cqes, cqEntries * 4);
      this.sqEntries = sqEntries;
      this.localTail = Atomics.load(this.sqTail, 0);
    } catch (err) {
      this.close();
      throw err;
    } finally {
      munmap(params.addr, 4096);
    }
  }

  private map(len: number, offset: number): number {
    const addr = mmap(len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, this.fd, offset);
    this.mappings.push([addr, len]);
    return addr;
  }

  /** Free SQ slots before the next submit is forced. */
  get sqSpace(): number {
    return this.sqEntries - (this.localTail - Atomics.load(this.sqHead, 0));
  }

  /**
   * Queues one SQE. `addr`, `off` are numbers (exact up to 2^53). Submits the queue first when it is full.
   */
  prep(opcode: number, fd: number, addr: number, len: number, off: number, opFlags: number, userData: number): void {
    if (this.sqSpace <= 0) this.makeRoom();
    const idx = this.localTail & this.sqMask;
    const w = idx * 16; // index in 32-bit words
    const s32 = this.sqes32;
    // Every word of the SQE is written (plain stores beat a fill() builtin call per request).
    s32[w] = opcode; // opcode u8, flags u8 and ioprio u16 all zero but the opcode
    s32[w + 1] = fd;
    s32[w + 2] = off % TWO_32;
    s32[w + 3] = Math.floor(off / TWO_32);
    s32[w + 4] = addr % TWO_32;
    s32[w + 5] = Math.floor(addr / TWO_32);
    s32[w + 6] = len;
    s32[w + 7] = opFlags;
    s32[w + 8] = userData % TWO_32;
    s32[w + 9] = Math.floor(userData / TWO_32);
    s32[w + 10] = 0; // buf_index, personality
    s32[w + 11] = 0; // splice_fd_in / file_index
    s32[w + 12] = 0; // addr3
    s32[w + 13] = 0;
    s32[w + 14] = 0;
    s32[w + 15] = 0;
    this.sqArray[idx] = idx;
    this.localTail = (this.localTail + 1) >>> 0;
    this.pending++;
  }

  /**
   * Submits until an SQ slot is free. The kernel may take none of a batch for a moment (EAGAIN, EBUSY);
   * writing on regardless would overwrite an SQE it has not read yet and lose that request, so retry, and
   * throw rather than overwrite if it never takes any.
   */
  private makeRoom(): void {
    for (let attempt = 0; attempt < MAKE_ROOM_ATTEMPTS; attempt++) {
      this.enter(0, attempt > 0);
      if (this.sqSpace > 0) return;
    }
    throw new Error(`io_uring submission queue full: the kernel took none of ${this.pending} queued SQEs in ${MAKE_ROOM_ATTEMPTS} tries`);
  }

  /** Number of SQEs queued but not yet handed to the kernel. */
  get pendingCount(): number {
    return this.pending;
  }

  /** Hands queued SQEs to the kernel without waiting. */
  submit(): number {
    return this.enter(0);
  }

  /**
   * Submits queued SQEs and waits until at least `minComplete` completions are ready.
   * Returns the number submitted. EINTR and EBUSY/EAGAIN (CQ backpressure) are not errors here.
   * `getEvents` with `minComplete` 0 posts what already completed without waiting: with
   * DEFER_TASKRUN, poll-driven completions (eventfd reads) only reach the CQ inside a GETEVENTS enter.
   */
  enter(minComplete: number, getEvents = minComplete > 0): number {
    Atomics.store(this.sqTail, 0, this.localTail);
    const toSubmit = this.pending;
    const flags = getEvents ? IORING_ENTER_GETEVENTS : 0;
    const ret = Number(native.ioUringEnter(SYS_io_uring_enter, this.fd, toSubmit, minComplete, flags, null, 0));
    if (ret < 0) {
      const errno = lastErrno();
      if (errno === EINTR || errno === EAGAIN || errno === EBUSY) return 0;
      throw new SysError('io_uring_enter', errno, `submit ${toSubmit}, wait ${minComplete}`);
    }
    this.pending -= ret;
    return ret;
  }

  /** Calls `handler` for each ready completion and frees their slots; returns how many. */
  reap(handler: CompletionHandler): number {
    let head = this.cqHead[0];
    const tail = Atomics.load(this.cqTail, 0);
    let n = 0;
    while (head !== tail) {
      const w = (head & this.cqMask) * 4;
      const userData = this.cqes32[w] + this.cqes32[w + 1] * TWO_32;
      const res = this.cqesI32[w + 2];
      head = (head + 1) >>> 0;
      n++;
      // Publish the head before calling out so the handler may prep and submit freely.
      Atomics.store(this.cqHead, 0, head);
      handler(userData, res);
    }
    return n;
  }

  /** Unmaps the rings and closes the fd. In-flight operations are cancelled by the kernel. */
  close(): void {
    for (const [addr, len] of this.mappings.splice(0)) munmap(addr, len);
    closeQuietly(this.fd);
  }
}

/** An Error for a negative io_uring result, naming the operation. */
export function completionError(call: string, res: number): SysError {
  return new SysError(call, -res);
}
