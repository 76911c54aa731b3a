/**
 * A queue worker thread: serves virtqueues with one io_uring and one blocking point.
 *
 * The thread sleeps only in io_uring_enter, which wakes it for backend completions, for a READ on each
 * queue's kick eventfd, and for a READ on the control eventfd (then it drains its message port
 * synchronously). Call notifications are eventfd WRITEs on the same ring, so one system call per loop
 * submits I/O, signals the guest and waits.
 */
import { parentPort, receiveMessageOnPort, workerData } from 'node:worker_threads';
import { FileBackend } from '../backend/file.js';
import { NullBackend } from '../backend/null.js';
import { FaultInjectingBackend } from '../backend/faults.js';
import type { BlockBackend, IoContext } from '../backend/types.js';
import { BlkRequestProcessor, type BlkSettings } from './request-processor.js';
import { GuestMemory, type MappedRegion } from '../memory/guest-memory.js';
import { DirtyLog } from '../memory/dirty-log.js';
import { allocNative, munmap, view } from '../os/libc.js';
import { IORING_OP_READ, IORING_OP_TIMEOUT, IORING_OP_WRITE, IoUring } from '../os/uring.js';
import { SplitQueue } from '../virtqueue/split.js';
import { InflightQueue, type InflightRecovery } from '../virtqueue/inflight.js';
import { PackedQueue, decodePackedBase, type PackedRingState } from '../virtqueue/packed.js';
import { PackedInflightQueue, type PackedInflightRecovery } from '../virtqueue/packed-inflight.js';
import type { VirtQueue } from '../virtqueue/queue.js';
import { MAX_RANGE_SECTORS } from './device.js';
import type { FromWorker, StartQueue, ToWorker, WorkerInit, WorkerRegion } from './worker-protocol.js';
import type { DirtyLogArea } from '../vhost-user/backend.js';

const IORING_OP_ASYNC_CANCEL = 14;
const ECANCELED = 125;
/** Completion tags: requests are queue * 2^16 + slot; the rest sit above them. */
const REQ_LIMIT = 2 ** 26;
const KICK_BASE = 2 ** 30;
const KICK_GENS = 1024;
const CALL_BASE = 2 ** 31;
const CONTROL_TAG = 2 ** 32;
const CANCEL_TAG = 2 ** 33;
/** A stopping queue's flush of the image (a tag the fault wrapper's delay tags never reach): STOP_FLUSH_BASE + queue. */
const STOP_FLUSH_BASE = 2 ** 29;
/** A stopping queue's watch timer: STOP_WATCH_BASE + queue. */
const STOP_WATCH_BASE = 2 ** 34;
const MAX_QUEUES = 1024;
/** A stop still waiting for requests after this long names them in the log (and again each period). */
const STOP_WATCH_SECONDS = 5;
/** Views over guest memory are cut at this size: V8 caps a single ArrayBuffer view. */
const VIEW_CHUNK = 2 ** 30;
/** Scratch layout: [0] u64 one (call writes), [8] control read buffer, [64 + 8q] kick read buffers, then the stop watch timespec. */
const STOP_WATCH_TIMESPEC = 64 + MAX_QUEUES * 8;
const SCRATCH_BYTES = STOP_WATCH_TIMESPEC + 16;

/** One virtqueue being served. */
interface Runner {
  index: number;
  queue: VirtQueue;
  proc: BlkRequestProcessor;
  kickFd: number;
  callFd: number;
  kickGen: number;
  /** A READ on the kick eventfd is in the ring. */
  kickArmed: boolean;
  /** The kick eventfd failed: never re-armed. */
  kickFailed: boolean;
  iov: { addr: number; buffer: ArrayBuffer; size: number };
  /** What the queue was started with (ring addresses translated to guest physical ones). */
  params: StartQueue;
  gpas: { descAddr: number; availAddr: number; usedAddr: number };
  /** Reply id of a pending stop, or -1. */
  stopId: number;
  /** The stop's flush of the image is in the ring: the reply waits for it. */
  stopFlushing: boolean;
}

