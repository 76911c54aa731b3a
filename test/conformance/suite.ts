// The vhost-user-blk conformance suite: protocol-level tests run through the TypeScript front-end against
// any back-end given by its socket. CI runs it against our daemon and against qemu-storage-daemon on the
// same kind of image; a test that passes on qemu-storage-daemon and fails on ours is our bug.
//
// Each backend gets a fresh sparse image in a temp dir, is started once (2 queues) for the whole suite,
// and is stopped by the last test, which checks it exits 0. Tests run in order on that backend; each one
// opens its own front-end connection(s) and closes them, and works on its own region of the disk. Tests
// that a backend may not survive run on a second instance of their own (withOwnBackend); a backend can
// declare those as known failures (reported as TODO). Features a backend does not offer are t.skip()ped.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, rmSync, statSync, truncateSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pattern, readImage } from '../image-data.js';
import {
  VhostUserBlkClient, VhostUserConnection, DRIVER_PROTOCOL_FEATURES, STATUS_NOT_WRITTEN, WRITE_ZEROES_FLAG_UNMAP,
  encodeBlkRanges, statusName, type BlkCompletion, type BlkRequest, type ClientOptions, type DmaBuffer, type GuestRegion,
} from '../../src/frontend/index.js';
import { Feature, RequestType, Status } from '../../src/blk/constants.js';
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../../src/virtqueue/split.js';
import { pageCacheState } from '../page-cache.js';
import {
  FrontendRequest as R, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_F_LOG_ALL, CONFIG_HEADER_SIZE, encodeConfig, encodeLog, encodeU64,
} from '../../src/vhost-user/messages.js';
import { DirtyLogArea, changedPages, dirtyLogBytes, logBaseReplyAccepted, logPage, type GuestRange } from '../../src/frontend/index.js';
import { GuestPlacer, PageLabels, planRequest, type PlannedRequest } from './dirty-log-plan.js';

/** A running back-end as the suite sees it. */
export interface ConformanceBackend {
  /** Unix socket the back-end listens on. */
  socket: string;
  /** Stops the back-end (SIGTERM) and resolves with its exit code (null: killed by a signal). */
  stop(): Promise<number | null>;
  /** The back-end's recent output, for failure messages. */
  output?(): string;
  /** False once the back-end process has exited (connects then fail at once instead of retrying). */
  running?(): boolean;
}

/** Starts a back-end serving `imagePath` with `numQueues` request queues (read-only: offering VIRTIO_BLK_F_RO). */
export type StartBackend = (imagePath: string, opts: { numQueues: number; readOnly?: boolean }) => Promise<ConformanceBackend>;

/** Known-failure key: abrupt disconnects with requests in flight. */
export const ABRUPT_INFLIGHT = 'abrupt-disconnect-inflight';
/** Known-failure key: GET_VRING_BASE with requests in flight (drain, then restart). */
export const INFLIGHT_STOP = 'get-vring-base-inflight';
/** Known-failure key: SET_LOG_BASE with a log smaller than guest memory needs is accepted. */
export const LOG_BASE_TOO_SMALL = 'dirty-log-base-too-small';
/** Known-failure key: SET_LOG_BASE without an fd is not refused with a reply (the connection must go on). */
export const LOG_BASE_NO_FD = 'dirty-log-base-no-fd';
/** Tests a backend can declare as known failures. */
export type KnownFailure = typeof ABRUPT_INFLIGHT | typeof INFLIGHT_STOP | typeof LOG_BASE_TOO_SMALL | typeof LOG_BASE_NO_FD;

/** Options of defineConformanceSuite. */
export interface SuiteOptions {
  /**
   * Tests known to fail on this backend, with the reason: they still run, on a backend instance of their
   * own, and are reported as TODO instead of failing the run. Meant for the reference backend only.
   */
  knownFailures?: Partial<Record<KnownFailure, string>>;
  /**
   * Run every test on packed virtqueues (VIRTIO_F_RING_PACKED). The tests that look into split-ring
   * indices are skipped; test/unit/packed-frontend.test.ts covers the packed ring state instead.
   */
  packed?: boolean;
}

/** Options of spawnBackend. */
export interface SpawnOptions {
  /** Name for messages. */
  name: string;
  /** Executable. */
  command: string;
  /** Arguments. */
  args: string[];
  /** Socket the process creates once it listens. */
  socket: string;
  /** How long to wait for the socket; default 15 s. */
  startTimeoutMs?: number;
  /** How long to wait for the exit after SIGTERM before SIGKILL; default 10 s. */
  stopTimeoutMs?: number;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** PIDs of back-ends still running: killed (by PID) if this process exits or is interrupted first. */
const live = new Set<number>();
/** Temp dirs still in use: removed then too. */
const tempDirs = new Set<string>();
let hooked = false;

function killLive(): void {
  for (const pid of live) {
    try { process.kill(pid, 'SIGKILL'); } catch { /* already gone */ }
  }
  live.clear();
  for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
  tempDirs.clear();
}

function hookExit(): void {
  if (hooked) return;
  hooked = true;
  process.once('exit', killLive);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.once(sig, () => {
      killLive();
      process.kill(process.pid, sig); // the handler is gone: the default action ends the process
    });
  }
}

function track(pid: number): void {
  live.add(pid);
  hookExit();
}

/**
 * Spawns a back-end process and waits for its socket. The process is killed (by its PID) if this process
 * exits while it still runs; stop() sends SIGTERM, then SIGKILL after stopTimeoutMs (and resolves null).
 */
export async function spawnBackend(o: SpawnOptions): Promise<ConformanceBackend> {
  const proc = spawn(o.command, o.args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const lines: string[] = [];
  const keep = (d: string) => {
    lines.push(d);
    if (lines.length > 400) lines.splice(0, lines.length - 400);
  };
  proc.stdout!.setEncoding('utf8').on('data', keep);
  proc.stderr!.setEncoding('utf8').on('data', keep);
  let status: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  let spawnError: Error | undefined;
  proc.on('error', (e) => { spawnError = e; });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    proc.once('exit', (code, signal) => { status = { code, signal }; resolve(status); });
  });
  const pid = proc.pid;
  if (pid !== undefined) {
    track(pid);
    void exited.then(() => live.delete(pid));
  }
  const output = () => lines.join('');

  const stop = async (): Promise<number | null> => {
    if (pid === undefined) return null; // never started (spawn error)
    if (!status) {
      proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), o.stopTimeoutMs ?? 10_000);
      await exited;
      clearTimeout(timer);
    }
    return status!.signal !== null ? null : status!.code;
  };

  const deadline = Date.now() + (o.startTimeoutMs ?? 15_000);
  for (;;) {
    if (spawnError) throw new Error(`cannot start ${o.name} (${o.command}): ${spawnError.message}`);
    if (status) throw new Error(`${o.name} exited (code ${status.code}, signal ${status.signal}) before listening:\n${output()}`);
    try {
      if (existsSync(o.socket) && statSync(o.socket).isSocket()) break;
    } catch { /* raced with creation */ }
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`${o.name} did not create ${o.socket} within ${o.startTimeoutMs ?? 15_000} ms:\n${output()}`);
    }
    await sleep(20);
  }
  return { socket: o.socket, stop, output, running: () => status === undefined };
}

// ---------------------------------------------------------------------------------------------------------
// Helpers

const MiB = 1024 * 1024;
const SECTOR = 512;
/** Size of the test image: a fresh sparse file per backend. */
const IMAGE_BYTES = 64 * MiB;
/** Queues the backend is started with. */
const NUM_QUEUES = 2;
/** Data the host writes into the image before the backend starts, at HOST_SECTOR. */
const HOST_SECTOR = 20 * 2048 + 24; // REGION.host + 24
const HOST_BYTES = 12 * 1024;
const TEST_TIMEOUT = 20_000;
/** Offset of the writeback field in struct virtio_blk_config. */
const WCE_OFFSET = 32;

/** Per-test disk regions (in sectors; 2048 sectors = 1 MiB), so that no test depends on another's data. */
const REGION = {
  sizes: 1 * 2048, // up to ~2 MiB
  sg: 4 * 2048,
  indirect: 6 * 2048, // ~1.7 MiB
  discard: 8 * 2048,
  writeZeroes: 9 * 2048,
  mq: 10 * 2048, // ~2.5 MiB
  stop: 16 * 2048,
  reconnect: 18 * 2048,
  host: 20 * 2048, // written by the host before the backend starts
  file: 22 * 2048,
  plain: 24 * 2048,
  invalid: 26 * 2048,
  memory: 32 * 2048, // to ~47 MiB
  dirtyLog: 48 * 2048,
  dirtyToggle: 50 * 2048,
  dirtyRefusals: 54 * 2048,
} as const;
const GiB = 1024 * MiB;

const DEVICE_FEATURE_NAMES: Record<number, string> = {
  1: 'SIZE_MAX', 2: 'SEG_MAX', 4: 'GEOMETRY', 5: 'RO', 6: 'BLK_SIZE', 9: 'FLUSH', 10: 'TOPOLOGY', 11: 'CONFIG_WCE',
  12: 'MQ', 13: 'DISCARD', 14: 'WRITE_ZEROES', 15: 'LIFETIME', 16: 'SECURE_ERASE', 17: 'ZONED', 24: 'NOTIFY_ON_EMPTY',
  26: 'LOG_ALL', 27: 'ANY_LAYOUT', 28: 'INDIRECT_DESC', 29: 'EVENT_IDX', 30: 'PROTOCOL_FEATURES', 32: 'VERSION_1',
  33: 'ACCESS_PLATFORM', 34: 'RING_PACKED', 35: 'IN_ORDER', 36: 'ORDER_PLATFORM', 37: 'SR_IOV', 38: 'NOTIFICATION_DATA',
  39: 'NOTIF_CONFIG_DATA', 40: 'RING_RESET',
};
const PROTOCOL_FEATURE_NAMES = new Map<number, string>(Object.entries(ProtocolFeature).map(([k, v]) => [v, k]));

function bitNames(bits: bigint, names: (n: number) => string): string {
  const out: string[] = [];
  for (let i = 0; i < 64; i++) if ((bits >> BigInt(i)) & 1n) out.push(names(i));
  return `0x${bits.toString(16)} [${out.join(' ')}]`;
}
const deviceFeatures = (bits: bigint) => bitNames(bits, (i) => DEVICE_FEATURE_NAMES[i] ?? `bit${i}`);
const protocolFeatures = (bits: bigint) => bitNames(bits, (i) => PROTOCOL_FEATURE_NAMES.get(i) ?? `bit${i}`);
const has = (bits: bigint, bit: number) => ((bits >> BigInt(bit)) & 1n) === 1n;



/** First index where `a` and `b` differ, for failure messages. */
function firstDiff(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

function assertBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  const d = firstDiff(actual, expected);
  assert.ok(d < 0, `${what}: ${actual.length} bytes, expected ${expected.length}; first difference at byte ${d}`);
}

/** Splits `total` bytes into segments of at most `unit` bytes. */
function split(total: number, unit: number): number[] {
  const segs: number[] = [];
  for (let done = 0; done < total; done += unit) segs.push(Math.min(unit, total - done));
  return segs;
}

/** Cuts `data` into pieces of the given lengths. */
function cut(data: Buffer, lens: readonly number[]): Buffer[] {
  let off = 0;
  return lens.map((l) => { const s = data.subarray(off, off + l); off += l; return s; });
}

function describeCompletion(r: BlkCompletion): string {
  return `${statusName(r.status)}, used len ${r.usedLen}`;
}

/** Asserts a request completed with `status` (and, for OK, the exact used length `okUsedLen` when given). */
function expectStatus(r: BlkCompletion, status: number, what: string, okUsedLen?: number): void {
  assert.notEqual(r.status, STATUS_NOT_WRITTEN, `${what}: the device returned the chain without writing the status byte (used len ${r.usedLen})`);
  assert.equal(r.status, status, `${what}: expected ${statusName(status)}, got ${describeCompletion(r)}`);
  if (status === Status.OK && okUsedLen !== undefined) {
    assert.equal(r.usedLen, okUsedLen, `${what}: used len (bytes the device wrote: data + status byte)`);
  }
}

/** Rejects after `ms` with a message naming `what` (so nothing in the suite can hang). */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`${what}: no completion within ${ms} ms`)), ms); })]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * One virtio-blk request as a raw chain: the header and the status byte in `hdr` (at 0 and 512), `data` as
 * the only data descriptor (device-writable for IN). Resolves with the status byte and the used len.
 */
async function rawBlkRequest(
  c: VhostUserBlkClient, hdr: DmaBuffer, data: { gpa: number; length: number }, type: number, sector: number,
): Promise<{ status: number; usedLen: number }> {
  const dv = new DataView(hdr.bytes.buffer, hdr.bytes.byteOffset, 16);
  dv.setUint32(0, type, true);
  dv.setUint32(4, 0, true);
  dv.setBigUint64(8, BigInt(sector), true);
  hdr.bytes[512] = STATUS_NOT_WRITTEN;
  const r = await within(c.submitRawChain(0, [
    { addr: hdr.gpa, len: 16, flags: VIRTQ_DESC_F_NEXT },
    { addr: data.gpa, len: data.length, flags: (type === RequestType.IN ? VIRTQ_DESC_F_WRITE : 0) | VIRTQ_DESC_F_NEXT },
    { addr: hdr.gpa + 512, len: 1, flags: VIRTQ_DESC_F_WRITE },
  ]), 5000, `${type === RequestType.IN ? 'read' : 'write'} of ${data.length} bytes at guest address 0x${data.gpa.toString(16)}`);
  return { status: hdr.bytes[512], usedLen: r.usedLen };
}

