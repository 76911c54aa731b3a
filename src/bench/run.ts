/**
 * Runs one workload against one target: starts the server and the image, connects, runs the
 * load-generator threads through warm-up and the measured window, samples CPU time, tears down.
 */
import { Worker } from 'node:worker_threads';
import { mkdtempSync, rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { VhostUserBlkClient } from '../frontend/client.js';
import { SharedMemory } from '../frontend/memory.js';
import { closeQuietly, eventfd, native, EFD_CLOEXEC, EFD_NONBLOCK } from '../os/libc.js';
import { Feature } from '../blk/constants.js';
import { HISTOGRAM_BUCKETS, mergeInto, summarize, type LatencySummary } from './histogram.js';
import { CLK_TCK, processTicks, systemBusyTicks } from './procstat.js';
import {
  PAGE, PHASE_MEASURE, PHASE_STOP, queueBufferBytes,
  type FromLoadWorker, type LoadWorkerInit, type LoadWorkerResult, type PollChoice, type PollMode, type RingSetup, type RwMode, type Workload,
} from './protocol.js';
import { createImage, removeImage, startQsd, startVhostBlk, stopServer, waitForSocket, type ServerProcess, type TargetName } from './targets.js';

/** One workload as the user asked for it. */
export interface WorkloadSpec {
  name: string;
  rw: RwMode;
  bs: number;
  iodepth: number;
  queues: number;
  rwmixread: number;
}

/** Settings common to every run. */
export interface RunSettings {
  runtimeSec: number;
  warmupSec: number;
  /** Image (and null disk) size in bytes. */
  size: number;
  imageDir: string;
  poll: PollChoice;
  spinUs: number;
}

/** What one target achieved on one workload. */
export interface TargetResult {
  target: TargetName;
  /** How the load generator waited for completions. */
  poll: PollMode;
  ok: boolean;
  error?: string;
  ios: number;
  errors: number;
  seconds: number;
  iops: number;
  mibps: number;
  latency: LatencySummary;
  /** Server (or, for bare, this whole process) CPU time per completed I/O, µs. */
  backendCpuUsPerIo: number;
  /** Server CPU in cores (CPU seconds per second) over the window. */
  backendCores: number;
  /** The load-generator threads' own CPU per I/O, µs. */
  loadgenCpuUsPerIo: number;
  loadgenCores: number;
  /** Kicks and sleeps per I/O of the load generator (how often it notified / blocked). */
  kicksPerIo: number;
  sleepsPerIo: number;
  /**
   * CPU used by everything else on the machine during the window, in cores: (all busy time) - server -
   * this process. Anything well above 0 means the numbers are disturbed by other work.
   */
  otherCores: number;
  /** Runs it took (see --retries). */
  attempts?: number;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function nextPow2(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** The queue size a workload needs: three descriptors per request, at least 128 (QEMU's default). */
export function queueSizeFor(iodepth: number): number {
  return Math.max(128, nextPow2(3 * iodepth));
}

function workloadOf(spec: WorkloadSpec, q: number, capacity: number): Workload {
  const regionLen = Math.floor(capacity / spec.queues / spec.bs) * spec.bs;
  return {
    rw: spec.rw, bs: spec.bs, iodepth: spec.iodepth, rwmixread: spec.rwmixread, capacity,
    regionStart: q * regionLen, regionLen, seed: (0x9e3779b9 * (q + 1)) >>> 0,
  };
}

/** A started load-generator (or loopback device) thread. */
interface Thread {
  worker: Worker;
  ready: Promise<void>;
  result: Promise<LoadWorkerResult>;
}

function startThread(init: LoadWorkerInit): Thread {
  const worker = new Worker(new URL('./worker.js', import.meta.url), { workerData: init });
  let readyResolve!: () => void;
  let fail!: (e: Error) => void;
  const ready = new Promise<void>((resolve, reject) => { readyResolve = resolve; fail = reject; });
  const result = new Promise<LoadWorkerResult>((resolve, reject) => {
    worker.on('message', (m: FromLoadWorker) => {
      if (m.op === 'ready') readyResolve();
      else if (m.op === 'result') resolve(m.result);
      else {
        const e = new Error(`load generator ${init.queue}: ${m.message}`);
        fail(e);
        reject(e);
      }
    });
    worker.on('error', (e) => { fail(e); reject(e); });
    worker.on('exit', (code) => {
      const e = new Error(`load generator ${init.queue} exited (code ${code}) without a result`);
      fail(e);
      reject(e);
    });
  });
  ready.catch(() => undefined);
  result.catch(() => undefined);
  return { worker, ready, result };
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => { timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms / 1000} s`)), ms); }),
  ]);
}

/** Connects, retrying briefly while the server finishes starting. */
async function connect(socket: string, numQueues: number, queueSize: number, memoryBytes: number): Promise<VhostUserBlkClient> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      return await VhostUserBlkClient.connect(socket, { numQueues, queueSize, memoryBytes });
    } catch (err) {
      if (Date.now() > deadline || !/ECONNREFUSED|ENOENT|closed the connection|ECONNRESET/.test((err as Error).message)) throw err;
      await sleep(20);
    }
  }
}

/** The polling mode a workload runs with: auto spins only if load generators and server queue threads each get a core. */
export function effectivePoll(choice: PollChoice, queues: number): PollMode {
  if (choice !== 'auto') return choice;
  return 2 * queues <= availableParallelism() ? 'spin' : 'hybrid';
}

/** Runs `spec` against `target`; never throws (failures come back with ok: false). */
export async function runTarget(target: TargetName, spec: WorkloadSpec, s: RunSettings): Promise<TargetResult> {
  const poll = effectivePoll(s.poll, spec.queues);
  const dir = mkdtempSync(join(tmpdir(), 'vhost-blk-bench-'));
  const image = join(s.imageDir, `vhost-blk-bench-${process.pid}-${target}.raw`);
  const cleanups: Array<() => Promise<void> | void> = [];
  const threads: Thread[] = [];
  const ctlBuf = new SharedArrayBuffer(8);
  const ctl = new Int32Array(ctlBuf);
  /** Call eventfds the load generators may sleep on: signalled before terminating them, so none stays blocked. */
  const callFds: number[] = [];
  try {
    const queueSize = queueSizeFor(spec.iodepth);
    const bufBytes = queueBufferBytes(spec.iodepth, spec.bs);
    const memoryBytes = alignUp(spec.queues * (bufBytes + 64 * 1024) + (1 << 20), 2 << 20);
    let server: ServerProcess | null = null;
    const needsImage = target === 'vhost-blk' || target === 'qemu-storage-daemon' || target === 'bare';
    if (needsImage) {
      removeImage(image);
      createImage(image, s.size);
      cleanups.push(() => removeImage(image));
    }
    const loadInits: LoadWorkerInit[] = [];
    const deviceInits: LoadWorkerInit[] = [];
    if (target === 'bare') {
      for (let q = 0; q < spec.queues; q++) {
        loadInits.push({ kind: 'bare', queue: q, ctl: ctlBuf, work: workloadOf(spec, q, s.size), imagePath: image, poll, spinUs: s.spinUs });
      }
    } else if (target === 'loopback') {
      const mem = SharedMemory.create(memoryBytes, 'vhost-blk-bench-loopback');
      cleanups.push(() => mem.close());
      let off = 0;
      for (let q = 0; q < spec.queues; q++) {
        const desc = off;
        const avail = desc + alignUp(16 * queueSize, PAGE);
        const used = avail + alignUp(6 + 2 * queueSize, PAGE);
        const bufGpa = used + alignUp(6 + 8 * queueSize, PAGE);
        off = bufGpa + bufBytes;
        const kickFd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        const callFd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        cleanups.push(() => { closeQuietly(kickFd); closeQuietly(callFd); });
        const ring: RingSetup = { memAddr: mem.addr, memSize: mem.size, queueSize, desc, avail, used, eventIdx: true, kickFd, callFd, bufGpa };
        deviceInits.push({ kind: 'loopback-device', queue: q, ctl: ctlBuf, ring });
        loadInits.push({ kind: 'vhost', queue: q, ctl: ctlBuf, work: workloadOf(spec, q, s.size), ring, poll, spinUs: s.spinUs });
      }
      if (off > memoryBytes) throw new Error(`internal: loopback layout needs ${off} bytes, have ${memoryBytes}`);
    } else {
      const socket = join(dir, 'sock');
      server = target === 'qemu-storage-daemon'
        ? startQsd(socket, image, spec.queues)
        : startVhostBlk(socket, { image: target === 'vhost-blk' ? image : null, size: s.size, queues: spec.queues, queueSize });
      const srv = server;
      cleanups.push(async () => { await stopServer(srv); });
      await waitForSocket(server);
      const client = await connect(socket, spec.queues, queueSize, memoryBytes);
      cleanups.push(() => client.close());
      const eventIdx = client.hasFeature(Feature.RING_EVENT_IDX);
      const capacity = client.config.capacityBytes;
      for (let q = 0; q < spec.queues; q++) {
        const l = client.ring(q).layout;
        const fds = client.eventFds(q);
        const bufGpa = client.allocDma(bufBytes).gpa;
        const ring: RingSetup = {
          memAddr: client.memory.addr, memSize: client.memory.size, queueSize, desc: l.desc, avail: l.avail, used: l.used,
          eventIdx, kickFd: fds.kickFd, callFd: fds.callFd, bufGpa,
        };
        loadInits.push({ kind: 'vhost', queue: q, ctl: ctlBuf, work: workloadOf(spec, q, capacity), ring, poll, spinUs: s.spinUs });
      }
    }

    for (const i of loadInits) if (i.kind === 'vhost') callFds.push(i.ring.callFd);
    const devices = deviceInits.map(startThread);
    threads.push(...devices);
    await withTimeout(Promise.all(devices.map((t) => t.ready)), 15_000, 'loopback device start');
    const loads = loadInits.map(startThread);
    threads.push(...loads);
    await withTimeout(Promise.all(loads.map((t) => t.ready)), 15_000, 'load generator start');

    await sleep(s.warmupSec * 1000);
    const serverTicks = (): number => (server ? processTicks(server.pid) : processTicks('self'));
    const b0 = serverTicks();
    const self0 = server ? processTicks('self') : 0;
    const sys0 = systemBusyTicks();
    const t0 = performance.now();
    Atomics.store(ctl, 0, PHASE_MEASURE);
    await sleep(s.runtimeSec * 1000);
    Atomics.store(ctl, 0, PHASE_STOP);
    const t1 = performance.now();
    const b1 = serverTicks();
    const self1 = server ? processTicks('self') : 0;
    const sys1 = systemBusyTicks();
    const results = await withTimeout(Promise.all(loads.map((t) => t.result)), 20_000, 'load generators draining');
    Atomics.store(ctl, 1, 1);
    await withTimeout(Promise.all(devices.map((t) => t.result)), 5_000, 'loopback device stop');

    const seconds = (t1 - t0) / 1000;
    const hist = new Float64Array(HISTOGRAM_BUCKETS);
    let ios = 0; let bytes = 0; let errors = 0; let lgTicks = 0; let latSum = 0; let kicks = 0; let sleeps = 0;
    for (const r of results) {
      mergeInto(hist, r.hist);
      ios += r.ios; bytes += r.bytes; errors += r.errors; lgTicks += r.cpuTicks; latSum += r.latSumNs; kicks += r.kicks; sleeps += r.sleeps;
    }
    let backendTicks = b1 - b0;
    // loopback: the devices are this process minus its load generators.
    if (target === 'loopback') backendTicks -= lgTicks;
    const usPerTick = 1e6 / CLK_TCK;
    return {
      target, poll, ok: errors === 0, error: errors ? `${errors} requests failed` : undefined, ios, errors, seconds,
      iops: ios / seconds, mibps: bytes / 2 ** 20 / seconds, latency: summarize(hist, latSum),
      backendCpuUsPerIo: ios ? (backendTicks * usPerTick) / ios : NaN, backendCores: backendTicks / CLK_TCK / seconds,
      loadgenCpuUsPerIo: ios ? (lgTicks * usPerTick) / ios : NaN, loadgenCores: lgTicks / CLK_TCK / seconds,
      kicksPerIo: ios ? kicks / ios : NaN, sleepsPerIo: ios ? sleeps / ios : NaN,
      otherCores: Math.max(0, (sys1 - sys0) - (b1 - b0) - (self1 - self0)) / CLK_TCK / seconds,
    };
  } catch (err) {
    return failed(target, poll, (err as Error).message);
  } finally {
    Atomics.store(ctl, 0, PHASE_STOP);
    Atomics.store(ctl, 1, 1);
    const one = new BigUint64Array([1n]);
    for (const fd of callFds) native.write(fd, one, 8);
    for (const t of threads) await t.worker.terminate().catch(() => undefined);
    for (const c of cleanups.reverse()) {
      try { await c(); } catch { /* best effort */ }
    }
    rmSync(dir, { recursive: true, force: true });
  }
}

function failed(target: TargetName, poll: PollMode, error: string): TargetResult {
  const nan = NaN;
  return {
    target, poll, ok: false, error, ios: 0, errors: 0, seconds: 0, iops: nan, mibps: nan,
    latency: { count: 0, meanUs: nan, p50Us: nan, p99Us: nan, p999Us: nan, maxUs: nan },
    backendCpuUsPerIo: nan, backendCores: nan, loadgenCpuUsPerIo: nan, loadgenCores: nan, kicksPerIo: nan, sleepsPerIo: nan, otherCores: nan,
  };
}