const init = workerData as WorkerInit;
const port = parentPort!;
const ring = new IoUring(512);
const scratch = allocNative(SCRATCH_BYTES);
new BigUint64Array(scratch.buffer, 0, 1)[0] = 1n;
new BigInt64Array(scratch.buffer, STOP_WATCH_TIMESPEC, 2).set([BigInt(STOP_WATCH_SECONDS), 0n]);
const inline: number[] = [];
const ctx: IoContext = { ring, completeInline: (tag, res) => { inline.push(tag, res); } };
const baseBackend: BlockBackend = init.backend.kind === 'file'
  ? new FileBackend(ctx, init.backend.fd, init.backend.sizeBytes, init.backend.readOnly)
  : new NullBackend(ctx, init.backend.sizeBytes, init.backend.readOnly);
const backend: BlockBackend = init.backend.faults?.length ? new FaultInjectingBackend(ctx, baseBackend, init.backend.faults) : baseBackend;
const settings: BlkSettings = {
  serial: init.serial, segMax: init.segMax, writeback: init.writeback, discard: false, writeZeroes: false, maxRangeSectors: MAX_RANGE_SECTORS,
  // Test-only: lets the migration tests prove that their check sees the pages a missed mark leaves stale.
  logReadData: process.env.VHOST_BLK_TEST_UNLOGGED_READS !== '1',
};
if (!settings.logReadData) log('warn', `worker ${init.index}: VHOST_BLK_TEST_UNLOGGED_READS=1: read data is NOT logged during migration (a test switch: guests migrated now get stale memory)`);
const runners: Array<Runner | undefined> = [];
let memory = GuestMemory.empty();
/** While the front-end migrates the guest: the dirty log every write into guest memory is marked in. */
let dirtyLog: DirtyLog | null = null;
/** Marks already reported as missed (outside the log), so each new batch is logged once. */
let missedReported = 0;
/** A memory table waiting for in-flight requests to drain, and the reply id for it. */
let pendingMemory: { mem: GuestMemory; id: number } | null = null;
let exitId = -1;
const name = `worker ${init.index}`;

function post(msg: FromWorker): void {
  port.postMessage(msg);
}

function log(level: 'debug' | 'info' | 'warn' | 'error', msg: string): void {
  post({ op: 'log', level, msg });
}

function armControl(): void {
  ring.prep(IORING_OP_READ, init.controlFd, scratch.addr + 8, 8, 0, 0, CONTROL_TAG);
}

function armKick(r: Runner): void {
  r.kickArmed = true;
  ring.prep(IORING_OP_READ, r.kickFd, scratch.addr + 64 + r.index * 8, 8, 0, 0, KICK_BASE + r.index + MAX_QUEUES * r.kickGen);
}

/** Cancels the kick read in flight; its completion (and any late one) is ignored by generation. */
function disarmKick(r: Runner): void {
  if (!r.kickArmed) return;
  r.kickArmed = false;
  ring.prep(IORING_OP_ASYNC_CANCEL, -1, KICK_BASE + r.index + MAX_QUEUES * r.kickGen, 0, 0, 0, CANCEL_TAG);
  r.kickGen = (r.kickGen + 1) % KICK_GENS;
}

function buildMemory(regions: WorkerRegion[]): GuestMemory {
  const mapped: MappedRegion[] = [];
  for (const r of regions) {
    for (let off = 0; off < r.size; off += VIEW_CHUNK) {
      const size = Math.min(VIEW_CHUNK, r.size - off);
      mapped.push({
        guestAddr: r.guestAddr + off, size, userAddr: r.userAddr + off, mmapOffset: r.mmapOffset + off,
        hostAddr: r.hostAddr + off, bytes: new Uint8Array(view(r.hostAddr + off, size)),
      });
    }
  }
  return new GuestMemory(mapped);
}

function translate(mem: GuestMemory, what: string, uaddr: number, len: number): number {
  const gpa = mem.userToGuest(uaddr, len);
  if (gpa < 0) throw new Error(`${what} at frontend address 0x${uaddr.toString(16)} (${len} bytes) is outside the guest memory table`);
  return gpa;
}

