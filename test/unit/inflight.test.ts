// Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) for split rings: the shared region's
// layout, its updates as requests start and complete, and recovery after a backend died at each point of
// a completion; over plain buffers (packed rings: packed-inflight.test.ts). Then the real daemon killed
// with requests in flight, split and packed rings, and a new one finishing them from the region the
// frontend kept.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, mkdtempSync, openSync, rmSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { GuestMemory } from '../../src/memory/guest-memory.js';
import { DescriptorChain, POP_EMPTY, SplitQueue, VIRTQ_DESC_F_WRITE, type RingAddresses } from '../../src/virtqueue/split.js';
import { INFLIGHT_ALIGNMENT, InflightQueue, inflightQueueBytes, inflightRegionBytes } from '../../src/virtqueue/inflight.js';
import { closeQuietly, eventfd, eventfdRead, ftruncate, getSeals, memfdCreate, mmap, munmap, view, EFD_CLOEXEC, EFD_NONBLOCK, F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, MAP_SHARED, MFD_ALLOW_SEALING, PROT_READ, PROT_WRITE } from '../../src/os/libc.js';
import { DriverQueue, PackedDriverQueue, SharedMemory, VhostUserConnection, type DriverRing } from '../../src/frontend/index.js';
import { decodePackedBase } from '../../src/virtqueue/packed.js';
import { FRESH, packedRegionFields } from './packed-driver.js';
import {
  FrontendRequest as R, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES,
  decodeInflight, encodeInflight, encodeMemTable, encodeRequest, encodeU64, encodeVringAddr, encodeVringFd, encodeVringState,
} from '../../src/vhost-user/messages.js';
import { Feature, RequestType } from '../../src/blk/constants.js';
import { GuestDriver } from './guest-driver.js';
import { MiB, connectClient, pattern, readImage, sleep, startDaemon, stopDaemon, type Daemon } from './daemon-process.js';

const SIZE = 8;
const ADDRS: RingAddresses = { descAddr: 0x1000, availAddr: 0x2000, usedAddr: 0x3000 };
const DATA = 0x4000;

/** The region's fields decoded by hand from the spec's struct layout (independently of inflight.ts). */
function fields(region: Uint8Array) {
  const dv = new DataView(region.buffer, region.byteOffset, region.byteLength);
  return {
    features: dv.getBigUint64(0, true),
    version: dv.getUint16(8, true),
    descNum: dv.getUint16(10, true),
    lastBatchHead: dv.getUint16(12, true),
    usedIdx: dv.getUint16(14, true),
    inflight: (h: number) => dv.getUint8(16 + 16 * h),
    counter: (h: number) => dv.getBigUint64(16 + 16 * h + 8, true),
    set16: (off: number, v: number) => dv.setUint16(off, v, true),
  };
}

/** Guest memory over a plain buffer, a guest driver on one ring, and a zeroed inflight queue region. */
function setup(startIdx = 0) {
  const bytes = new Uint8Array(0x10000);
  const mem = new GuestMemory([{ guestAddr: 0, size: bytes.length, userAddr: 0, mmapOffset: 0, hostAddr: 0, bytes }]);
  const driver = new GuestDriver(mem, SIZE, ADDRS, startIdx);
  const region = new Uint8Array(inflightQueueBytes(SIZE));
  return { mem, driver, region };
}

/** A backend (re)starting on the ring at vring base `base`, with inflight tracking over `tracker`. */
function startQueue(mem: GuestMemory, base: number, tracker: InflightQueue) {
  const queue = new SplitQueue(mem, SIZE, ADDRS, { eventIdx: false, indirect: false }, base);
  const recovery = queue.trackInflight(tracker);
  return { queue, recovery };
}

/** A two-descriptor request (header, status) for block `i`; returns its head. */
function submit(driver: GuestDriver, i: number): number {
  return driver.submit([{ addr: DATA + 64 * i, len: 16 }, { addr: DATA + 64 * i + 16, len: 1, write: true }]);
}

/** Pops every available chain; returns the heads in pop order. */
function popAll(queue: SplitQueue): number[] {
  const chain = new DescriptorChain(SIZE);
  const heads: number[] = [];
  for (let h = queue.popChain(chain); h !== POP_EMPTY; h = queue.popChain(chain)) {
    assert.ok(h >= 0, `pop failed: ${h} ${queue.lastError}`);
    heads.push(h);
  }
  return heads;
}

/** The backend process "dies" at `point` of the next completion: the method throws there, like a SIGKILL. */
class DiesAt extends InflightQueue {
  constructor(private readonly region: Uint8Array, private readonly point: 'before-used-ring' | 'after-used-ring' | 'after-inflight-clear') {
    super(region, SIZE, SIZE);
  }
  override beforeUsed(head: number): void {
    super.beforeUsed(head);
    if (this.point === 'before-used-ring') throw new Error('killed');
  }
  override afterUsed(head: number): void {
    // The spec's layout by hand: desc[head].inflight is byte 16 + 16 * head.
    if (this.point === 'after-inflight-clear') this.region[16 + 16 * head] = 0;
    throw new Error('killed');
  }
}

