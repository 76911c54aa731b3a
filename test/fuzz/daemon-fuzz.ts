/**
 * Property-based fuzzing of a live daemon (`bin/vhost-blk serve --backend null`) over its vhost-user
 * socket: random and mutated message sequences (request codes, flags, sizes that lie, payloads, 0-40 fds
 * of eventfds, memfds, sockets and /dev/null), optionally after a valid handshake that goes as far as a
 * memory table and a started ring over random guest memory, and optionally followed by garbage.
 *
 * After the sequence the fuzzer completes the framing (so the daemon is not left waiting for bytes
 * it was promised) and sends a GET_FEATURES probe. The daemon must answer the probe or close the
 * connection within a few seconds; every reply must be well formed and answer a request that was sent,
 * in order; it must never answer a probe that follows a header it had to refuse. Then the daemon must
 * be alive, a fresh connection must complete a GET_FEATURES handshake, and the daemon must hold no more
 * file descriptors than before the case.
 */
import fc from 'fast-check';
import { mkdtempSync, openSync, readdirSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VhostUserConnection } from '../../src/frontend/index.js';
import { closeQuietly, eventfd, eventfdSignal, ftruncate, memfdCreate, socketPair } from '../../src/os/libc.js';
import {
  FLAG_NEED_REPLY, FLAG_REPLY, FrontendRequest as R, HEADER_SIZE, MAX_PAYLOAD_SIZE, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES,
  encodeConfig, encodeHeader, encodeInflight, encodeMemRegion, encodeMemTable, encodeU64, encodeVringAddr, encodeVringFd, encodeVringState,
} from '../../src/vhost-user/messages.js';
import { Feature } from '../../src/blk/constants.js';
import { applyEdits, editArb, type Edit } from './codec-fuzz.js';
import { Prng } from './prng.js';
import { Violation, check } from './violation.js';
import { MiB, sleep, startDaemon as spawnDaemon, stopDaemon as stopProcess, type Daemon } from '../unit/daemon-process.js';

/** Guest memory of the handshake: one region of this size at guest address 0, user address USER_BASE. */
const GUEST_BYTES = MiB;
const USER_BASE = 0x7000_0000_0000;
/** How long the daemon may take to answer the probe or close the connection. */
const ANSWER_MS = 4000;

/** Kinds of file descriptor a message can carry. */
type FdKind = 'eventfd' | 'memfd' | 'socket' | 'devnull';

/** One message put on the wire. */
export interface WireMessage {
  /** Request code in the header. */
  request: number;
  /** Flags word in the header (mostly version 1, with or without NEED_REPLY). */
  flags: number;
  /** How the payload is made: a well-formed one for `request` (then edited), or random bytes. */
  payload: { kind: 'valid'; edits: Edit[] } | { kind: 'random'; bytes: Uint8Array };
  /** Added to the real payload length in the header (a header that lies about its size). */
  sizeDelta: number;
  /** File descriptors attached to the message's first byte. */
  fds: FdKind[];
}

/** One connection's worth of fuzzing. */
export interface DaemonCase {
  /** 0: nothing first; 1: feature negotiation; 2: and a memory table; 3: and a started ring over random memory. */
  prefix: number;
  /** Seed of payloads, guest memory and handshake choices. */
  seed: number;
  /** Ring options of prefix 3. */
  queueSizeLog2: number;
  /** Prefix 3: the used ring (split) is placed over the avail ring. */
  overlapRings: boolean;
  /** The random part. */
  messages: WireMessage[];
  /** Random bytes after the messages. */
  garbage: Uint8Array | null;
}

const KNOWN = Object.values(R) as number[];

