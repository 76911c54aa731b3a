/**
 * The back-end side of the vhost-user protocol for one frontend connection: one handler per request,
 * in a table. Generic over the device: what is device specific (features, config space, the data
 * plane that serves started rings) sits behind the VhostUserDevice interface.
 *
 * Every request is answered, refused or, when the stream can no longer be trusted (bad header), ends
 * the connection; none can throw past this class. Ring state follows the spec: a ring starts when it
 * has a kick fd and is enabled, and stops at GET_VRING_BASE, which answers only after in-flight
 * requests completed.
 */
import { fstatSync } from 'node:fs';
import { UnixConnection } from '../os/unix-socket.js';
import { addSeals, closeQuietly, ftruncate, getSeals, memfdCreate, F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, MFD_ALLOW_SEALING } from '../os/libc.js';
import { inflightQueueBytes, inflightRegionBytes } from '../virtqueue/inflight.js';
import { MAX_QUEUE_SIZE } from '../virtqueue/queue.js';
import { mapRegion, unmapRegion, type RegionMapping } from '../memory/mapping.js';
import type { RegionDescriptor } from '../memory/guest-memory.js';
import type { Logger } from '../daemon/logger.js';
import {
  FrontendRequest as R, BackendRequest, ProtocolFeature, ProtocolError, HEADER_SIZE, MAX_FDS, MAX_CONFIG_SIZE, VHOST_USER_F_PROTOCOL_FEATURES,
  decodeConfig, decodeEmpty, decodeInflight, encodeReplyInflight, decodeHeader, decodeMemRegion, decodeMemTable, decodeU64, decodeVringAddr, decodeVringFd,
  decodeVringState, decodeReplyHeader, encodeBackendRequest, encodeReply, encodeReplyAck, encodeReplyConfig, encodeReplyU64, encodeReplyVringState, requestName, backendRequestName,
} from './messages.js';

/** One queue's part of the inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), mapped in this process. */
export interface InflightArea {
  /** Address of the queue's region here. */
  hostAddr: number;
  /** Its length in bytes (inflightQueueBytes(queueSize, packed): the layout follows the ring type). */
  bytes: number;
  /** The queue size the frontend described the region with (desc_num). */
  queueSize: number;
}

/** Ring parameters handed to the data plane when a ring starts. */
export interface RingStart {
  queue: number;
  size: number;
  /** Split: descriptor table; packed: descriptor ring. */
  descUserAddr: number;
  /** Split: avail ring; packed: driver event suppression area. */
  availUserAddr: number;
  /** Split: used ring; packed: device event suppression area. */
  usedUserAddr: number;
  /** The vring base from SET_VRING_BASE: split, the next avail index; packed, see packedRing. */
  lastAvailIdx: number;
  kickFd: number;
  callFd: number;
  features: bigint;
  /**
   * VIRTIO_F_RING_PACKED was negotiated: the ring is packed and the base carries the last avail index in
   * bits 0-14, its wrap counter in bit 15, the used index in bits 16-30 and its wrap counter in bit 31.
   */
  packed: boolean;
  /** Where the ring records requests in flight (INFLIGHT_SHMFD set up; split or packed layout as `packed` says), or null/absent: untracked. */
  inflight?: InflightArea | null;
}

/** A mapped region as the data plane needs it. */
export interface PlaneRegion extends RegionDescriptor {
  hostAddr: number;
}

/** What a device behind the vhost-user protocol provides. */
export interface VhostUserDevice {
  /** virtio feature bits offered (device, ring and VERSION_1; PROTOCOL_FEATURES is added here). */
  readonly features: bigint;
  /** Protocol feature bits offered. */
  readonly protocolFeatures: bigint;
  /** Number of queues (GET_QUEUE_NUM). */
  readonly numQueues: number;
  /** Largest ring size accepted in SET_VRING_NUM. */
  readonly maxQueueSize: number;
  /** Config space bytes [offset, offset+size). */
  getConfig(offset: number, size: number): Uint8Array;
  /** Writes config space bytes; returns an error text to refuse. */
  setConfig(offset: number, data: Uint8Array, features: bigint): Promise<string | null>;
  /** Installs a new memory table in the data plane (resolves once the old one is no longer used). */
  setMemory(regions: PlaneRegion[]): Promise<void>;
  /** Starts serving a ring. */
  startRing(ring: RingStart): Promise<void>;
  /** Stops a ring after its in-flight requests; resolves with the next avail index. */
  stopRing(queue: number): Promise<number>;
  /** Replaces a running ring's call fd (-1: none). */
  setCallFd(queue: number, fd: number): Promise<void>;
}