describe('inflight region layout', () => {
  test('queue regions are 16 bytes of header plus 16 per descriptor, on 64-byte boundaries, as libvhost-user sizes them', () => {
    assert.equal(INFLIGHT_ALIGNMENT, 64);
    assert.equal(inflightQueueBytes(1), 64);
    assert.equal(inflightQueueBytes(128), 2112);
    assert.equal(inflightQueueBytes(256), 4160);
    assert.equal(inflightRegionBytes(4, 256), 4 * 4160);
    for (let qs = 1; qs <= 1024; qs++) {
      const b = inflightQueueBytes(qs);
      assert.equal(b % 64, 0);
      assert.ok(b >= 16 + 16 * qs && b < 16 + 16 * qs + 64, `queue size ${qs}: ${b} bytes`);
      // libvhost-user: ALIGN_UP(sizeof(VuDescStateSplit) * queue_size + sizeof(uint16_t), 64): the same number.
      assert.equal(b, Math.ceil((16 * qs + 2) / 64) * 64, `queue size ${qs}`);
    }
  });

  test('a fresh region is initialized in step with the ring, and the SET_VRING_BASE index stands', () => {
    const { mem, region } = setup(100);
    region.fill(0xee, 16); // whatever was there is cleared
    region.fill(0, 0, 16);
    const { queue, recovery } = startQueue(mem, 100, new InflightQueue(region, SIZE, SIZE));
    assert.deepEqual(recovery, { recovered: false, lastAvailIdx: 100, resubmit: [], settledCompletions: 0 });
    assert.equal(queue.lastAvailIdx, 100);
    const f = fields(region);
    assert.deepEqual([f.features, f.version, f.descNum, f.lastBatchHead, f.usedIdx], [0n, 1, SIZE, 0, 100]);
    for (let h = 0; h < SIZE; h++) assert.equal(f.inflight(h), 0);
  });

  test('taking heads records counter and inflight; returning one records last_batch_head, clears inflight, stores used_idx', () => {
    const { mem, driver, region } = setup();
    const { queue } = startQueue(mem, 0, new InflightQueue(region, SIZE, SIZE));
    const heads = [submit(driver, 0), submit(driver, 1), submit(driver, 2)];
    assert.deepEqual(popAll(queue), heads);
    const f = fields(region);
    heads.forEach((h, k) => {
      assert.equal(f.inflight(h), 1, `head ${h} in flight`);
      assert.equal(f.counter(h), BigInt(k), `head ${h} counter`);
    });
    queue.pushUsed(heads[1], 1);
    assert.equal(fields(region).lastBatchHead, heads[1]);
    assert.equal(fields(region).usedIdx, 1);
    assert.deepEqual(heads.map((h) => fields(region).inflight(h)), [1, 0, 1]);
    assert.equal(driver.usedIdx(), 1);
  });

  test('the ring size must fit the region, and the region its queue size', () => {
    assert.throws(() => new InflightQueue(new Uint8Array(inflightQueueBytes(8)), 16, 8), /ring size 16/);
    assert.throws(() => new InflightQueue(new Uint8Array(100), 8, 8), /100 bytes/);
    assert.throws(() => new InflightQueue(new Uint8Array(inflightQueueBytes(8)), 8, 0), /not in 1\.\.65535/);
  });
});

/** Three requests taken by a backend that dies at `point` while completing the second one. */
function diesCompleting(point: ConstructorParameters<typeof DiesAt>[1]) {
  const { mem, driver, region } = setup();
  const first = startQueue(mem, 0, new DiesAt(region, point));
  const heads = [submit(driver, 0), submit(driver, 1), submit(driver, 2)];
  popAll(first.queue);
  assert.throws(() => first.queue.pushUsed(heads[1], 1), /killed/);
  return { mem, driver, region, heads };
}

