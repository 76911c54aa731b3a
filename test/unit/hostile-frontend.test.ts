// A hostile front-end against the real daemon process: malformed messages, bad fds, corrupt rings.
// Each case runs on a fresh connection; afterwards a well-behaved client must still get correct I/O, the
// daemon must not have leaked file descriptors, and at the end it must exit 0 on SIGTERM.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readdirSync, rmSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  VhostUserBlkClient, VhostUserConnection, STATUS_NOT_WRITTEN, type ClientOptions, type RawReply,
} from '../../src/frontend/index.js';
import { RequestType, Status } from '../../src/blk/constants.js';
import {
  FrontendRequest as R, ProtocolFeature, encodeConfig, encodeHeader, encodeMemTable, encodeRequest, encodeU64, encodeVringAddr,
  encodeVringFd, encodeVringState,
} from '../../src/vhost-user/messages.js';
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../../src/virtqueue/split.js';
import { closeQuietly, eventfd, memfdCreate, ftruncate } from '../../src/os/libc.js';
import { pattern } from '../image-data.js';

const REPO = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const BIN = join(REPO, 'bin', 'vhost-blk');
const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

interface Daemon {
  proc: ChildProcess;
  socket: string;
  log: string[];
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Starts `bin/vhost-blk serve` with `args` and waits for its socket. */
async function startDaemon(dir: string, args: string[]): Promise<Daemon> {
  const socket = join(dir, 's');
  const proc = spawn(process.execPath, [BIN, 'serve', '--socket', socket, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  const log: string[] = [];
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => log.push(d));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
  const deadline = Date.now() + 10_000;
  while (!existsSync(socket)) {
    if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`daemon exited before listening:\n${log.join('')}`);
    if (Date.now() > deadline) throw new Error(`daemon did not create ${socket}:\n${log.join('')}`);
    await sleep(20);
  }
  return { proc, socket, log, exit };
}

/** SIGTERM and the way it exited (SIGKILL after 5 s). */
async function stopDaemon(d: Daemon): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (d.proc.exitCode !== null || d.proc.signalCode !== null) return { code: d.proc.exitCode, signal: d.proc.signalCode };
  d.proc.kill('SIGTERM');
  const timer = setTimeout(() => d.proc.kill('SIGKILL'), 5000);
  const how = await d.exit;
  clearTimeout(timer);
  return how;
}

function alive(d: Daemon): boolean {
  return d.proc.exitCode === null && d.proc.signalCode === null;
}

/** Connects a client, retrying while the daemon still tears down the previous connection. */
async function connectClient(socket: string, opts: ClientOptions = {}): Promise<VhostUserBlkClient> {
  const deadline = Date.now() + 5000;
  for (;;) {
    try {
      return await VhostUserBlkClient.connect(socket, { requestTimeoutMs: 3000, ...opts });
    } catch (err) {
      if (Date.now() > deadline || !/closed the connection|ECONNRESET|EPIPE/.test((err as Error).message)) throw err;
      await sleep(20);
    }
  }
}

/**
 * A raw connection the daemon is really serving (it turns away a second front-end while the previous one
 * is torn down): GET_FEATURES answered, then REPLY_ACK (+ CONFIG, MQ) negotiated unless `ack` is false.
 */
async function openSession(socket: string, ack = true): Promise<VhostUserConnection> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const conn = VhostUserConnection.connect(socket);
    try {
      await conn.request(R.GET_FEATURES, undefined, { expectReply: true, timeoutMs: 2000 });
    } catch (err) {
      conn.close();
      if (Date.now() > deadline) throw err;
      await sleep(20);
      continue;
    }
    if (ack) {
      const offered = (await conn.request(R.GET_PROTOCOL_FEATURES, undefined, { expectReply: true })).readBigUInt64LE(0);
      const want = [ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG, ProtocolFeature.MQ].reduce((a, b) => a | (1n << BigInt(b)), 0n);
      assert.equal(offered & want, want, 'daemon offers REPLY_ACK, CONFIG and MQ');
      await conn.request(R.SET_PROTOCOL_FEATURES, encodeU64(want));
    }
    return conn;
  }
}