function startQueue(p: StartQueue): void {
  if (p.queue >= MAX_QUEUES) throw new Error(`queue ${p.queue} out of range`);
  if (runners[p.queue]) throw new Error(`queue ${p.queue} is already running`);
  // A packed ring's "avail" and "used" addresses are its 4-byte driver and device event suppression areas.
  const gpas = p.packed ? {
    descAddr: translate(memory, 'descriptor ring', p.descUserAddr, p.size * 16),
    availAddr: translate(memory, 'driver event suppression area', p.availUserAddr, 4),
    usedAddr: translate(memory, 'device event suppression area', p.usedUserAddr, 4),
  } : {
    descAddr: translate(memory, 'descriptor table', p.descUserAddr, p.size * 16),
    availAddr: translate(memory, 'available ring', p.availUserAddr, 6 + p.size * 2),
    usedAddr: translate(memory, 'used ring', p.usedUserAddr, 6 + p.size * 8),
  };
  // Features are per connection, and one connection owns the device: the last ring start says.
  settings.discard = p.discard;
  settings.writeZeroes = p.writeZeroes;
  const size = BlkRequestProcessor.iovBytes(p.size, settings.segMax);
  const iovMem = allocNative(size);
  let built;
  try {
    built = buildQueue(p, gpas, p.lastAvailIdx, iovMem);
  } catch (err) {
    munmap(iovMem.addr, size);
    throw err;
  }
  const r: Runner = {
    index: p.queue, ...built, kickFd: p.kickFd, callFd: p.callFd, kickGen: 0, kickArmed: false, kickFailed: false, iov: { ...iovMem, size },
    stopId: -1, stopFlushing: false, params: p, gpas,
  };
  runners[p.queue] = r;
  armKick(r);
  // After a restart the guest may wait on completions the previous backend published while QEMU was
  // already switching its notifiers: the interrupt got lost, and a guest with nothing else to submit
  // would wait forever. One call at start makes it look (libvhost-user does the same on reconnect).
  if (p.inflight && p.callFd >= 0) ring.prep(IORING_OP_WRITE, p.callFd, scratch.addr, 8, 0, 0, CALL_BASE + p.queue);
  log('debug', `${name}: queue ${p.queue} started: ${p.packed ? 'packed' : 'split'}, size ${p.size}, base 0x${p.lastAvailIdx.toString(16)}, event_idx ${p.eventIdx}`);
}

/** The ring (split or packed) and its request processor over the current memory table; `base` is the vring base it resumes from. */
function buildQueue(p: StartQueue, gpas: Runner['gpas'], base: number, iovMem: { addr: number; buffer: ArrayBuffer }): { queue: VirtQueue; proc: BlkRequestProcessor } {
  const opts = { eventIdx: p.eventIdx, indirect: p.indirect };
  const queue = p.packed ? new PackedQueue(memory, p.size, gpas, opts, base) : new SplitQueue(memory, p.size, gpas, opts, base);
  if (p.inflight) trackInflight(queue, p, base);
  const proc = new BlkRequestProcessor(queue, memory, backend, settings, iovMem.buffer, iovMem.addr, p.queue * 65536, log, `queue ${p.queue}`);
  applyRingLog(queue, p);
  return { queue, proc };
}

/** Ring writes are logged while a dirty log is active and the frontend set VHOST_VRING_F_LOG on the ring. */
function applyRingLog(queue: VirtQueue, p: StartQueue): void {
  queue.setRingLog(p.logUsedAddr === null ? null : dirtyLog, p.logUsedAddr ?? 0);
}

/** Switches every write into guest memory to `next` (null: logging off); the old log is not touched after this returns. */
function setDirtyLog(next: DirtyLogArea | null): void {
  reportMissedMarks();
  dirtyLog = next === null ? null : new DirtyLog(new Uint8Array(view(next.hostAddr, next.bytes)));
  missedReported = 0;
  memory.dirtyLog = dirtyLog;
  for (const r of runners) if (r) applyRingLog(r.queue, r.params);
}