describe('recovery after the backend died', () => {
  test('killed before the used ring update: the request is resubmitted, first, and completes once', () => {
    const { mem, driver, region, heads } = diesCompleting('before-used-ring');
    assert.equal(driver.usedIdx(), 0, 'nothing reached the used ring');

    // QEMU sends used.idx as the vring base once the backend is gone.
    const { queue, recovery } = startQueue(mem, driver.usedIdx(), new InflightQueue(region, SIZE, SIZE));
    assert.deepEqual(recovery, { recovered: true, lastAvailIdx: 3, resubmit: heads, settledCompletions: 0 });
    const later = submit(driver, 3);
    assert.equal(queue.hasAvailable(), true);
    assert.deepEqual(popAll(queue), [...heads, later], 'the resubmitted heads come before the new one');
    for (const h of [heads[2], later, heads[0], heads[1]]) queue.pushUsed(h, 1);
    assert.deepEqual(driver.takeUsed().map((u) => u.id).sort(), [...heads, later].sort(), 'each request completed exactly once');
  });

  test('killed between the used ring update and the inflight clear: that completion stands, the others are resubmitted', () => {
    const { mem, driver, region, heads } = diesCompleting('after-used-ring');
    assert.equal(driver.usedIdx(), 1, 'the completion reached the guest');
    assert.equal(fields(region).inflight(heads[1]), 1, 'but the region still says in flight');

    const { queue, recovery } = startQueue(mem, driver.usedIdx(), new InflightQueue(region, SIZE, SIZE));
    assert.deepEqual(recovery, { recovered: true, lastAvailIdx: 3, resubmit: [heads[0], heads[2]], settledCompletions: 1 });
    assert.equal(fields(region).inflight(heads[1]), 0);
    assert.equal(fields(region).usedIdx, 1);
    assert.deepEqual(popAll(queue), [heads[0], heads[2]]);
  });

  test('killed between the inflight clear and the used_idx store: nothing is resubmitted twice', () => {
    const { mem, driver, region, heads } = diesCompleting('after-inflight-clear');
    assert.equal(fields(region).inflight(heads[1]), 0);
    assert.equal(fields(region).usedIdx, 0, 'the region did not record the completion');
    const { recovery } = startQueue(mem, driver.usedIdx(), new InflightQueue(region, SIZE, SIZE));
    assert.deepEqual(recovery, { recovered: true, lastAvailIdx: 3, resubmit: [heads[0], heads[2]], settledCompletions: 1 });
  });

  test('several in flight, completed out of order, heads reused: resubmitted in the order the guest submitted them', () => {
    const { mem, driver, region } = setup();
    const first = startQueue(mem, 0, new InflightQueue(region, SIZE, SIZE));
    const a = [submit(driver, 0), submit(driver, 1), submit(driver, 2), submit(driver, 3)];
    assert.deepEqual(popAll(first.queue), a);
    first.queue.pushUsed(a[1], 1);
    first.queue.pushUsed(a[0], 1);
    driver.takeUsed(); // the guest frees heads a[0] and a[1]: the next requests reuse them
    const b = [submit(driver, 4), submit(driver, 5)];
    assert.deepEqual(b.slice().sort(), a.slice(0, 2).sort(), 'test setup: heads are reused');
    assert.deepEqual(popAll(first.queue), b);
    first.queue.pushUsed(a[3], 1);
    // The process dies here with a[2] (oldest), b[0], b[1] in flight.

    const { queue, recovery } = startQueue(mem, driver.usedIdx(), new InflightQueue(region, SIZE, SIZE));
    assert.equal(driver.usedIdx(), 3);
    assert.deepEqual(recovery, { recovered: true, lastAvailIdx: 6, resubmit: [a[2], b[0], b[1]], settledCompletions: 0 });
    assert.equal(queue.lastAvailIdx, 6);
    // Counters go on above the highest one left in flight (b[1] had 5).
    driver.takeUsed();
    const c = submit(driver, 6);
    assert.deepEqual(popAll(queue), [a[2], b[0], b[1], c]);
    assert.equal(fields(region).counter(c), 6n);
    for (const h of [b[1], a[2], c, b[0]]) queue.pushUsed(h, 1);

    // Everything completed: the next start finds nothing in flight, and resumes where the ring is.
    const again = startQueue(mem, 0, new InflightQueue(region, SIZE, SIZE));
    assert.deepEqual(again.recovery, { recovered: true, lastAvailIdx: 7, resubmit: [], settledCompletions: 0 });
    assert.equal(again.queue.hasAvailable(), false);
  });

  test('the counter order is compared as a u64, high word first', () => {
    const { mem, driver, region } = setup();
    const first = startQueue(mem, 0, new InflightQueue(region, SIZE, SIZE));
    const heads = [submit(driver, 0), submit(driver, 1)];
    popAll(first.queue);
    // Head 0 carries a counter above 2^32, head 1 one just below it: head 1 is older.
    const dv = new DataView(region.buffer);
    dv.setBigUint64(16 + 16 * heads[0] + 8, 2n ** 32n + 1n, true);
    dv.setBigUint64(16 + 16 * heads[1] + 8, 2n ** 32n - 1n, true);
    const { recovery } = startQueue(mem, 0, new InflightQueue(region, SIZE, SIZE));
    assert.deepEqual(recovery.resubmit, [heads[1], heads[0]]);
  });

  test('a region that cannot be trusted is refused', () => {
    const cases: Array<[string, (f: ReturnType<typeof fields>) => void, RegExp]> = [
      ['unknown version', (f) => f.set16(8, 2), /version 2/],
      ['other queue size', (f) => f.set16(10, SIZE * 2), /16 descriptor states/],
      ['last batch head out of the ring', (f) => { f.set16(14, 0xffff); f.set16(12, SIZE); }, /head 8/],
      ['used_idx far behind used.idx', (f) => f.set16(14, 0x8000), /entries past/],
    ];
    for (const [what, corrupt, re] of cases) {
      const { mem, region } = setup();
      startQueue(mem, 0, new InflightQueue(region, SIZE, SIZE));
      corrupt(fields(region));
      assert.throws(() => startQueue(mem, 0, new InflightQueue(region, SIZE, SIZE)), re, what);
    }
  });
});