type Event = { kind: 'reply'; reply: RawReply } | { kind: 'closed' } | { kind: 'silent' };

/** What the daemon does next on `conn`: replies, closes, or stays silent for `ms`. */
async function nextEvent(conn: VhostUserConnection, ms = 2000): Promise<Event> {
  try {
    const reply = await conn.receiveReply(ms);
    if (!reply) return { kind: 'closed' };
    for (const fd of reply.fds) closeQuietly(fd);
    return { kind: 'reply', reply };
  } catch (err) {
    if (/no reply within/.test((err as Error).message)) return { kind: 'silent' };
    throw err;
  }
}

/** The daemon refused request `req` with a non-zero REPLY_ACK and still serves the connection. */
async function expectRefused(conn: VhostUserConnection, req: number, what: string): Promise<void> {
  const ev = await nextEvent(conn);
  assert.equal(ev.kind, 'reply', `${what}: expected a REPLY_ACK, got ${ev.kind}`);
  const r = (ev as { reply: RawReply }).reply;
  assert.equal(r.request, req, `${what}: ack is for request ${r.request}`);
  assert.equal(r.flags, 0x5, `${what}: reply flags`);
  assert.equal(r.payload.length, 8, `${what}: ack payload size`);
  assert.notEqual(r.payload.readBigUInt64LE(0), 0n, `${what}: ack must report failure`);
  await expectServing(conn, what);
}

/** The connection still answers a well-formed request. */
async function expectServing(conn: VhostUserConnection, what: string): Promise<void> {
  const f = await conn.request(R.GET_FEATURES, undefined, { expectReply: true, timeoutMs: 2000 });
  assert.equal(f.length, 8, `${what}: GET_FEATURES still answered`);
}

/** The daemon ends the connection (within 2 s) without replying. */
async function expectClosed(conn: VhostUserConnection, what: string): Promise<void> {
  const ev = await nextEvent(conn);
  assert.equal(ev.kind, 'closed', `${what}: expected the daemon to close the connection, got ${ev.kind}`);
}

/**
 * A GET_CONFIG the daemon cannot serve: vhost-user.rst has it answer with a zero-length payload; closing
 * the connection is accepted too.
 */
async function expectConfigRefused(conn: VhostUserConnection, what: string): Promise<void> {
  const ev = await nextEvent(conn);
  if (ev.kind === 'closed') return;
  assert.equal(ev.kind, 'reply', `${what}: expected a zero-length reply or a closed connection, got ${ev.kind}`);
  const r = (ev as { reply: RawReply }).reply;
  assert.equal(r.request, R.GET_CONFIG, `${what}: reply request`);
  assert.equal(r.payload.length, 0, `${what}: an error reply has no payload`);
  await expectServing(conn, what);
}

/** Sends a request with NEED_REPLY set. */
function sendNeedReply(conn: VhostUserConnection, req: number, payload: Uint8Array, fds: number[] = []): void {
  conn.sendRaw(encodeRequest(req, payload, true), fds);
}