/** A write the log could not cover is a page the destination may get stale: say so (once per batch). */
function reportMissedMarks(): void {
  if (dirtyLog === null || dirtyLog.missed === missedReported) return;
  log('error', `${name}: ${dirtyLog.missed - missedReported} write(s) into guest memory fell outside the dirty log ` +
    `(${dirtyLog.coveredBytes} bytes of guest memory covered): those pages may be stale after migration`);
  missedReported = dirtyLog.missed;
}

/**
 * Records the queue's requests in the frontend's inflight region, after recovering what a previous
 * backend left there. Also run when a new memory table rebuilds the queue: nothing is in flight then, and
 * requests still waiting to be resubmitted are found again in the region.
 */
function trackInflight(queue: SplitQueue | PackedQueue, p: StartQueue, base: number): void {
  const area = p.inflight!;
  const region = new Uint8Array(view(area.hostAddr, area.bytes));
  let r: InflightRecovery | PackedInflightRecovery;
  let where: string;
  if (queue instanceof SplitQueue) {
    r = queue.trackInflight(new InflightQueue(region, p.size, area.queueSize));
    where = `avail index ${r.lastAvailIdx} (vring base ${base})`;
  } else {
    r = queue.trackInflight(new PackedInflightQueue(region, p.size, area.queueSize));
    // After a crash the vring base is what QEMU last knew: only the region has the ring's position.
    where = `${packedPosition(r.state)} (vring base 0x${base.toString(16)}: ${packedPosition(decodePackedBase(base))})`;
  }
  const what = !r.recovered ? 'initialized' : `resumes at ${where}` +
    `, ${r.resubmit.length} requests left in flight to resubmit, ${r.settledCompletions} completion(s) settled`;
  log(r.resubmit.length > 0 || r.settledCompletions > 0 ? 'info' : 'debug', `${name}: queue ${p.queue}: inflight region ${what}`);
}

/** A packed ring's position for the log: slots and wrap counters. */
function packedPosition(s: PackedRingState): string {
  return `avail ${s.availIdx} wrap ${+s.availWrap}, used ${s.usedIdx} wrap ${+s.usedWrap}`;
}

/** Switches to a new memory table once nothing in flight points into the old one. */
function applyPendingMemory(): void {
  if (!pendingMemory || runners.some((r) => r && r.proc.inFlight > 0)) return;
  const { mem, id } = pendingMemory;
  pendingMemory = null;
  memory = mem;
  memory.dirtyLog = dirtyLog;
  for (const r of runners) {
    if (!r) continue;
    try {
      Object.assign(r, buildQueue(r.params, r.gpas, r.queue.vringBase, r.iov));
    } catch (err) {
      log('error', `${name}: queue ${r.index}: rings are not inside the new memory table, queue stopped: ${(err as Error).message}`);
      r.queue.broken = true;
    }
  }
  post({ op: 'reply', id });
}

/**
 * A stop waits for in-flight requests, which a stuck device can hold forever: after STOP_WATCH_SECONDS
 * the log names what it still waits for, so an operator sees which I/O hangs instead of a silent stop.
 */
function armStopWatch(r: Runner): void {
  ring.prep(IORING_OP_TIMEOUT, -1, scratch.addr + STOP_WATCH_TIMESPEC, 1, 0, 0, STOP_WATCH_BASE + r.index);
}

function onStopWatch(q: number): void {
  const r = runners[q];
  if (!r || r.stopId === -1 || r.proc.inFlight === 0) return; // stopped, or started again since
  const held = backend.describeHeld ? `; backend: ${backend.describeHeld()}` : '';
  log('warn', `${name}: queue ${q} stop still waiting for ${r.proc.inFlight} request(s): ${r.proc.describeInFlight()}${held}; ` +
    `${ring.pendingCount} SQE(s) unsubmitted`);
  armStopWatch(r);
}