const wireArb: fc.Arbitrary<WireMessage> = fc.record({
  request: fc.oneof({ weight: 10, arbitrary: fc.constantFrom(...KNOWN) }, { weight: 1, arbitrary: fc.nat({ max: 0xffffffff }) }, { weight: 1, arbitrary: fc.constantFrom(0, 44, 99) }),
  flags: fc.oneof({ weight: 30, arbitrary: fc.constantFrom(1, 1 | FLAG_NEED_REPLY) }, { weight: 1, arbitrary: fc.constantFrom(0, 2, 3, 5, 0x101, 0xffffffff) }, { weight: 1, arbitrary: fc.nat({ max: 0xffffffff }) }),
  payload: fc.oneof(
    { weight: 4, arbitrary: fc.record({ kind: fc.constant('valid' as const), edits: fc.array(editArb, { maxLength: 2 }) }) },
    { weight: 1, arbitrary: fc.record({ kind: fc.constant('random' as const), bytes: fc.uint8Array({ maxLength: 80 }) }) },
  ),
  sizeDelta: fc.oneof({ weight: 30, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: -8, max: 8 }) }, { weight: 1, arbitrary: fc.constantFrom(4097, 1 << 20, 0xffff0000) }),
  fds: fc.oneof(
    { weight: 6, arbitrary: fc.array(fc.constantFrom<FdKind>('eventfd', 'memfd', 'socket', 'devnull'), { maxLength: 3 }) },
    { weight: 1, arbitrary: fc.integer({ min: 30, max: 40 }).map((n) => Array<FdKind>(n).fill('eventfd')) },
  ),
});

