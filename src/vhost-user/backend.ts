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
import { UnixConnection } from '../os/unix-socket.js';
import { closeQuietly } from '../os/libc.js';
import { mapRegion, unmapRegion, type RegionMapping } from '../memory/mapping.js';
import type { RegionDescriptor } from '../memory/guest-memory.js';
import type { Logger } from '../logger.js';
import {
  FrontendRequest as R, ProtocolFeature, ProtocolError, HEADER_SIZE, MAX_FDS, MAX_CONFIG_SIZE, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_F_LOG_ALL, VHOST_VRING_F_LOG,
  decodeConfig, decodeEmpty, decodeInflight, encodeReplyInflight, decodeHeader, decodeLog, decodeMemRegion, decodeMemTable, decodeU64, decodeVringAddr, decodeVringFd,
  decodeVringState, encodeReply, encodeReplyAck, encodeReplyConfig, encodeReplyU64, encodeReplyVringState, requestName,
} from './messages.js';
import { BackendChannel } from './backend-channel.js';
import { InflightRegion, type InflightArea } from './inflight-region.js';
import { MigrationLog, type DirtyLogArea } from './migration-log.js';
import { Refusal } from './refusal.js';

export type { InflightArea } from './inflight-region.js';
export type { DirtyLogArea } from './migration-log.js';
export { BACKEND_REPLY_TIMEOUT_MS } from './backend-channel.js';

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
  /** VHOST_VRING_F_LOG was set with the ring's addresses: the guest address its used ring is logged at (log_guest_addr), else null. */
  logUsedAddr: number | null;
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
  /** Migration: logs every write into guest memory in `log` (null: stop); resolves once the previous log is no longer used. */
  setDirtyLog(log: DirtyLogArea | null): Promise<void>;
  /** Migration: a running ring's VHOST_VRING_F_LOG changed: log its ring writes at `usedLogAddr` (null: not). */
  setRingLog(queue: number, usedLogAddr: number | null): Promise<void>;
}

/** VIRTIO_F_RING_PACKED: a transport feature bit that changes what the vring messages mean. */
const VIRTIO_F_RING_PACKED = 34n;

/** Largest number of memory slots (ADD_MEM_REG) we accept; QEMU must never see this go down. */
export const MAX_MEM_SLOTS = 32;

/** Features every device gets from the session: the protocol feature messages and dirty logging for migration. */
const SESSION_FEATURES = (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES)) | (1n << BigInt(VHOST_F_LOG_ALL));
const LOG_ALL = 1n << BigInt(VHOST_F_LOG_ALL);
/** Protocol features the session itself implements. */
const SESSION_PROTOCOL_FEATURES = 1n << BigInt(ProtocolFeature.LOG_SHMFD);