/**
 * Finishes a stop once nothing is in flight: the guest has every completion (and, while migrating, every
 * one of them is in the dirty log) before we answer. A writable image is flushed first: GET_VRING_BASE
 * is where a migration's source stops, and the destination's daemon must find every acknowledged write
 * in the image, whatever the guest's cache mode.
 */
function finishStop(r: Runner): void {
  if (r.stopFlushing) return;
  flushNotifications(r, true);
  disarmKick(r);
  ring.submit();
  if (backend.readOnly) return answerStop(r);
  r.stopFlushing = true;
  backend.flush(STOP_FLUSH_BASE + r.index);
}

/** The stop's flush completed: the ring is released and the control thread gets the vring base. */
function onStopFlushed(q: number, res: number): void {
  const r = runners[q];
  if (!r || !r.stopFlushing) return;
  if (res < 0) log('error', `${name}: queue ${q}: flushing the image as the ring stops failed: errno ${-res}; acknowledged writes may not be durable`);
  answerStop(r);
}

function answerStop(r: Runner): void {
  reportMissedMarks();
  runners[r.index] = undefined;
  munmap(r.iov.addr, r.iov.size);
  post({ op: 'reply', id: r.stopId, lastAvailIdx: r.queue.vringBase });
}

/** Queues a call notification when the guest wants one; returns true if it did. */
function flushNotifications(r: Runner, force: boolean): boolean {
  if (!r.proc.hasNewUsed) return false;
  r.proc.hasNewUsed = false;
  if ((r.queue.shouldNotify() || force) && r.callFd >= 0) {
    ring.prep(IORING_OP_WRITE, r.callFd, scratch.addr, 8, 0, 0, CALL_BASE + r.index);
    return true;
  }
  return false;
}

function handleControl(msg: ToWorker): void {
  // Anything already queued for the ring goes out before a reply lets the control thread close fds.
  ring.submit();
  try {
    switch (msg.op) {
      case 'memory':
        // Running queues pause until their in-flight requests are done, then move to the new table;
        // the reply (after which the control thread may unmap the old regions) waits for that.
        pendingMemory = { mem: buildMemory(msg.regions), id: msg.id };
        applyPendingMemory();
        return;
      case 'start':
        startQueue(msg.params);
        break;
      case 'stop': {
        const r = runners[msg.queue];
        if (!r) return post({ op: 'reply', id: msg.id, error: `queue ${msg.queue} is not running` });
        r.stopId = msg.id;
        log('debug', `${name}: queue ${msg.queue} stopping with ${r.proc.inFlight} request(s) in flight, next avail ${r.queue.lastAvailIdx}, more available: ${r.queue.hasAvailable()}, ${ring.pendingCount} SQE(s) unsubmitted`);
        if (r.proc.inFlight === 0) finishStop(r);
        else armStopWatch(r);
        return; // replied by finishStop when in-flight requests are done
      }
      case 'call-fd': {
        const r = runners[msg.queue];
        if (r) {
          flushNotifications(r, false);
          ring.submit();
          r.callFd = msg.fd;
        }
        break;
      }
      case 'writeback':
        settings.writeback = msg.enabled;
        break;
      case 'dirty-log':
        setDirtyLog(msg.log);
        break;
      case 'ring-log': {
        const r = runners[msg.queue];
        if (r) {
          r.params = { ...r.params, logUsedAddr: msg.usedLogAddr };
          applyRingLog(r.queue, r.params);
        }
        break;
      }
      case 'resize':
        // Every processor reads the size from the backend per request: the next one sees it.
        backend.sizeBytes = msg.sizeBytes;
        break;
      case 'exit':
        exitId = msg.id;
        for (const r of runners) {
          if (!r || r.stopId >= 0) continue;
          r.stopId = -2;
          if (r.proc.inFlight > 0) armStopWatch(r);
        }
        return;
    }
    post({ op: 'reply', id: msg.id });
  } catch (err) {
    post({ op: 'reply', id: msg.id, error: (err as Error).message });
  }
}

