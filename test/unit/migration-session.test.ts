/**
 * The session's side of live migration (src/vhost-user/migration-log.ts and the handlers in backend.ts):
 * what is offered, SET_LOG_BASE and its refusals, LOG_ALL and VHOST_VRING_F_LOG while rings run, the
 * order a replaced log is switched and unmapped in, and the protocol feature gates of the handler table.
 * Driven over a real socket against a session whose device records what the data plane is told.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { DirtyLogArea, RingStart } from '../../src/vhost-user/backend.js';
import { VhostUserConnection } from '../../src/frontend/connection.js';
import { SESSION_RING_ADDRS, SessionTestDevice, startRing0, withSession as withDeviceSession } from './session-harness.js';
import {
  FrontendRequest as R, ProtocolFeature as P, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, encodeConfig, encodeLog, encodeU64,
  encodeVringAddr,
} from '../../src/vhost-user/messages.js';
import { closeQuietly, eventfd, ftruncate, memfdCreate, view } from '../../src/os/libc.js';

const LOG_ALL = 1n << BigInt(VHOST_F_LOG_ALL);
const PROTOCOL = 1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES);
const EVENT_IDX = 1n << 29n;
const VERSION_1 = 1n << 32n;
const ADDRS = SESSION_RING_ADDRS;

/** Records what the data plane is told; checks that a replaced log is still mapped when the next one is installed. */
class LoggingDevice extends SessionTestDevice {
  override readonly features = VERSION_1 | EVENT_IDX;
  override readonly protocolFeatures = (1n << BigInt(P.REPLY_ACK)) | (1n << BigInt(P.CONFIG));
  readonly events: string[] = [];
  logs: Array<DirtyLogArea | null> = [];
  private current: DirtyLogArea | null = null;
  override async startRing(ring: RingStart): Promise<void> {
    await super.startRing(ring);
    this.events.push('start');
  }
  override async stopRing(queue: number): Promise<number> {
    this.events.push('stop');
    return super.stopRing(queue);
  }
  override async setDirtyLog(log: DirtyLogArea | null): Promise<void> {
    // Touching the previous log would crash the test process if the session had unmapped it already.
    if (this.current) new Uint8Array(view(this.current.hostAddr, this.current.bytes))[0] |= 0;
    if (log) new Uint8Array(view(log.hostAddr, log.bytes))[log.bytes - 1] |= 0x80;
    await new Promise((resolve) => setTimeout(resolve, 5));
    this.current = log;
    this.logs.push(log);
    this.events.push(log ? `log ${log.bytes}` : 'log off');
  }
  override async setRingLog(queue: number, usedLogAddr: number | null): Promise<void> {
    this.events.push(`ring-log ${queue} ${usedLogAddr === null ? 'off' : '0x' + usedLogAddr.toString(16)}`);
  }
}

/** A memfd of `bytes` for a log region (the caller closes it). The session's 1 MiB of guest memory needs 32 bytes of log. */
function logFd(bytes: number): number {
  const fd = memfdCreate('test-log');
  ftruncate(fd, bytes);
  return fd;
}

/** Runs `body` against a session: features VERSION_1 | EVENT_IDX | PROTOCOL_FEATURES (+ `extra`), protocol `protocol`, 1 MiB memory. */
function withSession(protocol: bigint, body: (conn: VhostUserConnection, dev: LoggingDevice) => Promise<void>, extra = 0n): Promise<void> {
  const dev = new LoggingDevice();
  return withDeviceSession(dev, dev.features | PROTOCOL | extra, protocol, body);
}

const ALL_PROTOCOL = (1n << BigInt(P.REPLY_ACK)) | (1n << BigInt(P.LOG_SHMFD)) | (1n << BigInt(P.CONFIG));

const startRing = startRing0;

/** SET_LOG_BASE with `fds`; resolves with the u64 the back-end replied. */
async function setLogBase(conn: VhostUserConnection, mmapSize: number, fds: number[], mmapOffset = 0): Promise<bigint> {
  const reply = await conn.request(R.SET_LOG_BASE, encodeLog({ mmapSize, mmapOffset }), { fds, expectReply: true });
  assert.equal(reply.length, 8, 'SET_LOG_BASE is answered with a u64');
  return reply.readBigUInt64LE(0);
}