describe('hostile front-end against a live daemon', { timeout: 60_000 }, () => {
  let dir: string;
  let daemon: Daemon;
  let baselineFds = 0;
  let round = 0;

  const fdCount = (): number => readdirSync(`/proc/${daemon.proc.pid}/fd`).length;

  /** A well-behaved client does correct I/O; the daemon is alive and back to its baseline fd count. */
  async function healthy(what: string): Promise<void> {
    assert.ok(alive(daemon), `${what}: daemon died:\n${daemon.log.join('')}`);
    const c = await connectClient(daemon.socket);
    try {
      const seed = ++round;
      const sector = (seed * 64) % 30000;
      await c.write(sector, pattern(8192, seed));
      assert.deepEqual(await c.read(sector, 8192), pattern(8192, seed), `${what}: read back after the case`);
      assert.deepEqual(c.anomalies, []);
    } finally {
      await c.close();
    }
    assert.ok(alive(daemon), `${what}: daemon died`);
    // Session teardown is asynchronous: give it a moment to release everything.
    let n = fdCount();
    for (let i = 0; i < 100 && n !== baselineFds; i++) {
      await sleep(20);
      n = fdCount();
    }
    assert.equal(n, baselineFds, `${what}: daemon holds ${n} fds, ${baselineFds} before (leak)`);
  }

  /** Runs one hostile case on a fresh session, closes it, then checks the daemon is healthy. */
  async function hostile(what: string, body: (conn: VhostUserConnection) => Promise<void>, ack = true): Promise<void> {
    const conn = await openSession(daemon.socket, ack);
    try {
      await body(conn);
    } finally {
      conn.close();
    }
    await healthy(what);
  }

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vblk-hostile-'));
    const image = join(dir, 'disk.raw');
    closeSync(openSync(image, 'w'));
    truncateSync(image, 16 * MiB);
    daemon = await startDaemon(dir, ['--image', image]);
    // Warm up (worker threads, first session), then take the fd baseline.
    const c = await connectClient(daemon.socket);
    await c.write(0, Buffer.alloc(4096, 1));
    await c.close();
    await sleep(200);
    baselineFds = fdCount();
  });

  after(async () => {
    if (!daemon) return;
    const wasAlive = alive(daemon);
    const how = await stopDaemon(daemon);
    rmSync(dir, { recursive: true, force: true });
    assert.ok(wasAlive, `daemon was dead before SIGTERM (${how.signal ?? how.code}):\n${daemon.log.join('')}`);
    assert.deepEqual(how, { code: 0, signal: null }, `daemon exit on SIGTERM:\n${daemon.log.join('')}`);
  });

  test('wrong payload sizes: SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE are refused', async () => {
    await hostile('bad sizes', async (conn) => {
      sendNeedReply(conn, R.SET_VRING_NUM, Buffer.alloc(4));
      await expectRefused(conn, R.SET_VRING_NUM, 'SET_VRING_NUM with 4 bytes');
      sendNeedReply(conn, R.SET_VRING_NUM, Buffer.alloc(16));
      await expectRefused(conn, R.SET_VRING_NUM, 'SET_VRING_NUM with 16 bytes');
      sendNeedReply(conn, R.SET_VRING_ADDR, Buffer.alloc(39));
      await expectRefused(conn, R.SET_VRING_ADDR, 'SET_VRING_ADDR with 39 bytes');
      sendNeedReply(conn, R.SET_VRING_BASE, Buffer.alloc(0));
      await expectRefused(conn, R.SET_VRING_BASE, 'SET_VRING_BASE with no payload');
      sendNeedReply(conn, R.SET_FEATURES, Buffer.alloc(7));
      await expectRefused(conn, R.SET_FEATURES, 'SET_FEATURES with 7 bytes');
    });
  });

  test('GET_CONFIG with a malformed payload is refused (zero-length reply) or ends the connection', async () => {
    await hostile('GET_CONFIG 11 bytes', async (conn) => {
      conn.sendRaw(encodeRequest(R.GET_CONFIG, Buffer.alloc(11)));
      await expectConfigRefused(conn, 'GET_CONFIG with 11 bytes');
    });
    await hostile('GET_CONFIG size/payload mismatch', async (conn) => {
      // Header says 60 bytes of config, but only the 12-byte config header is there.
      conn.sendRaw(encodeRequest(R.GET_CONFIG, encodeConfig(0, 60, 0).subarray(0, 12)));
      await expectConfigRefused(conn, 'GET_CONFIG size mismatch');
    });
    await hostile('GET_CONFIG past the config space', async (conn) => {
      conn.sendRaw(encodeRequest(R.GET_CONFIG, encodeConfig(250, 60, 0)));
      await expectConfigRefused(conn, 'GET_CONFIG at offset 250');
    });
  });

  test('SET_MEM_TABLE whose region count does not match its fds is refused, and the fds are closed', async () => {
    const memfd = memfdCreate('hostile');
    const memfd2 = memfdCreate('hostile2');
    try {
      ftruncate(memfd, MiB);
      ftruncate(memfd2, MiB);
      const one = encodeMemTable([{ guestAddr: 0, size: MiB, userAddr: 0x7000_0000_0000, mmapOffset: 0 }]);
      const two = encodeMemTable([
        { guestAddr: 0, size: MiB, userAddr: 0x7000_0000_0000, mmapOffset: 0 },
        { guestAddr: 2 * MiB, size: MiB, userAddr: 0x7000_1000_0000, mmapOffset: 0 },
      ]);
      await hostile('SET_MEM_TABLE fd count', async (conn) => {
        sendNeedReply(conn, R.SET_MEM_TABLE, one, []);
        await expectRefused(conn, R.SET_MEM_TABLE, '1 region, 0 fds');
        sendNeedReply(conn, R.SET_MEM_TABLE, one, [memfd, memfd2]);
        await expectRefused(conn, R.SET_MEM_TABLE, '1 region, 2 fds');
        sendNeedReply(conn, R.SET_MEM_TABLE, two, [memfd]);
        await expectRefused(conn, R.SET_MEM_TABLE, '2 regions, 1 fd');
        // A region count field that disagrees with the payload size.
        const lying = Buffer.from(one);
        lying.writeUInt32LE(3, 0);
        sendNeedReply(conn, R.SET_MEM_TABLE, lying, [memfd, memfd2, memfd]);
        await expectRefused(conn, R.SET_MEM_TABLE, 'count 3, payload for 1');
        // A file descriptor that cannot be mapped at all.
        const efd = eventfd(0);
        try {
          sendNeedReply(conn, R.SET_MEM_TABLE, one, [efd]);
          await expectRefused(conn, R.SET_MEM_TABLE, 'an eventfd as memory');
        } finally {
          closeQuietly(efd);
        }
      });
    } finally {
      closeQuietly(memfd);
      closeQuietly(memfd2);
    }
  });

  test('SET_VRING_KICK with an out-of-range index, stray high bits or a NOFD/fd mismatch is refused', async () => {
    await hostile('SET_VRING_KICK', async (conn) => {
      const efd = eventfd(0);
      try {
        sendNeedReply(conn, R.SET_VRING_KICK, encodeVringFd(200, false), [efd]);
        await expectRefused(conn, R.SET_VRING_KICK, 'index 200');
        sendNeedReply(conn, R.SET_VRING_KICK, encodeU64((1n << 32n) | 0n), [efd]);
        await expectRefused(conn, R.SET_VRING_KICK, 'bit 32 set');
        sendNeedReply(conn, R.SET_VRING_CALL, encodeU64(0x200n), [efd]);
        await expectRefused(conn, R.SET_VRING_CALL, 'bit 9 set');
        sendNeedReply(conn, R.SET_VRING_KICK, encodeVringFd(0, true), [efd]);
        await expectRefused(conn, R.SET_VRING_KICK, 'NOFD with an fd');
        sendNeedReply(conn, R.SET_VRING_CALL, encodeVringFd(0, false), []);
        await expectRefused(conn, R.SET_VRING_CALL, 'no NOFD and no fd');
        sendNeedReply(conn, R.SET_VRING_ERR, encodeVringFd(1, false), [efd]);
        await expectRefused(conn, R.SET_VRING_ERR, 'SET_VRING_ERR for queue 1 of 1');
      } finally {
        closeQuietly(efd);
      }
    });
  });

  test('bad ring parameters are refused: sizes that are not a power of two, indexes out of range', async () => {
    await hostile('ring parameters', async (conn) => {
      for (const num of [100, 0, 3, 65536, 512]) {
        sendNeedReply(conn, R.SET_VRING_NUM, encodeVringState(0, num));
        await expectRefused(conn, R.SET_VRING_NUM, `SET_VRING_NUM ${num}`);
      }
      sendNeedReply(conn, R.SET_VRING_NUM, encodeVringState(7, 128));
      await expectRefused(conn, R.SET_VRING_NUM, 'SET_VRING_NUM for vring 7');
      sendNeedReply(conn, R.SET_VRING_BASE, encodeVringState(0, 0x10000));
      await expectRefused(conn, R.SET_VRING_BASE, 'SET_VRING_BASE 65536');
      sendNeedReply(conn, R.SET_VRING_ADDR, encodeVringAddr({ index: 0xffffffff, flags: 0, descUserAddr: 0, usedUserAddr: 0, availUserAddr: 0, logGuestAddr: 0 }));
      await expectRefused(conn, R.SET_VRING_ADDR, 'SET_VRING_ADDR for vring 2^32-1');
      sendNeedReply(conn, R.SET_VRING_ENABLE, encodeVringState(0, 2));
      await expectRefused(conn, R.SET_VRING_ENABLE, 'SET_VRING_ENABLE 2');
      // Starting a ring with no memory table and no addresses.
      const efd = eventfd(0);
      try {
        sendNeedReply(conn, R.SET_VRING_ENABLE, encodeVringState(0, 1));
        const ev = await nextEvent(conn);
        assert.equal(ev.kind, 'reply');
        sendNeedReply(conn, R.SET_VRING_KICK, encodeVringFd(0, false), [efd]);
        await expectRefused(conn, R.SET_VRING_KICK, 'kick before any addresses');
      } finally {
        closeQuietly(efd);
      }
    });
  });

  test('unknown requests and never-offered features are refused', async () => {
    await hostile('unknown requests', async (conn) => {
      sendNeedReply(conn, 999, Buffer.alloc(0));
      await expectRefused(conn, 999, 'request 999');
      sendNeedReply(conn, R.SET_LOG_BASE, Buffer.alloc(16));
      await expectRefused(conn, R.SET_LOG_BASE, 'SET_LOG_BASE (LOG_SHMFD not offered)');
      sendNeedReply(conn, R.SET_FEATURES, encodeU64(1n << 63n));
      await expectRefused(conn, R.SET_FEATURES, 'feature bit 63');
      sendNeedReply(conn, R.SET_PROTOCOL_FEATURES, encodeU64(1n << 40n));
      await expectRefused(conn, R.SET_PROTOCOL_FEATURES, 'protocol feature bit 40');
    });
  });

  test('GET_VRING_BASE for a vring that does not exist: the daemon cannot answer and closes', async () => {
    await hostile('GET_VRING_BASE 99', async (conn) => {
      conn.sendRaw(encodeRequest(R.GET_VRING_BASE, encodeVringState(99, 0)));
      await expectClosed(conn, 'GET_VRING_BASE index 99');
    });
  });

  test('untrustworthy headers end the connection: bad version, REPLY flag, a 1 MiB payload', async () => {
    for (const flags of [0x0, 0x2, 0x3, 0x5]) {
      await hostile(`flags 0x${flags.toString(16)}`, async (conn) => {
        conn.sendRaw(Buffer.concat([encodeHeader(R.GET_FEATURES, flags, 0)]));
        await expectClosed(conn, `header flags 0x${flags.toString(16)}`);
      });
    }
    await hostile('1 MiB payload', async (conn) => {
      conn.sendRaw(Buffer.concat([encodeHeader(R.SET_FEATURES, 1, MiB), Buffer.alloc(4096)]));
      await expectClosed(conn, 'header announcing 1 MiB');
    });
    await hostile('truncated message', async (conn) => {
      // Header announces 40 bytes, 8 arrive, then the front-end hangs up: nothing must be half-applied.
      conn.sendRaw(Buffer.concat([encodeHeader(R.SET_VRING_ADDR, 1, 40), Buffer.alloc(8)]));
      await sleep(20);
    });
  });

  test('random garbage on the socket', async () => {
    for (const seed of [1, 2, 3]) {
      await hostile(`garbage seed ${seed}`, async (conn) => {
        conn.sendRaw(pattern(64 * 1024, 7000 + seed));
        const ev = await nextEvent(conn, 3000);
        assert.notEqual(ev.kind, 'silent', `seed ${seed}: 64 KiB of garbage must make the daemon answer or hang up`);
      }, seed !== 3);
    }
  });

  test('a message with 40 fds attached', async () => {
    const fds = Array.from({ length: 40 }, () => eventfd(0));
    try {
      await hostile('40 fds', async (conn) => {
        sendNeedReply(conn, R.SET_VRING_CALL, encodeVringFd(0, false), fds);
        const ev = await nextEvent(conn);
        if (ev.kind === 'reply') {
          assert.notEqual(ev.reply.payload.readBigUInt64LE(0), 0n, '40 fds must not be accepted');
        } else {
          assert.equal(ev.kind, 'closed');
        }
      });
    } finally {
      for (const fd of fds) closeQuietly(fd);
    }
  });

  test('a refused SET_VRING_KICK leaves no stale fd behind (call notifications still work after a restart)', async () => {
    const c = await connectClient(daemon.socket);
    try {
      await c.write(0, pattern(4096, 1));
      const base = await c.stopQueue(0);
      // Ring addresses outside the memory table are accepted while the ring is stopped ...
      await c.connection.request(R.SET_VRING_ADDR, encodeVringAddr({
        index: 0, flags: 0, descUserAddr: 0x1000, usedUserAddr: 0x3000, availUserAddr: 0x2000, logGuestAddr: 0,
      }), { needReply: true });
      // ... and make the ring start behind SET_VRING_KICK fail: refused.
      await assert.rejects(
        c.connection.request(R.SET_VRING_KICK, encodeVringFd(0, false), { needReply: true, fds: [c.eventFds(0).kickFd] }),
        /SET_VRING_KICK refused/,
      );
      // The usual setup again; now every fd the daemon holds for the ring must be the one it was given.
      await c.restartQueue(0, base);
      c.callSignals(0);
      await c.write(8, pattern(4096, 2));
      assert.deepEqual(await c.read(8, 4096), pattern(4096, 2));
      let signals = 0n;
      for (let i = 0; i < 50 && signals === 0n; i++) {
        signals = c.callSignals(0);
        if (signals === 0n) await sleep(10);
      }
      assert.ok(signals > 0n, 'the back-end must signal the call eventfd it was given (it closed it instead)');
    } finally {
      await c.close();
    }
    await healthy('stale kick fd');
  });

  test('guest descriptors outside the shared memory complete with used len 0; the queue goes on', async () => {
    const c = await connectClient(daemon.socket, { memoryBytes: 8 * MiB });
    try {
      const status = c.allocDma(4096);
      const hdr = c.allocDma(4096);
      new DataView(hdr.bytes.buffer, hdr.bytes.byteOffset, 16).setUint32(0, RequestType.IN, true);
      const data = c.allocDma(4096);
      const cases: Array<[string, Parameters<typeof c.submitRawChain>[1]]> = [
        ['header beyond the memory end', [{ addr: 8 * MiB + 4096, len: 16, flags: 0 }, { addr: status.gpa, len: 1, flags: VIRTQ_DESC_F_WRITE }]],
        ['data straddling the memory end', [{ addr: hdr.gpa, len: 16, flags: 0 }, { addr: 8 * MiB - 256, len: 512, flags: VIRTQ_DESC_F_WRITE }, { addr: status.gpa, len: 1, flags: VIRTQ_DESC_F_WRITE }]],
        ['address 2^63', [{ addr: 1n << 63n, len: 16, flags: 0 }, { addr: status.gpa, len: 1, flags: VIRTQ_DESC_F_WRITE }]],
        ['address 2^64 - 8 (wraps)', [{ addr: (1n << 64n) - 8n, len: 16, flags: 0 }, { addr: status.gpa, len: 1, flags: VIRTQ_DESC_F_WRITE }]],
        ['status beyond the memory end', [{ addr: hdr.gpa, len: 16, flags: 0 }, { addr: data.gpa, len: 512, flags: VIRTQ_DESC_F_WRITE }, { addr: 64 * MiB, len: 1, flags: VIRTQ_DESC_F_WRITE }]],
        ['indirect table beyond the memory end', [{ addr: 16 * MiB, len: 64, flags: VIRTQ_DESC_F_INDIRECT }]],
      ];
      for (const [what, chain] of cases) {
        status.bytes[0] = STATUS_NOT_WRITTEN;
        const flagged = chain.map((d, i) => ({ ...d, flags: d.flags | (i < chain.length - 1 ? VIRTQ_DESC_F_NEXT : 0) }));
        const r = await c.submitRawChain(0, flagged);
        assert.equal(r.usedLen, 0, `${what}: used len`);
        assert.equal(status.bytes[0], STATUS_NOT_WRITTEN, `${what}: status byte must be left alone`);
        // A good request right after.
        await c.write(16, pattern(1024, 3));
        assert.deepEqual(await c.read(16, 1024), pattern(1024, 3), `${what}: next request`);
      }
      assert.deepEqual(c.anomalies, []);
    } finally {
      await c.close();
    }
    await healthy('descriptors outside memory');
  });

  test('descriptor loops and malformed chains complete with used len 0 (or IOERR); the queue goes on', async () => {
    const c = await connectClient(daemon.socket, { memoryBytes: 8 * MiB });
    try {
      const status = c.allocDma(4096);
      const hdr = c.allocDma(4096);
      const table = c.allocDma(4096);
      new DataView(hdr.bytes.buffer, hdr.bytes.byteOffset, 16).setUint32(0, RequestType.IN, true);
      const S = { addr: status.gpa, len: 1, flags: VIRTQ_DESC_F_WRITE };
      const cases: Array<[string, Parameters<typeof c.submitRawChain>[1]]> = [
        ['a descriptor whose next is itself', [{ addr: hdr.gpa, len: 16, flags: VIRTQ_DESC_F_NEXT, next: 0 }]],
        ['a two-descriptor loop', [{ addr: hdr.gpa, len: 16, flags: VIRTQ_DESC_F_NEXT }, { ...S, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 0 }]],
        ['next beyond the queue size', [{ addr: hdr.gpa, len: 16, flags: VIRTQ_DESC_F_NEXT, nextIndex: 4000 }]],
        ['readable after writable', [{ addr: hdr.gpa, len: 16, flags: VIRTQ_DESC_F_NEXT }, { ...S, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT }, { addr: hdr.gpa, len: 16, flags: 0 }]],
        ['INDIRECT together with NEXT', [{ addr: table.gpa, len: 32, flags: VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT }, S]],
        ['indirect table of length 0', [{ addr: table.gpa, len: 0, flags: VIRTQ_DESC_F_INDIRECT }]],
        ['indirect table of length 24', [{ addr: table.gpa, len: 24, flags: VIRTQ_DESC_F_INDIRECT }]],
      ];
      for (const [what, chain] of cases) {
        status.bytes[0] = STATUS_NOT_WRITTEN;
        const r = await c.submitRawChain(0, chain);
        assert.equal(r.usedLen, 0, `${what}: used len`);
        await c.write(24, pattern(512, 4));
        assert.deepEqual(await c.read(24, 512), pattern(512, 4), `${what}: next request`);
      }
      // Loops inside an indirect table: entry 0 -> 1 -> 0; and a nested indirect descriptor.
      const tv = new DataView(table.bytes.buffer, table.bytes.byteOffset, 64);
      const entry = (i: number, addr: number, len: number, flags: number, next: number) => {
        tv.setBigUint64(16 * i, BigInt(addr), true);
        tv.setUint32(16 * i + 8, len, true);
        tv.setUint16(16 * i + 12, flags, true);
        tv.setUint16(16 * i + 14, next, true);
      };
      entry(0, hdr.gpa, 16, VIRTQ_DESC_F_NEXT, 1);
      entry(1, status.gpa, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0);
      assert.equal((await c.submitRawChain(0, [{ addr: table.gpa, len: 32, flags: VIRTQ_DESC_F_INDIRECT }])).usedLen, 0, 'loop in an indirect table');
      entry(0, table.gpa, 32, VIRTQ_DESC_F_INDIRECT, 0);
      assert.equal((await c.submitRawChain(0, [{ addr: table.gpa, len: 16, flags: VIRTQ_DESC_F_INDIRECT }])).usedLen, 0, 'nested indirect table');
      // A header shorter than 16 bytes: the chain is sound, so the status byte says IOERR.
      status.bytes[0] = STATUS_NOT_WRITTEN;
      const short = await c.submitRawChain(0, [{ addr: hdr.gpa, len: 8, flags: VIRTQ_DESC_F_NEXT }, S]);
      assert.equal(status.bytes[0], Status.IOERR, 'short header: IOERR');
      assert.equal(short.usedLen, 1);
      // No status descriptor at all (last descriptor device-readable).
      assert.equal((await c.submitRawChain(0, [{ addr: hdr.gpa, len: 16, flags: 0 }])).usedLen, 0, 'no status byte');
      await c.write(24, pattern(512, 5));
      assert.deepEqual(await c.read(24, 512), pattern(512, 5));
      assert.deepEqual(c.anomalies, []);
    } finally {
      await c.close();
    }
    await healthy('descriptor loops');
  });

  test('a corrupt avail ring (index far ahead, head out of range) stops only that queue', async () => {
    for (const corrupt of ['avail idx +1000', 'head 500'] as const) {
      const c = await connectClient(daemon.socket, { memoryBytes: 4 * MiB });
      try {
        await c.write(0, pattern(512, 6));
        const usedBefore = c.ring(0).deviceUsedIdx();
        if (corrupt === 'avail idx +1000') c.ring(0).publishRawIndex(c.ring(0).availIdx + 1000);
        else c.ring(0).publish(500);
        await sleep(100);
        assert.equal(c.ring(0).deviceUsedIdx(), usedBefore, `${corrupt}: nothing may be completed from a corrupt ring`);
        assert.deepEqual(c.anomalies, []);
      } finally {
        await c.close();
      }
      await healthy(corrupt);
    }
  });
});