/** VIRTIO_F_RING_PACKED: a transport feature bit that changes what the vring messages mean. */
const VIRTIO_F_RING_PACKED = 34n;

/** Largest number of memory slots (ADD_MEM_REG) we accept; QEMU must never see this go down. */
export const MAX_MEM_SLOTS = 32;

/**
 * How long the frontend may take to answer a backend request. QEMU handles CONFIG_CHANGE_MSG by reading
 * the config space back (a GET_CONFIG round trip on the main socket), so a healthy one answers in
 * milliseconds; one that does not answer at all must not leave the caller waiting forever.
 */
export const BACKEND_REPLY_TIMEOUT_MS = 10_000;

interface Vring {
  size: number;
  addr: { desc: number; avail: number; used: number } | null;
  base: number;
  kickFd: number;
  callFd: number;
  errFd: number;
  enabled: boolean;
  running: boolean;
}

interface Message {
  request: number;
  needReply: boolean;
  payload: Buffer;
  fds: number[];
}

/**
 * What a handler returns: a reply to send, a reply with fds to pass along (ours to close once sent), or
 * nothing (an ack is then sent when asked for).
 */
type HandlerResult = Buffer | { reply: Buffer; fds: number[] } | void;
type Handler = (m: Message) => Promise<HandlerResult> | HandlerResult;
/** A handler table entry: fds it expects ('any' = the handler checks), whether it has a reply body, and
 * the reply that signals failure where the spec defines one (else a refusal ends the connection). */
interface Entry { fds: number | 'any'; replies: boolean; handler: Handler; errorReply?: (m: Message) => Buffer }

/** An error that refuses one request; the connection goes on. */
class Refusal extends Error {}

/** One frontend connection speaking vhost-user to a device. */
export class VhostUserSession {
  private features = 0n;
  private protocolFeatures = 0n;
  private readonly vrings: Vring[];
  private regions: RegionMapping[] = [];
  private readonly handlers: Map<number, Entry>;
  private closed = false;
  /** The inflight region from SET_INFLIGHT_FD, mapped here, and the queue shape it was described with. */
  private inflight: { mapping: RegionMapping; numQueues: number; queueSize: number } | null = null;
  /** Our end of the backend request channel the frontend gave with SET_BACKEND_REQ_FD, or null. */
  private backendChannel: UnixConnection | null = null;
  /** Backend requests go out one at a time: the next waits for the previous one's reply. */
  private backendQueue: Promise<unknown> = Promise.resolve();

  constructor(private readonly conn: UnixConnection, private readonly device: VhostUserDevice, private readonly log: Logger, private readonly name = 'frontend') {
    this.vrings = Array.from({ length: device.numQueues }, () => newVring());
    // fds: how many fds the request carries ('any' = handler checks); replies: has its own reply body.
    this.handlers = new Map<number, Entry>([
      [R.GET_FEATURES, { fds: 0, replies: true, handler: () => this.getFeatures() }],
      [R.SET_FEATURES, { fds: 0, replies: false, handler: (m) => this.setFeatures(m) }],
      [R.GET_PROTOCOL_FEATURES, { fds: 0, replies: true, handler: () => encodeReplyU64(R.GET_PROTOCOL_FEATURES, this.device.protocolFeatures) }],
      [R.SET_PROTOCOL_FEATURES, { fds: 0, replies: false, handler: (m) => this.setProtocolFeatures(m) }],
      [R.SET_OWNER, { fds: 0, replies: false, handler: (m) => decodeEmpty(m.request, m.payload) }],
      [R.RESET_OWNER, { fds: 0, replies: false, handler: () => this.resetOwner() }],
      [R.RESET_DEVICE, { fds: 0, replies: false, handler: () => this.reset() }],
      [R.GET_QUEUE_NUM, { fds: 0, replies: true, handler: () => encodeReplyU64(R.GET_QUEUE_NUM, BigInt(this.device.numQueues)) }],
      [R.GET_MAX_MEM_SLOTS, { fds: 0, replies: true, handler: () => encodeReplyU64(R.GET_MAX_MEM_SLOTS, BigInt(MAX_MEM_SLOTS)) }],
      [R.SET_MEM_TABLE, { fds: 'any', replies: false, handler: (m) => this.setMemTable(m) }],
      [R.ADD_MEM_REG, { fds: 1, replies: false, handler: (m) => this.addMemReg(m) }],
      [R.REM_MEM_REG, { fds: 'any', replies: false, handler: (m) => this.remMemReg(m) }],
      // vhost-user.rst: a GET_CONFIG reply with a zero-length payload tells the frontend it failed.
      [R.GET_CONFIG, { fds: 0, replies: true, handler: (m) => this.getConfig(m), errorReply: () => encodeReply(R.GET_CONFIG) }],
      [R.SET_CONFIG, { fds: 0, replies: false, handler: (m) => this.setConfig(m) }],
      [R.SET_VRING_NUM, { fds: 0, replies: false, handler: (m) => this.setVringNum(m) }],
      [R.SET_VRING_ADDR, { fds: 0, replies: false, handler: (m) => this.setVringAddr(m) }],
      [R.SET_VRING_BASE, { fds: 0, replies: false, handler: (m) => this.setVringBase(m) }],
      [R.GET_VRING_BASE, { fds: 0, replies: true, handler: (m) => this.getVringBase(m) }],
      [R.SET_VRING_KICK, { fds: 'any', replies: false, handler: (m) => this.setVringFd(m, 'kickFd') }],
      [R.SET_VRING_CALL, { fds: 'any', replies: false, handler: (m) => this.setVringFd(m, 'callFd') }],
      [R.SET_VRING_ERR, { fds: 'any', replies: false, handler: (m) => this.setVringFd(m, 'errFd') }],
      [R.SET_VRING_ENABLE, { fds: 0, replies: false, handler: (m) => this.setVringEnable(m) }],
      [R.SET_BACKEND_REQ_FD, { fds: 1, replies: false, handler: (m) => this.setBackendReqFd(m) }],
      // QEMU takes a zero-sized reply as "no inflight tracking" and goes on without it.
      [R.GET_INFLIGHT_FD, { fds: 0, replies: true, handler: (m) => this.getInflightFd(m), errorReply: () => encodeReplyInflight({ mmapSize: 0, mmapOffset: 0, numQueues: 0, queueSize: 0 }) }],
      [R.SET_INFLIGHT_FD, { fds: 1, replies: false, handler: (m) => this.setInflightFd(m) }],
    ]);
  }