function drainControl(): void {
  for (let m = receiveMessageOnPort(port as never); m; m = receiveMessageOnPort(port as never)) {
    handleControl(m.message as ToWorker);
  }
}

function onCompletion(tag: number, res: number): void {
  if (tag < KICK_BASE && backend.interceptCompletion !== undefined && backend.interceptCompletion(tag, res)) return;
  if (tag < REQ_LIMIT) {
    requestCompletions++;
    const r = runners[Math.floor(tag / 65536)];
    if (!r) return log('warn', `${name}: completion for a stopped queue (tag ${tag}) ignored`);
    try {
      r.proc.complete(tag % 65536, res);
    } catch (err) {
      stopAfterInternalError(r, err);
    }
    return;
  }
  if (tag >= KICK_BASE && tag < CALL_BASE) {
    const q = (tag - KICK_BASE) % MAX_QUEUES;
    const gen = Math.floor((tag - KICK_BASE) / MAX_QUEUES);
    const r = runners[q];
    if (!r || gen !== r.kickGen) return; // a cancelled or superseded kick read
    r.kickArmed = false;
    if (res < 0) {
      if (res !== -ECANCELED) {
        log('error', `${name}: queue ${q}: reading the kick eventfd failed: errno ${-res}; the queue is only polled from now on`);
        r.kickFailed = true;
      }
      return;
    }
    // Re-armed only before the next sleep: while awake the loop watches the rings itself.
    return;
  }
  if (tag >= CALL_BASE && tag < CONTROL_TAG) {
    if (res < 0) log('warn', `${name}: queue ${tag - CALL_BASE}: signalling the call eventfd failed: errno ${-res}`);
    return;
  }
  if (tag >= STOP_FLUSH_BASE && tag < STOP_FLUSH_BASE + MAX_QUEUES) {
    onStopFlushed(tag - STOP_FLUSH_BASE, res);
    return;
  }
  if (tag >= STOP_WATCH_BASE && tag < STOP_WATCH_BASE + MAX_QUEUES) {
    onStopWatch(tag - STOP_WATCH_BASE);
    return;
  }
  if (tag === CONTROL_TAG) {
    if (res < 0) throw new Error(`control eventfd read failed: errno ${-res}`);
    drainControl();
    if (exitId < 0) armControl();
  }
}

/** Busy loop passes between two non-blocking io_uring_enter calls. */
const BUSY_PASSES_PER_ENTER = 64;

/** Request completions reaped so far: a wakeup that brought none (a stray kick) did no work. */
let requestCompletions = 0;

/** An exception in a queue's processing stops that queue only, never the worker. */
function stopAfterInternalError(r: Runner, err: unknown): void {
  log('error', `${name}: queue ${r.index} stopped after an internal error: ${(err as Error).stack ?? err}`);
  r.queue.broken = true;
}

function drainInline(): boolean {
  if (inline.length === 0) return false;
  while (inline.length > 0) {
    const batch = inline.splice(0);
    for (let i = 0; i < batch.length; i += 2) onCompletion(batch[i], batch[i + 1]);
  }
  return true;
}

/** The longest poll (ns); the current window adapts below it, as QEMU's IOThread polling does. */
const pollMaxNs = init.pollUs * 1000;
let pollWindowNs = pollMaxNs;
/** Windows below this are not worth polling: the clock reads alone would eat them. */
const POLL_MIN_NS = 1000;

/**
 * Spins up to the current window for a new request on any serving queue; true if one came. A poll that
 * finds nothing halves the window (polling then stops wasting a core another thread could use); one that
 * pays off doubles it, up to --poll-us.
 */
function pollForRequests(): boolean {
  if (pollWindowNs < POLL_MIN_NS) return false;
  const start = process.hrtime.bigint();
  const deadline = start + BigInt(pollWindowNs);
  do {
    for (const r of runners) {
      if (r && r.stopId === -1 && !r.queue.broken && !pendingMemory && r.queue.hasAvailable()) {
        pollWindowNs = Math.min(pollMaxNs, Math.max(POLL_MIN_NS, pollWindowNs * 2));
        return true;
      }
    }
  } while (process.hrtime.bigint() < deadline);
  pollWindowNs = Math.floor(pollWindowNs / 2);
  return false;
}