describe('a memory region larger than the fd behind it', { timeout: 30_000 }, () => {
  let dir: string;
  let daemon: Daemon;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vblk-hostile-mem-'));
    const image = join(dir, 'disk.raw');
    closeSync(openSync(image, 'w'));
    truncateSync(image, 16 * MiB);
    daemon = await startDaemon(dir, ['--image', image]);
  });

  after(async () => {
    if (!daemon) return;
    // A daemon that died is reported by the test itself; only a living one is held to a clean exit.
    const wasAlive = alive(daemon);
    const how = await stopDaemon(daemon);
    rmSync(dir, { recursive: true, force: true });
    if (wasAlive) assert.deepEqual(how, { code: 0, signal: null }, `daemon exit on SIGTERM:\n${daemon.log.join('')}`);
  });

  test('is refused, or at least a descriptor into the part past the end of the fd does not kill the daemon', async () => {
    const c = await connectClient(daemon.socket, { memoryBytes: 4 * MiB, requestTimeoutMs: 1000 });
    try {
      await c.write(0, pattern(512, 7));
      // Claim 64 MiB of guest memory backed by the 4 MiB memfd.
      let accepted = true;
      try {
        await c.connection.request(R.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0, size: 64 * MiB, userAddr: c.memory.addr, mmapOffset: 0 }]), { needReply: true, fds: [c.memory.fd] });
      } catch {
        accepted = false;
      }
      if (accepted) {
        const status = c.allocDma(4096);
        await c.submitRawChain(0, [
          { addr: 32 * MiB, len: 16, flags: VIRTQ_DESC_F_NEXT },
          { addr: status.gpa, len: 1, flags: VIRTQ_DESC_F_WRITE },
        ]).catch(() => undefined);
        await sleep(100);
      }
      assert.ok(alive(daemon), `daemon died (${daemon.proc.signalCode ?? daemon.proc.exitCode}) after a descriptor into a region beyond its fd's size`);
    } finally {
      await c.close({ graceful: alive(daemon) });
    }
    const h = await connectClient(daemon.socket);
    try {
      await h.write(8, pattern(512, 8));
      assert.deepEqual(await h.read(8, 512), pattern(512, 8));
    } finally {
      await h.close();
    }
  });
});