describe('vhost-user session: dirty logging for migration', () => {
  test('the session offers VHOST_F_LOG_ALL and VHOST_USER_PROTOCOL_F_LOG_SHMFD', async () => {
    await withSession(ALL_PROTOCOL, async (conn) => {
      const f = (await conn.request(R.GET_FEATURES, undefined, { expectReply: true })).readBigUInt64LE(0);
      const p = (await conn.request(R.GET_PROTOCOL_FEATURES, undefined, { expectReply: true })).readBigUInt64LE(0);
      assert.ok((f & LOG_ALL) !== 0n, `GET_FEATURES 0x${f.toString(16)} lacks VHOST_F_LOG_ALL`);
      assert.ok((p & (1n << BigInt(P.LOG_SHMFD))) !== 0n, `GET_PROTOCOL_FEATURES 0x${p.toString(16)} lacks LOG_SHMFD`);
    });
  });

  test('QEMU\'s order at migration start: SET_LOG_BASE, then LOG_ALL and F_LOG while the ring runs; no ring is stopped', async () => {
    await withSession(ALL_PROTOCOL, async (conn, dev) => {
      await startRing(conn);
      const fd = logFd(32);
      try {
        assert.equal(await setLogBase(conn, 32, [fd]), 0n);
      } finally {
        closeQuietly(fd);
      }
      assert.deepEqual(dev.logs, [], 'no logging before LOG_ALL');
      await conn.request(R.SET_FEATURES, encodeU64(dev.features | PROTOCOL | LOG_ALL), { needReply: true });
      await conn.request(R.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 1, ...ADDRS, logGuestAddr: 0x2000 }), { needReply: true });
      // Migration over (or cancelled): both turned off again.
      await conn.request(R.SET_FEATURES, encodeU64(dev.features | PROTOCOL), { needReply: true });
      await conn.request(R.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 0, ...ADDRS, logGuestAddr: 0 }), { needReply: true });
      assert.deepEqual(dev.events, ['start', 'log 32', 'ring-log 0 0x2000', 'log off', 'ring-log 0 off']);
    });
  });

  test('QEMU\'s order at a device start during migration: LOG_ALL and F_LOG first, the region after; the ring gets its log address', async () => {
    await withSession(ALL_PROTOCOL, async (conn, dev) => {
      await conn.request(R.SET_FEATURES, encodeU64(dev.features | PROTOCOL | LOG_ALL), { needReply: true });
      await conn.request(R.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 1, ...ADDRS, logGuestAddr: 0x2000 }), { needReply: true });
      await startRing(conn);
      assert.equal(dev.starts[0].logUsedAddr, 0x2000);
      const fd = logFd(64);
      try {
        assert.equal(await setLogBase(conn, 64, [fd]), 0n);
      } finally {
        closeQuietly(fd);
      }
      assert.deepEqual(dev.events, ['start', 'log 64']);
    });
  });

  test('a second SET_LOG_BASE while logging switches the data plane first and unmaps the old region after', async () => {
    await withSession(ALL_PROTOCOL, async (conn, dev) => {
      await conn.request(R.SET_FEATURES, encodeU64(dev.features | PROTOCOL | LOG_ALL), { needReply: true });
      for (const size of [32, 4096, 64]) {
        const fd = logFd(size);
        try {
          assert.equal(await setLogBase(conn, size, [fd]), 0n);
        } finally {
          closeQuietly(fd);
        }
      }
      // LoggingDevice touched each previous region as the next came: none was unmapped too early.
      assert.deepEqual(dev.events, ['log 32', 'log 4096', 'log 64']);
    });
  });

  test('bad log regions are refused with a nonzero reply and the connection keeps working', async () => {
    await withSession(ALL_PROTOCOL, async (conn, dev) => {
      await conn.request(R.SET_FEATURES, encodeU64(dev.features | PROTOCOL | LOG_ALL), { needReply: true });
      const small = logFd(16);
      const pipeLike = eventfd(0, 0);
      try {
        assert.equal(await setLogBase(conn, 16, [small]), 1n, 'a region too small for 1 MiB of guest memory');
        assert.equal(await setLogBase(conn, 0, [small]), 1n, 'an empty region');
        assert.equal(await setLogBase(conn, 32, [small]), 1n, 'a region that runs past the end of its fd');
        assert.equal(await setLogBase(conn, 32, [pipeLike]), 1n, 'an fd that cannot be mapped');
        assert.equal(await setLogBase(conn, 32, []), 1n, 'no fd');
      } finally {
        closeQuietly(small);
        closeQuietly(pipeLike);
      }
      assert.deepEqual(dev.logs, [], 'the data plane never got a refused region');
      const f = await conn.request(R.GET_FEATURES, undefined, { expectReply: true });
      assert.equal(f.length, 8, 'the connection still answers');
    });
  });

  test('while a ring runs, SET_FEATURES may change LOG_ALL only, and SET_VRING_ADDR the log flag only', async () => {
    await withSession(ALL_PROTOCOL, async (conn, dev) => {
      await startRing(conn);
      await assert.rejects(conn.request(R.SET_FEATURES, encodeU64(dev.features | PROTOCOL | LOG_ALL | (1n << 28n)), { needReply: true }), /refused/);
      await assert.rejects(conn.request(R.SET_FEATURES, encodeU64((dev.features & ~EVENT_IDX) | PROTOCOL), { needReply: true }), /refused/);
      await assert.rejects(conn.request(R.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 1, ...ADDRS, usedUserAddr: 0x7000_0000_3000, logGuestAddr: 0x3000 }), { needReply: true }), /refused/);
      await assert.rejects(conn.request(R.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 2, ...ADDRS, logGuestAddr: 0 }), { needReply: true }), /refused/);
      await conn.request(R.SET_FEATURES, encodeU64(dev.features | PROTOCOL | LOG_ALL), { needReply: true });
      assert.deepEqual(dev.events, ['start'], 'nothing stopped, nothing logged without a region');
    });
  });

  test('requests whose protocol feature was not negotiated are refused (SET_LOG_BASE, GET_CONFIG, GET_QUEUE_NUM)', async () => {
    await withSession(1n << BigInt(P.REPLY_ACK), async (conn, dev) => {
      const fd = logFd(32);
      try {
        // Without LOG_SHMFD the frontend expects no reply body: a refusal is a nack.
        await assert.rejects(conn.request(R.SET_LOG_BASE, encodeLog({ mmapSize: 32, mmapOffset: 0 }), { fds: [fd], needReply: true }), /refused/);
      } finally {
        closeQuietly(fd);
      }
      const config = await conn.request(R.GET_CONFIG, encodeConfig(0, 8, 0), { expectReply: true });
      assert.equal(config.length, 0, 'GET_CONFIG without CONFIG gets the empty failure reply');
      assert.deepEqual(dev.logs, []);
      // GET_QUEUE_NUM without MQ: the frontend waits for a body we will not give, so the connection ends.
      await assert.rejects(conn.request(R.GET_QUEUE_NUM, undefined, { expectReply: true }), /closed/);
    });
  });
});