/** fast-check arbitrary for one live case. */
export const daemonCaseArb: fc.Arbitrary<DaemonCase> = fc.record({
  prefix: fc.nat({ max: 3 }),
  seed: fc.nat({ max: 0xffffffff }),
  queueSizeLog2: fc.integer({ min: 0, max: 8 }),
  overlapRings: fc.oneof({ weight: 5, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
  messages: fc.array(wireArb, { maxLength: 8 }),
  garbage: fc.oneof({ weight: 3, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: fc.uint8Array({ minLength: 1, maxLength: 200 }) }),
});

/** A well-formed payload for `req`, with values mostly inside the handshake's guest memory. */
function validPayload(req: number, p: Prng): Uint8Array {
  const index = p.chance(0.8) ? 0 : p.below(3);
  const inMem = () => USER_BASE + 64 * p.below(GUEST_BYTES / 64);
  switch (req) {
    case R.SET_FEATURES:
    case R.SET_PROTOCOL_FEATURES:
    case R.SET_STATUS:
      return encodeU64(BigInt(p.u32()) | (BigInt(p.u32()) << 32n));
    case R.SET_VRING_NUM:
    case R.SET_VRING_BASE:
    case R.GET_VRING_BASE:
    case R.SET_VRING_ENABLE:
    case R.SET_VRING_ENDIAN:
    case R.VRING_KICK:
      return encodeVringState(index, p.chance(0.5) ? 1 << p.below(16) : p.below(3));
    case R.SET_VRING_ADDR:
      return encodeVringAddr({ index, flags: p.below(2), descUserAddr: inMem(), usedUserAddr: inMem(), availUserAddr: inMem(), logGuestAddr: 0 });
    case R.SET_VRING_KICK:
    case R.SET_VRING_CALL:
    case R.SET_VRING_ERR:
      return encodeVringFd(index, p.chance(0.3));
    case R.SET_MEM_TABLE:
      return encodeMemTable(Array.from({ length: p.below(3) }, (_, i) => ({ guestAddr: i * 2 * MiB, size: MiB, userAddr: USER_BASE + i * 2 * MiB, mmapOffset: 0 })));
    case R.ADD_MEM_REG:
    case R.REM_MEM_REG:
      return encodeMemRegion({ guestAddr: 4 * MiB * p.below(4), size: MiB, userAddr: USER_BASE + 4 * MiB * p.below(4), mmapOffset: 0 });
    case R.GET_CONFIG:
    case R.SET_CONFIG: {
      const size = p.below(64);
      return encodeConfig(p.below(64), size, p.below(2), new Uint8Array(size).map(() => p.u32() & 0xff));
    }
    case R.GET_INFLIGHT_FD:
    case R.SET_INFLIGHT_FD:
      return encodeInflight({ mmapSize: p.chance(0.5) ? 0 : 4096 * p.below(64), mmapOffset: 0, numQueues: 1 + p.below(2), queueSize: 1 << p.below(10) });
    case R.SET_LOG_BASE:
      return new Uint8Array(16);
    default:
      return new Uint8Array(0);
  }
}

export type { Daemon };

/** Starts `bin/vhost-blk serve --backend null` (two queues) in a fresh directory. */
export async function startDaemon(): Promise<Daemon> {
  const dir = mkdtempSync(join(tmpdir(), 'vblk-fuzz-'));
  return spawnDaemon(dir, ['--backend', 'null', '--size', '64M', '--num-queues', '2']);
}

/** SIGTERM (SIGKILL after 5 s), removes its directory; resolves with the exit code (null if killed). */
export async function stopDaemon(d: Daemon): Promise<number | null> {
  const code = await stopProcess(d);
  rmSync(d.dir, { recursive: true, force: true });
  return code;
}

/** The end of the daemon's log, for failure reports. */
function logTail(d: Daemon): string {
  return d.log.join('').split('\n').slice(-40).join('\n');
}

function alive(d: Daemon): boolean {
  return d.proc.exitCode === null && d.proc.signalCode === null;
}

/** Number of file descriptors the daemon holds now. */
export function fdCount(d: Daemon): number {
  return readdirSync(`/proc/${d.proc.pid}/fd`).length;
}

/** A connection the daemon serves: GET_FEATURES answered (it turns others away while a session tears down). */
export async function openSession(d: Daemon): Promise<{ conn: VhostUserConnection; features: bigint }> {
  const deadline = Date.now() + 10_000;
  let last: unknown = null;
  while (Date.now() < deadline) {
    check(alive(d), `the daemon died (${d.proc.signalCode ?? d.proc.exitCode}):\n${logTail(d)}`);
    let conn: VhostUserConnection;
    try {
      conn = VhostUserConnection.connect(d.socket);
    } catch (err) {
      last = err;
      await sleep(20);
      continue;
    }
    try {
      const f = await conn.request(R.GET_FEATURES, undefined, { expectReply: true, timeoutMs: 2000 });
      check(f.length === 8, `GET_FEATURES answered with ${f.length} bytes`);
      return { conn, features: f.readBigUInt64LE(0) };
    } catch (err) {
      if (err instanceof Violation) throw err;
      last = err;
      conn.close();
      await sleep(20);
    }
  }
  throw new Violation(`a fresh connection gets no GET_FEATURES answer for 10 s (${(last as Error)?.message}):\n${logTail(d)}`);
}

/** Makes an fd of `kind` (the caller closes it after sending: the daemon gets its own copy). */
function makeFd(kind: FdKind, p: Prng, extra: number[]): number {
  switch (kind) {
    case 'eventfd':
      return eventfd(0);
    case 'memfd': {
      const fd = memfdCreate('fuzz');
      ftruncate(fd, p.chance(0.5) ? MiB : 4096 * p.below(512));
      return fd;
    }
    case 'socket': {
      const [a, b] = socketPair();
      extra.push(b);
      return a;
    }
    default:
      return openSync('/dev/null', 'r');
  }
}

/** Requests the daemon answers with a reply body of their own (every other one only with an ack, if asked). */
const SELF_REPLYING = new Set<number>([R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS, R.GET_CONFIG, R.GET_VRING_BASE, R.GET_INFLIGHT_FD, R.GET_STATUS, R.POSTCOPY_END, R.IOTLB_MSG, R.SET_DEVICE_STATE_FD, R.CHECK_DEVICE_STATE]);

/** Counts of what the live cases exercised. */
export const daemonStats = { cases: 0, messages: 0, replies: 0, probeAnswered: 0, closed: 0, ringsStarted: 0 };

/**
 * The valid handshake of `c.prefix`; returns whether REPLY_ACK is on. Refusals here are findings: every
 * message is one QEMU would send.
 */
async function handshake(conn: VhostUserConnection, features: bigint, c: DaemonCase, p: Prng, owned: number[]): Promise<void> {
  if (c.prefix < 1) return;
  await conn.request(R.SET_OWNER);
  const offered = (await conn.request(R.GET_PROTOCOL_FEATURES, undefined, { expectReply: true, timeoutMs: ANSWER_MS })).readBigUInt64LE(0);
  const pf = offered & ((1n << BigInt(ProtocolFeature.REPLY_ACK)) | (1n << BigInt(ProtocolFeature.MQ)) | (1n << BigInt(ProtocolFeature.CONFIG)) | (p.chance(0.5) ? offered : 0n));
  await conn.request(R.SET_PROTOCOL_FEATURES, encodeU64(pf));
  const ack = { needReply: (pf & (1n << BigInt(ProtocolFeature.REPLY_ACK))) !== 0n, timeoutMs: ANSWER_MS };
  // Offered features, a random subset of the optional ones dropped; PROTOCOL_FEATURES kept mostly.
  const mask = BigInt(p.u32()) | (BigInt(p.u32()) << 32n) | (1n << 32n) | (p.chance(0.9) ? 1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES) : 0n);
  const wanted = features & mask;
  await conn.request(R.SET_FEATURES, encodeU64(wanted), ack);
  if (c.prefix < 2) return;
  const mem = memfdCreate('fuzz-guest');
  owned.push(mem);
  ftruncate(mem, GUEST_BYTES);
  const guest = new Uint8Array(GUEST_BYTES);
  p.fill(guest);
  const size = 1 << c.queueSizeLog2;
  const desc = 0;
  const avail = 16 * size;
  const used = c.overlapRings ? avail : Math.ceil((avail + 6 + 2 * size) / 4096) * 4096;
  // Descriptors mostly pointing into guest memory with small lengths, the avail index a little ahead.
  const dv = new DataView(guest.buffer);
  for (let i = 0; i < size; i++) {
    if (p.chance(0.3)) continue;
    dv.setUint32(desc + 16 * i, p.below(GUEST_BYTES), true);
    dv.setUint32(desc + 16 * i + 4, 0, true);
    dv.setUint32(desc + 16 * i + 8, p.chance(0.5) ? 16 : p.below(4096), true);
    dv.setUint16(desc + 16 * i + 12, p.below(8), true);
    dv.setUint16(desc + 16 * i + 14, p.below(size + 1), true);
  }
  // Split: the next avail index. Packed: avail slot and wrap counter, used ones in the upper half (nothing in flight).
  const packed = (wanted & (1n << BigInt(Feature.RING_PACKED))) !== 0n;
  const slot = p.below(size) | (p.below(2) << 15);
  const base = packed ? slot + slot * 65536 : p.below(0x10000);
  for (let i = 0; i < size; i++) dv.setUint16(avail + 4 + 2 * i, p.below(size + 1), true);
  if (p.chance(0.8)) dv.setUint16(avail + 2, (base + p.below(size + 2)) & 0xffff, true);
  if (p.chance(0.5)) dv.setUint16(used + 2, base, true);
  writeSync(mem, guest, 0, GUEST_BYTES, 0);
  await conn.request(R.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0, size: GUEST_BYTES, userAddr: USER_BASE, mmapOffset: 0 }]), { ...ack, fds: [mem] });
  if (c.prefix < 3) return;
  const kick = eventfd(0);
  const call = eventfd(0);
  owned.push(kick, call);
  await conn.request(R.SET_VRING_NUM, encodeVringState(0, size), ack);
  await conn.request(R.SET_VRING_BASE, encodeVringState(0, base), ack);
  await conn.request(R.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 0, descUserAddr: USER_BASE + desc, availUserAddr: USER_BASE + avail, usedUserAddr: USER_BASE + used, logGuestAddr: 0 }), ack);
  await conn.request(R.SET_VRING_CALL, encodeVringFd(0, false), { ...ack, fds: [call] });
  await conn.request(R.SET_VRING_KICK, encodeVringFd(0, false), { ...ack, fds: [kick] });
  if ((wanted & (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES))) !== 0n) await conn.request(R.SET_VRING_ENABLE, encodeVringState(0, 1), ack);
  eventfdSignal(kick);
  daemonStats.ringsStarted++;
}

