/**
 * A load-generator thread of `vhost-blk bench`: drives one virtqueue (or, for the `bare` target, the
 * image file through its own io_uring) and keeps `iodepth` requests in flight.
 *
 * The hot loop allocates nothing: every request slot has three fixed descriptors (header, data, status)
 * and fixed buffers in the shared memory, written once at start; a new request only rewrites its
 * header, the data descriptor's WRITE flag and one avail ring entry. Completions are found by polling
 * used.idx; replacements for a whole batch of completions are published with one avail.idx store and
 * at most one kick. Latency is per request, from the avail ring store to the poll that saw it used.
 *
 * Also hosts the `loopback` device: a thread that completes every request the moment it sees it (no
 * socket, no backend), to measure what the load generator alone can reach.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { closeSync, openSync, readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { allocNative, native, view } from '../os/libc.js';
import { IoUring, IORING_OP_READ, IORING_OP_WRITE } from '../os/uring.js';
import { bucketOf, HISTOGRAM_BUCKETS } from './histogram.js';
import { PollRing } from './ring.js';
import { HDR_BLOCK, PAGE, PHASE_MEASURE, PHASE_STOP, PHASE_WARMUP, type FromLoadWorker, type LoadWorkerInit, type LoadWorkerResult, type RingSetup, type Workload } from './protocol.js';

const VIRTQ_DESC_F_NEXT = 1;
const VIRTQ_DESC_F_WRITE = 2;
const VRING_AVAIL_F_NO_INTERRUPT = 1;
const VRING_USED_F_NO_NOTIFY = 1;
const TWO_32 = 2 ** 32;
const STATUS_OFF = 16;

const init = workerData as LoadWorkerInit;
const port = parentPort!;
const ctl = new Int32Array(init.ctl);

function post(msg: FromLoadWorker): void {
  port.postMessage(msg);
}

/** utime + stime of this thread, in clock ticks. */
function threadCpuTicks(): number {
  const s = readFileSync('/proc/thread-self/stat', 'utf8');
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
  return Number(f[11]) + Number(f[12]);
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** Offsets and read/write choices of one queue, from a seeded xorshift32: no allocation. */
class RequestStream {
  private x: number;
  private seqPos = 0;
  private readonly nblocks: number;
  private readonly random: boolean;
  private readonly readPct: number;
  constructor(private readonly w: Workload) {
    this.x = (w.seed >>> 0) || 1;
    this.nblocks = Math.floor(w.capacity / w.bs);
    this.random = w.rw.startsWith('rand');
    this.readPct = w.rw === 'randread' || w.rw === 'read' ? 100 : w.rw === 'randrw' ? w.rwmixread : 0;
  }
  private next32(): number {
    let x = this.x;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.x = x;
    return x >>> 0;
  }
  /** True if the next request reads. */
  nextIsRead(): boolean {
    if (this.readPct === 100) return true;
    if (this.readPct === 0) return false;
    return this.next32() % 100 < this.readPct;
  }
  /** Byte offset of the next request. */
  nextOffset(): number {
    if (this.random) return Math.floor((this.next32() * this.nblocks) / TWO_32) * this.w.bs;
    const off = this.w.regionStart + this.seqPos;
    this.seqPos += this.w.bs;
    if (this.seqPos + this.w.bs > this.w.regionLen) this.seqPos = 0;
    return off;
  }
}

/** Counters of the measured window. */
class Stats {
  measuring = false;
  ios = 0;
  reads = 0;
  writes = 0;
  bytes = 0;
  errors = 0;
  kicks = 0;
  sleeps = 0;
  latSumNs = 0;
  readonly hist = new Uint32Array(HISTOGRAM_BUCKETS);
  private cpu0 = 0;
  private t0 = 0;
  private cpu1 = 0;
  private t1 = 0;
  start(): void {
    this.measuring = true;
    this.cpu0 = threadCpuTicks();
    this.t0 = performance.now();
  }
  stop(): void {
    if (!this.measuring) {
      this.cpu0 = this.cpu1 = threadCpuTicks();
      this.t0 = this.t1 = performance.now();
      return;
    }
    this.measuring = false;
    this.cpu1 = threadCpuTicks();
    this.t1 = performance.now();
  }
  result(queue: number): LoadWorkerResult {
    return {
      queue, ios: this.ios, reads: this.reads, writes: this.writes, bytes: this.bytes, errors: this.errors, hist: this.hist,
      latSumNs: this.latSumNs, cpuTicks: this.cpu1 - this.cpu0, kicks: this.kicks, sleeps: this.sleeps, windowMs: this.t1 - this.t0,
    };
  }
}

/** Views of a split ring in the shared memory, driver side. */
function ringViews(r: RingSetup): { mem8: Uint8Array; mem32: Uint32Array; desc32: Uint32Array; avail16: Uint16Array; used16: Uint16Array; used32: Uint32Array } {
  const buf = view(r.memAddr, r.memSize);
  const n = r.queueSize;
  return {
    mem8: new Uint8Array(buf),
    mem32: new Uint32Array(buf),
    desc32: new Uint32Array(buf, r.desc, 4 * n),
    avail16: new Uint16Array(buf, r.avail, 3 + n),
    used16: new Uint16Array(buf, r.used, 3 + 4 * n),
    used32: new Uint32Array(buf, r.used, 1 + 2 * n),
  };
}

/** The vhost-user-blk driver loop of one queue. */
function runVhost(init: LoadWorkerInit & { kind: 'vhost' }): void {
  const { work, ring: r } = init;
  const { mem8, mem32, desc32, avail16, used16, used32 } = ringViews(r);
  const size = r.queueSize;
  const mask = size - 1;
  const depth = work.iodepth;
  if (3 * depth > size) throw new Error(`iodepth ${depth} needs ${3 * depth} descriptors, the queue has ${size}`);
  const usedEventIdx = 2 + size; // in avail16
  const availEventIdx = 2 + 4 * size; // in used16
  const eventIdx = r.eventIdx;
  const dataBase = r.bufGpa + alignUp(depth * HDR_BLOCK, PAGE);
  const dataStride = alignUp(work.bs, PAGE);
  const stream = new RequestStream(work);
  const stats = new Stats();
  const startMs = new Float64Array(depth);
  const isRead = new Uint8Array(depth);
  const kickBuf = new BigUint64Array([1n]);
  const kickFd = r.kickFd;
  const hybrid = init.poll === 'hybrid';
  const spinMs = init.spinUs / 1000;

  // Fixed chains: slot s = descriptors 3s (header), 3s+1 (data), 3s+2 (status).
  for (let s = 0; s < depth; s++) {
    const hdr = r.bufGpa + s * HDR_BLOCK;
    const data = dataBase + s * dataStride;
    const d = 3 * s;
    const put = (i: number, addr: number, len: number, flags: number, next: number) => {
      desc32[4 * i] = addr % TWO_32;
      desc32[4 * i + 1] = Math.floor(addr / TWO_32);
      desc32[4 * i + 2] = len;
      desc32[4 * i + 3] = flags | (next << 16);
    };
    put(d, hdr, 16, VIRTQ_DESC_F_NEXT, d + 1);
    put(d + 1, data, work.bs, VIRTQ_DESC_F_NEXT, d + 2);
    put(d + 2, hdr + STATUS_OFF, 1, VIRTQ_DESC_F_WRITE, 0);
    // Written data is not all zeros (the image was filled with non-zero data too).
    for (let i = 0; i < work.bs; i += 512) mem8.fill((s + i / 512) % 251 + 1, data + i, data + i + 512);
  }

  let availIdx = Atomics.load(avail16, 1);
  let lastUsed = Atomics.load(used16, 1);
  let inflight = 0;

  /** Calls off: we poll. With EVENT_IDX, a used_event half the index space away is never crossed. */
  const suppressCalls = (): void => {
    if (eventIdx) Atomics.store(avail16, usedEventIdx, (lastUsed + 0x8000) & 0xffff);
    else Atomics.store(avail16, 0, VRING_AVAIL_F_NO_INTERRUPT);
  };
  const requestCall = (): void => {
    if (eventIdx) Atomics.store(avail16, usedEventIdx, lastUsed);
    else Atomics.store(avail16, 0, 0);
  };

  const submit = (s: number, now: number): void => {
    const read = stream.nextIsRead();
    const sector = stream.nextOffset() / 512;
    const h = (r.bufGpa + s * HDR_BLOCK) >>> 2;
    mem32[h] = read ? 0 : 1; // VIRTIO_BLK_T_IN / OUT
    mem32[h + 1] = 0;
    mem32[h + 2] = sector % TWO_32;
    mem32[h + 3] = Math.floor(sector / TWO_32);
    mem8[r.bufGpa + s * HDR_BLOCK + STATUS_OFF] = 0xff;
    const dd = 4 * (3 * s + 1);
    desc32[dd + 3] = (read ? VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE : VIRTQ_DESC_F_NEXT) | ((3 * s + 2) << 16);
    isRead[s] = read ? 1 : 0;
    avail16[2 + (availIdx & mask)] = 3 * s;
    availIdx = (availIdx + 1) & 0xffff;
    startMs[s] = now;
    inflight++;
  };
  const publish = (old: number): void => {
    // Release: descriptors, headers and ring entries above are visible before the index (and a full fence
    // before reading avail_event / used.flags, virtio 2.7.13).
    Atomics.store(avail16, 1, availIdx);
    const kick = eventIdx
      ? ((availIdx - Atomics.load(used16, availEventIdx) - 1) & 0xffff) < ((availIdx - old) & 0xffff)
      : (Atomics.load(used16, 0) & VRING_USED_F_NO_NOTIFY) === 0;
    if (kick) {
      native.write(kickFd, kickBuf, 8);
      if (stats.measuring) stats.kicks++;
    }
  };

  // The sleeping side of hybrid polling: a READ of the call eventfd on a private ring.
  const uring = hybrid ? new IoUring(4) : null;
  const scratch = hybrid ? allocNative(PAGE) : null;
  let armed = false;
  const onCqe = (): void => { armed = false; };

  suppressCalls();
  let now = performance.now();
  const first = availIdx;
  for (let s = 0; s < depth; s++) submit(s, now);
  publish(first);
  post({ op: 'ready' });

  let phase = PHASE_WARMUP;
  let issuing = true;
  let idleSince = -1;
  for (;;) {
    const p = Atomics.load(ctl, 0);
    if (p !== phase) {
      if (p === PHASE_MEASURE) stats.start();
      else if (p === PHASE_STOP) { stats.stop(); issuing = false; }
      phase = p;
    }
    const usedIdx = Atomics.load(used16, 1);
    if (usedIdx !== lastUsed) {
      now = performance.now();
      const old = availIdx;
      const measuring = stats.measuring;
      do {
        const id = used32[1 + 2 * (lastUsed & mask)];
        lastUsed = (lastUsed + 1) & 0xffff;
        const s = (id / 3) | 0;
        inflight--;
        if (measuring) {
          const ns = (now - startMs[s]) * 1e6;
          stats.hist[bucketOf(ns)]++;
          stats.latSumNs += ns;
          stats.ios++;
          if (isRead[s]) stats.reads++; else stats.writes++;
          stats.bytes += work.bs;
          if (mem8[r.bufGpa + s * HDR_BLOCK + STATUS_OFF] !== 0) stats.errors++;
        }
        if (issuing) submit(s, now);
      } while (lastUsed !== usedIdx);
      if (eventIdx) suppressCalls();
      if (availIdx !== old) publish(old);
      idleSince = -1;
      continue;
    }
    if (!issuing && inflight === 0) break;
    if (!hybrid) continue;
    const t = performance.now();
    if (idleSince < 0) { idleSince = t; continue; }
    if (t - idleSince < spinMs) continue;
    // Ask for a call, then look once more (the store is a full fence) before sleeping on it.
    requestCall();
    if (Atomics.load(used16, 1) === lastUsed) {
      if (!armed) {
        uring!.prep(IORING_OP_READ, r.callFd, scratch!.addr, 8, 0, 0, 1);
        armed = true;
      }
      uring!.enter(1);
      uring!.reap(onCqe);
      if (stats.measuring) stats.sleeps++;
      if (Atomics.load(ctl, 1) !== 0) break; // the main thread gave up on this run (ctl[1] = abort)
    }
    suppressCalls();
    idleSince = -1;
  }
  uring?.close();
  post({ op: 'result', result: stats.result(init.queue) });
}

/**
 * The bare-file loop: the image through io_uring from this thread, no virtio at all. spin: polls with
 * non-blocking io_uring_enter(GETEVENTS) calls (see ring.ts for why); hybrid: polls for spinUs, then
 * waits in io_uring_enter.
 */
function runBare(init: LoadWorkerInit & { kind: 'bare' }): void {
  const work = init.work;
  const depth = work.iodepth;
  const fd = openSync(init.imagePath, 'r+');
  let entries = 8;
  while (entries < 2 * depth) entries *= 2;
  const ring = new PollRing(entries);
  const stride = alignUp(work.bs, PAGE);
  const bufs = allocNative(depth * stride);
  new Uint8Array(bufs.buffer).fill(0x5a);
  const stream = new RequestStream(work);
  const stats = new Stats();
  const startMs = new Float64Array(depth);
  const isRead = new Uint8Array(depth);
  const hybrid = init.poll === 'hybrid';
  const spinMs = init.spinUs / 1000;
  let inflight = 0;
  let issuing = true;
  let now = performance.now();

  const submit = (s: number): void => {
    const read = stream.nextIsRead();
    ring.prep(read ? IORING_OP_READ : IORING_OP_WRITE, fd, bufs.addr + s * stride, work.bs, stream.nextOffset(), s);
    isRead[s] = read ? 1 : 0;
    startMs[s] = now;
    inflight++;
  };
  const onCqe = (s: number, res: number): void => {
    inflight--;
    if (stats.measuring) {
      const ns = (now - startMs[s]) * 1e6;
      stats.hist[bucketOf(ns)]++;
      stats.latSumNs += ns;
      stats.ios++;
      if (isRead[s]) stats.reads++; else stats.writes++;
      stats.bytes += work.bs;
      if (res !== work.bs) stats.errors++;
    }
    if (issuing) submit(s);
  };
  for (let s = 0; s < depth; s++) submit(s);
  post({ op: 'ready' });
  let phase = PHASE_WARMUP;
  let idleSince = -1;
  for (;;) {
    const p = Atomics.load(ctl, 0);
    if (p !== phase) {
      if (p === PHASE_MEASURE) stats.start();
      else if (p === PHASE_STOP) { stats.stop(); issuing = false; }
      phase = p;
    }
    if (!issuing && inflight === 0) break;
    // Submit what was prepped and post finished completions, without waiting.
    ring.enter(0, true);
    if (!ring.ready()) {
      if (!hybrid) continue;
      const t = performance.now();
      if (idleSince < 0) { idleSince = t; continue; }
      if (t - idleSince < spinMs) continue;
      ring.enter(1);
      if (stats.measuring) stats.sleeps++;
    }
    idleSince = -1;
    now = performance.now();
    ring.reap(onCqe);
  }
  ring.close();
  closeSync(fd);
  post({ op: 'result', result: stats.result(init.queue) });
}

/** The loopback device: completes each request as soon as it is seen; calls only when asked to. */
function runLoopbackDevice(init: LoadWorkerInit & { kind: 'loopback-device' }): void {
  const r = init.ring;
  const { mem8, desc32, avail16, used16, used32 } = ringViews(r);
  const size = r.queueSize;
  const mask = size - 1;
  const usedEventIdx = 2 + size;
  const availEventIdx = 2 + 4 * size;
  const callBuf = new BigUint64Array([1n]);
  let lastAvail = Atomics.load(avail16, 1);
  let used = Atomics.load(used16, 1);
  let n = 0;
  post({ op: 'ready' });
  for (;;) {
    if ((++n & 1023) === 0 && Atomics.load(ctl, 1) !== 0) break;
    const availIdx = Atomics.load(avail16, 1);
    if (availIdx === lastAvail) continue;
    const old = used;
    do {
      const head = avail16[2 + (lastAvail & mask)];
      lastAvail = (lastAvail + 1) & 0xffff;
      const data = desc32[4 * head + 3] >>> 16;
      const status = desc32[4 * data + 3] >>> 16;
      const isRead = (desc32[4 * data + 3] & VIRTQ_DESC_F_WRITE) !== 0;
      mem8[desc32[4 * status] + desc32[4 * status + 1] * TWO_32] = 0;
      const e = 1 + 2 * (used & mask);
      used32[e] = head;
      used32[e + 1] = isRead ? desc32[4 * data + 2] + 1 : 1;
      used = (used + 1) & 0xffff;
    } while (lastAvail !== availIdx);
    Atomics.store(used16, 1, used);
    // Never ask for kicks (we poll); call only if the driver wants one.
    Atomics.store(used16, availEventIdx, (lastAvail + 0x8000) & 0xffff);
    if (((used - Atomics.load(avail16, usedEventIdx) - 1) & 0xffff) < ((used - old) & 0xffff)) native.write(r.callFd, callBuf, 8);
  }
  post({ op: 'result', result: new Stats().result(init.queue) });
}

try {
  if (init.kind === 'vhost') runVhost(init);
  else if (init.kind === 'bare') runBare(init);
  else runLoopbackDevice(init);
} catch (err) {
  post({ op: 'error', message: (err as Error).stack ?? String(err) });
}