interface Vring {
  size: number;
  /** Ring addresses (frontend user addresses), and where the used ring is logged when VHOST_VRING_F_LOG is set (else null). */
  addr: { desc: number; avail: number; used: number; logUsed: number | null } | null;
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

/** How one request is handled, declared once in the table and checked before the handler runs. */
interface Spec<T> {
  /** File descriptors it must carry ('any': the handler checks). */
  fds: number | 'any';
  /** Decodes and checks the payload; a ProtocolError refuses the request. */
  decode: (m: Message) => T;
  /** Protocol feature that must be negotiated first (vhost-user.rst names one for many requests). */
  requires?: number;
  /** It always has a reply body: a refusal without errorReply must end the connection (the frontend waits). */
  replies?: boolean;
  /** The reply that signals failure where the spec defines one (undefined: none is due). */
  errorReply?: (m: Message) => Buffer | undefined;
}

/** A handler table entry: its spec and the handler, called with the decoded body. */
interface Entry extends Spec<unknown> {
  handle: (body: unknown, m: Message) => Promise<HandlerResult> | HandlerResult;
}

/** Builds a table entry whose handler gets what `spec.decode` returns, typed. */
function on<T>(spec: Spec<T>, handle: (body: T, m: Message) => Promise<HandlerResult> | HandlerResult): Entry {
  return { ...spec, handle: handle as Entry['handle'] };
}

/** Payload decoders in the shape the table takes. */
const empty = (m: Message) => decodeEmpty(m.request, m.payload);
/** For requests whose payload means nothing and was never checked (GET_FEATURES & co.): any is accepted, as before. */
const ignored = () => undefined;
const u64 = (m: Message) => decodeU64(m.request, m.payload);
const vringState = (m: Message) => decodeVringState(m.request, m.payload);
const vringFd = (m: Message) => decodeVringFd(m.request, m.payload);
const memRegion = (m: Message) => decodeMemRegion(m.request, m.payload);
const config = (m: Message) => decodeConfig(m.request, m.payload);
const inflight = (m: Message) => decodeInflight(m.payload, m.request);

/** Name of a protocol feature bit for refusals ("CONFIG"). */
function protocolFeatureName(bit: number): string {
  return Object.entries(ProtocolFeature).find(([, v]) => v === bit)?.[0] ?? `bit ${bit}`;
}

/** One frontend connection speaking vhost-user to a device. */
export class VhostUserSession {
  private features = 0n;
  private protocolFeatures = 0n;
  private readonly vrings: Vring[];
  private regions: RegionMapping[] = [];
  private readonly handlers: Map<number, Entry>;
  private closed = false;
  private readonly inflight: InflightRegion;
  private readonly channel: BackendChannel;
  private readonly migrationLog: MigrationLog;