/** Runs one live case against `d`; throws Violation on a broken rule. */
export async function runDaemonCase(d: Daemon, c: DaemonCase): Promise<void> {
  daemonStats.cases++;
  const p = new Prng(c.seed);
  const { conn, features } = await openSession(d);
  const fdsBefore = fdCount(d);
  const owned: number[] = [];
  try {
    try {
      await handshake(conn, features, c, p, owned);
    } catch (err) {
      throw new Violation(`the valid handshake (prefix ${c.prefix}) failed: ${(err as Error).message}\n${logTail(d)}`);
    }
    // The bytes of the random part, and what the daemon's framing makes of them.
    const chunks: { bytes: Uint8Array; fds: number[] }[] = [];
    for (const m of c.messages) {
      const payload = m.payload.kind === 'valid' ? applyEdits(validPayload(m.request, p), m.payload.edits) : m.payload.bytes;
      const size = Math.max(0, Math.min(0xffffffff, payload.length + m.sizeDelta));
      const bytes = new Uint8Array(HEADER_SIZE + payload.length);
      bytes.set(encodeHeader(m.request >>> 0, m.flags >>> 0, size));
      bytes.set(payload, HEADER_SIZE);
      const extra: number[] = [];
      const fds = m.fds.map((k) => makeFd(k, p, extra));
      owned.push(...fds, ...extra);
      chunks.push({ bytes, fds });
      daemonStats.messages++;
    }
    if (c.garbage) chunks.push({ bytes: c.garbage, fds: [] });
    const stream = concat(chunks.map((x) => x.bytes));
    const framing = frame(stream);
    if (framing.pad > 0) chunks.push({ bytes: new Uint8Array(framing.pad), fds: [] });
    chunks.push({ bytes: encodeHeader(R.GET_FEATURES, 1, 0), fds: [] });
    const probeIndex = framing.requests.length;
    const requests = [...framing.requests, R.GET_FEATURES];
    let sendFailed = false;
    for (const ch of chunks) {
      try {
        conn.sendRaw(ch.bytes, ch.fds);
      } catch {
        sendFailed = true; // the daemon closed (or stopped reading after a bad header): checked below
        break;
      }
    }
    // Replies, in order, until the probe's or the end of the stream.
    let next = 0;
    for (;;) {
      let reply;
      try {
        reply = await conn.receiveReply(ANSWER_MS);
      } catch (err) {
        throw new Violation(`the daemon neither answered the probe nor closed the connection (${(err as Error).message}); framing ${framing.badHeader ? 'broken by a bad header' : 'intact'}${sendFailed ? ', a send failed' : ''}`);
      }
      if (!reply) {
        daemonStats.closed++;
        break;
      }
      for (const fd of reply.fds) closeQuietly(fd);
      daemonStats.replies++;
      check(reply.flags === (1 | FLAG_REPLY), `a reply with flags 0x${reply.flags.toString(16)}`);
      check(reply.payload.length <= MAX_PAYLOAD_SIZE, `a reply of ${reply.payload.length} bytes`);
      let j = next;
      while (j < requests.length && requests[j] !== reply.request) j++;
      check(j < requests.length, `a reply for request ${reply.request}, which was not sent (or answered out of order)`);
      if (!SELF_REPLYING.has(reply.request)) check(reply.payload.length === 8, `an ack of ${reply.payload.length} bytes for request ${reply.request}`);
      next = j + 1;
      if (j === probeIndex) {
        check(!framing.badHeader, 'the daemon answered a probe that followed a header it should have refused');
        check(reply.payload.length === 8, `the probe's GET_FEATURES reply has ${reply.payload.length} bytes`);
        daemonStats.probeAnswered++;
        break;
      }
    }
  } finally {
    conn.close();
    for (const fd of owned) closeQuietly(fd);
  }
  check(alive(d), `the daemon died (${d.proc.signalCode ?? d.proc.exitCode}):\n${logTail(d)}`);
  // A fresh connection is served only once this case's session is torn down: its fds must be gone by then.
  const fresh = await openSession(d);
  const n = fdCount(d);
  fresh.conn.close();
  check(n <= fdsBefore, `after the case the daemon holds ${n} file descriptors with one fresh connection, ${fdsBefore} before it (leak)`);
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, x) => n + x.length, 0));
  let o = 0;
  for (const x of parts) {
    out.set(x, o);
    o += x.length;
  }
  return out;
}