// ---------------------------------------------------------------------------------------------------------
// The suite

/** Registers the conformance tests (one describe named `name`) for the backend `startBackend` launches. */
export function defineConformanceSuite(name: string, startBackend: StartBackend, opts: SuiteOptions = {}): void {
  const knownFailures = opts.knownFailures ?? {};
  const packed = opts.packed ?? false;
  /** `skip` of the tests that read split-ring indices (avail/used idx) directly. */
  const splitOnly = packed ? 'reads split-ring indices (packed-frontend.test.ts covers the packed ring state)' : false;
  describe(`vhost-user-blk conformance: ${name}`, { timeout: 120_000 }, () => {
    let dir = '';
    let image = '';
    let backend: ConformanceBackend | undefined;
    let stopped = false;
    const open = new Set<VhostUserBlkClient>();

    const logTail = () => (backend?.output ? `\n--- ${name} output ---\n${backend.output().slice(-4000)}` : '');

    /** Connects a client, retrying while the backend still tears down the previous connection. */
    async function connect(opts: ClientOptions = {}, target: ConformanceBackend = backend!): Promise<VhostUserBlkClient> {
      const deadline = Date.now() + 10_000;
      for (;;) {
        if (target.running && !target.running()) throw new Error(`${name} is not running${target.output ? `\n${target.output().slice(-4000)}` : ''}`);
        try {
          const c = await VhostUserBlkClient.connect(target.socket, { requestTimeoutMs: 10_000, replyTimeoutMs: 5000, packed, ...opts });
          open.add(c);
          return c;
        } catch (err) {
          const msg = (err as Error).message;
          if (Date.now() > deadline || !/closed the connection|ECONNRESET|EPIPE|ECONNREFUSED|EAGAIN/.test(msg)) {
            throw new Error(`connecting to ${name}: ${msg}${logTail()}`);
          }
          await sleep(25);
        }
      }
    }

    async function disconnect(c: VhostUserBlkClient, graceful = true): Promise<void> {
      open.delete(c);
      await c.close({ graceful });
    }

    /** Runs `fn` with a fresh client; checks the rings saw no anomalies; always closes the client. */
    async function withClient<T>(opts: ClientOptions, fn: (c: VhostUserBlkClient) => Promise<T>, target?: ConformanceBackend): Promise<T> {
      const c = await connect(opts, target);
      try {
        const r = await fn(c);
        assert.deepEqual(c.anomalies, [], 'ring anomalies seen by the driver');
        return r;
      } finally {
        await disconnect(c);
      }
    }

    /**
     * Runs `fn` against a second backend instance on an image of its own (for tests a backend is known to
     * crash or drop the connection on, or that need it read-only), then stops it and checks it exits 0.
     */
    async function withOwnBackend(label: string, fn: (target: ConformanceBackend, image: string) => Promise<void>, readOnly = false): Promise<void> {
      const sub = join(dir, label);
      mkdirSync(sub);
      const image2 = join(sub, 'disk.raw');
      closeSync(openSync(image2, 'w'));
      truncateSync(image2, IMAGE_BYTES);
      const b2 = await startBackend(image2, { numQueues: NUM_QUEUES, readOnly });
      let done = false;
      try {
        await fn(b2, image2);
        done = true;
        assert.equal(await b2.stop(), 0, `exit code of the ${label} backend${b2.output ? `\n${b2.output().slice(-4000)}` : ''}`);
      } finally {
        if (!done) await b2.stop().catch(() => undefined);
      }
    }

    /** submit() with a deadline. */
    function submit(c: VhostUserBlkClient, q: number, req: BlkRequest, what = 'request'): Promise<BlkCompletion> {
      return within(c.submit(q, req), 10_000, what);
    }

    /** Largest data segment this device allows the suite to use: size_max if announced, at most 4 KiB. */
    function segmentUnit(c: VhostUserBlkClient): number {
      const sizeMax = c.hasFeature(Feature.BLK_SIZE_MAX) ? c.config.sizeMax : 0;
      return sizeMax > 0 ? Math.min(sizeMax, 4096) : 4096;
    }

    /** Size of queue `q`'s ring, split or packed. */
    function ringSize(c: VhostUserBlkClient, q: number): number {
      return packed ? c.packedRing(q).size : c.ring(q).size;
    }

    /** seg_max as announced (1 when SEG_MAX is not offered: a driver may then use only what it knows works). */
    function segMax(c: VhostUserBlkClient): number {
      return c.hasFeature(Feature.BLK_SEG_MAX) && c.config.segMax > 0 ? c.config.segMax : 1;
    }

    before(async () => {
      dir = mkdtempSync(join(tmpdir(), 'vblk-conformance-'));
      tempDirs.add(dir);
      hookExit();
      image = join(dir, 'disk.raw');
      closeSync(openSync(image, 'w'));
      truncateSync(image, IMAGE_BYTES);
      const fd = openSync(image, 'r+');
      try {
        writeSync(fd, pattern(HOST_BYTES, 777), 0, HOST_BYTES, HOST_SECTOR * SECTOR);
      } finally {
        closeSync(fd);
      }
      backend = await startBackend(image, { numQueues: NUM_QUEUES });
    });

    after(async () => {
      for (const c of open) await c.close({ graceful: false }).catch(() => undefined);
      open.clear();
      if (backend && !stopped) await backend.stop().catch(() => undefined);
      if (dir) {
        rmSync(dir, { recursive: true, force: true });
        tempDirs.delete(dir);
      }
    });

    test('handshake: VERSION_1 and PROTOCOL_FEATURES offered, protocol feature CONFIG, GET_QUEUE_NUM >= queues started with', { timeout: TEST_TIMEOUT }, async (t) => {
      // Raw messages, retried while the backend still serves a previous connection.
      const deadline = Date.now() + 10_000;
      let conn: VhostUserConnection;
      let offered: bigint;
      for (;;) {
        conn = VhostUserConnection.connect(backend!.socket);
        try {
          const f = await conn.request(R.GET_FEATURES, undefined, { expectReply: true, timeoutMs: 3000 });
          assert.equal(f.length, 8, 'GET_FEATURES reply is a u64');
          offered = f.readBigUInt64LE(0);
          break;
        } catch (err) {
          conn.close();
          if (Date.now() > deadline) throw err;
          await sleep(25);
        }
      }
      try {
        t.diagnostic(`device features offered: ${deviceFeatures(offered)}`);
        assert.ok(has(offered, Feature.VERSION_1), 'VIRTIO_F_VERSION_1 offered');
        assert.ok(has(offered, VHOST_USER_F_PROTOCOL_FEATURES), 'VHOST_USER_F_PROTOCOL_FEATURES offered');
        const pf = await conn.request(R.GET_PROTOCOL_FEATURES, undefined, { expectReply: true, timeoutMs: 3000 });
        assert.equal(pf.length, 8, 'GET_PROTOCOL_FEATURES reply is a u64');
        const offeredProtocol = pf.readBigUInt64LE(0);
        t.diagnostic(`protocol features offered: ${protocolFeatures(offeredProtocol)}`);
        assert.ok(has(offeredProtocol, ProtocolFeature.CONFIG), 'VHOST_USER_PROTOCOL_F_CONFIG offered');
        assert.ok(has(offeredProtocol, ProtocolFeature.MQ), `VHOST_USER_PROTOCOL_F_MQ offered (the backend was started with ${NUM_QUEUES} queues)`);
        const protocol = offeredProtocol & DRIVER_PROTOCOL_FEATURES;
        await conn.request(R.SET_PROTOCOL_FEATURES, encodeU64(protocol), { timeoutMs: 3000 });
        const ack = { needReply: has(protocol, ProtocolFeature.REPLY_ACK), timeoutMs: 3000 };
        await conn.request(R.SET_OWNER, undefined, ack);
        const qn = await conn.request(R.GET_QUEUE_NUM, undefined, { expectReply: true, timeoutMs: 3000 });
        assert.equal(qn.length, 8, 'GET_QUEUE_NUM reply is a u64');
        const queues = qn.readBigUInt64LE(0);
        t.diagnostic(`GET_QUEUE_NUM: ${queues}`);
        assert.ok(queues >= BigInt(NUM_QUEUES), `GET_QUEUE_NUM ${queues} >= ${NUM_QUEUES}`);
        const cfg = await conn.request(R.GET_CONFIG, encodeConfig(0, 60, 0), { expectReply: true, timeoutMs: 3000 });
        assert.equal(cfg.length, CONFIG_HEADER_SIZE + 60, 'GET_CONFIG answers with the 12-byte header and the 60 bytes asked for');
        assert.equal(cfg.readUInt32LE(0), 0, 'GET_CONFIG reply: offset echoed');
        assert.equal(cfg.readUInt32LE(4), 60, 'GET_CONFIG reply: size echoed');
      } finally {
        conn.close();
      }
    });

    test('config space: capacity = image size / 512, blk_size, seg_max > 0, num_queues', { timeout: TEST_TIMEOUT }, async (t) => {
      await withClient({ numQueues: NUM_QUEUES }, async (c) => {
        const cfg = c.config;
        const { raw: _raw, ...fields } = cfg;
        t.diagnostic(`config: ${JSON.stringify(fields)}`);
        t.diagnostic(`negotiated: ${deviceFeatures(c.features)}; protocol ${protocolFeatures(c.protocolFeatures)}`);
        assert.equal(cfg.capacitySectors, IMAGE_BYTES / SECTOR, 'capacity in 512-byte sectors');
        assert.ok(c.maxQueues >= NUM_QUEUES, `GET_QUEUE_NUM ${c.maxQueues} >= ${NUM_QUEUES}`);
        if (c.hasFeature(Feature.BLK_BLK_SIZE)) {
          assert.ok(cfg.blkSize >= SECTOR && (cfg.blkSize & (cfg.blkSize - 1)) === 0, `blk_size ${cfg.blkSize} is a power of two >= 512`);
          assert.equal(IMAGE_BYTES % cfg.blkSize, 0, `capacity is a whole number of ${cfg.blkSize}-byte blocks`);
        } else {
          t.diagnostic('VIRTIO_BLK_F_BLK_SIZE not offered: blk_size not checked');
        }
        assert.ok(c.hasFeature(Feature.BLK_SEG_MAX), 'VIRTIO_BLK_F_SEG_MAX offered');
        assert.ok(cfg.segMax > 0, `seg_max ${cfg.segMax} > 0`);
        assert.ok(c.hasFeature(Feature.BLK_MQ), `VIRTIO_BLK_F_MQ offered (started with ${NUM_QUEUES} queues)`);
        assert.equal(cfg.numQueues, NUM_QUEUES, 'num_queues');
        if (c.hasFeature(Feature.BLK_SIZE_MAX) && cfg.sizeMax === 0) t.diagnostic('VIRTIO_BLK_F_SIZE_MAX offered with size_max = 0 (no limit stated): the suite uses 4 KiB segments');
        if (c.hasFeature(Feature.BLK_DISCARD)) {
          assert.ok(cfg.maxDiscardSectors > 0, `max_discard_sectors ${cfg.maxDiscardSectors} > 0`);
          assert.ok(cfg.maxDiscardSeg > 0, `max_discard_seg ${cfg.maxDiscardSeg} > 0`);
        }
        if (c.hasFeature(Feature.BLK_WRITE_ZEROES)) {
          assert.ok(cfg.maxWriteZeroesSectors > 0, `max_write_zeroes_sectors ${cfg.maxWriteZeroesSectors} > 0`);
          assert.ok(cfg.maxWriteZeroesSeg > 0, `max_write_zeroes_seg ${cfg.maxWriteZeroesSeg} > 0`);
        }
        // The config space reads the same a second time.
        const again = await c.connection.request(R.GET_CONFIG, encodeConfig(0, 60, 0), { expectReply: true, timeoutMs: 3000 });
        assertBytes(again.subarray(CONFIG_HEADER_SIZE), cfg.raw, 'second GET_CONFIG');
      });
    });

    test('reads and writes at the first and the last sector, on every queue', { timeout: TEST_TIMEOUT }, async () => {
      await withClient({ numQueues: NUM_QUEUES }, async (c) => {
        const cap = c.config.capacitySectors;
        for (let q = 0; q < NUM_QUEUES; q++) {
          const first = pattern(SECTOR, 10 + q);
          const last = pattern(SECTOR, 20 + q);
          expectStatus(await submit(c, q, { type: RequestType.OUT, sector: 0, out: [first] }), Status.OK, `write of sector 0 on queue ${q}`, 1);
          expectStatus(await submit(c, q, { type: RequestType.OUT, sector: cap - 1, out: [last] }), Status.OK, `write of the last sector on queue ${q}`, 1);
          const r0 = await submit(c, q, { type: RequestType.IN, sector: 0, inLengths: [SECTOR] });
          expectStatus(r0, Status.OK, `read of sector 0 on queue ${q}`, SECTOR + 1);
          assertBytes(r0.data[0], first, `sector 0 read back on queue ${q}`);
          const rl = await submit(c, q, { type: RequestType.IN, sector: cap - 1, inLengths: [SECTOR] });
          expectStatus(rl, Status.OK, `read of the last sector on queue ${q}`, SECTOR + 1);
          assertBytes(rl.data[0], last, `last sector read back on queue ${q}`);
          assertBytes(readImage(image, 0, SECTOR), first, 'image file at offset 0');
          assertBytes(readImage(image, (cap - 1) * SECTOR, SECTOR), last, 'image file at the last sector');
        }
        // The last 8 sectors in one request.
        const tail = pattern(4096, 30);
        await within(c.write(cap - 8, tail), 10_000, 'write of the last 4 KiB');
        assertBytes(await within(c.read(cap - 8, 4096), 10_000, 'read of the last 4 KiB'), tail, 'last 4 KiB');
        assert.equal(statSync(image).size, IMAGE_BYTES, 'the image file did not change size');
      });
    });

    test('past the end: reads and writes at and straddling the end, and at huge sectors, fail with IOERR and change nothing', { timeout: TEST_TIMEOUT }, async (t) => {
      await withClient({}, async (c) => {
        const cap = c.config.capacitySectors;
        const tail = pattern(2 * SECTOR, 40);
        await within(c.write(cap - 2, tail), 10_000, 'write of the last two sectors');
        const cases: Array<[string, BlkRequest]> = [
          ['read of 1 sector at the capacity', { type: RequestType.IN, sector: cap, inLengths: [SECTOR] }],
          ['read of 2 sectors straddling the end', { type: RequestType.IN, sector: cap - 1, inLengths: [2 * SECTOR] }],
          ['read of 16 sectors straddling the end, 2 segments', { type: RequestType.IN, sector: cap - 8, inLengths: [4096, 4096] }],
          ['read of 1 sector far past the end', { type: RequestType.IN, sector: cap + 1000, inLengths: [SECTOR] }],
          ['read at sector 2^63', { type: RequestType.IN, sector: 2n ** 63n, inLengths: [SECTOR] }],
          ['read at sector 2^64-1 (sector + length wraps around)', { type: RequestType.IN, sector: 2n ** 64n - 1n, inLengths: [2 * SECTOR] }],
          ['write of 1 sector at the capacity', { type: RequestType.OUT, sector: cap, out: [pattern(SECTOR, 41)] }],
          ['write of 2 sectors straddling the end', { type: RequestType.OUT, sector: cap - 1, out: [pattern(2 * SECTOR, 42)] }],
          ['write of 16 sectors straddling the end, 2 segments', { type: RequestType.OUT, sector: cap - 8, out: [pattern(4096, 43), pattern(4096, 44)] }],
          ['write at sector 2^64-1 (sector + length wraps around)', { type: RequestType.OUT, sector: 2n ** 64n - 1n, out: [pattern(2 * SECTOR, 45)] }],
        ];
        const usedLens: string[] = [];
        for (const [what, req] of cases) {
          const r = await submit(c, 0, req, what);
          expectStatus(r, Status.IOERR, what);
          usedLens.push(`${what}: ${r.usedLen}`);
        }
        t.diagnostic(`used len of the failed requests: ${usedLens.join('; ')}`);
        assertBytes(await within(c.read(cap - 2, 2 * SECTOR), 10_000, 'read of the last two sectors'), tail, 'the last sectors after the failed writes');
        assertBytes(readImage(image, (cap - 2) * SECTOR, 2 * SECTOR), tail, 'image file: the last sectors after the failed writes');
        assert.equal(statSync(image).size, IMAGE_BYTES, 'failed writes did not grow the image file');
      });
    });

    test('request sizes from 512 B up to seg_max x min(size_max, 4 KiB)', { timeout: TEST_TIMEOUT }, async (t) => {
      await withClient({}, async (c) => {
        const unit = segmentUnit(c);
        const maxBytes = Math.floor((segMax(c) * unit) / SECTOR) * SECTOR;
        t.diagnostic(`segment unit ${unit} B, seg_max ${segMax(c)}: largest request ${maxBytes} B`);
        const sizes = [...new Set([512, 1024, 1536, 2048, 3584, 4096, 8192, 16384, 65536, 131072, 262144, maxBytes - SECTOR, maxBytes])]
          .filter((s) => s >= SECTOR && s <= maxBytes)
          .sort((a, b) => a - b);
        let sector: number = REGION.sizes;
        const placed: Array<{ sector: number; data: Buffer; segs: number[] }> = [];
        for (const [i, size] of sizes.entries()) {
          const data = pattern(size, 100 + i);
          const segs = split(size, unit);
          const w = await submit(c, 0, { type: RequestType.OUT, sector, out: cut(data, segs) }, `write of ${size} B`);
          expectStatus(w, Status.OK, `write of ${size} B in ${segs.length} segments`, 1);
          const r = await submit(c, 0, { type: RequestType.IN, sector, inLengths: segs }, `read of ${size} B`);
          expectStatus(r, Status.OK, `read of ${size} B in ${segs.length} segments`, size + 1);
          assertBytes(Buffer.concat(r.data), data, `${size} B read back`);
          placed.push({ sector, data, segs });
          sector += Math.ceil(size / 4096) * 8;
        }
        // All of them again at once, then the image file.
        const all = await within(Promise.all(placed.map((p) => c.submit(0, { type: RequestType.IN, sector: p.sector, inLengths: p.segs }))), 10_000, 'concurrent reads');
        all.forEach((r, i) => {
          expectStatus(r, Status.OK, `concurrent read of ${placed[i].data.length} B`, placed[i].data.length + 1);
          assertBytes(Buffer.concat(r.data), placed[i].data, `concurrent read of ${placed[i].data.length} B`);
        });
        for (const p of placed) assertBytes(readImage(image, p.sector * SECTOR, p.data.length), p.data, `image file: ${p.data.length} B at sector ${p.sector}`);
      });
    });

    test('scatter-gather: up to seg_max data descriptors in one direct chain, of even and odd lengths', { timeout: TEST_TIMEOUT }, async (t) => {
      await withClient({ indirect: false }, async (c) => {
        const size = ringSize(c, 0);
        const n = Math.min(segMax(c), size - 2);
        if (n < segMax(c)) t.diagnostic(`seg_max ${segMax(c)} does not fit a ${size}-entry ring: chains of ${n} data descriptors`);
        const unit = segmentUnit(c);
        // n sectors, one descriptor each.
        const sectors = Array.from({ length: n }, (_, i) => pattern(SECTOR, 200 + i));
        const base = REGION.sg;
        expectStatus(await submit(c, 0, { type: RequestType.OUT, sector: base, out: sectors, indirect: false }), Status.OK, `write of ${n} 512-byte segments`, 1);
        const back = await submit(c, 0, { type: RequestType.IN, sector: base, inLengths: Array(n).fill(SECTOR), indirect: false });
        expectStatus(back, Status.OK, `read of ${n} 512-byte segments`, n * SECTOR + 1);
        back.data.forEach((d, i) => assertBytes(d, sectors[i], `segment ${i}`));
        // n segments of mixed whole-sector sizes up to the unit.
        const mixedLens = Array.from({ length: n }, (_, i) => Math.max(SECTOR, ([1, 2, 8, 3, 7, 4][i % 6] * SECTOR) % (unit + SECTOR)));
        const mixedTotal = mixedLens.reduce((a, b) => a + b, 0);
        const mixed = pattern(mixedTotal, 300);
        const base2 = base + 1024;
        expectStatus(await submit(c, 0, { type: RequestType.OUT, sector: base2, out: cut(mixed, mixedLens), indirect: false }), Status.OK, `write of ${n} mixed segments`, 1);
        const mixedBack = await submit(c, 0, { type: RequestType.IN, sector: base2, inLengths: mixedLens.slice().reverse(), indirect: false });
        expectStatus(mixedBack, Status.OK, `read of ${n} mixed segments (another split)`, mixedTotal + 1);
        assertBytes(Buffer.concat(mixedBack.data), mixed, 'mixed segments read back');
        // n segments of odd lengths (not sector multiples) whose sum is whole sectors.
        const oddLens = Array.from({ length: n }, (_, i) => 1 + ((i * 397 + 101) % Math.min(unit, 1500)));
        const rest = oddLens.reduce((a, b) => a + b, 0) % SECTOR;
        if (rest !== 0) oddLens[n - 1] += SECTOR - rest;
        const oddTotal = oddLens.reduce((a, b) => a + b, 0);
        const odd = pattern(oddTotal, 400);
        const base3 = base + 2048 - Math.ceil(oddTotal / SECTOR) - 8;
        expectStatus(await submit(c, 0, { type: RequestType.OUT, sector: base3, out: cut(odd, oddLens), indirect: false }), Status.OK, `write of ${n} odd-length segments`, 1);
        const oddBack = await submit(c, 0, { type: RequestType.IN, sector: base3, inLengths: oddLens, indirect: false });
        expectStatus(oddBack, Status.OK, `read of ${n} odd-length segments`, oddTotal + 1);
        assertBytes(Buffer.concat(oddBack.data), odd, 'odd-length segments read back');
        assertBytes(readImage(image, base * SECTOR, n * SECTOR), Buffer.concat(sectors), 'image file: 512-byte segments');
        assertBytes(readImage(image, base2 * SECTOR, mixedTotal), mixed, 'image file: mixed segments');
        assertBytes(readImage(image, base3 * SECTOR, oddTotal), odd, 'image file: odd-length segments');
      });
    });

    test('indirect descriptor tables (VIRTIO_F_INDIRECT_DESC)', { timeout: TEST_TIMEOUT }, async (t) => {
      await withClient({}, async (c) => {
        if (!has(c.offeredFeatures, Feature.RING_INDIRECT_DESC)) {
          t.skip('backend does not offer INDIRECT_DESC');
          return;
        }
        assert.ok(c.hasFeature(Feature.RING_INDIRECT_DESC), 'INDIRECT_DESC negotiated');
        const n = segMax(c);
        const base = REGION.indirect;
        // seg_max segments in one table (one ring slot).
        const segs = Array.from({ length: n }, (_, i) => pattern(SECTOR, 500 + i));
        expectStatus(await submit(c, 0, { type: RequestType.OUT, sector: base, out: segs, indirect: true }), Status.OK, `write of ${n} segments in an indirect table`, 1);
        const back = await submit(c, 0, { type: RequestType.IN, sector: base, inLengths: Array(n).fill(SECTOR), indirect: true });
        expectStatus(back, Status.OK, `read of ${n} segments in an indirect table`, n * SECTOR + 1);
        back.data.forEach((d, i) => assertBytes(d, segs[i], `indirect segment ${i}`));
        // The smallest table: header, one segment, status.
        const one = pattern(4096, 600);
        expectStatus(await submit(c, 0, { type: RequestType.OUT, sector: base + 512, out: [one], indirect: true }), Status.OK, 'write in a 3-entry table', 1);
        const oneBack = await submit(c, 0, { type: RequestType.IN, sector: base + 512, inLengths: [4096], indirect: true });
        expectStatus(oneBack, Status.OK, 'read in a 3-entry table', 4097);
        assertBytes(oneBack.data[0], one, 'read in a 3-entry table');
        // Direct and indirect chains mixed, more than the ring holds.
        const count = 300;
        const unit = segmentUnit(c);
        const datas = Array.from({ length: count }, (_, i) => pattern(4096, 700 + i));
        const w = await within(Promise.all(datas.map((d, i) => c.submit(0, {
          type: RequestType.OUT, sector: base + 1024 + i * 8, out: cut(d, split(4096, Math.min(unit, 1024))), indirect: i % 2 === 0,
        }))), 15_000, 'mixed writes');
        w.forEach((r, i) => expectStatus(r, Status.OK, `mixed write ${i}`, 1));
        const rd = await within(Promise.all(datas.map((_, i) => c.submit(0, {
          type: RequestType.IN, sector: base + 1024 + i * 8, inLengths: split(4096, Math.min(unit, 1024)), indirect: i % 2 === 1,
        }))), 15_000, 'mixed reads');
        rd.forEach((r, i) => {
          expectStatus(r, Status.OK, `mixed read ${i}`, 4097);
          assertBytes(Buffer.concat(r.data), datas[i], `mixed read ${i}`);
        });
        assertBytes(readImage(image, base * SECTOR, n * SECTOR), Buffer.concat(segs), 'image file: indirect write');
      });
    });

    test('flush (VIRTIO_BLK_F_FLUSH) completes OK on every queue', { timeout: TEST_TIMEOUT }, async (t) => {
      await withClient({ numQueues: NUM_QUEUES }, async (c) => {
        if (!has(c.offeredFeatures, Feature.BLK_FLUSH)) {
          t.skip('backend does not offer FLUSH');
          return;
        }
        for (let q = 0; q < NUM_QUEUES; q++) {
          await within(c.write(REGION.plain + 64 + q * 8, pattern(4096, 800 + q), q), 10_000, 'write before flush');
          expectStatus(await submit(c, q, { type: RequestType.FLUSH }), Status.OK, `flush on queue ${q}`, 1);
          // The sector field of a flush is reserved: a non-zero one must not matter.
          expectStatus(await submit(c, q, { type: RequestType.FLUSH, sector: 12345 }), Status.OK, `flush with a non-zero sector on queue ${q}`, 1);
          assertBytes(readImage(image, (REGION.plain + 64 + q * 8) * SECTOR, 4096), pattern(4096, 800 + q), 'image file after the flush');
        }
      });
    });

    test('CONFIG_WCE: SET_CONFIG of the writeback field is read back by GET_CONFIG, and I/O goes on', { timeout: TEST_TIMEOUT }, async (t) => {
      await withClient({}, async (c) => {
        if (!has(c.offeredFeatures, Feature.BLK_CONFIG_WCE)) {
          t.skip('backend does not offer CONFIG_WCE');
          return;
        }
        const ack = { needReply: has(c.protocolFeatures, ProtocolFeature.REPLY_ACK), timeoutMs: 3000 };
        const readWce = async () => (await c.connection.request(R.GET_CONFIG, encodeConfig(0, 60, 0), { expectReply: true, timeoutMs: 3000 }))[CONFIG_HEADER_SIZE + WCE_OFFSET];
        const initial = c.config.writeback;
        assert.equal(await readWce(), initial);
        for (const wce of [initial ^ 1, initial]) {
          await c.connection.request(R.SET_CONFIG, encodeConfig(WCE_OFFSET, 1, 0, Uint8Array.of(wce)), ack);
          assert.equal(await readWce(), wce, `writeback after SET_CONFIG ${wce}`);
          const sector = REGION.plain + 512 + wce * 8;
          await within(c.write(sector, pattern(4096, 850 + wce)), 10_000, `write with writeback ${wce}`);
          if (c.hasFeature(Feature.BLK_FLUSH)) await within(c.flush(), 10_000, 'flush');
          assertBytes(readImage(image, sector * SECTOR, 4096), pattern(4096, 850 + wce), `image file with writeback ${wce}`);
        }
      });
    });

    test('CONFIG_WCE: with writeback 0, a completed write is durable, on every queue (no dirty host page cache left)', { timeout: TEST_TIMEOUT }, async (t) => {
      await withClient({ numQueues: NUM_QUEUES }, async (c) => {
        if (!has(c.offeredFeatures, Feature.BLK_CONFIG_WCE)) {
          t.skip('backend does not offer CONFIG_WCE');
          return;
        }
        if (!pageCacheState(image, 0, SECTOR)) {
          t.skip('the host kernel has no cachestat(2) (Linux < 6.5): durability cannot be observed');
          return;
        }
        const ack = { needReply: has(c.protocolFeatures, ProtocolFeature.REPLY_ACK), timeoutMs: 3000 };
        const setWce = (wce: number) => c.connection.request(R.SET_CONFIG, encodeConfig(WCE_OFFSET, 1, 0, Uint8Array.of(wce)), ack);
        const initial = c.config.writeback;
        // The second MiB of REGION.plain, 64 KiB (128 sectors) per write.
        const base = REGION.plain + 2048;
        const len = 64 * 1024;
        try {
          await setWce(1);
          await within(c.write(base, pattern(len, 860)), 10_000, 'write with writeback 1');
          const cached = pageCacheState(image, base * SECTOR, len)!;
          // Writeback allows (does not require) the data to sit in a cache: shown, not asserted.
          t.diagnostic(`writeback 1, right after the write completed: ${JSON.stringify(cached)}${cached.dirty === 0 ? ' (the backend wrote through anyway: this test cannot tell the modes apart)' : ''}`);
          await setWce(0);
          for (let q = 0; q < NUM_QUEUES; q++) {
            const sector = base + 256 + q * 128;
            await within(c.write(sector, pattern(len, 861 + q), q), 10_000, `write with writeback 0 on queue ${q}`);
            const s = pageCacheState(image, sector * SECTOR, len)!;
            assert.equal(s.dirty + s.writeback, 0, `queue ${q}: pages not yet durable right after a write completed with writeback 0: ${JSON.stringify(s)}`);
            assertBytes(readImage(image, sector * SECTOR, len), pattern(len, 861 + q), `image file, queue ${q}`);
          }
        } finally {
          await setWce(initial);
        }
      });
    });

    test('read-only (VIRTIO_BLK_F_RO, on a backend of its own): writes fail with IOERR and change nothing; reads work', { timeout: TEST_TIMEOUT }, async (t) => {
      await withOwnBackend('readonly', async (target, roImage) => {
        // Data the host put there (the backend reads the same file).
        const hostData = pattern(64 * 1024, 1100);
        const fd = openSync(roImage, 'r+');
        try {
          writeSync(fd, hostData, 0, hostData.length, 0);
        } finally {
          closeSync(fd);
        }
        const blocks = statSync(roImage).blocks;
        await withClient({ numQueues: NUM_QUEUES }, async (c) => {
          if (!has(c.offeredFeatures, Feature.BLK_RO)) {
            t.skip('backend does not offer RO when started read-only');
            return;
          }
          assert.ok(c.hasFeature(Feature.BLK_RO), 'RO negotiated');
          const cap = c.config.capacitySectors;
          for (let q = 0; q < NUM_QUEUES; q++) {
            for (const [sector, len] of [[0, 4096], [9, SECTOR], [cap - 8, 4096]] as const) {
              const r = await submit(c, q, { type: RequestType.OUT, sector, out: [pattern(len, 1101 + q)] }, 'write on a read-only disk');
              expectStatus(r, Status.IOERR, `write of ${len} B at sector ${sector} on queue ${q} of a read-only disk`);
            }
          }
          // virtio 1.2, 5.2.6.2 names writes; discard and write-zeroes change data too, so they must fail as well.
          for (const [type, name, feature] of [[RequestType.DISCARD, 'discard', Feature.BLK_DISCARD], [RequestType.WRITE_ZEROES, 'write zeroes', Feature.BLK_WRITE_ZEROES]] as const) {
            if (!c.hasFeature(feature)) continue;
            const r = await submit(c, 0, { type, out: [encodeBlkRanges([{ sector: 0, numSectors: 16 }])] }, `${name} on a read-only disk`);
            t.diagnostic(`${name} on a read-only disk: ${describeCompletion(r)}`);
            assert.notEqual(r.status, Status.OK, `${name} on a read-only disk: ${describeCompletion(r)}`);
          }
          assertBytes(await within(c.read(0, hostData.length, 1), 10_000, 'read'), hostData, 'the host data, after the refused writes');
          assertBytes(await within(c.read(cap - 8, 4096), 10_000, 'read'), Buffer.alloc(4096), 'the last 8 sectors, after the refused writes');
        }, target);
        assertBytes(readImage(roImage, 0, hostData.length), hostData, 'the read-only image file');
        assert.equal(statSync(roImage).blocks, blocks, 'blocks allocated to the read-only image file');
        assert.equal(statSync(roImage).size, IMAGE_BYTES, 'the read-only image file did not change size');
      }, true);
    });

    test('GET_ID: OK, at most 20 bytes, the same on every queue', { timeout: TEST_TIMEOUT }, async (t) => {
      await withClient({ numQueues: NUM_QUEUES }, async (c) => {
        const r = await submit(c, 0, { type: RequestType.GET_ID, inLengths: [20] });
        if (r.status === Status.UNSUPP) {
          t.skip('device answers GET_ID with UNSUPP');
          return;
        }
        expectStatus(r, Status.OK, 'GET_ID');
        assert.ok(r.usedLen >= 1 && r.usedLen <= 21, `GET_ID used len ${r.usedLen} is 1..21 (at most 20 id bytes + status)`);
        const nul = r.data[0].indexOf(0);
        const id = r.data[0].subarray(0, nul < 0 ? 20 : nul);
        t.diagnostic(`id: ${JSON.stringify(id.toString('latin1'))} (${id.length} bytes), used len ${r.usedLen}`);
        assert.ok(id.length <= 20);
        for (let q = 1; q < NUM_QUEUES; q++) {
          const rq = await submit(c, q, { type: RequestType.GET_ID, inLengths: [20] });
          expectStatus(rq, Status.OK, `GET_ID on queue ${q}`);
          assertBytes(rq.data[0], r.data[0], `GET_ID on queue ${q}`);
        }
        // A buffer shorter than 20 bytes gets a truncated id and nothing past it.
        const short = await submit(c, 0, { type: RequestType.GET_ID, inLengths: [8] });
        expectStatus(short, Status.OK, 'GET_ID into 8 bytes');
        assert.ok(short.usedLen <= 9, `GET_ID into 8 bytes: used len ${short.usedLen} <= 9`);
        assertBytes(short.data[0].subarray(0, Math.min(8, id.length)), id.subarray(0, 8), 'truncated id');
        // A bigger buffer: the id is still at most 20 bytes.
        const big = await submit(c, 0, { type: RequestType.GET_ID, inLengths: [64] });
        expectStatus(big, Status.OK, 'GET_ID into 64 bytes');
        assertBytes(big.data[0].subarray(0, 20), r.data[0], 'GET_ID into 64 bytes: the same first 20 bytes');
        t.diagnostic(`GET_ID into 64 bytes: used len ${big.usedLen}`);
      });
    });

    test('DISCARD (VIRTIO_BLK_F_DISCARD)', { timeout: TEST_TIMEOUT }, async (t) => {
      await withClient({}, async (c) => {
        if (!has(c.offeredFeatures, Feature.BLK_DISCARD)) {
          t.skip('backend does not offer DISCARD');
          return;
        }
        assert.ok(c.hasFeature(Feature.BLK_DISCARD), 'DISCARD negotiated');
        const base = REGION.discard;
        const cap = c.config.capacitySectors;
        const data = pattern(128 * SECTOR, 900);
        await within(c.write(base, data.subarray(0, 64 * SECTOR)), 10_000, 'write');
        await within(c.write(base + 64, data.subarray(64 * SECTOR)), 10_000, 'write');
        const n = Math.min(64, c.config.maxDiscardSectors);
        const r = await submit(c, 0, { type: RequestType.DISCARD, out: [encodeBlkRanges([{ sector: base + 32, numSectors: n }])] });
        expectStatus(r, Status.OK, `discard of ${n} sectors`, 1);
        // What a discarded range reads as is unspecified; the sectors around it are untouched.
        assertBytes(await within(c.read(base, 32 * SECTOR), 10_000, 'read'), data.subarray(0, 32 * SECTOR), 'sectors before the discarded range');
        assertBytes(await within(c.read(base + 32 + n, (96 - n) * SECTOR), 10_000, 'read'), data.subarray((32 + n) * SECTOR), 'sectors after the discarded range');
        expectStatus(await submit(c, 0, { type: RequestType.DISCARD, out: [encodeBlkRanges([{ sector: cap - 8, numSectors: 16 }])] }), Status.IOERR, 'discard straddling the end');
        expectStatus(await submit(c, 0, { type: RequestType.DISCARD, out: [encodeBlkRanges([{ sector: cap + 8, numSectors: 8 }])] }), Status.IOERR, 'discard past the end');
        // virtio 1.2, 5.2.6.2: UNSUPP for a discard with the unmap flag or any unknown flag.
        expectStatus(await submit(c, 0, { type: RequestType.DISCARD, out: [encodeBlkRanges([{ sector: base, numSectors: 8, flags: WRITE_ZEROES_FLAG_UNMAP }])] }), Status.UNSUPP, 'discard with the unmap flag');
        expectStatus(await submit(c, 0, { type: RequestType.DISCARD, out: [encodeBlkRanges([{ sector: base, numSectors: 8, flags: 2 }])] }), Status.UNSUPP, 'discard with an unknown flag');
        assertBytes(await within(c.read(base, 32 * SECTOR), 10_000, 'read'), data.subarray(0, 32 * SECTOR), 'refused discards changed nothing');
      });
    });

    test('WRITE_ZEROES (VIRTIO_BLK_F_WRITE_ZEROES)', { timeout: TEST_TIMEOUT }, async (t) => {
      await withClient({}, async (c) => {
        if (!has(c.offeredFeatures, Feature.BLK_WRITE_ZEROES)) {
          t.skip('backend does not offer WRITE_ZEROES');
          return;
        }
        assert.ok(c.hasFeature(Feature.BLK_WRITE_ZEROES), 'WRITE_ZEROES negotiated');
        const base = REGION.writeZeroes;
        const cap = c.config.capacitySectors;
        const data = pattern(128 * SECTOR, 1000);
        await within(c.write(base, data.subarray(0, 64 * SECTOR)), 10_000, 'write');
        await within(c.write(base + 64, data.subarray(64 * SECTOR)), 10_000, 'write');
        const n = Math.min(32, c.config.maxWriteZeroesSectors);
        expectStatus(await submit(c, 0, { type: RequestType.WRITE_ZEROES, out: [encodeBlkRanges([{ sector: base + 16, numSectors: n }])] }), Status.OK, `write zeroes of ${n} sectors`, 1);
        expectStatus(await submit(c, 0, { type: RequestType.WRITE_ZEROES, out: [encodeBlkRanges([{ sector: base + 64, numSectors: n, flags: WRITE_ZEROES_FLAG_UNMAP }])] }), Status.OK, `write zeroes of ${n} sectors with unmap`, 1);
        const expected = Buffer.from(data);
        expected.fill(0, 16 * SECTOR, (16 + n) * SECTOR);
        expected.fill(0, 64 * SECTOR, (64 + n) * SECTOR);
        assertBytes(await within(c.read(base, 64 * SECTOR), 10_000, 'read'), expected.subarray(0, 64 * SECTOR), 'after write zeroes (first half)');
        assertBytes(await within(c.read(base + 64, 64 * SECTOR), 10_000, 'read'), expected.subarray(64 * SECTOR), 'after write zeroes with unmap (second half)');
        assertBytes(readImage(image, base * SECTOR, 128 * SECTOR), expected, 'image file after write zeroes');
        // The end of the disk.
        const tail = pattern(8 * SECTOR, 1001);
        await within(c.write(cap - 8, tail), 10_000, 'write of the tail');
        expectStatus(await submit(c, 0, { type: RequestType.WRITE_ZEROES, out: [encodeBlkRanges([{ sector: cap - 4, numSectors: 8 }])] }), Status.IOERR, 'write zeroes straddling the end');
        expectStatus(await submit(c, 0, { type: RequestType.WRITE_ZEROES, out: [encodeBlkRanges([{ sector: cap, numSectors: 1 }])] }), Status.IOERR, 'write zeroes past the end');
        // virtio 1.2, 5.2.6.2: UNSUPP for any unknown flag.
        expectStatus(await submit(c, 0, { type: RequestType.WRITE_ZEROES, out: [encodeBlkRanges([{ sector: cap - 8, numSectors: 4, flags: 2 }])] }), Status.UNSUPP, 'write zeroes with an unknown flag');
        assertBytes(await within(c.read(cap - 8, 8 * SECTOR), 10_000, 'read'), tail, 'failed write zeroes changed nothing');
        expectStatus(await submit(c, 0, { type: RequestType.WRITE_ZEROES, out: [encodeBlkRanges([{ sector: cap - 8, numSectors: 8 }])] }), Status.OK, 'write zeroes of the last 8 sectors', 1);
        assertBytes(await within(c.read(cap - 8, 8 * SECTOR), 10_000, 'read'), Buffer.alloc(8 * SECTOR), 'the last 8 sectors zeroed');
      });
    });

    test('message framing (virtio 1.x, 2.6.4): the header, data and status byte may be split or merged across descriptors', { timeout: TEST_TIMEOUT }, async (t) => {
      await withClient({}, async (c) => {
        const base = REGION.invalid + 256;
        const buf = c.allocDma(64 * 1024);
        try {
          /**
           * Lays out one request in `buf`: the 16-byte header (type, sector), `data` after it for a write,
           * room for `readLen` bytes for a read, then the status byte; `cuts` are the byte offsets where one
           * descriptor ends and the next begins. Returns the status, used len and the bytes read.
           */
          const framed = async (what: string, type: number, sector: number, data: Buffer | null, readLen: number, cuts: number[]) => {
            const outLen = 16 + (data ? data.length : 0);
            const total = outLen + readLen + 1;
            buf.bytes.fill(0xee, 0, total);
            const dv = new DataView(buf.bytes.buffer, buf.bytes.byteOffset, 16);
            dv.setUint32(0, type, true);
            dv.setUint32(4, 0, true);
            dv.setBigUint64(8, BigInt(sector), true);
            if (data) buf.bytes.set(data, 16);
            buf.bytes[total - 1] = STATUS_NOT_WRITTEN;
            const bounds = [0, ...cuts, total];
            const descs = bounds.slice(0, -1).map((from, i) => {
              const to = bounds[i + 1];
              assert.ok(to > from && (to <= outLen || from >= outLen), `${what}: cut list mixes device-readable and -writable bytes`);
              return { addr: buf.gpa + from, len: to - from, flags: (from >= outLen ? VIRTQ_DESC_F_WRITE : 0) | (i < bounds.length - 2 ? VIRTQ_DESC_F_NEXT : 0) };
            });
            const r = await within(c.submitRawChain(0, descs), 5000, what);
            return { status: buf.bytes[total - 1], usedLen: r.usedLen, data: Buffer.from(buf.bytes.subarray(outLen, outLen + readLen)) };
          };
          const expectOk = (what: string, r: { status: number; usedLen: number }, usedLen: number) => {
            assert.equal(r.status, Status.OK, `${what}: ${statusName(r.status)}, used len ${r.usedLen}`);
            assert.equal(r.usedLen, usedLen, `${what}: used len`);
          };
          const d1 = pattern(4096, 9600);
          const d2 = pattern(4096, 9601);
          // Writes.
          expectOk('write: header split 8 + 8', await framed('write: header split 8 + 8', RequestType.OUT, base, d1, 0, [8, 16, 16 + 4096]), 1);
          assertBytes(await within(c.read(base, 4096), 10_000, 'read'), d1, 'write with a split header');
          expectOk('write: header and data in one descriptor', await framed('write: header and data in one descriptor', RequestType.OUT, base + 8, d2, 0, [16 + 4096]), 1);
          assertBytes(await within(c.read(base + 8, 4096), 10_000, 'read'), d2, 'write with header and data merged');
          expectOk('write: header + first 100 data bytes, then the rest', await framed('write: header + first 100 data bytes, then the rest', RequestType.OUT, base + 16, d1, 0, [116, 16 + 4096]), 1);
          assertBytes(await within(c.read(base + 16, 4096), 10_000, 'read'), d1, 'write with the data cut inside the header descriptor');
          // Reads.
          const r1 = await framed('read: data and status in one descriptor', RequestType.IN, base, null, 4096, [16]);
          expectOk('read: data and status in one descriptor', r1, 4097);
          assertBytes(r1.data, d1, 'read with data and status merged');
          const r2 = await framed('read: header split 4 + 12, data in 3 odd pieces', RequestType.IN, base + 8, null, 4096, [4, 16, 16 + 1000, 16 + 3001, 16 + 4096]);
          expectOk('read: header split 4 + 12, data in 3 odd pieces', r2, 4097);
          assertBytes(r2.data, d2, 'read with a split header and odd pieces');
          // Flush and GET_ID.
          if (c.hasFeature(Feature.BLK_FLUSH)) expectOk('flush: header split 10 + 6', await framed('flush: header split 10 + 6', RequestType.FLUSH, 0, null, 0, [10, 16]), 1);
          const id = await framed('GET_ID: id and status in one descriptor', RequestType.GET_ID, 0, null, 20, [16]);
          if (id.status === Status.UNSUPP) t.diagnostic('GET_ID: UNSUPP');
          else {
            assert.equal(id.status, Status.OK, `GET_ID with id and status merged: ${statusName(id.status)}`);
            assert.ok(id.usedLen >= 1 && id.usedLen <= 21, `GET_ID with id and status merged: used len ${id.usedLen}`);
          }
        } finally {
          buf.free();
        }
      });
    });

    test('unsupported and malformed requests: unknown types UNSUPP, partial sectors IOERR, and the queue goes on', { timeout: TEST_TIMEOUT }, async (t) => {
      await withClient({}, async (c) => {
        const notOffered: Array<[string, number, number]> = [['GET_LIFETIME', RequestType.GET_LIFETIME, 15], ['SECURE_ERASE', RequestType.SECURE_ERASE, 16]];
        const unknown = await submit(c, 0, { type: 99, inLengths: [SECTOR] });
        expectStatus(unknown, Status.UNSUPP, 'request type 99');
        t.diagnostic(`request type 99: used len ${unknown.usedLen}`);
        for (const [label, type, bit] of notOffered) {
          if (has(c.offeredFeatures, bit)) continue;
          const req: BlkRequest = type === RequestType.GET_LIFETIME ? { type, inLengths: [8] } : { type, out: [encodeBlkRanges([{ sector: 0, numSectors: 1 }])] };
          expectStatus(await submit(c, 0, req), Status.UNSUPP, `${label} (not offered)`);
        }
        const base = REGION.invalid;
        const data = pattern(4096, 1100);
        await within(c.write(base, data), 10_000, 'write');
        expectStatus(await submit(c, 0, { type: RequestType.IN, sector: base, inLengths: [100] }), Status.IOERR, 'read of 100 bytes');
        expectStatus(await submit(c, 0, { type: RequestType.IN, sector: base, inLengths: [4096, 100] }), Status.IOERR, 'read of 4196 bytes');
        expectStatus(await submit(c, 0, { type: RequestType.OUT, sector: base, out: [pattern(100, 1)] }), Status.IOERR, 'write of 100 bytes');
        expectStatus(await submit(c, 0, { type: RequestType.OUT, sector: base, out: [pattern(1000, 2)] }), Status.IOERR, 'write of 1000 bytes');
        assertBytes(await within(c.read(base, 4096), 10_000, 'read'), data, 'data after the refused partial-sector writes');
      });
    });

    test('two queues at once: concurrent writes to different regions, read back across queues', { timeout: TEST_TIMEOUT }, async () => {
      await withClient({ numQueues: 2 }, async (c) => {
        assert.equal(c.numQueues, 2);
        const count = 200;
        const regionA = REGION.mq;
        const regionB = REGION.mq + 2048;
        const a = Array.from({ length: count }, (_, i) => pattern(4096, 2000 + i));
        const b = Array.from({ length: count }, (_, i) => pattern(4096, 3000 + i));
        c.callSignals(0);
        c.callSignals(1);
        await within(Promise.all([
          ...a.map((d, i) => c.write(regionA + i * 8, d, 0)),
          ...b.map((d, i) => c.write(regionB + i * 8, d, 1)),
        ]), 15_000, 'concurrent writes on two queues');
        const [fromA, fromB] = await within(Promise.all([
          Promise.all(a.map((_, i) => c.read(regionA + i * 8, 4096, 1))),
          Promise.all(b.map((_, i) => c.read(regionB + i * 8, 4096, 0))),
        ]), 15_000, 'crossed reads');
        fromA.forEach((d, i) => assertBytes(d, a[i], `region A block ${i} read on queue 1`));
        fromB.forEach((d, i) => assertBytes(d, b[i], `region B block ${i} read on queue 0`));
        // Interleaved on one region: each block written on one queue, read on the other.
        const regionC = REGION.mq + 4096;
        const cData = Array.from({ length: count }, (_, i) => pattern(2048, 4000 + i));
        await within(Promise.all(cData.map((d, i) => c.write(regionC + i * 4, d, i % 2))), 15_000, 'interleaved writes');
        const cBack = await within(Promise.all(cData.map((_, i) => c.read(regionC + i * 4, 2048, (i + 1) % 2))), 15_000, 'interleaved reads');
        cBack.forEach((d, i) => assertBytes(d, cData[i], `region C block ${i}`));
        assert.ok(c.callSignals(0) > 0n, 'queue 0 call eventfd signalled');
        assert.ok(c.callSignals(1) > 0n, 'queue 1 call eventfd signalled');
        assertBytes(readImage(image, regionA * SECTOR, 4096), a[0], 'image file: region A');
        assertBytes(readImage(image, (regionB + (count - 1) * 8) * SECTOR, 4096), b[count - 1], 'image file: region B');
      });
    });

    test('stop and restart a ring: GET_VRING_BASE / SET_VRING_BASE, avail index preserved, I/O continues', { timeout: TEST_TIMEOUT, skip: splitOnly }, async () => {
      await withClient({ numQueues: 2 }, async (c) => {
        const base = REGION.stop;
        const ring = c.ring(0);
        for (let i = 0; i < 5; i++) await within(c.write(base + i * 8, pattern(4096, 5000 + i)), 10_000, 'write');
        const idx1 = await c.stopQueue(0);
        assert.equal(idx1, ring.availIdx, 'GET_VRING_BASE reports every chain made available');
        assert.equal(ring.deviceUsedIdx(), ring.availIdx, 'every chain was used before the ring stopped');
        // The other queue goes on while queue 0 is stopped.
        await within(c.write(base + 100, pattern(4096, 5100), 1), 10_000, 'write on queue 1 while queue 0 is stopped');
        assertBytes(await within(c.read(base + 100, 4096, 1), 10_000, 'read on queue 1'), pattern(4096, 5100), 'queue 1 while queue 0 is stopped');
        // Made available on the stopped ring: must wait for the restart.
        let done = false;
        const pending = c.write(base + 5 * 8, pattern(4096, 5005), 0).then(() => { done = true; });
        await sleep(200);
        assert.equal(done, false, 'a stopped ring must not be processed');
        assert.equal(ring.deviceUsedIdx(), idx1, 'used index unchanged while stopped');
        await c.restartQueue(0, idx1);
        await within(pending, 10_000, 'the request made available while stopped, after the restart');
        assert.equal(ring.availIdx, (idx1 + 1) & 0xffff);
        // More I/O after the restart; nothing processed twice, nothing skipped.
        for (let i = 6; i < 10; i++) await within(c.write(base + i * 8, pattern(4096, 5000 + i)), 10_000, 'write after restart');
        const back = await within(c.read(base, 10 * 4096), 10_000, 'read after restart');
        for (let i = 0; i < 10; i++) assertBytes(back.subarray(i * 4096, (i + 1) * 4096), pattern(4096, 5000 + i), `block ${i}`);
        assert.equal(ring.deviceUsedIdx(), ring.availIdx, 'used index caught up with the avail index');
        // A second cycle with nothing pending: the index the device reports is ours again.
        const idx2 = await c.stopQueue(0);
        assert.equal(idx2, ring.availIdx, 'second GET_VRING_BASE');
        assert.equal(idx2, (idx1 + 1 + 4 + 1) & 0xffff, 'avail index advanced by exactly the requests made since the first stop');
        await c.restartQueue(0, idx2);
        await within(c.write(base + 80, pattern(4096, 5080)), 10_000, 'write after the second restart');
        assertBytes(await within(c.read(base + 80, 4096), 10_000, 'read'), pattern(4096, 5080), 'after the second restart');
        // Stop and restart queue 1 too, then use both.
        const idx3 = await c.stopQueue(1);
        assert.equal(idx3, c.ring(1).availIdx, 'GET_VRING_BASE of queue 1');
        await c.restartQueue(1, idx3);
        if (c.hasFeature(Feature.BLK_FLUSH)) await within(Promise.all([c.flush(0), c.flush(1)]), 10_000, 'flush on both queues');
        assertBytes(await within(c.read(base + 100, 4096, 1), 10_000, 'read on queue 1 after its restart'), pattern(4096, 5100), 'queue 1 after its restart');
      });
    });

    test('GET_VRING_BASE with requests in flight drains them (on a backend of its own); the restart goes on from the base', {
      timeout: TEST_TIMEOUT, todo: knownFailures[INFLIGHT_STOP], skip: splitOnly,
    }, async (t) => {
      await withOwnBackend('inflight-stop', async (target, image2) => {
        await withClient({}, async (c) => {
          const ring = c.ring(0);
          const count = 64;
          const blocks = Array.from({ length: count }, (_, i) => pattern(64 * 1024, 5200 + i));
          const writes = blocks.map((d, i) => c.write(i * 128, d));
          for (const w of writes) w.catch(() => undefined); // failures are reported below, or by Promise.all
          await sleep(0);
          const idx = await c.stopQueue(0);
          const usedAtStop = ring.deviceUsedIdx();
          const unpopped = (ring.availIdx - idx) & 0xffff;
          t.diagnostic(`GET_VRING_BASE answered ${idx}: ${ring.availIdx} chains made available, ${usedAtStop} used, ${unpopped} not yet taken`);
          assert.ok(unpopped <= count, `GET_VRING_BASE ${idx} is at most the avail index ${ring.availIdx} and not before the start`);
          // vhost-user.rst: without GET_VRING_BASE_INFLIGHT, GET_VRING_BASE drains in-flight I/O before it answers,
          // and a device whose rings are all stopped is suspended: it writes no guest memory.
          assert.equal(usedAtStop, idx, 'every chain the device took was completed before GET_VRING_BASE answered (drained)');
          await sleep(100);
          assert.equal(ring.deviceUsedIdx(), usedAtStop, 'no completion is written while the ring is stopped');
          await c.restartQueue(0, idx);
          await within(Promise.all(writes), 15_000, 'writes across the stop');
          assert.equal(c.outstandingRequests, 0);
          assert.equal(ring.deviceUsedIdx(), ring.availIdx, 'used index caught up with the avail index: nothing lost, nothing twice');
          const back = await within(Promise.all(blocks.map((_, i) => c.read(i * 128, 64 * 1024))), 15_000, 'read back');
          back.forEach((d, i) => assertBytes(d, blocks[i], `block ${i}`));
          assertBytes(readImage(image2, 5 * 128 * SECTOR, 64 * 1024), blocks[5], 'image file');
        }, target);
      });
    });

    test('QEMU\'s stop sequence: SET_VRING_ENABLE 0, GET_VRING_BASE, then the ring set up again and enabled', { timeout: TEST_TIMEOUT, skip: splitOnly }, async () => {
      await withClient({ numQueues: 2 }, async (c) => {
        const base = REGION.stop + 1024;
        await within(c.write(base, pattern(4096, 5300)), 10_000, 'write');
        for (let q = 0; q < 2; q++) await c.setQueueEnabled(q, false);
        const idx = [await c.stopQueue(0), await c.stopQueue(1)];
        assert.equal(idx[0], c.ring(0).availIdx, 'GET_VRING_BASE of queue 0 after SET_VRING_ENABLE 0');
        assert.equal(idx[1], c.ring(1).availIdx, 'GET_VRING_BASE of queue 1 after SET_VRING_ENABLE 0');
        for (let q = 0; q < 2; q++) await c.restartQueue(q, idx[q]);
        for (let q = 0; q < 2; q++) {
          await within(c.write(base + 8 + q * 8, pattern(4096, 5301 + q), q), 10_000, `write on queue ${q} after the restart`);
        }
        assertBytes(await within(c.read(base, 3 * 4096, 1), 10_000, 'read'), Buffer.concat([pattern(4096, 5300), pattern(4096, 5301), pattern(4096, 5302)]), 'after the restart');
      });
    });

    test('ring indices wrap around: a ring restarted at index 65530 keeps working past 65535', { timeout: TEST_TIMEOUT, skip: splitOnly }, async () => {
      await withClient({}, async (c) => {
        const ring = c.ring(0);
        const base = REGION.stop + 1536;
        await c.stopQueue(0);
        ring.reset(65530);
        await c.restartQueue(0, 65530);
        for (let i = 0; i < 8; i++) await within(c.write(base + i * 8, pattern(4096, 5400 + i)), 10_000, `write ${i} around the wrap`);
        assert.equal(ring.availIdx, (65530 + 8) & 0xffff);
        const back = await within(Promise.all(Array.from({ length: 40 }, (_, i) => c.read(base + (i % 8) * 8, 4096))), 10_000, 'reads past the wrap');
        back.forEach((d, i) => assertBytes(d, pattern(4096, 5400 + (i % 8)), `read ${i}`));
        assert.equal(ring.deviceUsedIdx(), ring.availIdx, 'used index wrapped with the avail index');
        const idx = await c.stopQueue(0);
        assert.equal(idx, (65530 + 48) & 0xffff, 'GET_VRING_BASE after the wrap');
        await c.restartQueue(0, idx);
        await within(c.write(base + 64, pattern(4096, 5500)), 10_000, 'write after a restart past the wrap');
        assertBytes(await within(c.read(base + 64, 4096), 10_000, 'read'), pattern(4096, 5500), 'after a restart past the wrap');
      });
    });

    test('device reset (guest reboot): SET_FEATURES and SET_MEM_TABLE again, rings cleared and restarted at index 0', { timeout: TEST_TIMEOUT, skip: splitOnly }, async () => {
      await withClient({ numQueues: 2 }, async (c) => {
        const base = REGION.stop + 1792;
        for (let q = 0; q < 2; q++) await within(c.write(base + q * 8, pattern(4096, 5600 + q), q), 10_000, 'write before the reset');
        for (let i = 0; i < 20; i++) await within(c.read(base, 4096, i % 2), 10_000, 'read');
        await c.reinitialize();
        assert.equal(c.ring(0).availIdx, 0);
        for (let q = 0; q < 2; q++) {
          assertBytes(await within(c.read(base + ((q + 1) % 2) * 8, 4096, q), 10_000, `read on queue ${q} after the reset`), pattern(4096, 5600 + ((q + 1) % 2)), `queue ${q} after the reset`);
          await within(c.write(base + 16 + q * 8, pattern(4096, 5610 + q), q), 10_000, `write on queue ${q} after the reset`);
        }
        assert.equal(c.ring(0).deviceUsedIdx(), c.ring(0).availIdx, 'queue 0 used index restarted from 0');
        assert.equal(c.ring(1).deviceUsedIdx(), c.ring(1).availIdx, 'queue 1 used index restarted from 0');
        assertBytes(readImage(image, (base + 16) * SECTOR, 8192), Buffer.concat([pattern(4096, 5610), pattern(4096, 5611)]), 'image file after the reset');
      });
    });

    test('disconnect and reconnect: a new front-end sees what the old one wrote', { timeout: TEST_TIMEOUT }, async () => {
      const base = REGION.reconnect;
      const first = await connect({});
      const x = pattern(16384, 6000);
      await within(first.write(base, x), 10_000, 'write before the disconnect');
      assert.deepEqual(first.anomalies, []);
      await disconnect(first);

      const second = await connect({ numQueues: 2 });
      assertBytes(await within(second.read(base, x.length, 1), 10_000, 'read after reconnect'), x, 'data of the previous connection');
      const y = pattern(8192, 6001);
      await within(second.write(base + 64, y, 1), 10_000, 'write');
      // An abrupt disconnect: no GET_VRING_BASE, the socket just closes (rings idle).
      assert.deepEqual(second.anomalies, []);
      await disconnect(second, false);

      await withClient({}, async (third) => {
        assertBytes(await within(third.read(base, x.length), 10_000, 'read'), x, 'data of the first connection after an abrupt disconnect');
        assertBytes(await within(third.read(base + 64, y.length), 10_000, 'read'), y, 'data of the second connection after an abrupt disconnect');
      });
      // Quick cycles: each connection reads what the one before wrote.
      for (let i = 0; i < 5; i++) {
        await withClient({ numQueues: 1 + (i % 2) }, async (c) => {
          if (i > 0) assertBytes(await within(c.read(base + 128 + (i - 1) * 8, 4096, i % 2), 10_000, 'read'), pattern(4096, 6010 + i - 1), `cycle ${i}: the previous connection's block`);
          await within(c.write(base + 128 + i * 8, pattern(4096, 6010 + i), i % 2), 10_000, 'write');
        });
      }
      assertBytes(readImage(image, base * SECTOR, x.length), x, 'image file');
    });

    test('abrupt disconnects with requests in flight (on a backend of its own): it survives and serves the next front-end', {
      timeout: 30_000, todo: knownFailures[ABRUPT_INFLIGHT],
    }, async () => {
      await withOwnBackend('abrupt', async (target) => {
        const x = pattern(65536, 6200);
        await withClient({}, async (c) => { await within(c.write(0, x), 10_000, 'write'); }, target);
        for (let round = 0; round < 5; round++) {
          const c = await connect({ numQueues: 2 }, target);
          const inflight = [
            ...Array.from({ length: 32 }, (_, i) => c.read((i % 16) * 8, 4096, i % 2).catch(() => null)),
            ...Array.from({ length: 16 }, (_, i) => c.write(1024 + i * 128, pattern(64 * 1024, 6300 + i), i % 2).catch(() => null)),
          ];
          await disconnect(c, false);
          await within(Promise.all(inflight), 5000, 'in-flight requests rejected on close');
        }
        await withClient({ numQueues: 2 }, async (c) => {
          assertBytes(await within(c.read(0, x.length, 1), 10_000, 'read'), x, 'data written before the abrupt disconnects');
        }, target);
      });
    });

    test('the image file on the host: frontend writes land at the right offset; host data is read back', { timeout: TEST_TIMEOUT }, async () => {
      await withClient({}, async (c) => {
        const host = await within(c.read(HOST_SECTOR, HOST_BYTES), 10_000, 'read of the data the host wrote before start');
        assertBytes(host, pattern(HOST_BYTES, 777), 'data the host put in the image before the backend started');
        const cap = c.config.capacitySectors;
        const spots = [REGION.file, REGION.file + 1, REGION.file + 12345 % 2048, cap - 3];
        const written = spots.map((s, i) => ({ s, d: pattern(SECTOR * (1 + (i % 3)), 7000 + i) }));
        for (const w of written) await within(c.write(w.s, w.d), 10_000, `write at sector ${w.s}`);
        if (has(c.features, Feature.BLK_FLUSH)) await within(c.flush(), 10_000, 'flush');
        for (const w of written) assertBytes(readImage(image, w.s * SECTOR, w.d.length), w.d, `image file at byte ${w.s * SECTOR}`);
        // The sector before and after an isolated write are untouched (zero: never written).
        const lone = REGION.file + 1000;
        await within(c.write(lone, pattern(SECTOR, 7100)), 10_000, 'lone write');
        assertBytes(readImage(image, (lone - 1) * SECTOR, 3 * SECTOR), Buffer.concat([Buffer.alloc(SECTOR), pattern(SECTOR, 7100), Buffer.alloc(SECTOR)]), 'image file around a lone sector');
        assert.equal(statSync(image).size, IMAGE_BYTES, 'image size unchanged');
      });
    });

    test('without EVENT_IDX and INDIRECT_DESC, with a 4-entry ring: I/O and call notifications still work', { timeout: TEST_TIMEOUT }, async () => {
      await withClient({ eventIdx: false, indirect: false, queueSize: 4, memoryBytes: 4 * MiB }, async (c) => {
        assert.equal(c.hasFeature(Feature.RING_EVENT_IDX), false);
        assert.equal(c.hasFeature(Feature.RING_INDIRECT_DESC), false);
        const base = REGION.plain + 256;
        const blocks = Array.from({ length: 40 }, (_, i) => pattern(4096, 8000 + i));
        c.callSignals(0);
        await within(Promise.all(blocks.map((d, i) => c.write(base + i * 8, d))), 15_000, 'writes through a 4-entry ring');
        const back = await within(Promise.all(blocks.map((_, i) => c.read(base + i * 8, 4096))), 15_000, 'reads through a 4-entry ring');
        back.forEach((d, i) => assertBytes(d, blocks[i], `block ${i}`));
        // Two data descriptors: the most a 4-entry ring can take in one chain.
        const two = [pattern(SECTOR, 8100), pattern(SECTOR, 8101)];
        expectStatus(await submit(c, 0, { type: RequestType.OUT, sector: base + 400, out: two }), Status.OK, 'a 4-descriptor chain', 1);
        let signals = 0n;
        for (let i = 0; i < 100 && signals === 0n; i++) {
          signals = c.callSignals(0);
          if (signals === 0n) await sleep(10);
        }
        assert.ok(signals > 0n, 'call eventfd signalled without EVENT_IDX');
      });
    });

    test('a 256-entry ring: more requests in flight than a 128-entry ring holds', { timeout: TEST_TIMEOUT }, async () => {
      await withClient({ queueSize: 256, indirect: false }, async (c) => {
        assert.equal(ringSize(c, 0), 256);
        const base = REGION.plain + 1024;
        const blocks = Array.from({ length: 240 }, (_, i) => pattern(SECTOR, 8200 + i));
        await within(Promise.all(blocks.map((d, i) => c.write(base + i, d))), 15_000, 'writes');
        const back = await within(Promise.all(blocks.map((_, i) => c.read(base + i, SECTOR))), 15_000, 'reads');
        back.forEach((d, i) => assertBytes(d, blocks[i], `sector ${i}`));
      });
    });

    test('QEMU-like guest memory: several regions, a hole, non-zero mmap offsets, guest addresses above 4 GiB', { timeout: TEST_TIMEOUT }, async () => {
      const base = REGION.memory;
      // As QEMU lays out a PC: RAM below 640 KiB, the VGA/BIOS hole, RAM from 768 KiB, and RAM above 4 GiB
      // further on in the same memfd.
      const pc: GuestRegion[] = [
        { guestAddr: 0, offset: 0, size: 0xa0000 },
        { guestAddr: 0xc0000, offset: 0xc0000, size: 16 * MiB - 0xc0000 },
        { guestAddr: 4 * 1024 * MiB, offset: 16 * MiB, size: 32 * MiB },
      ];
      await withClient({ numQueues: 2, memoryBytes: 48 * MiB, memoryRegions: pc }, async (c) => {
        // 1 MiB requests: more than fit below 4 GiB, so buffers land in every region that can hold them.
        const big = Array.from({ length: 24 }, (_, i) => pattern(MiB, 9100 + i));
        await within(Promise.all(big.map((d, i) => c.write(base + (i % 4) * 2048, d, i % 2))), 15_000, 'concurrent 1 MiB writes');
        const last = big.slice(20);
        const back = await within(Promise.all(last.map((_, i) => c.read(base + i * 2048, MiB, (i + 1) % 2))), 15_000, '1 MiB reads');
        back.forEach((d, i) => assertBytes(d, last[i], `1 MiB block ${i}`));
        const small = Array.from({ length: 200 }, (_, i) => pattern(4096, 9200 + i));
        await within(Promise.all(small.map((d, i) => c.write(base + 8192 + i * 8, d, i % 2))), 15_000, 'small writes');
        const smallBack = await within(Promise.all(small.map((_, i) => c.read(base + 8192 + i * 8, 4096, i % 2))), 15_000, 'small reads');
        smallBack.forEach((d, i) => assertBytes(d, small[i], `4 KiB block ${i}`));
      });
      // Only high memory, in two regions listed out of order, with the rings above 4 GiB too.
      const high: GuestRegion[] = [
        { guestAddr: 8 * 1024 * MiB, offset: 8 * MiB, size: 8 * MiB },
        { guestAddr: 4 * 1024 * MiB + 64 * MiB, offset: 24 * MiB, size: 24 * MiB },
      ];
      await withClient({ numQueues: 2, memoryBytes: 48 * MiB, memoryRegions: high }, async (c) => {
        const blocks = Array.from({ length: 64 }, (_, i) => pattern(64 * 1024, 9300 + i));
        await within(Promise.all(blocks.map((d, i) => c.write(base + 10240 + i * 128, d, i % 2))), 15_000, 'writes');
        const back = await within(Promise.all(blocks.map((_, i) => c.read(base + 10240 + i * 128, 64 * 1024, (i + 1) % 2))), 15_000, 'reads');
        back.forEach((d, i) => assertBytes(d, blocks[i], `64 KiB block ${i}`));
        if (c.hasFeature(Feature.RING_INDIRECT_DESC)) {
          const segs = Array.from({ length: segMax(c) }, (_, i) => pattern(SECTOR, 9400 + i));
          expectStatus(await submit(c, 0, { type: RequestType.OUT, sector: base + 18432, out: segs, indirect: true }), Status.OK, 'indirect write in high memory', 1);
          const r = await submit(c, 1, { type: RequestType.IN, sector: base + 18432, inLengths: Array(segs.length).fill(SECTOR), indirect: true });
          expectStatus(r, Status.OK, 'indirect read in high memory', segs.length * SECTOR + 1);
          assertBytes(Buffer.concat(r.data), Buffer.concat(segs), 'indirect read in high memory');
        }
      });
    });

    test('a data descriptor spanning two memory regions that are contiguous in guest physical memory (two DIMMs)', { timeout: TEST_TIMEOUT }, async (t) => {
      const base = REGION.memory + 20000;
      const dimm = 4 * 1024 * MiB;
      // Two 8 MiB "DIMMs" back to back in guest memory, but in the memfd the second comes first, with a gap.
      const layout: GuestRegion[] = [
        { guestAddr: 0, offset: 0, size: 16 * MiB },
        { guestAddr: dimm, offset: 32 * MiB, size: 8 * MiB },
        { guestAddr: dimm + 8 * MiB, offset: 16 * MiB, size: 8 * MiB },
      ];
      await withClient({ memoryBytes: 40 * MiB, memoryRegions: layout }, async (c) => {
        const span = c.allocGuest(dimm + 8 * MiB - 8192, 16384);
        const hdr = c.allocDma(4096);
        try {
          const run = (type: number, sector: number) => rawBlkRequest(c, hdr, span, type, sector);
          const data = pattern(16384, 9500);
          span.write(data);
          const w = await run(RequestType.OUT, base);
          t.diagnostic(`write through a descriptor spanning two regions: ${statusName(w.status)}, used len ${w.usedLen}`);
          assert.equal(w.status, Status.OK, `write through a descriptor spanning two regions: ${statusName(w.status)}, used len ${w.usedLen}`);
          assertBytes(await within(c.read(base, 16384), 10_000, 'read back'), data, 'data written through the spanning descriptor');
          const other = pattern(16384, 9501);
          await within(c.write(base + 64, other), 10_000, 'write');
          span.write(Buffer.alloc(16384));
          const r = await run(RequestType.IN, base + 64);
          assert.equal(r.status, Status.OK, `read through a descriptor spanning two regions: ${statusName(r.status)}, used len ${r.usedLen}`);
          assert.equal(r.usedLen, 16385, 'used len of the spanning read');
          assertBytes(span.read(), other, 'data read through the spanning descriptor');
        } finally {
          span.free();
          hdr.free();
        }
      });
    });

    test('memory hot-plug with ADD_MEM_REG / REM_MEM_REG (CONFIGURE_MEM_SLOTS), as QEMU sends the table when both sides offer it', { timeout: TEST_TIMEOUT }, async (t) => {
      const base = REGION.memory + 20480;
      const pc: GuestRegion[] = [
        { guestAddr: 0, offset: 0, size: 0xa0000 },
        { guestAddr: 0xc0000, offset: 0xc0000, size: 16 * MiB - 0xc0000 },
        { guestAddr: 4 * 1024 * MiB, offset: 16 * MiB, size: 16 * MiB },
      ];
      const hot: GuestRegion = { guestAddr: 16 * 1024 * MiB, offset: 36 * MiB, size: 4 * MiB };
      await withClient({ numQueues: 2, memoryBytes: 40 * MiB, memoryRegions: pc, memoryMessages: 'add-mem-reg' }, async (c) => {
        t.diagnostic(`GET_MAX_MEM_SLOTS: ${c.maxMemSlots}`);
        assert.ok(c.maxMemSlots >= pc.length + 1, `GET_MAX_MEM_SLOTS ${c.maxMemSlots} leaves room for a hot-added region`);
        const blocks = Array.from({ length: 40 }, (_, i) => pattern(256 * 1024, 9700 + i));
        await within(Promise.all(blocks.map((d, i) => c.write(base + i * 512, d, i % 2))), 15_000, 'writes');
        const back = await within(Promise.all(blocks.map((_, i) => c.read(base + i * 512, 256 * 1024, (i + 1) % 2))), 15_000, 'reads');
        back.forEach((d, i) => assertBytes(d, blocks[i], `256 KiB block ${i}`));
        const hdr = c.allocDma(4096);
        try {
          for (let round = 0; round < 2; round++) {
            await c.addMemoryRegion(hot);
            const buf = c.allocGuest(hot.guestAddr + MiB, 64 * 1024);
            const data = pattern(64 * 1024, 9800 + round);
            buf.write(data);
            const w = await rawBlkRequest(c, hdr, buf, RequestType.OUT, base + 30000);
            assert.equal(w.status, Status.OK, `round ${round}: write from the hot-added region: ${statusName(w.status)}, used len ${w.usedLen}`);
            assertBytes(await within(c.read(base + 30000, data.length), 10_000, 'read'), data, `round ${round}: data written from the hot-added region`);
            buf.write(Buffer.alloc(data.length));
            const r = await rawBlkRequest(c, hdr, buf, RequestType.IN, base);
            assert.equal(r.status, Status.OK, `round ${round}: read into the hot-added region: ${statusName(r.status)}`);
            assertBytes(buf.read(), blocks[0].subarray(0, 64 * 1024), `round ${round}: data read into the hot-added region`);
            buf.free();
            await c.removeMemoryRegion(hot.guestAddr);
            // The other regions serve on.
            assertBytes(await within(c.read(base + 512, 256 * 1024, round), 10_000, 'read after REM_MEM_REG'), blocks[1], `round ${round}: after REM_MEM_REG`);
          }
        } finally {
          hdr.free();
        }
      });
    });

    // ---------------------------------------------------------------------------------------------------
    // Dirty page logging (live migration, vhost-user "Migration"), driven as QEMU drives it.

    /** Guest memory of the dirty log tests: low memory and a region above 4 GiB, so log bits follow guest addresses, not memfd offsets. */
    const logLayout: GuestRegion[] = [
      { guestAddr: 0, offset: 0, size: 8 * MiB },
      { guestAddr: 4 * GiB, offset: 8 * MiB, size: 8 * MiB },
    ];

    function requireDirtyLog(c: VhostUserBlkClient): void {
      assert.ok(c.supportsDirtyLog, `live migration needs VHOST_F_LOG_ALL and VHOST_USER_PROTOCOL_F_LOG_SHMFD: offered ${deviceFeatures(c.offeredFeatures)}; protocol ${protocolFeatures(c.offeredProtocolFeatures)}`);
    }

    /**
     * Labels the ring pages of every queue; returns the pages only the driver writes (split: descriptor
     * table and avail ring; packed: the driver event suppression area), which the device need not log.
     */
    function labelRings(c: VhostUserBlkClient, labels: PageLabels): Set<number> {
      const driverOnly = new Set<number>();
      for (let q = 0; q < c.numQueues; q++) {
        const a = c.ringAreas(q);
        labels.add(a.desc, `queue ${q} descriptor ${packed ? 'ring (driver and device write it)' : 'table (driver-written)'}`);
        labels.add(a.avail, `queue ${q} ${packed ? 'driver event suppression area' : 'avail ring'} (driver-written)`);
        labels.add(a.used, `queue ${q} ${packed ? 'device event suppression area' : 'used ring'} (device-written)`);
        const pages = (r: GuestRange) => { for (let p = logPage(r.guestAddr); p <= logPage(r.guestAddr + r.size - 1); p++) driverOnly.add(p); };
        if (!packed) pages(a.desc);
        pages(a.avail);
      }
      return driverOnly;
    }

    /** The ring page(s) the device writes on every completion: the used ring (split) or the descriptor ring (packed). */
    function deviceRingPages(c: VhostUserBlkClient, q: number): number[] {
      const a = c.ringAreas(q);
      const r = packed ? a.desc : a.used;
      const out: number[] = [];
      for (let p = logPage(r.guestAddr); p <= logPage(r.guestAddr + r.size - 1); p++) out.push(p);
      return out;
    }

    test('dirty log: with logging on, every guest page the backend changes is marked and no other, on every queue; nothing once logging stops', { timeout: 30_000 }, async (t) => {
      await withClient({ numQueues: NUM_QUEUES, memoryBytes: 16 * MiB, memoryRegions: logLayout }, async (c) => {
        requireDirtyLog(c);
        const base = REGION.dirtyLog;
        const unit = segmentUnit(c);
        const diskData = (q: number) => pattern(16 * 1024, 12_000 + q);
        for (let q = 0; q < NUM_QUEUES; q++) await within(c.write(base + q * 256, diskData(q), q), 10_000, `write of known data on queue ${q}`);
        const log = await c.startDirtyLog();
        t.diagnostic(`log: ${log.size} bytes for guest memory up to 0x${(4 * GiB + 8 * MiB).toString(16)}`);

        const labels = new PageLabels();
        const driverOnly = labelRings(c, labels);
        // Request buffers in both regions, away from what the client allocates itself.
        const placer = new GuestPlacer(c, [{ guestAddr: 4 * MiB, size: 4 * MiB - 4096 }, { guestAddr: 4 * GiB + MiB, size: 6 * MiB }]);
        try {
          const plan: PlannedRequest[] = [];
          const indirect = c.hasFeature(Feature.RING_INDIRECT_DESC);
          for (let q = 0; q < NUM_QUEUES; q++) {
            const segs = [{ length: unit }, { length: unit }, { length: 512, inPage: 1536 }].slice(0, Math.max(1, Math.min(3, segMax(c))));
            const readLen = segs.reduce((n, s) => n + s.length, 0);
            plan.push(planRequest(c, placer, { queue: q, type: RequestType.IN, sector: base + q * 256, segments: segs, data: diskData(q).subarray(0, readLen), labels }));
            plan.push(planRequest(c, placer, { queue: q, type: RequestType.IN, sector: base + q * 256 + 16, segments: [{ length: unit }], data: diskData(q).subarray(16 * SECTOR, 16 * SECTOR + unit), labels, indirect }));
            plan.push(planRequest(c, placer, { queue: q, type: RequestType.OUT, sector: base + q * 256 + 64, data: pattern(unit, 12_100 + q), labels }));
            if (c.hasFeature(Feature.BLK_FLUSH)) plan.push(planRequest(c, placer, { queue: q, type: RequestType.FLUSH, labels }));
            plan.push(planRequest(c, placer, { queue: q, type: RequestType.GET_ID, labels }));
            if (c.hasFeature(Feature.BLK_DISCARD)) plan.push(planRequest(c, placer, { queue: q, type: RequestType.DISCARD, sector: base + q * 256 + 128, numSectors: 8, labels }));
          }
          t.diagnostic(`${plan.length} requests: ${plan.map((p) => p.what).join('; ')}`);
          const before = c.snapshotMemory();
          const done = await within(Promise.all(plan.map((p) => c.submitRawChain(p.queue, p.descriptors))), 10_000, 'the requests with logging on');
          plan.forEach((p, i) => p.check(done[i].usedLen));
          const dirty = new Set(c.dirtyPages());
          const after = c.snapshotMemory();
          const snapshots = { before, after };
          const changed = changedPages(before, after);

          // The test is only as good as its buffers: each device-written page really changed.
          const mustChange = new Set<number>();
          for (const p of plan) for (const r of p.deviceWritten) for (let pg = logPage(r.guestAddr); pg <= logPage(r.guestAddr + r.size - 1); pg++) mustChange.add(pg);
          for (let q = 0; q < NUM_QUEUES; q++) for (const pg of deviceRingPages(c, q)) mustChange.add(pg);
          const unchanged = [...mustChange].filter((pg) => !changed.includes(pg)).sort((a, b) => a - b);
          assert.deepEqual(unchanged, [], `pages the device must have written did not change:\n${labels.describe(unchanged, snapshots)}`);

          // (a) No missed page: every page that changed, except those only the driver writes, is marked.
          const missed = changed.filter((pg) => !driverOnly.has(pg) && !dirty.has(pg));
          assert.deepEqual(missed, [], `pages the backend changed with logging on but did not mark in the dirty log (their contents would be stale after migration):\n${labels.describe(missed, snapshots)}`);
          // (b) Nothing marked outside the requests' buffers and the rings.
          const stray = [...dirty].filter((pg) => !labels.has(pg)).sort((a, b) => a - b);
          assert.deepEqual(stray, [], `pages marked in the dirty log that the backend had no business writing:\n${labels.describe(stray, snapshots)}`);
          t.diagnostic(`${changed.length} pages changed, ${dirty.size} marked`);

          // (c) Once logging is off, I/O marks nothing (the back-end may keep the old log mapped; it must not write it).
          const old = await c.stopDirtyLog({ keepLog: true });
          try {
            old!.clear();
            for (let q = 0; q < NUM_QUEUES; q++) {
              await within(c.write(base + q * 256 + 192, pattern(2 * unit, 12_200 + q), q), 10_000, `write on queue ${q} after logging stopped`);
              assertBytes(await within(c.read(base + q * 256 + 192, 2 * unit, q), 10_000, `read on queue ${q}`), pattern(2 * unit, 12_200 + q), `data read back on queue ${q} after logging stopped`);
              if (c.hasFeature(Feature.BLK_FLUSH)) await within(c.flush(q), 10_000, `flush on queue ${q}`);
              await within(c.getId(q), 10_000, `GET_ID on queue ${q}`);
              if (c.hasFeature(Feature.BLK_DISCARD)) await within(c.discard(base + q * 256 + 128, 8, q), 10_000, `discard on queue ${q}`);
            }
            const late = old!.pages();
            assert.deepEqual(late, [], `pages marked in the log after logging was turned off (SET_FEATURES without LOG_ALL, SET_VRING_ADDR without VHOST_VRING_F_LOG):\n${labels.describe(late)}`);
          } finally {
            old?.close();
          }
        } finally {
          placer.free();
        }
      });
    });

    test('dirty log: turned on, replaced (a second SET_LOG_BASE) and off while both queues run: every request completes, data intact', { timeout: 30_000 }, async (t) => {
      await withClient({ numQueues: NUM_QUEUES }, async (c) => {
        requireDirtyLog(c);
        const base = REGION.dirtyToggle;
        const ops = new Array<number>(NUM_QUEUES).fill(0);
        const written = new Map<number, Buffer>();
        let stop = false;
        let failure: Error | undefined;
        const worker = async (q: number) => {
          for (let i = 0; !stop && !failure; i++) {
            const sector = base + q * 1024 + (i % 32) * 16;
            const d = pattern(8192, 13_000 + q * 100_000 + i);
            await c.write(sector, d, q);
            const back = await c.read(sector, 8192, q);
            const diff = firstDiff(back, d);
            if (diff >= 0) throw new Error(`queue ${q}, round ${i}: sector ${sector} read back differs at byte ${diff}`);
            written.set(sector, d);
            ops[q]++;
          }
        };
        const running = Promise.all(Array.from({ length: NUM_QUEUES }, (_, q) => worker(q).catch((e: Error) => { failure = e; })));
        /** Waits until every queue did `n` more write+read rounds. */
        const progress = async (n: number, phase: string) => {
          const target = ops.map((o) => o + n);
          const deadline = Date.now() + 10_000;
          while (ops.some((o, q) => o < target[q])) {
            if (failure) throw new Error(`${phase}: ${failure.message}`);
            if (Date.now() > deadline) throw new Error(`${phase}: no progress (rounds per queue: ${ops.join(', ')})`);
            await sleep(2);
          }
        };
        const expectRingPagesMarked = (pages: number[], phase: string) => {
          for (let q = 0; q < NUM_QUEUES; q++) {
            for (const pg of deviceRingPages(c, q)) assert.ok(pages.includes(pg), `${phase}: queue ${q}'s ${packed ? 'descriptor ring' : 'used ring'} page ${pg} is not marked (marked: ${pages.slice(0, 20).join(' ')})`);
          }
        };
        try {
          await progress(4, 'before logging');
          await c.startDirtyLog();
          await progress(4, 'logging on');
          expectRingPagesMarked(c.dirtyPages(), 'logging on');
          const old = await c.replaceDirtyLog({ keepOld: true });
          try {
            c.clearDirtyLog();
            await progress(4, 'after SET_LOG_BASE with a new log');
            const late = old!.pages();
            assert.deepEqual(late, [], `the backend still wrote into the old log after acknowledging its replacement (pages ${late.join(' ')})`);
            expectRingPagesMarked(c.dirtyPages(), 'new log');
          } finally {
            old?.close();
          }
          await c.stopDirtyLog();
          await progress(4, 'logging off');
          await c.startDirtyLog();
          await progress(4, 'logging on again');
          expectRingPagesMarked(c.dirtyPages(), 'logging on again');
          await c.stopDirtyLog();
          await progress(4, 'logging off again');
        } finally {
          stop = true;
          await within(running, 10_000, 'the I/O loops');
        }
        if (failure) throw failure;
        t.diagnostic(`write+read rounds per queue: ${ops.join(', ')}`);
        for (const [sector, d] of written) assertBytes(await within(c.read(sector, d.length), 10_000, 'final read'), d, `sector ${sector} at the end`);
        assert.equal(c.outstandingRequests, 0, 'requests still outstanding');
      });
    });

    /**
     * A refusal test on a backend of its own: `refuse` sends the bad message(s) and checks the refusal;
     * then the same connection must still do I/O and log properly.
     */
    async function afterRefusal(label: string, refuse: (c: VhostUserBlkClient, t: { diagnostic(s: string): void }) => Promise<boolean>, t: { diagnostic(s: string): void; skip(s: string): void }): Promise<void> {
      await withOwnBackend(label, async (target) => {
        await withClient({ memoryBytes: 16 * MiB, memoryRegions: logLayout }, async (c) => {
          requireDirtyLog(c);
          const sector = REGION.dirtyRefusals;
          const d = pattern(8192, 14_000);
          await within(c.write(sector, d), 10_000, 'write before');
          if (!(await refuse(c, t))) return;
          // The connection goes on: I/O, then logging done right.
          assertBytes(await within(c.read(sector, d.length), 10_000, 'read after the refusal'), d, 'data read after the refusal');
          await c.startDirtyLog();
          const r = await within(c.read(sector, d.length), 10_000, 'read with logging on');
          assertBytes(r, d, 'data read with logging on');
          expectMarked(c, c.dirtyPages(), 'after the refusal, with a proper log');
          await c.stopDirtyLog();
        }, target);
      });
    }

    function expectMarked(c: VhostUserBlkClient, pages: number[], phase: string): void {
      for (const pg of deviceRingPages(c, 0)) assert.ok(pages.includes(pg), `${phase}: queue 0's ${packed ? 'descriptor ring' : 'used ring'} page ${pg} is not marked (marked: ${pages.join(' ')})`);
    }

    test('dirty log refusals: SET_LOG_BASE with a log too small for guest memory (declared, or an fd shorter than declared) is refused; the connection goes on', {
      timeout: 30_000, todo: knownFailures[LOG_BASE_TOO_SMALL],
    }, async (t) => {
      await afterRefusal('log-too-small', async (c) => {
        const need = dirtyLogBytes(c.memoryRegions);
        const cases = [
          { what: `a declared size of 8 bytes (guest memory needs ${need})`, fileBytes: 8, mmapSize: 8 },
          { what: `a declared size of ${need} bytes in a memfd of only 4096`, fileBytes: 4096, mmapSize: need },
        ];
        for (const k of cases) {
          const log = DirtyLogArea.create(k.fileBytes);
          try {
            const reply = await c.connection.request(R.SET_LOG_BASE, encodeLog({ mmapSize: k.mmapSize, mmapOffset: 0 }), { fds: [log.fd], expectReply: true, timeoutMs: 5000 });
            const r = logBaseReplyAccepted(reply, k.mmapSize);
            assert.equal(r.accepted, false, `SET_LOG_BASE with ${k.what}: accepted (reply ${r.value ?? `of ${reply.length} bytes`}), expected a refusal`);
          } finally {
            log.close();
          }
        }
        return true;
      }, t);
    });

    test('dirty log refusals: SET_LOG_BASE without an fd is refused with a reply; the connection goes on', {
      timeout: 30_000, todo: knownFailures[LOG_BASE_NO_FD],
    }, async (t) => {
      await afterRefusal('log-no-fd', async (c) => {
        const need = dirtyLogBytes(c.memoryRegions);
        const reply = await c.connection.request(R.SET_LOG_BASE, encodeLog({ mmapSize: need, mmapOffset: 0 }), { expectReply: true, timeoutMs: 5000 });
        const r = logBaseReplyAccepted(reply, need);
        assert.equal(r.accepted, false, `SET_LOG_BASE without an fd: accepted (reply ${r.value ?? `of ${reply.length} bytes`}), expected a refusal`);
        return true;
      }, t);
    });

    // Not a refusal: QEMU's vhost_dev_start sends SET_FEATURES with LOG_ALL and every SET_VRING_ADDR with
    // VHOST_VRING_F_LOG before SET_LOG_BASE when a device starts while a migration runs (a guest that resets
    // its disk mid-migration). A backend that refused LOG_ALL without a log would fail that start.
    test('dirty log: LOG_ALL and logged rings before SET_LOG_BASE (QEMU\'s order for a device started mid-migration) are accepted; I/O goes on; the log then works', {
      timeout: 30_000,
    }, async (t) => {
      await withClient({ numQueues: NUM_QUEUES, memoryBytes: 16 * MiB, memoryRegions: logLayout }, async (c) => {
        requireDirtyLog(c);
        const sector = REGION.dirtyRefusals + 4096;
        const d = pattern(8192, 14_100);
        await within(c.write(sector, d), 10_000, 'write before');
        if (has(c.protocolFeatures, ProtocolFeature.REPLY_ACK)) {
          // LOG_ALL with no log yet, acked; I/O while there is nothing to log into.
          await c.connection.request(R.SET_FEATURES, encodeU64(c.features | (1n << BigInt(VHOST_F_LOG_ALL))), { needReply: true, timeoutMs: 5000 });
          for (let q = 0; q < NUM_QUEUES; q++) assertBytes(await within(c.read(sector, d.length, q), 10_000, `read on queue ${q} with LOG_ALL and no log`), d, `data read on queue ${q} with LOG_ALL and no log`);
          await c.connection.request(R.SET_FEATURES, encodeU64(c.features), { needReply: true, timeoutMs: 5000 });
        } else {
          t.diagnostic('REPLY_ACK not negotiated: LOG_ALL alone is not checked');
        }
        await c.startDirtyLog({ logBaseLast: true });
        c.clearDirtyLog();
        for (let q = 0; q < NUM_QUEUES; q++) {
          assertBytes(await within(c.read(sector, d.length, q), 10_000, `read on queue ${q} with logging on`), d, `data read on queue ${q} with logging on`);
        }
        const pages = c.dirtyPages();
        for (let q = 0; q < NUM_QUEUES; q++) {
          for (const pg of deviceRingPages(c, q)) assert.ok(pages.includes(pg), `queue ${q}'s ${packed ? 'descriptor ring' : 'used ring'} page ${pg} is not marked once the log came last (marked: ${pages.join(' ')})`);
        }
        await c.stopDirtyLog();
      });
    });

    test('the backend exits cleanly (code 0) on SIGTERM, with an idle front-end still connected', { timeout: TEST_TIMEOUT }, async () => {
      for (const c of open) await c.close();
      open.clear();
      const c = await connect({});
      await within(c.write(REGION.plain + 1536, pattern(4096, 9000)), 10_000, 'write');
      stopped = true;
      const code = await backend!.stop();
      await disconnect(c, false);
      assert.equal(code, 0, `exit code${logTail()}`);
      assertBytes(readImage(image, (REGION.plain + 1536) * SECTOR, 4096), pattern(4096, 9000), 'image file: the last write');
      assert.equal(statSync(image).size, IMAGE_BYTES, 'image size unchanged');
    });
  });
}