/** After a sleep: if an event came within the longest poll, polling would have caught it: grow. */
function adaptAfterSleep(sleptNs: number, woke: boolean): void {
  if (pollMaxNs > 0 && woke && sleptNs < pollMaxNs) pollWindowNs = Math.min(pollMaxNs, Math.max(POLL_MIN_NS, pollWindowNs * 2));
}

/** Pops and starts a queue's available requests; an exception stops that queue only, never the worker. */
function pump(r: Runner): boolean {
  try {
    return r.proc.pump() > 0;
  } catch (err) {
    stopAfterInternalError(r, err);
    return false;
  }
}

/**
 * The worker loop. It keeps going without a system call while there is work the kernel is not needed
 * for; it enters the kernel at once only to deliver a guest notification; otherwise one
 * io_uring_enter both submits the batch and sleeps until a completion, kick or control message.
 */
function loop(): void {
  armControl();
  let didWork = false;
  /** Loop passes in a row that found work: a guest can keep that going forever (see pump()). */
  let busyPasses = 0;
  for (;;) {
    let progress = drainInline();
    let notified = false;
    for (const r of runners) {
      if (!r) continue;
      if (r.stopId === -1 && !r.queue.broken && !pendingMemory && pump(r)) progress = true;
      progress = drainInline() || progress;
      notified = flushNotifications(r, false) || notified;
      if (r.stopId !== -1 && r.proc.inFlight === 0) {
        if (r.stopId === -2) { disarmKick(r); runners[r.index] = undefined; } else finishStop(r);
      }
    }
    applyPendingMemory();
    if (exitId >= 0 && runners.every((r) => !r)) break;
    if (notified) {
      // The guest waits for this interrupt: hand it to the kernel now, and pick up what completed.
      ring.enter(0);
      // Requests this reap completes are in the used ring but their guest is not told yet: go round
      // once more to notify it. Falling through to sleep here lost that interrupt for good (a guest
      // with nothing else in flight waited forever on requests already completed).
      if (ring.reap(onCompletion) > 0) progress = true;
    }
    if (progress) {
      didWork = true;
      // Never starve the kernel: control messages (stop the ring) and submitted I/O must get through.
      if (++busyPasses % BUSY_PASSES_PER_ENTER === 0) {
        ring.enter(0, true);
        ring.reap(onCompletion);
      }
      continue;
    }
    busyPasses = 0;
    // Right after work, the guest often sends the next request within microseconds: polling for it
    // spares the guest a kick and us a wakeup. Only with nothing left to submit, so no I/O waits on it.
    if (pollMaxNs > 0 && didWork && ring.pendingCount === 0 && pollForRequests()) continue;
    // About to sleep: let the guest kick us again, unless work slipped in meanwhile.
    for (const r of runners) {
      if (r && r.stopId === -1 && !r.queue.broken && !pendingMemory && r.queue.enableNotifications()) progress = true;
    }
    if (progress) continue;
    for (const r of runners) if (r && !r.kickArmed && !r.kickFailed && r.stopId === -1) armKick(r);
    const sleepStart = pollMaxNs > 0 ? process.hrtime.bigint() : 0n;
    ring.enter(1);
    for (const r of runners) if (r && !r.queue.broken) r.queue.disableNotifications();
    const before = requestCompletions;
    const events = ring.reap(onCompletion);
    didWork = requestCompletions > before;
    // A kick or a completion this soon means polling would have caught it (null backends complete
    // inline, so a kick is their only event).
    if (pollMaxNs > 0) adaptAfterSleep(Number(process.hrtime.bigint() - sleepStart), events > 0);
  }
  ring.submit();
  ring.close();
  post({ op: 'reply', id: exitId });
}

try {
  loop();
} catch (err) {
  log('error', `${name}: fatal: ${(err as Error).stack ?? err}`);
  process.exit(1);
}