/**
 * The daemon's framing of `stream`: the request codes of complete messages, whether a header it must
 * refuse (version not 1, REPLY set, size above the maximum) ends the stream, and how many zero bytes
 * complete the last message (a partial header is completed with zeros too, then judged).
 */
function frame(stream: Uint8Array): { requests: number[]; badHeader: boolean; pad: number } {
  let pad = 0;
  for (;;) {
    const r = frameOnce(stream);
    if (r.pad === 0) return { requests: r.requests, badHeader: r.badHeader, pad };
    pad += r.pad;
    stream = concat([stream, new Uint8Array(r.pad)]);
  }
}

function frameOnce(stream: Uint8Array): { requests: number[]; badHeader: boolean; pad: number } {
  const dv = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  const requests: number[] = [];
  let pos = 0;
  for (;;) {
    if (pos === stream.length) return { requests, badHeader: false, pad: 0 };
    if (pos + HEADER_SIZE > stream.length) return { requests, badHeader: false, pad: pos + HEADER_SIZE - stream.length };
    const request = dv.getUint32(pos, true);
    const flags = dv.getUint32(pos + 4, true);
    const size = dv.getUint32(pos + 8, true);
    if ((flags & 3) !== 1 || (flags & FLAG_REPLY) !== 0 || size > MAX_PAYLOAD_SIZE) return { requests, badHeader: true, pad: 0 };
    if (pos + HEADER_SIZE + size > stream.length) return { requests, badHeader: false, pad: pos + HEADER_SIZE + size - stream.length };
    requests.push(request);
    pos += HEADER_SIZE + size;
  }
}

/** Runs `numRuns` live cases (or until `deadline`), checking the daemon at the end; returns fast-check's details. */
export async function checkDaemon(params: fc.Parameters<[DaemonCase]>): Promise<fc.RunDetails<[DaemonCase]>> {
  const d = await startDaemon();
  let details: fc.RunDetails<[DaemonCase]>;
  try {
    // A first session warms the daemon up (worker threads), so later fd counts compare like with like.
    const first = await openSession(d);
    first.conn.close();
    details = await fc.check(fc.asyncProperty(daemonCaseArb, (c) => runDaemonCase(d, c)), params);
    if (!details.failed) {
      const { conn: last } = await openSession(d);
      last.close();
    }
  } finally {
    const wasAlive = alive(d);
    const code = await stopDaemon(d);
    if (wasAlive && code !== 0) throw new Violation(`the daemon did not exit cleanly on SIGTERM after the fuzzing (${code}):\n${logTail(d)}`);
  }
  return details;
}