  /** Serves requests until the frontend disconnects or breaks the framing; then releases everything. */
  async serve(): Promise<void> {
    try {
      for (;;) {
        const msg = await this.receive();
        if (!msg) break;
        await this.dispatch(msg);
      }
    } catch (err) {
      this.log.error(`${this.name}: connection dropped: ${(err as Error).message}`);
    } finally {
      this.log.debug(`${this.name}: connection closed; stopping its rings`);
      await this.teardown();
    }
  }

  /** Closes the connection; serve() then stops rings and resolves. */
  close(): void {
    this.conn.close();
  }

  /** Reads one message; null at end of stream. A header that cannot be trusted ends the connection. */
  private async receive(): Promise<Message | null> {
    const head = await this.conn.recvExact(HEADER_SIZE);
    if (!head) return null;
    let header;
    try {
      header = decodeHeader(head.data);
    } catch (err) {
      for (const fd of head.fds) closeQuietly(fd);
      throw err;
    }
    let body;
    try {
      body = header.size > 0 ? await this.conn.recvExact(header.size) : { data: Buffer.alloc(0), fds: [] };
    } catch (err) {
      // The body broke the stream (e.g. too many fds): the header's fds are ours to close.
      for (const fd of head.fds) closeQuietly(fd);
      throw err;
    }
    if (!body) {
      for (const fd of head.fds) closeQuietly(fd);
      return null;
    }
    const fds = [...head.fds, ...body.fds];
    return { request: header.request, needReply: header.needReply, payload: body.data, fds };
  }

  /** Runs the handler of one request and sends its reply or ack. Never throws for a bad request. */
  private async dispatch(m: Message): Promise<void> {
    const name = requestName(m.request);
    const entry = this.handlers.get(m.request);
    let reply: HandlerResult = undefined;
    let ok = true;
    try {
      if (!entry) throw new Refusal(`${name} is not supported`);
      if (entry.fds !== 'any' && m.fds.length !== entry.fds) {
        throw new Refusal(`${name} came with ${m.fds.length} file descriptors, expected ${entry.fds}`);
      }
      if (m.fds.length > MAX_FDS) throw new Refusal(`${name} came with ${m.fds.length} file descriptors`);
      this.log.debug(`${this.name}: ${name} (${m.payload.length} bytes, ${m.fds.length} fds)`);
      reply = await entry.handler(m);
    } catch (err) {
      ok = false;
      for (const fd of m.fds) closeQuietly(fd);
      const why = err instanceof Refusal || err instanceof ProtocolError || err instanceof RangeError ? (err as Error).message : `internal error: ${(err as Error).stack ?? err}`;
      this.log.warn(`${this.name}: refused ${name}: ${why}`);
      if (entry?.errorReply) {
        reply = entry.errorReply(m);
      } else if (entry?.replies) {
        // The frontend waits for a reply body we cannot give: stop talking rather than let it hang.
        throw new Error(`cannot answer ${name}`);
      }
    }
    if (reply && 'fds' in reply) {
      try {
        this.conn.send(reply.reply, reply.fds);
      } finally {
        for (const fd of reply.fds) closeQuietly(fd);
      }
    } else if (reply) {
      this.conn.send(reply);
    } else if (m.needReply && this.negotiated(ProtocolFeature.REPLY_ACK)) {
      this.conn.send(encodeReplyAck(m.request, ok));
    }
  }

