/**
 * A VhostUserSession over a real socket pair, with a device of the test's own, set up as QEMU does it up
 * to the ring start: for unit tests of the protocol handlers without worker threads.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VhostUserSession, type PlaneRegion, type RingStart, type VhostUserDevice } from '../../src/vhost-user/backend.js';
import { UnixListener } from '../../src/os/unix-socket.js';
import { VhostUserConnection } from '../../src/frontend/connection.js';
import { Logger } from '../../src/logger.js';
import { FrontendRequest as R, encodeMemTable, encodeU64, encodeVringAddr, encodeVringState } from '../../src/vhost-user/messages.js';
import { closeQuietly, eventfd, ftruncate, memfdCreate } from '../../src/os/libc.js';

/** Guest memory of the session: one region of this size at guest address 0. */
export const SESSION_MEMORY = 1 << 20;
/** Ring 0's addresses as SET_VRING_ADDR gives them (frontend user addresses inside the region). */
export const SESSION_RING_ADDRS = { descUserAddr: 0x7000_0000_0000, availUserAddr: 0x7000_0000_1000, usedUserAddr: 0x7000_0000_2000 };

/**
 * Runs `body` against a session serving `dev`, after SET_FEATURES `features`, SET_PROTOCOL_FEATURES
 * `protocol`, a SESSION_MEMORY memory table, and ring 0's size (256) and addresses; then closes it all.
 */
export async function withSession<D extends VhostUserDevice>(
  dev: D, features: bigint, protocol: bigint, body: (conn: VhostUserConnection, dev: D) => Promise<void>,
): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'vhost-blk-session-'));
  const listener = UnixListener.listen(join(dir, 's'));
  const memfd = memfdCreate('session-test');
  const accepted = listener.accept();
  const conn = VhostUserConnection.connect(join(dir, 's'));
  const server = await accepted;
  assert.ok(server);
  const session = new VhostUserSession(server, dev, new Logger('error'), 'test');
  const served = session.serve();
  try {
    ftruncate(memfd, SESSION_MEMORY);
    await conn.request(R.SET_FEATURES, encodeU64(features));
    await conn.request(R.SET_PROTOCOL_FEATURES, encodeU64(protocol));
    await conn.request(R.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0, size: SESSION_MEMORY, userAddr: SESSION_RING_ADDRS.descUserAddr, mmapOffset: 0 }]), { fds: [memfd], needReply: true });
    await conn.request(R.SET_VRING_NUM, encodeVringState(0, 256), { needReply: true });
    await conn.request(R.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 0, ...SESSION_RING_ADDRS, logGuestAddr: 0 }), { needReply: true });
    await body(conn, dev);
  } finally {
    conn.close();
    await served;
    closeQuietly(memfd);
    listener.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Starts ring 0 as QEMU does: a kick fd, then SET_VRING_ENABLE. */
export async function startRing0(conn: VhostUserConnection): Promise<void> {
  const kick = eventfd(0, 0);
  try {
    await conn.request(R.SET_VRING_KICK, encodeU64(0n), { fds: [kick], needReply: true });
  } finally {
    closeQuietly(kick);
  }
  await conn.request(R.SET_VRING_ENABLE, encodeVringState(0, 1), { needReply: true });
}

/** A device that records ring starts and answers stops with `stopBase`; tests subclass it to record more. */
export class SessionTestDevice implements VhostUserDevice {
  readonly features: bigint = 1n << 32n;
  readonly protocolFeatures: bigint = 0n;
  readonly numQueues = 1;
  readonly maxQueueSize = 256;
  readonly starts: RingStart[] = [];
  stopBase = 0;
  getConfig(_offset: number, size: number): Uint8Array {
    return new Uint8Array(size);
  }
  async setConfig(): Promise<string | null> {
    return 'read-only';
  }
  async setMemory(_regions: PlaneRegion[]): Promise<void> {}
  async startRing(ring: RingStart): Promise<void> {
    this.starts.push(ring);
  }
  async stopRing(_queue: number): Promise<number> {
    return this.stopBase;
  }
  async setCallFd(): Promise<void> {}
  async setDirtyLog(_log: unknown): Promise<void> {}
  async setRingLog(_queue: number, _usedLogAddr: number | null): Promise<void> {}
}