  constructor(private readonly conn: UnixConnection, private readonly device: VhostUserDevice, private readonly log: Logger, private readonly name = 'frontend') {
    this.vrings = Array.from({ length: device.numQueues }, () => newVring());
    this.inflight = new InflightRegion(log, name, device.numQueues);
    this.channel = new BackendChannel(log, name, () => this.negotiated(ProtocolFeature.REPLY_ACK), () => !this.closed);
    this.migrationLog = new MigrationLog(log, name, device);
    const P = ProtocolFeature;
    this.handlers = new Map<number, Entry>([
      [R.GET_FEATURES, on({ fds: 0, decode: ignored, replies: true }, () => encodeReplyU64(R.GET_FEATURES, this.offeredFeatures))],
      [R.SET_FEATURES, on({ fds: 0, decode: u64 }, (f) => this.setFeatures(f))],
      [R.GET_PROTOCOL_FEATURES, on({ fds: 0, decode: ignored, replies: true }, () => encodeReplyU64(R.GET_PROTOCOL_FEATURES, this.offeredProtocolFeatures))],
      [R.SET_PROTOCOL_FEATURES, on({ fds: 0, decode: u64 }, (f) => this.setProtocolFeatures(f))],
      [R.SET_OWNER, on({ fds: 0, decode: empty }, () => undefined)],
      [R.RESET_OWNER, on({ fds: 0, decode: ignored }, () => this.resetOwner())],
      [R.RESET_DEVICE, on({ fds: 0, decode: ignored, requires: P.RESET_DEVICE }, () => this.reset())],
      [R.GET_QUEUE_NUM, on({ fds: 0, decode: ignored, replies: true, requires: P.MQ }, () => encodeReplyU64(R.GET_QUEUE_NUM, BigInt(this.device.numQueues)))],
      [R.GET_MAX_MEM_SLOTS, on({ fds: 0, decode: ignored, replies: true, requires: P.CONFIGURE_MEM_SLOTS }, () => encodeReplyU64(R.GET_MAX_MEM_SLOTS, BigInt(MAX_MEM_SLOTS)))],
      [R.SET_MEM_TABLE, on({ fds: 'any', decode: (m) => decodeMemTable(m.payload) }, (t, m) => this.setMemTable(t, m.fds))],
      [R.ADD_MEM_REG, on({ fds: 1, decode: memRegion, requires: P.CONFIGURE_MEM_SLOTS }, (r, m) => this.addMemReg(r, m.fds))],
      [R.REM_MEM_REG, on({ fds: 'any', decode: memRegion, requires: P.CONFIGURE_MEM_SLOTS }, (r, m) => this.remMemReg(r, m.fds))],
      // vhost-user.rst: a GET_CONFIG reply with a zero-length payload tells the frontend it failed.
      [R.GET_CONFIG, on({ fds: 0, decode: config, replies: true, requires: P.CONFIG, errorReply: () => encodeReply(R.GET_CONFIG) }, (c) => this.getConfig(c))],
      [R.SET_CONFIG, on({ fds: 0, decode: config, requires: P.CONFIG }, (c) => this.setConfig(c))],
      [R.SET_VRING_NUM, on({ fds: 0, decode: vringState }, (v) => this.setVringNum(v.index, v.num))],
      [R.SET_VRING_ADDR, on({ fds: 0, decode: (m) => decodeVringAddr(m.payload) }, (a) => this.setVringAddr(a))],
      [R.SET_VRING_BASE, on({ fds: 0, decode: vringState }, (v) => this.setVringBase(v.index, v.num))],
      [R.GET_VRING_BASE, on({ fds: 0, decode: vringState, replies: true }, (v) => this.getVringBase(v.index))],
      [R.SET_VRING_KICK, on({ fds: 'any', decode: vringFd }, (v, m) => this.setVringFd(v.index, v.noFd, m, 'kickFd'))],
      [R.SET_VRING_CALL, on({ fds: 'any', decode: vringFd }, (v, m) => this.setVringFd(v.index, v.noFd, m, 'callFd'))],
      [R.SET_VRING_ERR, on({ fds: 'any', decode: vringFd }, (v, m) => this.setVringFd(v.index, v.noFd, m, 'errFd'))],
      [R.SET_VRING_ENABLE, on({ fds: 0, decode: vringState }, (v) => this.setVringEnable(v.index, v.num))],
      [R.SET_BACKEND_REQ_FD, on({ fds: 1, decode: empty, requires: P.BACKEND_REQ }, (_, m) => this.setBackendReqFd(m))],
      // QEMU takes a zero-sized reply as "no inflight tracking" and goes on without it.
      [R.GET_INFLIGHT_FD, on({
        fds: 0, decode: inflight, replies: true, requires: P.INFLIGHT_SHMFD,
        errorReply: () => encodeReplyInflight({ mmapSize: 0, mmapOffset: 0, numQueues: 0, queueSize: 0 }),
      }, (d) => this.getInflightFd(d))],
      [R.SET_INFLIGHT_FD, on({ fds: 1, decode: inflight, requires: P.INFLIGHT_SHMFD }, (d, m) => this.setInflightFd(d, m))],
      // With LOG_SHMFD the frontend waits for a u64 reply (QEMU ignores its value; 0 here means the log is in use).
      [R.SET_LOG_BASE, on({
        fds: 1, decode: (m) => decodeLog(m.payload), requires: P.LOG_SHMFD,
        errorReply: () => (this.negotiated(P.LOG_SHMFD) ? encodeReplyU64(R.SET_LOG_BASE, 1n) : undefined),
      }, (d, m) => this.setLogBase(d, m))],
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

  /** True once the frontend is gone (or leaving): its end of the socket is closed, even if we have not read that far. */
  get frontendGone(): boolean {
    return this.closed || this.conn.peerHungUp();
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

  /**
   * Checks a request against its table entry (fds, protocol feature, payload), runs the handler with
   * the decoded body and sends its reply or ack. Never throws for a bad request.
   */
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
      if (entry.requires !== undefined && !this.negotiated(entry.requires)) {
        throw new Refusal(`VHOST_USER_PROTOCOL_F_${protocolFeatureName(entry.requires)} was not negotiated`);
      }
      const body = entry.decode(m);
      this.log.debug(`${this.name}: ${name} (${m.payload.length} bytes, ${m.fds.length} fds)`);
      reply = await entry.handle(body, m);
    } catch (err) {
      ok = false;
      for (const fd of m.fds) closeQuietly(fd);
      const why = err instanceof Refusal || err instanceof ProtocolError || err instanceof RangeError ? (err as Error).message : `internal error: ${(err as Error).stack ?? err}`;
      this.log.warn(`${this.name}: refused ${name}: ${why}`);
      reply = entry?.errorReply?.(m);
      if (reply === undefined && entry?.replies) {
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

  private get offeredFeatures(): bigint {
    return this.device.features | SESSION_FEATURES;
  }

  private get offeredProtocolFeatures(): bigint {
    return this.device.protocolFeatures | SESSION_PROTOCOL_FEATURES;
  }

  /**
   * SET_FEATURES. While rings run only VHOST_F_LOG_ALL may change (a migration starts or ends): that
   * switches dirty logging and resets nothing. The ack waits until the data plane logs (or stopped).
   */
  private async setFeatures(wanted: bigint): Promise<void> {
    const offered = this.offeredFeatures;
    if ((wanted & ~offered) !== 0n) throw new Refusal(`features 0x${(wanted & ~offered).toString(16)} were never offered`);
    const running = this.vrings.findIndex((v) => v.running);
    if (running >= 0 && ((wanted ^ this.features) & ~LOG_ALL) !== 0n) {
      throw new Refusal(`vring ${running} is running; only VHOST_F_LOG_ALL may change (features 0x${((wanted ^ this.features) & ~LOG_ALL).toString(16)} differ)`);
    }
    await this.migrationLog.setLogAll((wanted & LOG_ALL) !== 0n);
    this.features = wanted;
    // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings are enabled from the start.
    if ((wanted & (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES))) === 0n) for (const v of this.vrings) v.enabled = true;
  }

  private setProtocolFeatures(wanted: bigint): void {
    const offered = this.offeredProtocolFeatures;
    if ((wanted & ~offered) !== 0n) throw new Refusal(`protocol features 0x${(wanted & ~offered).toString(16)} were never offered`);
    this.protocolFeatures = wanted;
  }

  private vring(index: number): Vring {
    const v = this.vrings[index];
    if (!v) throw new Refusal(`vring index ${index} is out of range (this device has ${this.vrings.length} queues)`);
    return v;
  }

  private setVringNum(index: number, num: number): void {
    const v = this.vring(index);
    if (v.running) throw new Refusal(`vring ${index} is running`);
    // A packed ring may have any size (virtio 1.2, 2.8); a split ring needs a power of two (2.7). QEMU
    // sends SET_FEATURES first; a split ring whose size slipped through is refused when it starts.
    if (num < 1 || num > this.device.maxQueueSize) throw new Refusal(`vring ${index} size ${num} is not in 1..${this.device.maxQueueSize}`);
    if (!this.packedRings && (num & (num - 1)) !== 0) throw new Refusal(`vring ${index} size ${num} is not a power of two (split rings need one)`);
    v.size = num;
  }

  /**
   * SET_VRING_ADDR. On a running ring only VHOST_VRING_F_LOG may change (the addresses must be the
   * same): QEMU sends that when a migration starts or ends, and waits for the ack before it relies on it.
   */
  private async setVringAddr(a: ReturnType<typeof decodeVringAddr>): Promise<void> {
    const v = this.vring(a.index);
    if ((a.flags & ~(1 << VHOST_VRING_F_LOG)) !== 0) throw new Refusal(`vring ${a.index} flags 0x${a.flags.toString(16)}: only VHOST_VRING_F_LOG (bit 0) is defined`);
    const logUsed = (a.flags & (1 << VHOST_VRING_F_LOG)) !== 0 ? a.logGuestAddr : null;
    const next = { desc: a.descUserAddr, avail: a.availUserAddr, used: a.usedUserAddr, logUsed };
    if (v.running) {
      const old = v.addr!;
      if (old.desc !== next.desc || old.avail !== next.avail || old.used !== next.used) throw new Refusal(`vring ${a.index} is running; its addresses cannot change`);
      if (old.logUsed !== logUsed) await this.device.setRingLog(a.index, logUsed);
    }
    v.addr = next;
  }

  private setVringBase(index: number, num: number): void {
    const v = this.vring(index);
    if (v.running) throw new Refusal(`vring ${index} is running`);
    // Packed rings carry both wrap counters and the used index too (RingStart.packed): all 32 bits count.
    if (num > 0xffff && !this.packedRings) throw new Refusal(`vring ${index} base ${num} does not fit a 16-bit ring index`);
    v.base = num;
  }

  private async getVringBase(index: number): Promise<Buffer> {
    const v = this.vring(index);
    await this.stopRing(index, v);
    // The ring is stopped for good: its kick fd is no longer ours to watch.
    closeQuietly(v.kickFd);
    v.kickFd = -1;
    return encodeReplyVringState(R.GET_VRING_BASE, index, v.base);
  }

  private async setVringFd(index: number, noFd: boolean, m: Message, which: 'kickFd' | 'callFd' | 'errFd'): Promise<void> {
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

  private async setVringEnable(index: number, num: number): Promise<void> {
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
        inflight: this.inflight.area(index, v.size, this.packedRings), logUsedAddr: v.addr.logUsed,
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

  private async setMemTable(table: RegionDescriptor[], fds: number[]): Promise<void> {
    if (fds.length !== table.length) throw new Refusal(`SET_MEM_TABLE describes ${table.length} regions but came with ${fds.length} file descriptors`);
    const mapped = this.mapAll(table, fds);
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
    this.migrationLog.checkCovers(this.guestEnd);
  }

  /** End of the highest guest memory region: what a dirty log must cover. */
  private get guestEnd(): number {
    return this.regions.reduce((end, r) => Math.max(end, r.region.guestAddr + r.region.size), 0);
  }

  private async addMemReg(region: RegionDescriptor, fds: number[]): Promise<void> {
    if (this.regions.length >= MAX_MEM_SLOTS) throw new Refusal(`all ${MAX_MEM_SLOTS} memory slots are in use`);
    const end = region.guestAddr + region.size;
    const clash = this.regions.find((r) => region.guestAddr < r.region.guestAddr + r.region.size && r.region.guestAddr < end);
    if (clash) throw new Refusal(`region [0x${region.guestAddr.toString(16)} +${region.size}] overlaps an existing one`);
    const [mapped] = this.mapAll([region], fds);
    await this.replaceRegions([...this.regions, mapped]);
  }

  private async remMemReg(region: RegionDescriptor, fds: number[]): Promise<void> {
    // The spec lets a frontend send an fd here; it means nothing, so it is closed.
    for (const fd of fds) closeQuietly(fd);
    const victim = this.regions.find((r) => r.region.guestAddr === region.guestAddr && r.region.size === region.size && r.region.userAddr === region.userAddr);
    if (!victim) throw new Refusal(`no region [0x${region.guestAddr.toString(16)} +${region.size}] to remove`);
    await this.replaceRegions(this.regions.filter((r) => r !== victim));
  }

  private getConfig(c: ReturnType<typeof decodeConfig>): Buffer {
    if (c.offset + c.size > MAX_CONFIG_SIZE) throw new Refusal(`GET_CONFIG range ${c.offset}+${c.size} exceeds ${MAX_CONFIG_SIZE}`);
    return encodeReplyConfig(c.offset, c.size, c.flags, this.device.getConfig(c.offset, c.size));
  }

  private async setConfig(c: ReturnType<typeof decodeConfig>): Promise<void> {
    const err = await this.device.setConfig(c.offset, c.data, this.features);
    if (err) throw new Refusal(err);
  }

  /** RESET_OWNER: the frontend gives the device up, and with it the backend request channel. */
  private async resetOwner(): Promise<void> {
    await this.reset();
    this.channel.close();
  }

  /** SET_BACKEND_REQ_FD: keeps the frontend's socket for backend requests (replacing an earlier one). */
  private setBackendReqFd(m: Message): void {
    const fd = m.fds[0];
    m.fds[0] = -1; // the channel takes it, kept or refused
    this.channel.set(fd);
  }

  /** True while the frontend has given us a backend request channel. */
  get hasBackendChannel(): boolean {
    return this.channel.present;
  }

  /** True while the frontend migrates the guest: LOG_ALL is on and a log region is set. */
  get dirtyLogging(): boolean {
    return this.migrationLog.active;
  }

  /** Tells the frontend the config space changed (CONFIG_CHANGE_MSG); see BackendChannel.notifyConfigChange. */
  notifyConfigChange(): Promise<boolean> {
    return this.channel.notifyConfigChange();
  }

  /** GET_INFLIGHT_FD: a new region for the queues the frontend describes, in the negotiated ring layout. */
  private getInflightFd(d: ReturnType<typeof decodeInflight>): HandlerResult {
    const { size, fd } = this.inflight.create(d, this.packedRings);
    return { reply: encodeReplyInflight({ mmapSize: size, mmapOffset: 0, numQueues: d.numQueues, queueSize: d.queueSize }), fds: [fd] };
  }

  /** SET_INFLIGHT_FD: the region rings record their requests in (sent before the rings start). */
  private setInflightFd(d: ReturnType<typeof decodeInflight>, m: Message): void {
    const running = this.vrings.findIndex((v) => v.running);
    if (running >= 0) throw new Refusal(`vring ${running} is running; the inflight region can only change while every ring is stopped`);
    const fd = m.fds[0];
    m.fds[0] = -1; // the region takes it, mapped or refused
    this.inflight.set(d, fd, this.packedRings);
  }

  /** SET_LOG_BASE: the dirty log of a migration; replied to with 0 once the data plane logs into it (if LOG_ALL is on). */
  private async setLogBase(d: ReturnType<typeof decodeLog>, m: Message): Promise<Buffer> {
    const fd = m.fds[0];
    m.fds[0] = -1; // the log takes it, mapped or refused
    await this.migrationLog.setBase(d, fd, this.guestEnd);
    return encodeReplyU64(R.SET_LOG_BASE, 0n);
  }

  /** RESET_OWNER / RESET_DEVICE: stop every ring and forget ring state, features, the inflight region and the dirty log. */
  private async reset(): Promise<void> {
    for (let i = 0; i < this.vrings.length; i++) {
      const v = this.vrings[i];
      await this.stopRing(i, v);
      closeVringFds(v);
      this.vrings[i] = newVring();
    }
    this.features = 0n;
    await this.migrationLog.reset();
    // A reset device starts over with fresh rings; QEMU gets a new region (and sends it) before it restarts.
    this.inflight.drop();
  }

  /** After the connection ends: stop rings (in-flight requests finish), unmap memory, close fds. */
  private async teardown(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.conn.close();
    this.channel.close();
    for (let i = 0; i < this.vrings.length; i++) {
      try {
        await this.stopRing(i, this.vrings[i]);
      } catch (err) {
        this.log.error(`${this.name}: stopping vring ${i} failed: ${(err as Error).message}`);
      }
      closeVringFds(this.vrings[i]);
    }
    try {
      await this.migrationLog.reset();
    } catch (err) {
      this.log.error(`${this.name}: stopping the dirty log failed: ${(err as Error).message}`);
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
    else this.inflight.drop();
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
