/**
 * Regression tests for bugs the fuzzers in test/fuzz/ found, each with the concrete input.
 *
 * 1. Overlapping rings (ring-fuzz.ts, a scenario with overlapRings): a guest that places its used ring over
 *    its avail ring makes every used entry the device writes bump avail.idx, so one more chain is always
 *    available. pump() looped forever on it (chains answered at once take no slot), and the worker loop,
 *    always finding work, never entered the kernel again (with DEFER_TASKRUN, completions such as the
 *    control eventfd read are only posted inside a GETEVENTS enter), so it never saw a control message:
 *    GET_VRING_BASE was never answered and the daemon could not be stopped.
 * 2. An fd leak (daemon-fuzz.ts): a header whose fds arrived, followed by a body whose receive failed (more
 *    than 32 fds attached to it), left the header's fds open in the daemon for good.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlkRequestProcessor } from '../../src/blk/request-processor.js';
import type { BlockBackend } from '../../src/backend/types.js';
import { GuestMemory } from '../../src/memory/guest-memory.js';
import { SplitQueue } from '../../src/virtqueue/split.js';
import type { DescriptorChain } from '../../src/virtqueue/queue.js';
import { VhostUserBlkClient } from '../../src/frontend/index.js';
import { FrontendRequest as R, encodeHeader, encodeVringAddr, encodeVringFd, encodeVringState } from '../../src/vhost-user/messages.js';
import { closeQuietly, eventfd, eventfdSignal } from '../../src/os/libc.js';
import { fdCount, openSession, startDaemon, stopDaemon } from '../fuzz/daemon-fuzz.js';

const SIZE = 8;
const AVAIL = 0x1000;

test('pump() takes at most one ring of chains per call when the used ring overlaps the avail ring', () => {
  const bytes = new Uint8Array(0x10000);
  const mem = new GuestMemory([{ guestAddr: 0, size: bytes.length, userAddr: 0, mmapOffset: 0, hostAddr: 0x1000_0000, bytes }]);
  const dv = new DataView(bytes.buffer);
  // Every descriptor is zero: a 0-byte readable buffer at guest 0, a sound chain with no status byte,
  // returned at once with used len 0. avail.idx (= used.idx) is one ahead of the last avail index.
  dv.setUint16(AVAIL + 2, 1, true);
  const queue = new SplitQueue(mem, SIZE, { descAddr: 0, availAddr: AVAIL, usedAddr: AVAIL }, { eventIdx: false, indirect: false }, 0);
  const untouchable = () => assert.fail('no request may reach the backend');
  const backend: BlockBackend = { sizeBytes: 1 << 20, readOnly: false, readv: untouchable, writev: untouchable, flush: untouchable, discard: untouchable, writeZeroes: untouchable };
  const settings = { serial: new Uint8Array(20), segMax: 4, writeback: true, discard: false, writeZeroes: false, maxRangeSectors: 8 };
  const proc = new BlkRequestProcessor(queue, mem, backend, settings, new ArrayBuffer(BlkRequestProcessor.iovBytes(SIZE, 4)), 0x1000, 0, () => undefined, 'q');
  // Before the fix pump() never returned: count the pops and throw instead of spinning forever.
  const pop = queue.popChain.bind(queue);
  let pops = 0;
  queue.popChain = (chain: DescriptorChain) => {
    if (++pops > 100 * SIZE) throw new Error('pump() keeps popping chains: it would never return');
    return pop(chain);
  };
  const taken = proc.pump();
  assert.ok(taken >= 1 && taken <= SIZE, `pump() took ${taken} chains`);
  // The guest keeps feeding the ring: each call does a bounded amount of work, and the work is real.
  const again = proc.pump();
  assert.ok(again >= 1 && again <= SIZE, `the second pump() took ${again} chains`);
  assert.equal(queue.usedIdx, (1 + taken + again) & 0xffff);
  assert.equal(proc.inFlight, 0);
});

test('a live daemon still answers GET_VRING_BASE (and serves the next frontend) with overlapping rings', { timeout: 30_000 }, async () => {
  const d = await startDaemon();
  try {
    const c = await VhostUserBlkClient.connect(d.socket, { requestTimeoutMs: 3000, eventIdx: false });
    await c.write(0, Buffer.alloc(512, 1));
    const base = await c.stopQueue(0);
    const l = c.ring(0).layout;
    const m = c.memory;
    // avail.idx one ahead of the base, then the same ring part given as avail and used ring.
    new DataView(m.bytes.buffer, m.bytes.byteOffset).setUint16(l.avail + 2, (base + 1) & 0xffff, true);
    const ack = { needReply: true };
    await c.connection.request(R.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 0, descUserAddr: m.addr + l.desc, usedUserAddr: m.addr + l.avail, availUserAddr: m.addr + l.avail, logGuestAddr: 0 }), ack);
    await c.connection.request(R.SET_VRING_BASE, encodeVringState(0, base), ack);
    await c.connection.request(R.SET_VRING_KICK, encodeVringFd(0, false), { ...ack, fds: [c.eventFds(0).kickFd] });
    eventfdSignal(c.eventFds(0).kickFd);
    await new Promise((r) => setTimeout(r, 200));
    const reply = await c.connection.request(R.GET_VRING_BASE, encodeVringState(0, 0), { expectReply: true, timeoutMs: 3000 });
    assert.equal(reply.length, 8, 'GET_VRING_BASE answered');
    await c.close({ graceful: false });
    const { conn } = await openSession(d);
    conn.close();
  } finally {
    assert.equal(await stopDaemon(d), 0, `daemon exit after SIGTERM:\n${d.log.join('')}`);
  }
});

test('a header with an fd, then a body carrying more than 32 fds: the daemon keeps no fd', { timeout: 30_000 }, async () => {
  const d = await startDaemon();
  const fds = Array.from({ length: 34 }, () => eventfd(0));
  try {
    (await openSession(d)).conn.close(); // warm-up: the first session allocates for good
    const { conn } = await openSession(d);
    const before = fdCount(d);
    // The fuzzer's input: request 0 announcing a 1-byte body, with one eventfd; the body byte is the
    // first byte of the next message, which carries 33 eventfds (the daemon takes 32 at most).
    conn.sendRaw(encodeHeader(0, 1, 1), fds.slice(0, 1));
    conn.sendRaw(encodeHeader(R.GET_FEATURES, 1, 0), fds.slice(1));
    assert.equal(await conn.receiveReply(3000), null, 'the daemon drops the connection');
    conn.close();
    const fresh = await openSession(d);
    const after = fdCount(d);
    fresh.conn.close();
    assert.equal(after, before, 'file descriptors held with one fresh connection, before and after');
  } finally {
    for (const fd of fds) closeQuietly(fd);
    assert.equal(await stopDaemon(d), 0, `daemon exit after SIGTERM:\n${d.log.join('')}`);
  }
});
