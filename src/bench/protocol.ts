/**
 * What the benchmark's main thread and its load-generator threads tell each other.
 *
 * Phases go through a shared Int32Array (ctl[0]) so the hot loop reads them with one Atomics.load and
 * no message handling; results come back once, by postMessage.
 */

/** ctl[0] values. */
export const PHASE_WARMUP = 0;
export const PHASE_MEASURE = 1;
export const PHASE_STOP = 2;

/** Access patterns, as fio names them. */
export type RwMode = 'randread' | 'randwrite' | 'read' | 'write' | 'randrw';
export const RW_MODES: readonly RwMode[] = ['randread', 'randwrite', 'read', 'write', 'randrw'];

/**
 * How a load-generator thread waits for completions. spin: polls the used ring without pause and asks
 * the device for no call notifications. hybrid: polls for `spinUs`, then asks for a call and sleeps in
 * io_uring_enter on the call eventfd.
 */
export type PollMode = 'spin' | 'hybrid';
/** As asked on the command line: auto picks spin when every load-generator thread and every server queue thread can have a core. */
export type PollChoice = PollMode | 'auto';

/** The workload of one queue. */
export interface Workload {
  rw: RwMode;
  /** Bytes per request. */
  bs: number;
  iodepth: number;
  /** Percentage of reads for randrw. */
  rwmixread: number;
  /** Disk capacity in bytes (requests stay below it). */
  capacity: number;
  /** Sequential workloads walk [regionStart, regionStart + regionLen) and wrap. */
  regionStart: number;
  regionLen: number;
  /** Seed of the offset generator (xorshift32, non-zero). */
  seed: number;
}

/** A ring the load generator drives (offsets in the shared memory = guest physical addresses). */
export interface RingSetup {
  memAddr: number;
  memSize: number;
  queueSize: number;
  desc: number;
  avail: number;
  used: number;
  eventIdx: boolean;
  kickFd: number;
  callFd: number;
  /** Start of this queue's request blocks (headers, status bytes, data buffers) in the shared memory. */
  bufGpa: number;
}

/** workerData of a load-generator thread. */
export type LoadWorkerInit =
  | { kind: 'vhost'; queue: number; ctl: SharedArrayBuffer; work: Workload; ring: RingSetup; poll: PollMode; spinUs: number }
  | { kind: 'bare'; queue: number; ctl: SharedArrayBuffer; work: Workload; imagePath: string; poll: PollMode; spinUs: number }
  /** The trivially fast in-process device of the `loopback` target (completes every request at once). */
  | { kind: 'loopback-device'; queue: number; ctl: SharedArrayBuffer; ring: RingSetup };

/** What a load-generator thread reports at the end. */
export interface LoadWorkerResult {
  queue: number;
  /** Requests completed inside the measured window. */
  ios: number;
  reads: number;
  writes: number;
  bytes: number;
  /** Completions whose status byte was not OK (or short bare I/O). */
  errors: number;
  /** Latency histogram (counts per bucket) and exact sum in ns, measured window only. */
  hist: Uint32Array;
  latSumNs: number;
  /** This thread's utime+stime in clock ticks over the measured window. */
  cpuTicks: number;
  /** Kicks (eventfd writes) and sleeps (io_uring waits) in the measured window. */
  kicks: number;
  sleeps: number;
  /** Measured window length seen by this thread, in ms. */
  windowMs: number;
}

/** Messages from a load-generator thread. */
export type FromLoadWorker =
  | { op: 'ready' }
  | { op: 'result'; result: LoadWorkerResult }
  | { op: 'error'; message: string };

/** Per-slot header block in the shared memory: 16-byte virtio_blk_outhdr, status byte at +16. */
export const HDR_BLOCK = 64;
export const PAGE = 4096;

/** Bytes of shared memory one queue's request blocks take: headers, then one page-aligned buffer per slot. */
export function queueBufferBytes(iodepth: number, bs: number): number {
  return Math.ceil((iodepth * HDR_BLOCK) / PAGE) * PAGE + iodepth * Math.ceil(bs / PAGE) * PAGE;
}