// ---------------------------------------------------------------------------------------------------------
// The real daemon, killed with requests in flight

const QSIZE = 64;
const RING = { desc: 0, avail: 0x1000, used: 0x2000 };
/** Request i lives in an 8 KiB block: header at +0, status at +64, 4 KiB of data at +4096; descriptors 3i..3i+2. */
const BLOCKS = 0x10000;
const BLOCK = 8192;

/**
 * The parts of QEMU's vhost-user-blk that matter here: guest memory and the ring live in this process and
 * survive the backend; on every (re)connect it negotiates, hands the inflight region back
 * (GET_INFLIGHT_FD only the first time), and restarts the ring where QEMU would once the old backend is
 * gone (virtio_queue_restore_last_avail_idx): a split ring at used.idx; a packed ring at the state QEMU
 * last learned (at reset, or from a GET_VRING_BASE that succeeded), stale after a crash, since a packed
 * ring's position is nowhere in guest memory.
 */
class ReconnectingFrontend {
  readonly memory = SharedMemory.create(4 * MiB);
  readonly kickFd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  readonly callFd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  readonly ring: DriverRing;
  /** How many times each request (the `i` of write) came back used. */
  readonly completions = new Map<number, number>();
  /** Called for every used element with its request, after it is counted (NaN: an id no request has). */
  onUsed: (request: number) => void = () => undefined;
  inflight: { fd: number; size: number; addr: number } | null = null;
  conn: VhostUserConnection | null = null;
  /** Packed: the vring base QEMU would send, and the descriptor handles and request of each buffer id out. */
  knownBase: number;
  private readonly handlesOf = new Map<number, number[]>();
  private readonly requestOf = new Map<number, number>();

  constructor(readonly packed = false) {
    this.ring = packed ? new PackedDriverQueue(this.memory.bytes, QSIZE, RING, false, this.kickFd) : new DriverQueue(this.memory.bytes, QSIZE, RING, false, this.kickFd);
    this.ring.reset();
    this.knownBase = this.ring.vringBase;
  }

  /** The split ring (used.idx lives in guest memory). */
  get splitRing(): DriverQueue {
    return this.ring as DriverQueue;
  }

  /** The packed ring. */
  get packedRing(): PackedDriverQueue {
    return this.ring as PackedDriverQueue;
  }