  /** True once the frontend acked VIRTIO_F_RING_PACKED: every ring is then packed. */
  private get packedRings(): boolean {
    return (this.features & (1n << VIRTIO_F_RING_PACKED)) !== 0n;
  }

  private negotiated(protocolFeature: number): boolean {
    return (this.protocolFeatures & (1n << BigInt(protocolFeature))) !== 0n;
  }

  private getFeatures(): Buffer {
    return encodeReplyU64(R.GET_FEATURES, this.device.features | (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES)));
  }

  private setFeatures(m: Message): void {
    const wanted = decodeU64(m.request, m.payload);
    const offered = this.device.features | (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES));
    if ((wanted & ~offered) !== 0n) throw new Refusal(`features 0x${(wanted & ~offered).toString(16)} were never offered`);
    this.features = wanted;
    // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings are enabled from the start.
    if ((wanted & (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES))) === 0n) for (const v of this.vrings) v.enabled = true;
  }

  private setProtocolFeatures(m: Message): void {
    const wanted = decodeU64(m.request, m.payload);
    if ((wanted & ~this.device.protocolFeatures) !== 0n) throw new Refusal(`protocol features 0x${(wanted & ~this.device.protocolFeatures).toString(16)} were never offered`);
    this.protocolFeatures = wanted;
  }

  private vring(index: number): Vring {
    const v = this.vrings[index];
    if (!v) throw new Refusal(`vring index ${index} is out of range (this device has ${this.vrings.length} queues)`);
    return v;
  }

  private setVringNum(m: Message): void {
    const { index, num } = decodeVringState(m.request, m.payload);
    const v = this.vring(index);
    if (v.running) throw new Refusal(`vring ${index} is running`);
    // A packed ring may have any size (virtio 1.2, 2.8); a split ring needs a power of two (2.7). QEMU
    // sends SET_FEATURES first; a split ring whose size slipped through is refused when it starts.
    if (num < 1 || num > this.device.maxQueueSize) throw new Refusal(`vring ${index} size ${num} is not in 1..${this.device.maxQueueSize}`);
    if (!this.packedRings && (num & (num - 1)) !== 0) throw new Refusal(`vring ${index} size ${num} is not a power of two (split rings need one)`);
    v.size = num;
  }

  private setVringAddr(m: Message): void {
    const a = decodeVringAddr(m.payload);
    const v = this.vring(a.index);
    if (v.running) throw new Refusal(`vring ${a.index} is running`);
    v.addr = { desc: a.descUserAddr, avail: a.availUserAddr, used: a.usedUserAddr };
  }

  private setVringBase(m: Message): void {
    const { index, num } = decodeVringState(m.request, m.payload);
    const v = this.vring(index);
    if (v.running) throw new Refusal(`vring ${index} is running`);
    // Packed rings carry both wrap counters and the used index too (RingStart.packed): all 32 bits count.
    if (num > 0xffff && !this.packedRings) throw new Refusal(`vring ${index} base ${num} does not fit a 16-bit ring index`);
    v.base = num;
  }

  private async getVringBase(m: Message): Promise<Buffer> {
    const { index } = decodeVringState(m.request, m.payload);
    const v = this.vring(index);
    await this.stopRing(index, v);
    // The ring is stopped for good: its kick fd is no longer ours to watch.
    closeQuietly(v.kickFd);
    v.kickFd = -1;
    return encodeReplyVringState(R.GET_VRING_BASE, index, v.base);
  }

  private async setVringFd(m: Message, which: 'kickFd' | 'callFd' | 'errFd'): Promise<void> {
    const { index, noFd } = decodeVringFd(m.request, m.payload);
    const v = this.vring(index);
    if (m.fds.length !== (noFd ? 0 : 1)) throw new Refusal(`${requestName(m.request)} came with ${m.fds.length} file descriptors, expected ${noFd ? 0 : 1}`);
    const fd = noFd ? -1 : m.fds[0];
    // From here the vring owns the fd: a refusal below must not close it a second time.
    if (!noFd) m.fds[0] = -1;
    if (which === 'kickFd') {
      // A new kick fd restarts the ring with it (QEMU sends one when it (re)starts the device).
      if (v.running) await this.stopRing(index, v);
      closeQuietly(v.kickFd);
      v.kickFd = fd;
      if (fd < 0) this.log.warn(`${this.name}: vring ${index} has no kick fd; it will not be served (polling mode is not supported)`);
      await this.maybeStart(index, v);
    } else if (which === 'callFd') {
      if (v.running) await this.device.setCallFd(index, fd);
      closeQuietly(v.callFd);
      v.callFd = fd;
    } else {
      closeQuietly(v.errFd);
      v.errFd = fd;
    }
  }

  private async setVringEnable(m: Message): Promise<void> {
    const { index, num } = decodeVringState(m.request, m.payload);
    const v = this.vring(index);
    if (num > 1) throw new Refusal(`SET_VRING_ENABLE state ${num} is neither 0 nor 1`);
    v.enabled = num === 1;
    if (v.enabled) await this.maybeStart(index, v);
    else if (v.running) await this.stopRing(index, v);
  }

  /** Starts a ring once it has everything it needs; problems are refusals with the reason. */
  private async maybeStart(index: number, v: Vring): Promise<void> {
    if (v.running || !v.enabled || v.kickFd < 0) return;
    if (!v.addr) throw new Refusal(`vring ${index} has a kick fd but no addresses`);
    if (this.regions.length === 0) throw new Refusal(`vring ${index} started before any memory table`);
    try {
      await this.device.startRing({
        queue: index, size: v.size, descUserAddr: v.addr.desc, availUserAddr: v.addr.avail, usedUserAddr: v.addr.used,
        lastAvailIdx: v.base, kickFd: v.kickFd, callFd: v.callFd, features: this.features, packed: this.packedRings,
        inflight: this.inflightArea(index, v),
      });
    } catch (err) {
      throw new Refusal(`vring ${index} cannot start: ${(err as Error).message}`);
    }
    v.running = true;
    this.log.info(`${this.name}: vring ${index} started (size ${v.size}, base ${v.base})`);
  }

  private async stopRing(index: number, v: Vring): Promise<void> {
    if (!v.running) return;
    this.log.debug(`${this.name}: stopping vring ${index}`);
    v.base = await this.device.stopRing(index);
    v.running = false;
    this.log.info(`${this.name}: vring ${index} stopped at avail index ${v.base}`);
  }

  private async setMemTable(m: Message): Promise<void> {
    const table = decodeMemTable(m.payload);
    if (m.fds.length !== table.length) throw new Refusal(`SET_MEM_TABLE describes ${table.length} regions but came with ${m.fds.length} file descriptors`);
    const mapped = this.mapAll(table, m.fds);
    await this.replaceRegions(mapped);
  }

  private mapAll(table: RegionDescriptor[], fds: number[]): RegionMapping[] {
    const mapped: RegionMapping[] = [];
    try {
      for (let i = 0; i < table.length; i++) {
        const fd = fds[i];
        fds[i] = -1; // mapRegion closes it, mapped or not
        mapped.push(mapRegion(table[i], fd));
      }
    } catch (err) {
      for (const r of mapped) unmapRegion(r);
      throw new Refusal(`mapping guest memory failed: ${(err as Error).message}`);
    }
    return mapped;
  }

  /** Hands a new table to the data plane, then unmaps what it no longer uses. */
  private async replaceRegions(next: RegionMapping[]): Promise<void> {
    const old = this.regions;
    try {
      await this.device.setMemory(next.map((r) => ({ ...r.region, hostAddr: r.hostAddr })));
    } catch (err) {
      for (const r of next) if (!old.includes(r)) unmapRegion(r);
      throw new Refusal(`the data plane refused the memory table: ${(err as Error).message}`);
    }
    this.regions = next;
    for (const r of old) if (!next.includes(r)) unmapRegion(r);
    this.log.info(`${this.name}: memory table: ${next.map((r) => `[gpa 0x${r.region.guestAddr.toString(16)} +${r.region.size}]`).join(' ')}`);
  }

  private async addMemReg(m: Message): Promise<void> {
    const region = decodeMemRegion(m.request, m.payload);
    if (this.regions.length >= MAX_MEM_SLOTS) throw new Refusal(`all ${MAX_MEM_SLOTS} memory slots are in use`);
    const end = region.guestAddr + region.size;
    const clash = this.regions.find((r) => region.guestAddr < r.region.guestAddr + r.region.size && r.region.guestAddr < end);
    if (clash) throw new Refusal(`region [0x${region.guestAddr.toString(16)} +${region.size}] overlaps an existing one`);
    const [mapped] = this.mapAll([region], m.fds);
    await this.replaceRegions([...this.regions, mapped]);
  }

  private async remMemReg(m: Message): Promise<void> {
    // The spec lets a frontend send an fd here; it means nothing, so it is closed.
    for (const fd of m.fds) closeQuietly(fd);
    const region = decodeMemRegion(m.request, m.payload);
    const victim = this.regions.find((r) => r.region.guestAddr === region.guestAddr && r.region.size === region.size && r.region.userAddr === region.userAddr);
    if (!victim) throw new Refusal(`no region [0x${region.guestAddr.toString(16)} +${region.size}] to remove`);
    await this.replaceRegions(this.regions.filter((r) => r !== victim));
  }

  private getConfig(m: Message): Buffer {
    const c = decodeConfig(m.request, m.payload);
    if (c.offset + c.size > MAX_CONFIG_SIZE) throw new Refusal(`GET_CONFIG range ${c.offset}+${c.size} exceeds ${MAX_CONFIG_SIZE}`);
    return encodeReplyConfig(c.offset, c.size, c.flags, this.device.getConfig(c.offset, c.size));
  }

  private async setConfig(m: Message): Promise<void> {
    const c = decodeConfig(m.request, m.payload);
    const err = await this.device.setConfig(c.offset, c.data, this.features);
    if (err) throw new Refusal(err);
  }

  /** RESET_OWNER: the frontend gives the device up, and with it the backend request channel. */
  private async resetOwner(): Promise<void> {
    await this.reset();
    this.closeBackendChannel();
  }

  /** SET_BACKEND_REQ_FD: keeps the frontend's socket for backend requests (replacing an earlier one). */
  private setBackendReqFd(m: Message): void {
    decodeEmpty(m.request, m.payload);
    if (!this.negotiated(ProtocolFeature.BACKEND_REQ)) throw new Refusal('VHOST_USER_PROTOCOL_F_BACKEND_REQ was not negotiated');
    let isSocket: boolean;
    try {
      isSocket = fstatSync(m.fds[0]).isSocket();
    } catch (err) {
      throw new Refusal(`the file descriptor cannot be examined: ${(err as Error).message}`);
    }
    if (!isSocket) throw new Refusal('the file descriptor is not a socket');
    this.closeBackendChannel();
    this.backendChannel = new UnixConnection(m.fds[0]);
    m.fds[0] = -1; // the channel owns it now
    this.log.info(`${this.name}: backend request channel set up`);
  }

  private closeBackendChannel(): void {
    this.backendChannel?.close();
    this.backendChannel = null;
  }

  /** True while the frontend has given us a backend request channel. */
  get hasBackendChannel(): boolean {
    return this.backendChannel !== null;
  }

  /**
   * Tells the frontend that the config space changed (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG): QEMU then
   * reads it back with GET_CONFIG and, if the capacity changed, interrupts the guest. Resolves true once
   * the frontend took it (acknowledged it, with REPLY_ACK); false without a channel or when it failed,
   * which is logged. Never rejects, and never waits longer than BACKEND_REPLY_TIMEOUT_MS for a reply.
   */
  notifyConfigChange(): Promise<boolean> {
    const run = this.backendQueue.then(() => this.sendBackendRequest(BackendRequest.CONFIG_CHANGE_MSG));
    this.backendQueue = run;
    return run;
  }

  private async sendBackendRequest(request: number): Promise<boolean> {
    const channel = this.backendChannel;
    const name = backendRequestName(request);
    if (!channel || this.closed) {
      this.log.info(`${this.name}: no backend request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ not set up); ${name} not sent`);
      return false;
    }
    // Without REPLY_ACK the frontend never answers: asking for a reply would leave one unread forever.
    const needReply = this.negotiated(ProtocolFeature.REPLY_ACK);
    try {
      channel.send(encodeBackendRequest(request, undefined, needReply));
      if (needReply) {
        const ack = await this.backendReply(channel, request);
        if (ack !== 0n) {
          this.log.warn(`${this.name}: the frontend answered ${name} with failure (${ack})`);
          return false;
        }
      }
      this.log.debug(`${this.name}: ${name} sent${needReply ? ' and acknowledged' : ''}`);
      return true;
    } catch (err) {
      // A reply late, malformed or missing leaves the stream out of step: the channel is dropped.
      this.log.warn(`${this.name}: ${name} failed: ${(err as Error).message}; backend request channel closed`);
      if (this.backendChannel === channel) this.closeBackendChannel();
      else channel.close();
      return false;
    }
  }

  /** Reads the u64 reply to a backend request within BACKEND_REPLY_TIMEOUT_MS. */
  private async backendReply(channel: UnixConnection, request: number): Promise<bigint> {
    let timedOut = false;
    // Closing the channel ends a receive parked in poll(): the awaits below then see end of stream.
    const timer = setTimeout(() => { timedOut = true; channel.close(); }, BACKEND_REPLY_TIMEOUT_MS);
    const gone = () => new Error(timedOut ? `no reply within ${BACKEND_REPLY_TIMEOUT_MS} ms` : 'the frontend closed the channel');
    try {
      const head = await channel.recvExact(HEADER_SIZE);
      if (!head) throw gone();
      for (const fd of head.fds) closeQuietly(fd);
      const h = decodeReplyHeader(head.data, 'backend');
      if (h.request !== request) throw new Error(`the reply is for ${backendRequestName(h.request)}`);
      const body = await channel.recvExact(h.size);
      if (!body) throw gone();
      for (const fd of body.fds) closeQuietly(fd);
      if (body.data.length !== 8) throw new Error(`the reply payload is ${body.data.length} bytes, expected 8`);
      return body.data.readBigUInt64LE(0);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * GET_INFLIGHT_FD: a new zero-filled memfd sized for the queues the frontend describes. The frontend
   * keeps it and hands it back with SET_INFLIGHT_FD, to this process or to the next one after a restart.
   * Queue regions are QueueRegionPacked when VIRTIO_F_RING_PACKED was negotiated (QEMU sends
   * SET_FEATURES before this, for that reason), else QueueRegionSplit. A request that does not fit gets
   * size 0 in the reply.
   */
  private getInflightFd(m: Message): HandlerResult {
    const d = decodeInflight(m.payload, R.GET_INFLIGHT_FD);
    if (!this.negotiated(ProtocolFeature.INFLIGHT_SHMFD)) throw new Refusal('VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD was not negotiated');
    this.checkInflightShape(d.numQueues, d.queueSize);
    const packed = this.packedRings;
    const size = inflightRegionBytes(d.numQueues, d.queueSize, packed);
    const fd = memfdCreate('vhost-blk-inflight', MFD_ALLOW_SEALING);
    try {
      ftruncate(fd, size);
      // Sealed at its size for good: whoever holds the fd (the frontend, any later backend) can never
      // shrink it under a process that has it mapped, which would die of SIGBUS on its next store.
      addSeals(fd, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
    } catch (err) {
      closeQuietly(fd);
      throw err;
    }
    this.log.info(`${this.name}: inflight region of ${size} bytes created for ${d.numQueues} ${packed ? 'packed' : 'split'} queues of ${d.queueSize}`);
    return { reply: encodeReplyInflight({ mmapSize: size, mmapOffset: 0, numQueues: d.numQueues, queueSize: d.queueSize }), fds: [fd] };
  }

  private checkInflightShape(numQueues: number, queueSize: number): void {
    if (numQueues < 1 || numQueues > this.vrings.length) throw new Refusal(`inflight region for ${numQueues} queues (this device has ${this.vrings.length})`);
    if (queueSize < 1 || queueSize > MAX_QUEUE_SIZE) throw new Refusal(`inflight queue size ${queueSize} is not in 1..${MAX_QUEUE_SIZE}`);
  }

  /**
   * SET_INFLIGHT_FD: maps the region the frontend kept (sent before the rings start). Rings started from
   * now on record their requests there, and the first start of each recovers what a previous backend left.
   */
  private setInflightFd(m: Message): void {
    const d = decodeInflight(m.payload, R.SET_INFLIGHT_FD);
    if (!this.negotiated(ProtocolFeature.INFLIGHT_SHMFD)) throw new Refusal('VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD was not negotiated');
    const running = this.vrings.findIndex((v) => v.running);
    if (running >= 0) throw new Refusal(`vring ${running} is running; the inflight region can only change while every ring is stopped`);
    this.checkInflightShape(d.numQueues, d.queueSize);
    const need = inflightRegionBytes(d.numQueues, d.queueSize, this.packedRings);
    if (d.mmapSize < need) throw new Refusal(`inflight region of ${d.mmapSize} bytes, ${d.numQueues} queues of ${d.queueSize} need ${need}`);
    // The per-queue views are typed arrays over u64/u32/u16 fields.
    if (d.mmapOffset % 8 !== 0) throw new Refusal(`inflight region offset ${d.mmapOffset} is not 8-byte aligned`);
    const fd = m.fds[0];
    m.fds[0] = -1; // mapRegion closes it, mapped or not
    this.sealInflightFd(fd);
    let mapping: RegionMapping;
    try {
      mapping = mapRegion({ guestAddr: 0, size: d.mmapSize, userAddr: 0, mmapOffset: d.mmapOffset }, fd);
    } catch (err) {
      throw new Refusal(`mapping the inflight region failed: ${(err as Error).message}`);
    }
    this.dropInflight();
    this.inflight = { mapping, numQueues: d.numQueues, queueSize: d.queueSize };
    this.log.info(`${this.name}: inflight region set: ${d.mmapSize} bytes for ${d.numQueues} queues of ${d.queueSize}`);
  }

  /**
   * The region we map must not shrink under us (a store past its end is a SIGBUS that kills the daemon).
   * Our own GET_INFLIGHT_FD fds come sealed; one from elsewhere (an older vhost-blk, another backend) is
   * sealed here if it allows it, and otherwise taken with a warning: refusing it would fail QEMU's device
   * start and lose the requests a restart is meant to save. Guest memory fds carry the same exposure.
   */
  private sealInflightFd(fd: number): void {
    let seals: number;
    try {
      seals = getSeals(fd);
    } catch {
      seals = 0; // not a memfd or shmem file: it cannot carry seals
    }
    if ((seals & F_SEAL_SHRINK) !== 0) return;
    try {
      addSeals(fd, F_SEAL_SHRINK);
    } catch (err) {
      this.log.warn(`${this.name}: the inflight region's fd cannot be sealed against shrinking (${(err as Error).message}); ` +
        'a frontend that truncates it would crash this daemon');
    }
  }

  /** Queue `index`'s part of the inflight region, laid out for the negotiated ring type, or null when this ring is not tracked. */
  private inflightArea(index: number, v: Vring): InflightArea | null {
    const f = this.inflight;
    if (!f) return null;
    const bytes = inflightQueueBytes(f.queueSize, this.packedRings);
    // The size was checked at SET_INFLIGHT_FD for the ring type then; features may have changed since.
    const mapped = f.mapping.region.size;
    if (index >= f.numQueues || v.size > f.queueSize || (index + 1) * bytes > mapped) {
      this.log.warn(`${this.name}: vring ${index} (size ${v.size}) is outside the inflight region (${f.numQueues} queues of ${f.queueSize}, ` +
        `${mapped} bytes); its requests are not tracked`);
      return null;
    }
    return { hostAddr: f.mapping.hostAddr + index * bytes, bytes, queueSize: f.queueSize };
  }

  /** Unmaps the inflight region; only once no ring runs (workers write to it). */
  private dropInflight(): void {
    if (!this.inflight) return;
    unmapRegion(this.inflight.mapping);
    this.inflight = null;
  }

  /** RESET_OWNER / RESET_DEVICE: stop every ring and forget ring state, features and the inflight region. */
  private async reset(): Promise<void> {
    for (let i = 0; i < this.vrings.length; i++) {
      const v = this.vrings[i];
      await this.stopRing(i, v);
      closeVringFds(v);
      this.vrings[i] = newVring();
    }
    this.features = 0n;
    // A reset device starts over with fresh rings; QEMU gets a new region (and sends it) before it restarts.
    this.dropInflight();
  }

  /** After the connection ends: stop rings (in-flight requests finish), unmap memory, close fds. */
  private async teardown(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.conn.close();
    this.closeBackendChannel();
    for (let i = 0; i < this.vrings.length; i++) {
      try {
        await this.stopRing(i, this.vrings[i]);
      } catch (err) {
        this.log.error(`${this.name}: stopping vring ${i} failed: ${(err as Error).message}`);
      }
      closeVringFds(this.vrings[i]);
    }
    try {
      await this.device.setMemory([]);
    } catch (err) {
      this.log.error(`${this.name}: clearing the memory table failed: ${(err as Error).message}`);
    }
    for (const r of this.regions) unmapRegion(r);
    this.regions = [];
    // A ring that failed to stop may still write to the region: leaving it mapped costs only address space.
    if (this.vrings.some((v) => v.running)) this.log.error(`${this.name}: a vring is still running; the inflight region stays mapped`);
    else this.dropInflight();
  }
}

function newVring(): Vring {
  // Until SET_FEATURES says otherwise, rings wait for SET_VRING_ENABLE (PROTOCOL_FEATURES is the norm).
  return { size: 0, addr: null, base: 0, kickFd: -1, callFd: -1, errFd: -1, enabled: false, running: false };
}

function closeVringFds(v: Vring): void {
  closeQuietly(v.kickFd);
  closeQuietly(v.callFd);
  closeQuietly(v.errFd);
  v.kickFd = v.callFd = v.errFd = -1;
}