  async connect(socket: string): Promise<void> {
    const deadline = Date.now() + 10_000;
    for (;;) {
      try {
        this.conn = VhostUserConnection.connect(socket);
        break;
      } catch (err) {
        // A new daemon may not have replaced the old one's socket yet.
        if (Date.now() > deadline) throw err;
        await sleep(20);
      }
    }
    const c = this.conn;
    const t = { timeoutMs: 5000 };
    const features = (await c.request(R.GET_FEATURES, undefined, { ...t, expectReply: true })).readBigUInt64LE(0);
    assert.ok(features & (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES)));
    const offered = (await c.request(R.GET_PROTOCOL_FEATURES, undefined, { ...t, expectReply: true })).readBigUInt64LE(0);
    const inflightBit = 1n << BigInt(ProtocolFeature.INFLIGHT_SHMFD);
    assert.ok(offered & inflightBit, 'the daemon offers VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD');
    const replyAck = 1n << BigInt(ProtocolFeature.REPLY_ACK);
    await c.request(R.SET_PROTOCOL_FEATURES, encodeU64(inflightBit | replyAck), t);
    const ack = { ...t, needReply: true };
    await c.request(R.SET_OWNER, undefined, ack);
    const ringPacked = this.packed ? 1n << BigInt(Feature.RING_PACKED) : 0n;
    await c.request(R.SET_FEATURES, encodeU64((1n << BigInt(Feature.VERSION_1)) | (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES)) | ringPacked), ack);
    if (!this.inflight) {
      c.sendRaw(encodeRequest(R.GET_INFLIGHT_FD, encodeInflight({ mmapSize: 0, mmapOffset: 0, numQueues: 1, queueSize: QSIZE })));
      const reply = await c.receiveReply(5000);
      assert.ok(reply, 'GET_INFLIGHT_FD answered');
      assert.equal(reply.request, R.GET_INFLIGHT_FD);
      assert.equal(reply.fds.length, 1, 'GET_INFLIGHT_FD reply carries the region fd');
      const d = decodeInflight(reply.payload, R.GET_INFLIGHT_FD);
      assert.equal(d.mmapSize, inflightRegionBytes(1, QSIZE, this.packed), `the region is sized for ${this.packed ? 'packed' : 'split'} rings`);
      // Sealed at its size: nobody holding the fd can shrink it under a daemon that has it mapped.
      assert.equal(getSeals(reply.fds[0]), F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL, 'the region fd is sealed');
      assert.throws(() => ftruncate(reply.fds[0], 0), /EPERM/, 'the region cannot shrink');
      this.inflight = { fd: reply.fds[0], size: d.mmapSize, addr: mmap(d.mmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, reply.fds[0], 0) };
    }
    await c.request(R.SET_INFLIGHT_FD, encodeInflight({ mmapSize: this.inflight.size, mmapOffset: 0, numQueues: 1, queueSize: QSIZE }), { ...ack, fds: [this.inflight.fd] });
    await c.request(R.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0, size: this.memory.size, userAddr: this.memory.addr, mmapOffset: 0 }]), { ...ack, fds: [this.memory.fd] });
    await c.request(R.SET_VRING_NUM, encodeVringState(0, QSIZE), ack);
    await c.request(R.SET_VRING_BASE, encodeVringState(0, this.packed ? this.knownBase : this.splitRing.deviceUsedIdx()), ack);
    const a = this.memory.addr;
    await c.request(R.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 0, descUserAddr: a + RING.desc, availUserAddr: a + RING.avail, usedUserAddr: a + RING.used, logGuestAddr: 0 }), ack);
    await c.request(R.SET_VRING_CALL, encodeVringFd(0, false), { ...ack, fds: [this.callFd] });
    await c.request(R.SET_VRING_KICK, encodeVringFd(0, false), { ...ack, fds: [this.kickFd] });
    await c.request(R.SET_VRING_ENABLE, encodeVringState(0, 1), ack);
  }

  /** Makes a 4 KiB write of `data` at `sector` available as request `i` (split: head 3i; packed: a free buffer id); returns the head or id. */
  write(i: number, sector: number, data: Buffer): number {
    const block = BLOCKS + i * BLOCK;
    const bytes = this.memory.bytes;
    const hv = new DataView(bytes.buffer, bytes.byteOffset + block, 16);
    hv.setUint32(0, RequestType.OUT, true);
    hv.setUint32(4, 0, true);
    hv.setBigUint64(8, BigInt(sector), true);
    bytes[block + 64] = 0xff;
    bytes.set(data, block + 4096);
    const handles = this.packed ? this.ring.allocDescriptors(3) : [3 * i, 3 * i + 1, 3 * i + 2];
    assert.ok(handles, 'test bug: the packed ring is full');
    const head = handles[0];
    if (this.packed) {
      this.handlesOf.set(head, handles);
      this.requestOf.set(head, i);
    }
    this.ring.writeChain(handles, [block, block + 4096, block + 64], [16, 4096, 1], [0, 0, VIRTQ_DESC_F_WRITE]);
    this.ring.publish(head);
    return head;
  }

  /** Status byte of request i. */
  status(i: number): number {
    return this.memory.bytes[BLOCKS + i * BLOCK + 64];
  }

  /** Collects used elements; resolves once `done()` holds (checked every 5 ms). */
  async until(done: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      this.reap();
      if (done()) return;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; completions ${JSON.stringify([...this.completions])}`);
      await sleep(5);
    }
  }

  /** Waits for every request of `all` to complete, then checks each completed exactly once, with status OK. */
  async allCompleteOnce(all: Array<{ i: number }>): Promise<void> {
    await this.until(() => all.every((r) => this.completions.has(r.i)), 'every request after the restart');
    // A completion published twice would show up within this.
    await sleep(50);
    this.reap();
    for (const r of all) {
      assert.equal(this.completions.get(r.i), 1, `request ${r.i} completed exactly once`);
      assert.equal(this.status(r.i), 0, `request ${r.i} status OK`);
    }
  }

  /** Takes the used elements the daemon published. */
  reap(): void {
    this.ring.reap((id) => {
      let request = id / 3;
      if (this.packed) {
        // A packed ring's buffer ids are reused: free this one (and its slots) before onUsed issues more.
        request = this.requestOf.get(id) ?? NaN;
        const handles = this.handlesOf.get(id);
        if (handles) this.ring.freeDescriptors(handles);
        this.handlesOf.delete(id);
        this.requestOf.delete(id);
      }
      this.completions.set(request, (this.completions.get(request) ?? 0) + 1);
      this.onUsed(request);
    });
  }

  /** The inflight region's queue 0, as this frontend (QEMU) holds it (split layout). */
  region(): ReturnType<typeof fields> {
    return fields(new Uint8Array(view(this.inflight!.addr, this.inflight!.size)));
  }

  /** The inflight region's queue 0 in the packed layout. */
  packedRegion(): ReturnType<typeof packedRegionFields> {
    return packedRegionFields(new Uint8Array(view(this.inflight!.addr, this.inflight!.size)));
  }

  /** GET_VRING_BASE: stops the ring; a packed ring's answer is what QEMU keeps for the next start. */
  async stopRing(): Promise<number> {
    const reply = await this.conn!.request(R.GET_VRING_BASE, encodeVringState(0, 0), { expectReply: true, timeoutMs: 5000 });
    const base = reply.readUInt32LE(4);
    if (this.packed) this.knownBase = base;
    return base;
  }

  close(): void {
    this.conn?.close();
    if (this.inflight) {
      munmap(this.inflight.addr, this.inflight.size);
      closeQuietly(this.inflight.fd);
    }
    closeQuietly(this.kickFd);
    closeQuietly(this.callFd);
    this.memory.close();
  }
}

describe('daemon restart with requests in flight', { timeout: 60_000 }, () => {
  let dir: string;
  let image: string;
  let daemon: Daemon | undefined;
  let fe: ReconnectingFrontend | undefined;

  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'vblk-inflight-'));
    image = join(dir, 'disk.raw');
    closeSync(openSync(image, 'w'));
    truncateSync(image, 16 * MiB);
  });

  after(async () => {
    fe?.close();
    if (daemon) await stopDaemon(daemon);
    rmSync(dir, { recursive: true, force: true });
  });

  test('SIGKILL with writes in flight: a new daemon finishes them from the inflight region, each exactly once', async () => {
    // Writes to 1..2 MiB are held for 30 s: they are still in flight when the daemon dies.
    daemon = await startDaemon(dir, ['--image', image, '--inject-faults', 'delay=30s:write@1M-2M']);
    fe = new ReconnectingFrontend();
    await fe.connect(daemon.socket);
    // A tracked ring signals the guest once as it starts (completions a dead backend never signalled).
    const fe0 = fe;
    await fe0.until(() => { try { return eventfdRead(fe0.callFd) > 0n; } catch { return false; } }, 'the call at ring start', 2000);
    const held = [0, 1, 2, 3].map((i) => ({ i, sector: 2048 + 8 * i, data: pattern(4096, 10 + i) }));
    const fast = [4, 5, 6].map((i) => ({ i, sector: 8192 + 8 * i, data: pattern(4096, 10 + i) }));
    const heads = new Map<number, number>();
    for (const r of [...held, ...fast]) heads.set(r.i, fe.write(r.i, r.sector, r.data));
    const f = fe;
    await f.until(() => fast.every((r) => f.completions.get(r.i) === 1), 'the writes outside the delayed range');
    const region = f.region();
    assert.deepEqual(held.map((r) => region.inflight(heads.get(r.i)!)), [1, 1, 1, 1], 'the held writes are recorded in flight');
    assert.deepEqual(fast.map((r) => region.inflight(heads.get(r.i)!)), [0, 0, 0], 'completed writes are not');
    assert.equal(region.usedIdx, 3);

    daemon.proc.kill('SIGKILL');
    await daemon.exit;
    f.conn!.close();
    // The guest goes on submitting while no backend runs.
    const late = { i: 7, sector: 2048 + 64, data: pattern(4096, 99) };
    heads.set(late.i, f.write(late.i, late.sector, late.data));

    // The same command line without the fault; the old socket file is still there and must be replaced.
    daemon = await startDaemon(dir, ['--image', image]);
    await f.connect(daemon.socket);
    const all = [...held, ...fast, late];
    await f.allCompleteOnce(all);
    assert.equal(f.splitRing.deviceUsedIdx(), all.length);
    const after = f.region();
    assert.equal(after.usedIdx, all.length);
    for (let h = 0; h < QSIZE; h++) assert.equal(after.inflight(h), 0, `head ${h} not in flight`);
    assert.match(daemon.log.join(''), /4 requests left in flight to resubmit/);
    for (const r of all) assert.deepEqual(readImage(image, r.sector * 512, 4096), r.data, `request ${r.i} data in the image`);
    // The region cannot change under a running ring.
    await assert.rejects(
      f.conn!.request(R.SET_INFLIGHT_FD, encodeInflight({ mmapSize: f.inflight!.size, mmapOffset: 0, numQueues: 1, queueSize: QSIZE }), { needReply: true, fds: [f.inflight!.fd] }),
      /SET_INFLIGHT_FD refused/,
    );
    // Nothing is left in flight inside the daemon either: it stops the ring (GET_VRING_BASE drains first).
    assert.equal(await f.stopRing(), all.length, 'GET_VRING_BASE: next avail index');
  });

  test('packed ring: SIGKILL with writes in flight: a new daemon, given the stale vring base QEMU keeps, resumes from the region; each write completes once', async () => {
    fe?.close();
    if (daemon) assert.equal(await stopDaemon(daemon), 0);
    daemon = await startDaemon(dir, ['--image', image, '--inject-faults', 'delay=30s:write@1M-2M']);
    const f = fe = new ReconnectingFrontend(true);
    // GET_INFLIGHT_FD (in connect) sizes the region for QueueRegionPacked.
    await f.connect(daemon.socket);
    await f.until(() => { try { return eventfdRead(f.callFd) > 0n; } catch { return false; } }, 'the call at ring start', 2000);
    assert.equal(f.packedRegion().version, 1, 'the region was initialized');
    // 90 slots of writes first: the ring wraps, to a position and wrap counters the stale base does not have.
    for (let batch = 0; batch < 3; batch++) {
      const warm = Array.from({ length: 10 }, (_, k) => 20 + 10 * batch + k);
      for (const i of warm) f.write(i, 8192 + 8 * i, pattern(4096, i));
      await f.until(() => warm.every((i) => f.completions.get(i) === 1), 'the warm-up writes');
    }
    const ring = f.packedRing;
    assert.deepEqual([ring.lastUsed, ring.usedWrap], [90 - QSIZE, 0], 'test setup: the ring is in its second lap');
    const held = [0, 1, 2, 3].map((i) => ({ i, sector: 2048 + 8 * i, data: pattern(4096, 10 + i) }));
    const fast = [4, 5, 6].map((i) => ({ i, sector: 8192 + 8 * i, data: pattern(4096, 10 + i) }));
    for (const r of [...held, ...fast]) f.write(r.i, r.sector, r.data);
    await f.until(() => fast.every((r) => f.completions.get(r.i) === 1), 'the writes outside the delayed range');
    const region = f.packedRegion();
    assert.equal(region.inflightEntries(QSIZE).length, 4, 'the held writes are recorded in flight');
    assert.deepEqual([region.usedIdx, region.usedWrap], [ring.lastUsed, ring.usedWrap], 'the region has the used position');
    const resumeUsed = { idx: ring.lastUsed, wrap: ring.usedWrap };

    daemon.proc.kill('SIGKILL');
    await daemon.exit;
    f.conn!.close();
    // The guest goes on submitting while no backend runs.
    const late = { i: 7, sector: 2048 + 64, data: pattern(4096, 99) };
    f.write(late.i, late.sector, late.data);

    // QEMU starts the ring again from the state it knew before the first start: slot 0, wrap counters 1.
    assert.equal(f.knownBase, FRESH);
    daemon = await startDaemon(dir, ['--image', image]);
    await f.connect(daemon.socket);
    const all = [...held, ...fast, late];
    await f.allCompleteOnce(all);
    const log = daemon.log.join('');
    assert.match(log, /4 requests left in flight to resubmit/);
    // Four 3-slot chains were in flight past the used position.
    const avail = resumeUsed.idx + 12;
    assert.match(log, new RegExp(`resumes at avail ${avail % QSIZE} wrap ${avail >= QSIZE ? 1 - resumeUsed.wrap : resumeUsed.wrap}, used ${resumeUsed.idx} wrap ${resumeUsed.wrap} \\(vring base 0x80008000`));
    for (const r of all) assert.deepEqual(readImage(image, r.sector * 512, 4096), r.data, `request ${r.i} data in the image`);
    const after = f.packedRegion();
    assert.deepEqual(after.inflightEntries(QSIZE), [], 'nothing in flight');
    assert.deepEqual([after.usedIdx, after.usedWrap], [ring.lastUsed, ring.usedWrap]);
    // GET_VRING_BASE drains and reports where the ring really is.
    assert.deepEqual(decodePackedBase(await f.stopRing()), decodePackedBase(ring.vringBase), 'GET_VRING_BASE: both positions and wrap counters');

    // A region the frontend scribbled on refuses the ring start; put right, the ring starts where it stood.
    f.packedRegion().set16(8, 7);
    const ack = { needReply: true, timeoutMs: 5000 };
    await f.conn!.request(R.SET_VRING_BASE, encodeVringState(0, f.knownBase), ack);
    await assert.rejects(f.conn!.request(R.SET_VRING_KICK, encodeVringFd(0, false), { ...ack, fds: [f.kickFd] }), /refused/);
    assert.match(daemon.log.join(''), /vring 0 cannot start: inflight region version 7 is not 1/);
    f.packedRegion().set16(8, 1);
    await f.conn!.request(R.SET_VRING_KICK, encodeVringFd(0, false), { ...ack, fds: [f.kickFd] });
    const more = { i: 8, sector: 8192, data: pattern(4096, 123) };
    f.write(more.i, more.sector, more.data);
    await f.until(() => f.completions.get(more.i) === 1, 'a write after the restart');
    assert.deepEqual(readImage(image, more.sector * 512, 4096), more.data);
    assert.equal(await f.stopRing(), ring.vringBase);
  });

  for (const packed of [false, true]) test(`${packed ? 'packed' : 'split'} ring: SIGKILL at random moments under a continuous write load, then SIGTERM: every write completes once and lands`, async () => {
    fe?.close();
    if (daemon) assert.equal(await stopDaemon(daemon), 0);
    const f = fe = new ReconnectingFrontend(packed);
    // Each request is held 2 ms, so a kill finds several in the daemon's hands.
    const args = ['--image', image, '--inject-faults', 'delay=2ms'];
    const restart = async () => {
      daemon = await startDaemon(dir, args);
      await f.connect(daemon.socket);
    };
    const SLOTS = 16;
    const sector = (slot: number) => 4096 + 8 * slot;
    const gen = new Array<number>(SLOTS).fill(0);
    const outstanding = new Array<boolean>(SLOTS).fill(false);
    const anomalies: string[] = [];
    let completed = 0;
    let issuing = true;
    const issue = (slot: number) => {
      gen[slot]++;
      outstanding[slot] = true;
      f.write(slot, sector(slot), pattern(4096, slot * 100_000 + gen[slot]));
    };
    f.onUsed = (slot) => {
      if (!Number.isInteger(slot) || slot >= SLOTS || !outstanding[slot]) return void anomalies.push(`unexpected completion of request ${slot}`);
      if (f.status(slot) !== 0) anomalies.push(`slot ${slot} generation ${gen[slot]}: status ${f.status(slot)}`);
      outstanding[slot] = false;
      completed++;
      if (issuing) issue(slot);
    };
    const runFor = async (ms: number) => {
      const end = Date.now() + ms;
      await f.until(() => Date.now() >= end, 'the load', ms + 10_000);
    };
    await restart();
    for (let s = 0; s < SLOTS; s++) issue(s);
    let resubmitted = 0;
    for (let k = 0; k < 5; k++) {
      await runFor(100 + Math.floor(Math.random() * 300));
      daemon!.proc.kill('SIGKILL');
      await daemon!.exit;
      f.conn!.close();
      f.reap(); // completions published right before the kill
      await restart();
      await f.until(() => daemon!.log.join('').includes('vring 0 started'), 'the ring to start');
      resubmitted += Number(/(\d+) requests left in flight to resubmit/.exec(daemon!.log.join(''))?.[1] ?? 0);
    }
    await runFor(200);
    const code = await stopDaemon(daemon!);
    assert.equal(code, 0, `exit code after SIGTERM under load\n${daemon!.log.join('')}`);
    f.conn!.close();
    issuing = false;
    await restart();
    await f.until(() => outstanding.every((o) => !o), 'the last writes');
    assert.deepEqual(anomalies, []);
    assert.ok(completed > 5 * SLOTS, `${completed} writes completed`);
    assert.ok(resubmitted > 0, 'some kill found requests in flight');
    for (let s = 0; s < SLOTS; s++) assert.deepEqual(readImage(image, sector(s) * 512, 4096), pattern(4096, s * 100_000 + gen[s]), `slot ${s} holds its last write`);
    assert.equal(await f.stopRing(), f.ring.vringBase, 'GET_VRING_BASE: the daemon stands where the guest does');
  });

  test('a region fd from elsewhere is sealed against shrinking when it allows it, else taken with a warning', async () => {
    fe?.close();
    fe = undefined;
    if (daemon) assert.equal(await stopDaemon(daemon), 0);
    daemon = await startDaemon(dir, ['--image', image]);
    const size = inflightRegionBytes(1, QSIZE, false);
    for (const [what, flags] of [['sealable', MFD_ALLOW_SEALING], ['unsealable', 0]] as const) {
      const fd = memfdCreate(`foreign-${what}`, flags);
      ftruncate(fd, size);
      const f = new ReconnectingFrontend();
      f.inflight = { fd, size, addr: mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) };
      try {
        await f.connect(daemon.socket);
        if (what === 'sealable') assert.equal(getSeals(fd) & F_SEAL_SHRINK, F_SEAL_SHRINK, 'the daemon sealed the region it maps');
        else assert.match(daemon.log.join(''), /inflight region's fd cannot be sealed against shrinking/);
        // Either way the ring runs with tracking.
        f.write(0, 0, pattern(4096, 7));
        await f.until(() => f.completions.get(0) === 1, 'the write');
        assert.deepEqual(readImage(image, 0, 4096), pattern(4096, 7));
      } finally {
        f.close();
      }
      assert.equal(await stopDaemon(daemon), 0);
      daemon = await startDaemon(dir, ['--image', image]);
    }
  });

  test('without INFLIGHT_SHMFD negotiated the daemon serves as before and GET_INFLIGHT_FD gets a size-0 answer', async () => {
    fe?.close();
    fe = undefined;
    // A fresh daemon: the previous one may still be tearing down the last frontend (it turns others away).
    if (daemon) assert.equal(await stopDaemon(daemon), 0);
    daemon = await startDaemon(dir, ['--image', image]);
    const client = await connectClient(daemon.socket);
    try {
      assert.equal(client.protocolFeatures & (1n << BigInt(ProtocolFeature.INFLIGHT_SHMFD)), 0n);
      await client.write(4096, pattern(4096, 5));
      assert.deepEqual(await client.read(4096, 4096), pattern(4096, 5));
      client.connection.sendRaw(encodeRequest(R.GET_INFLIGHT_FD, encodeInflight({ mmapSize: 0, mmapOffset: 0, numQueues: 1, queueSize: 128 })));
      const reply = await client.connection.receiveReply(5000);
      assert.ok(reply);
      assert.equal(reply.fds.length, 0);
      assert.equal(decodeInflight(reply.payload, R.GET_INFLIGHT_FD).mmapSize, 0);
      assert.deepEqual(await client.read(4096, 4096), pattern(4096, 5), 'the connection goes on');
    } finally {
      await client.close();
    }
    assert.equal(await stopDaemon(daemon), 0);
    daemon = undefined;
  });
});
