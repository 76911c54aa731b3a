/**
 * A vhost-user-blk front-end: what QEMU's vhost-user-blk-pci does for a guest, done from a Node process.
 *
 * connect() negotiates features, shares a memfd as guest RAM, and starts the virtqueues; then read(),
 * write(), flush(), getId(), discard() and writeZeroes() run virtio-blk requests through the rings to the
 * back-end. Completions are
 * found by polling the used rings while requests are outstanding (setImmediate while busy, then a 1 ms
 * timer); the call eventfds are signalled by the back-end too, and callSignals() reads them for tests.
 *
 * By default the whole memfd is one region and guest physical address = offset in the memfd; the
 * memoryRegions option lays it out as QEMU does (several regions, holes, non-zero mmap offsets, addresses
 * above 4 GiB), sent with SET_MEM_TABLE or ADD_MEM_REG, and regions can be hot-added and removed. Ring
 * addresses sent with SET_VRING_ADDR are our own mapping addresses (front-end user addresses), as QEMU
 * sends them.
 */
import { Socket } from 'node:net';
import { closeQuietly, eventfd, lastErrno, native, socketPair, EFD_CLOEXEC, EFD_NONBLOCK } from '../os/libc.js';
import {
  FrontendRequest as R, BackendRequest, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES, CONFIG_HEADER_SIZE, HEADER_SIZE,
  VHOST_F_LOG_ALL, VHOST_VRING_F_LOG,
  backendRequestName, decodeHeader, encodeReplyAck, encodeConfig, encodeMemRegion, encodeMemTable, encodeU64, encodeVringAddr, encodeVringFd, encodeVringState,
} from '../vhost-user/messages.js';
import { Feature, RequestType, Status, REQUEST_HEADER_SIZE, SECTOR_SIZE, ID_BYTES } from '../blk/constants.js';
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_WRITE } from '../virtqueue/queue.js';
import { VhostUserConnection, VhostUserError } from './connection.js';
import { DriverQueue, ringSizes, type DriverRing } from './driver-queue.js';
import { PackedDriverQueue, packedRingSizes } from './packed-driver-queue.js';
import { ExtentAllocator, SharedMemory, PAGE_SIZE } from './memory.js';
import { DirtyLogArea, dirtyLogBytes, sendLogBase, type GuestRange, type MemorySnapshot } from './dirty-log.js';

/** One guest memory region: `size` bytes of the memfd from `offset`, seen by the guest at `guestAddr`. */
export interface GuestRegion {
  /** Guest physical address of the region's first byte. */
  guestAddr: number;
  /** Offset of the region in the memfd (its mmap offset); page aligned. */
  offset: number;
  /** Size in bytes; page aligned. */
  size: number;
}

/** A buffer at a chosen guest physical address (it may span regions), from allocGuest(). */
export interface GuestBuffer {
  /** Guest physical address. */
  gpa: number;
  /** Length in bytes. */
  length: number;
  /** Copies the buffer's current bytes out of guest memory. */
  read(): Buffer;
  /** Copies `data` into the buffer at byte `at` (default 0). */
  write(data: Uint8Array, at?: number): void;
  /** Returns the memory to the allocator. */
  free(): void;
}

/** Most regions SET_MEM_TABLE carries. */
const MAX_MEM_TABLE_REGIONS = 8;

/** Checks a memory layout against a memfd of `memoryBytes`; returns it sorted by offset. */
function checkRegions(regions: readonly GuestRegion[], memoryBytes: number, maxRegions = MAX_MEM_TABLE_REGIONS): GuestRegion[] {
  if (regions.length < 1 || regions.length > maxRegions) throw new RangeError(`memory layouts have 1..${maxRegions} regions, got ${regions.length}`);
  for (const r of regions) {
    for (const [k, v] of [['guestAddr', r.guestAddr], ['offset', r.offset], ['size', r.size]] as const) {
      if (!Number.isSafeInteger(v) || v < 0 || v % PAGE_SIZE !== 0) throw new RangeError(`memory region ${k} ${v} is not a page-aligned non-negative integer`);
    }
    if (r.size === 0 || r.offset + r.size > memoryBytes) throw new RangeError(`memory region at offset ${r.offset} (+${r.size}) is empty or outside the ${memoryBytes}-byte memfd`);
  }
  const byOffset = [...regions].sort((a, b) => a.offset - b.offset);
  const byGpa = [...regions].sort((a, b) => a.guestAddr - b.guestAddr);
  for (let i = 1; i < byOffset.length; i++) {
    if (byOffset[i].offset < byOffset[i - 1].offset + byOffset[i - 1].size) throw new RangeError('memory regions overlap in the memfd');
    if (byGpa[i].guestAddr < byGpa[i - 1].guestAddr + byGpa[i - 1].size) throw new RangeError('memory regions overlap in guest physical memory');
  }
  return byOffset;
}

/** Options of VhostUserBlkClient.connect. */
export interface ClientOptions {
  /** Queues to start (at most what GET_QUEUE_NUM allows); default 1. */
  numQueues?: number;
  /** Entries per queue: a power of two for split rings, any size in 1..32768 for packed ones; default 128. */
  queueSize?: number;
  /** Size of the shared guest memory in bytes (page multiple); default 64 MiB. */
  memoryBytes?: number;
  /**
   * Guest memory layout: which parts of the memfd are guest RAM and at which guest physical address each
   * starts (SET_MEM_TABLE regions, at most 8). Default: one region, guest address = memfd offset.
   */
  memoryRegions?: readonly GuestRegion[];
  /**
   * How the memory table is sent: 'set-mem-table' (default) or, as QEMU does when both sides offer
   * VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS, 'add-mem-reg': GET_MAX_MEM_SLOTS then one ADD_MEM_REG per region.
   */
  memoryMessages?: 'set-mem-table' | 'add-mem-reg';
  /**
   * Device features to negotiate: 'all-offered' takes every offered bit, a bigint is sent as is (even
   * bits never offered: hostile tests); by default the offered bits this driver understands.
   */
  features?: 'all-offered' | bigint;
  /** Force VIRTIO_F_EVENT_IDX on (must be offered) or off; default: on if offered. */
  eventIdx?: boolean;
  /** Force VIRTIO_F_INDIRECT_DESC on (must be offered) or off; default: on if offered. */
  indirect?: boolean;
  /** Use packed virtqueues (VIRTIO_F_RING_PACKED, must be offered); default: split rings. */
  packed?: boolean;
  /** Protocol features to set instead of (offered ∩ supported). */
  protocolFeatures?: bigint;
  /** Reject an I/O request that has not completed after this many ms (0, the default: wait forever). */
  requestTimeoutMs?: number;
  /** How long to wait for each control-message reply; default 5000 ms. */
  replyTimeoutMs?: number;
  /**
   * Called when the back-end says its config space changed (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, as after
   * a live resize), with the config the client has just read back (GET_CONFIG, as QEMU does) and the one
   * before; the back-end gets its ack once this returns. Giving it makes the client set up the back-end
   * request channel (SET_BACKEND_REQ_FD) when the back-end offers VHOST_USER_PROTOCOL_F_BACKEND_REQ.
   */
  onConfigChange?: (config: BlkDeviceConfig, previous: BlkDeviceConfig) => void | Promise<void>;
}

/** The virtio-blk config space (struct virtio_blk_config, first 60 bytes), decoded. */
export interface BlkDeviceConfig {
  /** Capacity in 512-byte sectors. */
  capacitySectors: number;
  /** Capacity in bytes. */
  capacityBytes: number;
  /** Largest segment in bytes (VIRTIO_BLK_F_SIZE_MAX). */
  sizeMax: number;
  /** Most data segments per request (VIRTIO_BLK_F_SEG_MAX). */
  segMax: number;
  /** Geometry: cylinders, heads, sectors per track (VIRTIO_BLK_F_GEOMETRY). */
  geometry: { cylinders: number; heads: number; sectors: number };
  /** Logical block size in bytes (VIRTIO_BLK_F_BLK_SIZE). */
  blkSize: number;
  /** log2(physical block / logical block). */
  physicalBlockExp: number;
  /** Offset of the first aligned logical block. */
  alignmentOffset: number;
  /** Suggested minimum I/O size in logical blocks. */
  minIoSize: number;
  /** Optimal I/O size in logical blocks. */
  optIoSize: number;
  /** 1 = writeback cache, 0 = writethrough (VIRTIO_BLK_F_CONFIG_WCE). */
  writeback: number;
  /** Number of request queues (VIRTIO_BLK_F_MQ). */
  numQueues: number;
  /** Discard limits (VIRTIO_BLK_F_DISCARD). */
  maxDiscardSectors: number;
  /** Most discard segments per request. */
  maxDiscardSeg: number;
  /** Discard alignment in sectors. */
  discardSectorAlignment: number;
  /** Write-zeroes limits (VIRTIO_BLK_F_WRITE_ZEROES). */
  maxWriteZeroesSectors: number;
  /** Most write-zeroes segments per request. */
  maxWriteZeroesSeg: number;
  /** Write zeroes may deallocate. */
  writeZeroesMayUnmap: number;
  /** The raw config bytes as the back-end sent them. */
  raw: Buffer;
}

/** Bytes of config space read at connect, as QEMU's vhost-user-blk does (through write_zeroes fields). */
export const BLK_CONFIG_READ_SIZE = 60;

/** Decodes the little-endian virtio-blk config space (at least 60 bytes). */
export function decodeBlkConfig(b: Buffer): BlkDeviceConfig {
  if (b.length < BLK_CONFIG_READ_SIZE) throw new RangeError(`config space is ${b.length} bytes, expected ${BLK_CONFIG_READ_SIZE}`);
  const capacity = b.readBigUInt64LE(0);
  if (capacity > BigInt(Number.MAX_SAFE_INTEGER) / BigInt(SECTOR_SIZE)) throw new RangeError(`capacity ${capacity} sectors is too large`);
  const capacitySectors = Number(capacity);
  return {
    capacitySectors, capacityBytes: capacitySectors * SECTOR_SIZE,
    sizeMax: b.readUInt32LE(8), segMax: b.readUInt32LE(12),
    geometry: { cylinders: b.readUInt16LE(16), heads: b.readUInt8(18), sectors: b.readUInt8(19) },
    blkSize: b.readUInt32LE(20), physicalBlockExp: b.readUInt8(24), alignmentOffset: b.readUInt8(25),
    minIoSize: b.readUInt16LE(26), optIoSize: b.readUInt32LE(28), writeback: b.readUInt8(32),
    numQueues: b.readUInt16LE(34), maxDiscardSectors: b.readUInt32LE(36), maxDiscardSeg: b.readUInt32LE(40),
    discardSectorAlignment: b.readUInt32LE(44), maxWriteZeroesSectors: b.readUInt32LE(48),
    maxWriteZeroesSeg: b.readUInt32LE(52), writeZeroesMayUnmap: b.readUInt8(56), raw: Buffer.from(b),
  };
}

/** A virtio-blk request for submit(). */
export interface BlkRequest {
  /** RequestType (IN, OUT, FLUSH, GET_ID, ...). */
  type: number;
  /** Starting 512-byte sector (default 0). */
  sector?: number | bigint;
  /** Request priority field of the header (default 0). */
  ioprio?: number;
  /** Device-readable data segments after the header, one descriptor each. */
  out?: readonly Uint8Array[];
  /** Sizes of device-writable data segments before the status byte, one descriptor each. */
  inLengths?: readonly number[];
  /** Put the chain in an indirect table (needs VIRTIO_F_INDIRECT_DESC); default false, forced when the chain is longer than the queue. */
  indirect?: boolean;
}

/** How a submitted request ended. */
export interface BlkCompletion {
  /** Status byte (Status.OK/IOERR/UNSUPP), or STATUS_NOT_WRITTEN if the device never wrote it. */
  status: number;
  /** Copies of the device-writable data segments, one per inLengths entry. */
  data: Buffer[];
  /** Bytes the device says it wrote (used element len). */
  usedLen: number;
}

/** The status byte is preset to this before submission: seeing it afterwards means the device never wrote it. */
export const STATUS_NOT_WRITTEN = 0xff;

/** Name of a status byte value ("OK", "IOERR", "UNSUPP", "NOT_WRITTEN", or the number). */
export function statusName(status: number): string {
  switch (status) {
    case Status.OK: return 'OK';
    case Status.IOERR: return 'IOERR';
    case Status.UNSUPP: return 'UNSUPP';
    case STATUS_NOT_WRITTEN: return 'NOT_WRITTEN';
    default: return `status ${status}`;
  }
}

/** A request that completed with a status other than OK; the message names the status. */
export class BlkRequestError extends Error {
  /** Builds the error from what was asked and the status byte. */
  constructor(what: string, readonly status: number, readonly usedLen: number) {
    super(`${what} failed: ${statusName(status)} (used len ${usedLen})`);
    this.name = 'BlkRequestError';
  }
}

/** One descriptor of a raw chain for submitRawChain(). */
export interface RawDescriptor {
  /** Guest physical address (any 64-bit value: hostile tests point outside memory). */
  addr: number | bigint;
  /** Length in bytes. */
  len: number;
  /** VIRTQ_DESC_F_* flags; NEXT is not added automatically. */
  flags: number;
  /** Position in this chain that `next` points at (translated to its descriptor index); default: the following one. */
  next?: number;
  /** Absolute descriptor index for `next` (wins over `next`): for out-of-range values. */
  nextIndex?: number;
}

/** How a raw chain ended. */
export interface RawCompletion {
  /** Used element len. */
  usedLen: number;
  /** Head descriptor index the chain used. */
  head: number;
}

/** A buffer in the shared memory, for raw descriptors. */
export interface DmaBuffer {
  /** Guest physical address. */
  gpa: number;
  /** Length in bytes. */
  length: number;
  /** The bytes (a view of the shared memory: invalid after free() or close()). */
  bytes: Uint8Array;
  /** Returns the buffer to the allocator. */
  free(): void;
}

/** Device features this driver understands and negotiates by default. */
export const DRIVER_FEATURES = [
  Feature.VERSION_1, Feature.RING_INDIRECT_DESC, Feature.RING_EVENT_IDX, Feature.BLK_SIZE_MAX, Feature.BLK_SEG_MAX,
  Feature.BLK_GEOMETRY, Feature.BLK_RO, Feature.BLK_BLK_SIZE, Feature.BLK_FLUSH, Feature.BLK_TOPOLOGY,
  Feature.BLK_CONFIG_WCE, Feature.BLK_MQ, Feature.BLK_DISCARD, Feature.BLK_WRITE_ZEROES, VHOST_USER_F_PROTOCOL_FEATURES,
].reduce((acc, b) => acc | (1n << BigInt(b)), 0n);

/** Flag of a WRITE_ZEROES range (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP): the device may deallocate the sectors. */
export const WRITE_ZEROES_FLAG_UNMAP = 1;

/** One range of a DISCARD or WRITE_ZEROES request (struct virtio_blk_discard_write_zeroes). */
export interface BlkRange {
  /** First 512-byte sector. */
  sector: number | bigint;
  /** Number of sectors (u32). */
  numSectors: number;
  /** Flags (u32): WRITE_ZEROES_FLAG_UNMAP or any bits (tests); default 0. */
  flags?: number;
}

/** Bytes of one encoded BlkRange. */
export const BLK_RANGE_SIZE = 16;

/** Encodes `ranges` as the data segment of a DISCARD / WRITE_ZEROES request (16 bytes each, little-endian). */
export function encodeBlkRanges(ranges: readonly BlkRange[]): Buffer {
  const b = Buffer.alloc(BLK_RANGE_SIZE * ranges.length);
  ranges.forEach((r, i) => {
    b.writeBigUInt64LE(BigInt.asUintN(64, BigInt(r.sector)), BLK_RANGE_SIZE * i);
    b.writeUInt32LE(r.numSectors >>> 0, BLK_RANGE_SIZE * i + 8);
    b.writeUInt32LE((r.flags ?? 0) >>> 0, BLK_RANGE_SIZE * i + 12);
  });
  return b;
}

/** Protocol features this front-end understands (LOG_SHMFD: dirty logging with startDirtyLog()). */
export const DRIVER_PROTOCOL_FEATURES = [
  ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG, ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.LOG_SHMFD,
].reduce((acc, b) => acc | (1n << BigInt(b)), 0n);

/** Reads the config space (GET_CONFIG of the first BLK_CONFIG_READ_SIZE bytes, as QEMU does) and decodes it. */
async function getBlkConfig(conn: VhostUserConnection, timeoutMs: number): Promise<BlkDeviceConfig> {
  const reply = await conn.request(R.GET_CONFIG, encodeConfig(0, BLK_CONFIG_READ_SIZE, 0), { timeoutMs, expectReply: true });
  if (reply.length !== CONFIG_HEADER_SIZE + BLK_CONFIG_READ_SIZE) {
    throw new VhostUserError(`GET_CONFIG reply is ${reply.length} bytes, expected ${CONFIG_HEADER_SIZE + BLK_CONFIG_READ_SIZE}`, R.GET_CONFIG);
  }
  return decodeBlkConfig(reply.subarray(CONFIG_HEADER_SIZE));
}

/** The SET_MEM_TABLE regions of `regions` in `memory` (user address = our mapping of the region). */
function memTable(memory: SharedMemory, regions: readonly GuestRegion[]) {
  return regions.map((r) => ({ guestAddr: r.guestAddr, size: r.size, userAddr: memory.addr + r.offset, mmapOffset: r.offset }));
}

/** VHOST_F_LOG_ALL as a feature mask. */
const LOG_ALL = 1n << BigInt(VHOST_F_LOG_ALL);

function has(bits: bigint, bit: number): boolean {
  return (bits & (1n << BigInt(bit))) !== 0n;
}

/** Byte offsets inside a request's block: header, status, indirect table, then data segments. */
const STATUS_OFF = REQUEST_HEADER_SIZE;
const TABLE_OFF = 64;
const SEGMENT_ALIGN = 512;

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** An outstanding chain. */
interface Inflight {
  descs: number[];
  block: number;
  blockLen: number;
  statusOff: number;
  inOffs: number[];
  inLens: number[];
  writableBytes: number;
  raw: boolean;
  abandoned: boolean;
  timer: NodeJS.Timeout | undefined;
  resolve: (v: BlkCompletion & RawCompletion) => void;
  reject: (e: Error) => void;
}

/** Where a queue's rings are in guest physical memory (from VhostUserBlkClient.ringAreas). */
export interface RingAreas {
  /** Descriptor table (split) or descriptor ring (packed). */
  desc: GuestRange;
  /** Available ring (split) or driver event suppression area (packed). */
  avail: GuestRange;
  /** Used ring (split) or device event suppression area (packed): what SET_VRING_ADDR logs at log_guest_addr. */
  used: GuestRange;
}

/** Per-queue state. */
interface QueueState {
  index: number;
  ring: DriverRing;
  kickFd: number;
  callFd: number;
  running: boolean;
  inflight: Array<Inflight | undefined>;
  /** Submissions waiting for descriptors or memory, in order; each returns true once started. */
  waiting: Array<{ attempt: () => boolean; reject: (e: Error) => void }>;
}

/** A vhost-user-blk front-end connected to one back-end. */
export class VhostUserBlkClient {
  /** The device config space: read at connect, read again on a config change notice or readConfig(). */
  get config(): BlkDeviceConfig {
    return this.currentConfig;
  }
  private currentConfig: BlkDeviceConfig;
  /** Our end of the back-end request channel, when one was set up. */
  private backendChannel: Socket | null = null;
  /** Device feature bits offered by the back-end (GET_FEATURES). */
  readonly offeredFeatures: bigint;
  /** Device feature bits negotiated (SET_FEATURES). */
  readonly features: bigint;
  /** Protocol feature bits offered (0 without VHOST_USER_F_PROTOCOL_FEATURES). */
  readonly offeredProtocolFeatures: bigint;
  /** Protocol feature bits negotiated. */
  readonly protocolFeatures: bigint;
  /** Queues the back-end supports (GET_QUEUE_NUM, 1 without MQ). */
  readonly maxQueues: number;
  /** Device misbehaviour seen on the rings (unknown used ids, over-long used lens); empty when all is well. */
  readonly anomalies: string[] = [];
  /** The guest memory layout the back-end was given, sorted by memfd offset. */
  get memoryRegions(): readonly GuestRegion[] {
    return this.regions;
  }
  /** Memory slots the back-end supports (GET_MAX_MEM_SLOTS), or 0 if the table went by SET_MEM_TABLE. */
  readonly maxMemSlots: number;
  private regions: GuestRegion[];
  private readonly memoryMessages: 'set-mem-table' | 'add-mem-reg';
  private readonly queues: QueueState[] = [];
  private readonly allocator: ExtentAllocator;
  private outstanding = 0;
  private closed = false;
  private pollHandle: { immediate: NodeJS.Immediate } | { timer: NodeJS.Timeout } | null = null;
  private idlePolls = 0;
  private readonly requestTimeoutMs: number;
  private readonly replyTimeoutMs: number;
  /** The dirty log the back-end writes into, while logging is on. */
  private log: DirtyLogArea | null = null;

  private constructor(
    /** The control connection (raw access for tests). */
    readonly connection: VhostUserConnection,
    /** The shared guest memory. */
    readonly memory: SharedMemory,
    init: {
      config: BlkDeviceConfig; offered: bigint; features: bigint; offeredProtocol: bigint; protocol: bigint; maxQueues: number;
      requestTimeoutMs: number; replyTimeoutMs: number; regions: GuestRegion[]; memoryMessages: 'set-mem-table' | 'add-mem-reg';
      maxMemSlots: number;
    },
  ) {
    this.currentConfig = init.config;
    this.offeredFeatures = init.offered;
    this.features = init.features;
    this.offeredProtocolFeatures = init.offeredProtocol;
    this.protocolFeatures = init.protocol;
    this.maxQueues = init.maxQueues;
    this.requestTimeoutMs = init.requestTimeoutMs;
    this.replyTimeoutMs = init.replyTimeoutMs;
    this.regions = init.regions;
    this.memoryMessages = init.memoryMessages;
    this.maxMemSlots = init.maxMemSlots;
    this.allocator = new ExtentAllocator(0, memory.size);
    const single = init.regions.length === 1 && init.regions[0].offset === 0 && init.regions[0].size === memory.size;
    if (!single) {
      // Only memory inside a region is handed out, and never across the end of one: the last page of a
      // region directly followed (in the memfd) by another stays reserved, as its guest address is not
      // contiguous with the next one.
      this.allocator.alloc(memory.size);
      for (const r of init.regions) {
        const followed = init.regions.some((o) => o.offset === r.offset + r.size);
        const usable = followed ? r.size - PAGE_SIZE : r.size;
        if (usable > 0) this.allocator.free(r.offset, usable);
      }
    }
  }

  /**
   * Connects to the back-end at `socketPath` and brings the device up like QEMU: features, protocol
   * features, owner, queue count, config, memory table, then every queue started at index 0.
   */
  static async connect(socketPath: string, opts: ClientOptions = {}): Promise<VhostUserBlkClient> {
    const numQueues = opts.numQueues ?? 1;
    const queueSize = opts.queueSize ?? 128;
    const memoryBytes = opts.memoryBytes ?? 64 * 1024 * 1024;
    const replyTimeoutMs = opts.replyTimeoutMs ?? 5000;
    const regions = checkRegions(opts.memoryRegions ?? [{ guestAddr: 0, offset: 0, size: memoryBytes }], memoryBytes);
    if (!Number.isInteger(numQueues) || numQueues < 1 || numQueues > 256) throw new RangeError(`numQueues must be 1..256, got ${numQueues}`);
    // Packed rings may have any size (virtio 1.2, 2.8); split rings need a power of two (2.7).
    const sizeOk = Number.isInteger(queueSize) && queueSize >= 1 && queueSize <= 32768 && (opts.packed === true || (queueSize & (queueSize - 1)) === 0);
    if (!sizeOk) throw new RangeError(`queueSize must be ${opts.packed ? 'in' : 'a power of two in'} 1..32768, got ${queueSize}`);
    const conn = VhostUserConnection.connect(socketPath);
    let memory: SharedMemory | null = null;
    let client: VhostUserBlkClient | null = null;
    try {
      const t = { timeoutMs: replyTimeoutMs };
      const offered = (await conn.request(R.GET_FEATURES, undefined, { ...t, expectReply: true })).readBigUInt64LE(0);
      let offeredProtocol = 0n;
      let protocol = 0n;
      if (has(offered, VHOST_USER_F_PROTOCOL_FEATURES)) {
        offeredProtocol = (await conn.request(R.GET_PROTOCOL_FEATURES, undefined, { ...t, expectReply: true })).readBigUInt64LE(0);
        // The backend request channel is only worth its socket when someone listens to it.
        const wanted = DRIVER_PROTOCOL_FEATURES | (opts.onConfigChange ? 1n << BigInt(ProtocolFeature.BACKEND_REQ) : 0n);
        protocol = opts.protocolFeatures ?? (offeredProtocol & wanted);
        await conn.request(R.SET_PROTOCOL_FEATURES, encodeU64(protocol), t);
      }
      const ack = { ...t, needReply: has(protocol, ProtocolFeature.REPLY_ACK) };
      await conn.request(R.SET_OWNER, undefined, ack);
      let maxQueues = 1;
      if (has(protocol, ProtocolFeature.MQ)) {
        maxQueues = Number((await conn.request(R.GET_QUEUE_NUM, undefined, { ...t, expectReply: true })).readBigUInt64LE(0));
      }
      if (numQueues > maxQueues) throw new RangeError(`${numQueues} queues asked for, the back-end supports ${maxQueues}`);
      if (!has(protocol, ProtocolFeature.CONFIG)) throw new VhostUserError('the back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG: no way to read the disk size');
      const config = await getBlkConfig(conn, replyTimeoutMs);

      let features = opts.features === 'all-offered' ? offered : typeof opts.features === 'bigint' ? opts.features : offered & DRIVER_FEATURES;
      for (const [opt, bitNo, label] of [[opts.eventIdx, Feature.RING_EVENT_IDX, 'EVENT_IDX'], [opts.indirect, Feature.RING_INDIRECT_DESC, 'INDIRECT_DESC'], [opts.packed, Feature.RING_PACKED, 'RING_PACKED']] as const) {
        if (opt === false) features &= ~(1n << BigInt(bitNo));
        else if (opt === true) {
          if (!has(offered, bitNo)) throw new VhostUserError(`VIRTIO_F_${label} was asked for but the back-end does not offer it`);
          features |= 1n << BigInt(bitNo);
        }
      }
      await conn.request(R.SET_FEATURES, encodeU64(features), ack);

      memory = SharedMemory.create(memoryBytes);
      const memoryMessages = opts.memoryMessages ?? 'set-mem-table';
      let maxMemSlots = 0;
      if (memoryMessages === 'add-mem-reg') {
        if (!has(protocol, ProtocolFeature.CONFIGURE_MEM_SLOTS)) throw new VhostUserError('ADD_MEM_REG asked for but VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS was not negotiated');
        const slots = await conn.request(R.GET_MAX_MEM_SLOTS, undefined, { ...t, expectReply: true });
        if (slots.length !== 8) throw new VhostUserError(`GET_MAX_MEM_SLOTS reply is ${slots.length} bytes, expected 8`, R.GET_MAX_MEM_SLOTS);
        maxMemSlots = Number(slots.readBigUInt64LE(0));
        if (regions.length > maxMemSlots) throw new RangeError(`${regions.length} memory regions, the back-end has ${maxMemSlots} slots`);
        for (const r of memTable(memory, regions)) await conn.request(R.ADD_MEM_REG, encodeMemRegion(r), { ...ack, fds: [memory.fd] });
      } else {
        await conn.request(R.SET_MEM_TABLE, encodeMemTable(memTable(memory, regions)), { ...ack, fds: regions.map(() => memory!.fd) });
      }

      client = new VhostUserBlkClient(conn, memory, {
        config, offered, features, offeredProtocol, protocol, maxQueues, requestTimeoutMs: opts.requestTimeoutMs ?? 0, replyTimeoutMs, regions,
        memoryMessages, maxMemSlots,
      });
      if (opts.onConfigChange && has(protocol, ProtocolFeature.BACKEND_REQ)) await client.openBackendChannel(opts.onConfigChange);
      for (let q = 0; q < numQueues; q++) {
        client.addQueue(queueSize);
        await client.startRing(q, client.queues[q].ring.vringBase);
      }
      return client;
    } catch (err) {
      if (client) await client.close({ graceful: false });
      else {
        conn.close();
        memory?.close();
      }
      throw err;
    }
  }

  /** True once the feature bit `bitNo` (Feature.*) was negotiated. */
  hasFeature(bitNo: number): boolean {
    return has(this.features, bitNo);
  }

  /** Number of started queues. */
  get numQueues(): number {
    return this.queues.length;
  }

  /** Requests submitted and not yet completed (or abandoned on timeout). */
  get outstandingRequests(): number {
    return this.outstanding;
  }

  private get ack(): { needReply: boolean; timeoutMs: number } {
    return { needReply: has(this.protocolFeatures, ProtocolFeature.REPLY_ACK), timeoutMs: this.replyTimeoutMs };
  }

  /** Reads the config space again (GET_CONFIG) and keeps it as `config`. */
  async readConfig(): Promise<BlkDeviceConfig> {
    this.currentConfig = await getBlkConfig(this.connection, this.replyTimeoutMs);
    return this.currentConfig;
  }

  /**
   * Gives the back-end one end of a socket pair for its requests (SET_BACKEND_REQ_FD) and serves the other:
   * CONFIG_CHANGE_MSG re-reads the config and calls `onConfigChange`; other requests are refused. The
   * channel is a node:net socket, so waiting for requests holds no thread.
   */
  private async openBackendChannel(onConfigChange: NonNullable<ClientOptions['onConfigChange']>): Promise<void> {
    const [ours, theirs] = socketPair();
    try {
      await this.connection.request(R.SET_BACKEND_REQ_FD, undefined, { ...this.ack, fds: [theirs] });
    } catch (err) {
      closeQuietly(ours);
      throw err;
    } finally {
      closeQuietly(theirs);
    }
    const channel = new Socket({ fd: ours, readable: true, writable: true });
    this.backendChannel = channel;
    let pending = Buffer.alloc(0);
    // One request at a time, in order: each answer goes out before the next request is looked at.
    let serving: Promise<void> = Promise.resolve();
    channel.on('error', (err) => this.anomalies.push(`back-end request channel: ${err.message}`));
    channel.on('data', (chunk: Buffer) => {
      pending = Buffer.concat([pending, chunk]);
      while (pending.length >= HEADER_SIZE) {
        let header;
        try {
          header = decodeHeader(pending, 'backend');
        } catch (err) {
          this.anomalies.push(`back-end request channel: ${(err as Error).message}; channel closed`);
          channel.destroy();
          return;
        }
        if (pending.length < HEADER_SIZE + header.size) return;
        pending = pending.subarray(HEADER_SIZE + header.size);
        const h = header;
        serving = serving.then(() => this.serveBackendRequest(channel, h.request, h.needReply, onConfigChange));
      }
    });
  }

  /** Handles one back-end request and acks it when asked; never throws. */
  private async serveBackendRequest(channel: Socket, request: number, needReply: boolean, onConfigChange: NonNullable<ClientOptions['onConfigChange']>): Promise<void> {
    let ok = false;
    if (request === BackendRequest.CONFIG_CHANGE_MSG && !this.closed) {
      try {
        const previous = this.currentConfig;
        await onConfigChange(await this.readConfig(), previous);
        ok = true;
      } catch (err) {
        this.anomalies.push(`CONFIG_CHANGE_MSG: ${(err as Error).message}`);
      }
    } else if (request !== BackendRequest.CONFIG_CHANGE_MSG) {
      this.anomalies.push(`back-end request ${backendRequestName(request)} is not supported; refused`);
    }
    if (needReply && !channel.destroyed) channel.write(encodeReplyAck(request, ok));
  }

  /** Allocates the rings and eventfds of the next queue. */
  private addQueue(size: number): void {
    const packed = this.hasFeature(Feature.RING_PACKED);
    const s = packed ? packedRingSizes(size) : ringSizes(size);
    const availOff = alignUp(s.desc, PAGE_SIZE);
    const usedOff = availOff + alignUp(s.avail, PAGE_SIZE);
    const len = usedOff + alignUp(s.used, PAGE_SIZE);
    const block = this.allocator.alloc(len);
    if (block < 0) throw new RangeError(`no room for the rings of a ${size}-entry queue in ${this.memory.size} bytes of memory`);
    // Nonblocking eventfds, as QEMU creates them (event_notifier_init).
    const kickFd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    const callFd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    const layout = { desc: block, avail: block + availOff, used: block + usedOff };
    const eventIdx = this.hasFeature(Feature.RING_EVENT_IDX);
    const ring = packed ? new PackedDriverQueue(this.memory.bytes, size, layout, eventIdx, kickFd) : new DriverQueue(this.memory.bytes, size, layout, eventIdx, kickFd);
    ring.reset();
    this.queues.push({ index: this.queues.length, ring, kickFd, callFd, running: false, inflight: new Array(size), waiting: [] });
  }

  /** Sends the ring setup of queue `q` starting at vring base `base` (split: avail index), ending with SET_VRING_ENABLE 1. */
  private async startRing(q: number, base: number): Promise<void> {
    const qs = this.queues[q];
    const ack = this.ack;
    const c = this.connection;
    await c.request(R.SET_VRING_NUM, encodeVringState(q, qs.ring.size), ack);
    await c.request(R.SET_VRING_BASE, encodeVringState(q, base), ack);
    await this.sendVringAddr(q, this.log !== null);
    await c.request(R.SET_VRING_CALL, encodeVringFd(q, false), { ...ack, fds: [qs.callFd] });
    await c.request(R.SET_VRING_KICK, encodeVringFd(q, false), { ...ack, fds: [qs.kickFd] });
    if (has(this.features, VHOST_USER_F_PROTOCOL_FEATURES)) await c.request(R.SET_VRING_ENABLE, encodeVringState(q, 1), ack);
    qs.running = true;
    // Anything made available while the queue was stopped is the device's again.
    // (The low 16 bits are the avail index, or a packed ring's avail slot and wrap counter.)
    if ((qs.ring.vringBase & 0xffff) !== (base & 0xffff)) qs.ring.kick();
  }

  /**
   * SET_VRING_ADDR of queue `q` with its addresses (our mapping's user addresses) and, when `logged`,
   * VHOST_VRING_F_LOG with log_guest_addr = the used ring's guest address (as QEMU sends it).
   */
  private async sendVringAddr(q: number, logged: boolean): Promise<void> {
    const l = this.queues[q].ring.layout;
    await this.connection.request(R.SET_VRING_ADDR, encodeVringAddr({
      index: q, flags: logged ? 1 << VHOST_VRING_F_LOG : 0, descUserAddr: this.memory.addr + l.desc, usedUserAddr: this.memory.addr + l.used,
      availUserAddr: this.memory.addr + l.avail, logGuestAddr: logged ? this.guestAddress(l.used) : 0,
    }), this.ack);
  }

  /** Stops queue `q` (GET_VRING_BASE; the back-end finishes in-flight requests first); resolves with the vring base (split: the next avail index; packed: both positions and wrap counters). */
  async stopQueue(q: number): Promise<number> {
    const qs = this.queueState(q);
    const reply = await this.connection.request(R.GET_VRING_BASE, encodeVringState(q, 0), { expectReply: true, timeoutMs: this.replyTimeoutMs });
    if (reply.length !== 8) throw new VhostUserError(`GET_VRING_BASE reply is ${reply.length} bytes, expected 8`, R.GET_VRING_BASE);
    const index = reply.readUInt32LE(0);
    if (index !== q) throw new VhostUserError(`GET_VRING_BASE reply is for vring ${index}, asked for ${q}`, R.GET_VRING_BASE);
    qs.running = false;
    this.reapAll();
    return reply.readUInt32LE(4);
  }

  /** Restarts a stopped queue at vring base `base` (what stopQueue returned): the same setup as connect. */
  async restartQueue(q: number, base: number): Promise<void> {
    this.queueState(q);
    await this.startRing(q, base);
  }

  /**
   * Sends SET_VRING_ENABLE for queue `q` (QEMU disables the rings before it stops them with GET_VRING_BASE);
   * needs VHOST_USER_F_PROTOCOL_FEATURES.
   */
  async setQueueEnabled(q: number, enabled: boolean): Promise<void> {
    this.queueState(q);
    await this.connection.request(R.SET_VRING_ENABLE, encodeVringState(q, enabled ? 1 : 0), this.ack);
  }

  /**
   * Sets the device up again as QEMU does when the guest resets it: stops every running queue
   * (GET_VRING_BASE), sends SET_FEATURES and SET_MEM_TABLE again, clears every ring and starts it at index 0
   * (still logged, with LOG_ALL in the features, while dirty logging is on). Fails if requests are still outstanding once the queues are stopped.
   */
  async reinitialize(): Promise<void> {
    for (const qs of this.queues) if (qs.running) await this.stopQueue(qs.index);
    if (this.outstanding > 0) throw new Error(`${this.outstanding} requests still outstanding after the queues stopped`);
    await this.connection.request(R.SET_FEATURES, encodeU64(this.log ? this.features | LOG_ALL : this.features), this.ack);
    if (this.memoryMessages === 'set-mem-table') await this.sendMemTable();
    for (const qs of this.queues) {
      qs.ring.reset();
      await this.startRing(qs.index, qs.ring.vringBase);
    }
  }

  /** True while queue `q` is started. */
  isRunning(q: number): boolean {
    return this.queueState(q).running;
  }

  /** The driver-side split ring of queue `q` (raw access for tests); throws if the queue is packed. */
  ring(q: number): DriverQueue {
    const r = this.queueState(q).ring;
    if (!(r instanceof DriverQueue)) throw new Error(`queue ${q} is a packed ring: use packedRing(${q})`);
    return r;
  }

  /** The driver-side packed ring of queue `q` (raw access for tests); throws if the queue is split. */
  packedRing(q: number): PackedDriverQueue {
    const r = this.queueState(q).ring;
    if (!(r instanceof PackedDriverQueue)) throw new Error(`queue ${q} is a split ring: use ring(${q})`);
    return r;
  }

  /** Reads and resets the call eventfd counter of queue `q`: how many times the back-end signalled since the last call. */
  callSignals(q: number): bigint {
    const out = new BigUint64Array(1);
    const n = Number(native.read(this.queueState(q).callFd, out, 8));
    if (n === 8) return out[0];
    const errno = lastErrno();
    if (errno === 11) return 0n; // EAGAIN: not signalled
    throw new Error(`reading the call eventfd of queue ${q} failed: errno ${errno}`);
  }

  /** The eventfds of queue `q` (owned by the client; for tests that hand them to the back-end themselves). */
  eventFds(q: number): { kickFd: number; callFd: number } {
    const qs = this.queueState(q);
    return { kickFd: qs.kickFd, callFd: qs.callFd };
  }

  private queueState(q: number): QueueState {
    if (this.closed) throw new Error('the client is closed');
    const qs = this.queues[q];
    if (!qs) throw new RangeError(`queue ${q} does not exist (${this.queues.length} queues)`);
    return qs;
  }

  // -------------------------------------------------------------------------------------------------------
  // Dirty logging (live migration): the generic log is in dirty-log.ts; this drives the protocol.

  /** True if the back-end can log dirty pages: it offers VHOST_F_LOG_ALL and VHOST_USER_PROTOCOL_F_LOG_SHMFD was negotiated. */
  get supportsDirtyLog(): boolean {
    return has(this.offeredFeatures, VHOST_F_LOG_ALL) && has(this.protocolFeatures, ProtocolFeature.LOG_SHMFD);
  }

  /** True between startDirtyLog() and stopDirtyLog(). */
  get dirtyLogging(): boolean {
    return this.log !== null;
  }

  /** The log the back-end writes into while logging is on (raw access; owned by the client), else null. */
  get dirtyLog(): DirtyLogArea | null {
    return this.log;
  }

  /**
   * Turns dirty logging on as QEMU does when a migration starts, with the rings running: a log sized for
   * guest memory (dirtyLogBytes) in a fresh memfd, SET_LOG_BASE with it (a refusing reply throws
   * VhostUserError and leaves logging off), SET_FEATURES with VHOST_F_LOG_ALL added, then SET_VRING_ADDR
   * with VHOST_VRING_F_LOG for every started queue; each acked when REPLY_ACK is negotiated, so the
   * back-end logs once this resolves. With `logBaseLast`, SET_LOG_BASE comes after the others instead:
   * QEMU's order when a device starts while a migration runs (vhost_dev_start). A failure part way
   * leaves logging off here, and the back-end in whatever state the messages it took put it. Resolves
   * with the log.
   */
  async startDirtyLog(opts: { logBaseLast?: boolean } = {}): Promise<DirtyLogArea> {
    this.checkOpen();
    if (this.log) throw new Error('dirty logging is already on');
    if (!this.supportsDirtyLog) {
      throw new VhostUserError(`the back-end cannot log dirty pages: it offers ${has(this.offeredFeatures, VHOST_F_LOG_ALL) ? '' : 'no VHOST_F_LOG_ALL, '}` +
        `${has(this.offeredProtocolFeatures, ProtocolFeature.LOG_SHMFD) ? `VHOST_USER_PROTOCOL_F_LOG_SHMFD${has(this.protocolFeatures, ProtocolFeature.LOG_SHMFD) ? '' : ' (not negotiated)'}` : 'no VHOST_USER_PROTOCOL_F_LOG_SHMFD'}`);
    }
    const log = DirtyLogArea.create(dirtyLogBytes(this.regions));
    try {
      if (!opts.logBaseLast) await sendLogBase(this.connection, log, this.replyTimeoutMs);
      await this.connection.request(R.SET_FEATURES, encodeU64(this.features | LOG_ALL), this.ack);
      for (const qs of this.queues) if (qs.running) await this.sendVringAddr(qs.index, true);
      if (opts.logBaseLast) await sendLogBase(this.connection, log, this.replyTimeoutMs);
      this.log = log;
    } catch (err) {
      // The log stays mapped only if the back-end may still write into it: closing our copy is harmless either way.
      this.log = null;
      log.close();
      throw err;
    }
    return log;
  }

  /**
   * Turns dirty logging off as QEMU does when a migration ends or fails: SET_FEATURES without LOG_ALL,
   * SET_VRING_ADDR without VHOST_VRING_F_LOG for every started queue, then the log is unmapped and
   * closed, unless `keepLog`: then it is returned still mapped, and the caller closes it (tests: the
   * back-end must not write into it any more).
   */
  async stopDirtyLog(opts: { keepLog?: boolean } = {}): Promise<DirtyLogArea | null> {
    this.checkOpen();
    const log = this.log;
    if (!log) throw new Error('dirty logging is not on');
    await this.connection.request(R.SET_FEATURES, encodeU64(this.features), this.ack);
    for (const qs of this.queues) if (qs.running) await this.sendVringAddr(qs.index, false);
    this.log = null;
    if (opts.keepLog) return log;
    log.close();
    return null;
  }

  /**
   * Gives the back-end a new log while logging is on (a second SET_LOG_BASE, as QEMU sends when guest
   * memory grows), sized for `regions` (default: the current layout). Once the back-end answered, the bits
   * of the old log are moved into the new one (nothing is lost) and the old log is closed, unless
   * `keepOld`: then it is returned still mapped, for the caller to close.
   */
  async replaceDirtyLog(opts: { keepOld?: boolean; regions?: readonly GuestRange[] } = {}): Promise<DirtyLogArea | null> {
    this.checkOpen();
    const old = this.log;
    if (!old) throw new Error('dirty logging is not on');
    const log = DirtyLogArea.create(dirtyLogBytes(opts.regions ?? this.regions));
    try {
      await sendLogBase(this.connection, log, this.replyTimeoutMs);
    } catch (err) {
      log.close();
      throw err;
    }
    this.log = log;
    const lost = log.addPages(old.takePages());
    if (lost > 0) this.anomalies.push(`${lost} dirty page(s) of the old log are past the end of its replacement`);
    if (opts.keepOld) return old;
    old.close();
    return null;
  }

  /** Guest page numbers (guest physical address / 4096) marked in the dirty log, ascending; throws unless logging is on. */
  dirtyPages(): number[] {
    return this.activeLog().pages();
  }

  /** Reads and clears the dirty log (atomically per 64-bit word, as QEMU's sync does); returns the pages that were marked. */
  takeDirtyPages(): number[] {
    return this.activeLog().takePages();
  }

  /** Clears the dirty log (atomically per 64-bit word: a bit set meanwhile is kept or cleared, never torn). */
  clearDirtyLog(): void {
    this.activeLog().clear();
  }

  private activeLog(): DirtyLogArea {
    this.checkOpen();
    if (!this.log) throw new Error('dirty logging is not on: call startDirtyLog() first');
    return this.log;
  }

  /** A copy of guest memory, one entry per memory region with its guest physical address (for diffs with changedPages). */
  snapshotMemory(): MemorySnapshot {
    this.checkOpen();
    const mem = this.memory.bytes;
    return { regions: this.regions.map((r) => ({ guestAddr: r.guestAddr, bytes: Buffer.from(mem.subarray(r.offset, r.offset + r.size)) })) };
  }

  /** Where queue `q`'s rings are in guest physical memory (each part with its exact byte size). */
  ringAreas(q: number): RingAreas {
    const ring = this.queueState(q).ring;
    const s = ring instanceof PackedDriverQueue ? packedRingSizes(ring.size) : ringSizes(ring.size);
    const l = ring.layout;
    return {
      desc: { guestAddr: this.guestAddress(l.desc), size: s.desc },
      avail: { guestAddr: this.guestAddress(l.avail), size: s.avail },
      used: { guestAddr: this.guestAddress(l.used), size: s.used },
    };
  }

  private checkOpen(): void {
    if (this.closed) throw new Error('the client is closed');
  }

  // -------------------------------------------------------------------------------------------------------
  // Requests

  /**
   * Submits one virtio-blk request: header | out segments | in segments | status, one descriptor each
   * (or one indirect table). Waits for free descriptors and memory if needed. Resolves with the status
   * and copies of the in segments; a failing status still resolves (read/write/flush/getId throw).
   */
  submit(queue: number, req: BlkRequest): Promise<BlkCompletion> {
    try {
      return this.submitChain(queue, req);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  private submitChain(queue: number, req: BlkRequest): Promise<BlkCompletion> {
    const qs = this.queueState(queue);
    const out = req.out ?? [];
    const inLengths = req.inLengths ?? [];
    for (const l of inLengths) if (!Number.isInteger(l) || l < 0 || l > 0xffffffff) throw new RangeError(`in segment length ${l} is not a u32`);
    const ndesc = 2 + out.length + inLengths.length;
    const canIndirect = this.hasFeature(Feature.RING_INDIRECT_DESC);
    let indirect = req.indirect ?? false;
    if (indirect && !canIndirect) throw new Error('indirect descriptors were not negotiated');
    if (!indirect && ndesc > qs.ring.size) {
      if (!canIndirect) throw new RangeError(`a chain of ${ndesc} descriptors does not fit a ${qs.ring.size}-entry queue`);
      indirect = true;
    }
    if (indirect && ndesc * 16 > 0xffffffff) throw new RangeError('indirect table too large');
    // Block layout: header at 0, status at 16, indirect table at 64, then 512-aligned segments.
    let off = alignUp(TABLE_OFF + (indirect ? ndesc * 16 : 0), SEGMENT_ALIGN);
    const outOffs = out.map((seg) => { const o = off; off = alignUp(off + seg.length, SEGMENT_ALIGN); return o; });
    const inOffs = inLengths.map((len) => { const o = off; off = alignUp(off + len, SEGMENT_ALIGN); return o; });
    const blockLen = off;
    if (ExtentAllocator.roundUp(blockLen) > this.memory.size) throw new RangeError(`a request of ${blockLen} bytes cannot fit in ${this.memory.size} bytes of shared memory`);
    const sector = BigInt(req.sector ?? 0);
    const type = req.type;
    const ioprio = req.ioprio ?? 0;

    return new Promise<BlkCompletion>((resolve, reject) => {
      const attempt = (): boolean => {
        const block = this.allocator.alloc(blockLen);
        if (block < 0) return false;
        const descs = qs.ring.allocDescriptors(indirect ? 1 : ndesc);
        if (!descs) {
          this.allocator.free(block, blockLen);
          return false;
        }
        const mem = this.memory.bytes;
        const dv = new DataView(mem.buffer, mem.byteOffset + block, REQUEST_HEADER_SIZE);
        dv.setUint32(0, type >>> 0, true);
        dv.setUint32(4, ioprio >>> 0, true);
        dv.setBigUint64(8, BigInt.asUintN(64, sector), true);
        mem[block + STATUS_OFF] = STATUS_NOT_WRITTEN;
        out.forEach((seg, i) => mem.set(seg, block + outOffs[i]));
        // The chain in order: header, out segments, in segments, status.
        const addrs = [block, ...outOffs.map((o) => block + o), ...inOffs.map((o) => block + o), block + STATUS_OFF].map((o) => this.guestAddress(o));
        const lens = [REQUEST_HEADER_SIZE, ...out.map((s) => s.length), ...inLengths, 1];
        const flags = addrs.map((_, i) => (i > out.length ? VIRTQ_DESC_F_WRITE : 0));
        if (indirect) {
          const table = new DataView(mem.buffer, mem.byteOffset + block + TABLE_OFF, ndesc * 16);
          for (let i = 0; i < ndesc; i++) qs.ring.writeIndirectEntry(table, i, ndesc, addrs[i], lens[i], flags[i]);
          qs.ring.writeDescriptor(descs[0], this.guestAddress(block + TABLE_OFF), ndesc * 16, VIRTQ_DESC_F_INDIRECT, 0);
        } else {
          qs.ring.writeChain(descs, addrs, lens, flags);
        }
        let writableBytes = 1;
        for (const l of inLengths) writableBytes += l;
        this.track(qs, {
          descs, block, blockLen, statusOff: block + STATUS_OFF, inOffs: inOffs.map((o) => block + o), inLens: [...inLengths],
          writableBytes, raw: false, abandoned: false, timer: undefined, resolve, reject,
        });
        return true;
      };
      this.startOrWait(qs, attempt, reject);
    });
  }

  /**
   * Publishes a chain of raw descriptors exactly as given (hostile tests: addresses outside memory,
   * loops, bad flags). Resolves with the used len once the device returns the head.
   */
  submitRawChain(queue: number, descriptors: readonly RawDescriptor[]): Promise<RawCompletion> {
    try {
      return this.publishRaw(queue, descriptors);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  private publishRaw(queue: number, descriptors: readonly RawDescriptor[]): Promise<RawCompletion> {
    const qs = this.queueState(queue);
    const n = descriptors.length;
    if (n < 1 || n > qs.ring.size) throw new RangeError(`a raw chain needs 1..${qs.ring.size} descriptors, got ${n}`);
    return new Promise<RawCompletion>((resolve, reject) => {
      const attempt = (): boolean => {
        const descs = qs.ring.allocDescriptors(n);
        if (!descs) return false;
        descriptors.forEach((d, k) => {
          const next = d.nextIndex ?? (d.next !== undefined ? descs[d.next] : k + 1 < n ? descs[k + 1] : 0);
          qs.ring.writeDescriptor(descs[k], d.addr, d.len, d.flags, next);
        });
        // What an indirect table lets the device write is not known here: no used len check then.
        let writableBytes = 0;
        for (const d of descriptors) {
          if (d.flags & VIRTQ_DESC_F_INDIRECT) writableBytes = Number.POSITIVE_INFINITY;
          else if (d.flags & VIRTQ_DESC_F_WRITE) writableBytes += d.len;
        }
        this.track(qs, {
          descs, block: -1, blockLen: 0, statusOff: -1, inOffs: [], inLens: [], writableBytes, raw: true, abandoned: false,
          timer: undefined, resolve, reject,
        });
        return true;
      };
      this.startOrWait(qs, attempt, reject);
    });
  }

  /** Allocates `length` bytes of shared memory for raw descriptors (page granular, inside one region). */
  allocDma(length: number): DmaBuffer {
    if (this.closed) throw new Error('the client is closed');
    const off = this.allocator.alloc(length);
    if (off < 0) throw new RangeError(`no room for ${length} bytes of shared memory`);
    let freed = false;
    return {
      gpa: this.guestAddress(off), length, bytes: this.memory.bytes.subarray(off, off + length),
      free: () => {
        if (freed || this.closed) return;
        freed = true;
        this.allocator.free(off, length);
        this.retryWaiting();
      },
    };
  }

  private async sendMemTable(): Promise<void> {
    await this.connection.request(R.SET_MEM_TABLE, encodeMemTable(memTable(this.memory, this.regions)), {
      ...this.ack, fds: this.regions.map(() => this.memory.fd),
    });
  }

  /**
   * Hot-adds guest memory region `region` (ADD_MEM_REG, or the whole table again with SET_MEM_TABLE) and
   * lets the allocator hand it out. While dirty logging is on, a log too small for it is replaced first. It must not touch an existing region, in the memfd or in guest memory.
   */
  async addMemoryRegion(region: GuestRegion): Promise<void> {
    if (this.closed) throw new Error('the client is closed');
    const next = checkRegions([...this.regions, region], this.memory.size, this.memoryMessages === 'add-mem-reg' ? this.maxMemSlots : MAX_MEM_TABLE_REGIONS);
    if (this.regions.some((r) => r.offset + r.size === region.offset || region.offset + region.size === r.offset)) {
      throw new RangeError('a hot-added region must not be adjacent to another one in the memfd');
    }
    // As QEMU: a log that would not cover the new region grows before the back-end learns of the region.
    if (this.log && dirtyLogBytes(next) > this.log.size) await this.replaceDirtyLog({ regions: next });
    const previous = this.regions;
    this.regions = next;
    try {
      if (this.memoryMessages === 'add-mem-reg') {
        await this.connection.request(R.ADD_MEM_REG, encodeMemRegion(memTable(this.memory, [region])[0]), { ...this.ack, fds: [this.memory.fd] });
      } else {
        await this.sendMemTable();
      }
    } catch (err) {
      this.regions = previous;
      throw err;
    }
    this.allocator.free(region.offset, region.size);
    this.retryWaiting();
  }

  /**
   * Hot-removes the region starting at guest address `guestAddr` (REM_MEM_REG without fds, or the whole
   * table again with SET_MEM_TABLE). None of its memory may be in use (rings, requests, buffers).
   */
  async removeMemoryRegion(guestAddr: number): Promise<void> {
    if (this.closed) throw new Error('the client is closed');
    const region = this.regions.find((r) => r.guestAddr === guestAddr);
    if (!region) throw new RangeError(`no memory region at guest address 0x${guestAddr.toString(16)}`);
    if (this.regions.length === 1) throw new RangeError('cannot remove the last memory region');
    const followed = this.regions.some((o) => o.offset === region.offset + region.size);
    const usable = followed ? region.size - PAGE_SIZE : region.size;
    const taken = this.allocator.reserve(region.offset, usable);
    if (!taken) throw new RangeError(`memory region at guest address 0x${guestAddr.toString(16)} is still in use`);
    const previous = this.regions;
    this.regions = this.regions.filter((r) => r !== region);
    try {
      if (this.memoryMessages === 'add-mem-reg') {
        await this.connection.request(R.REM_MEM_REG, encodeMemRegion(memTable(this.memory, [region])[0]), this.ack);
      } else {
        await this.sendMemTable();
      }
    } catch (err) {
      this.regions = previous;
      this.allocator.free(taken.start, taken.len);
      throw err;
    }
  }

  /** Guest physical address of byte `offset` of the shared memory; throws if no region maps it. */
  guestAddress(offset: number): number {
    for (const r of this.regions) {
      if (offset >= r.offset && offset < r.offset + r.size) return r.guestAddr + (offset - r.offset);
    }
    throw new RangeError(`memfd offset ${offset} is in no memory region`);
  }

  /** The memfd pieces behind guest range [gpa, gpa+length), in order; throws if part of it is unmapped. */
  private guestPieces(gpa: number, length: number): Array<{ offset: number; len: number }> {
    const pieces: Array<{ offset: number; len: number }> = [];
    let at = gpa;
    const end = gpa + length;
    while (at < end) {
      const r = this.regions.find((x) => at >= x.guestAddr && at < x.guestAddr + x.size);
      if (!r) throw new RangeError(`guest address 0x${at.toString(16)} is in no memory region`);
      const len = Math.min(end, r.guestAddr + r.size) - at;
      pieces.push({ offset: r.offset + (at - r.guestAddr), len });
      at += len;
    }
    return pieces;
  }

  /**
   * Takes the memory behind guest range [gpa, gpa+length), which may span regions that are contiguous in
   * guest physical memory (for descriptors that cross a region boundary). Throws if any of it is in use.
   */
  allocGuest(gpa: number, length: number): GuestBuffer {
    if (this.closed) throw new Error('the client is closed');
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(length) || gpa < 0 || length <= 0) throw new RangeError(`bad guest range ${gpa}+${length}`);
    const pieces = this.guestPieces(gpa, length);
    const taken: Array<{ start: number; len: number }> = [];
    for (const p of pieces) {
      const t = this.allocator.reserve(p.offset, p.len);
      if (!t) {
        for (const x of taken) this.allocator.free(x.start, x.len);
        throw new RangeError(`guest range 0x${gpa.toString(16)}+${length} is (partly) in use`);
      }
      taken.push(t);
    }
    let freed = false;
    const mem = this.memory.bytes;
    return {
      gpa, length,
      read: () => Buffer.concat(pieces.map((p) => Buffer.from(mem.subarray(p.offset, p.offset + p.len)))),
      write: (data: Uint8Array, at = 0) => {
        if (at < 0 || at + data.length > length) throw new RangeError(`write of ${data.length} bytes at ${at} outside a ${length}-byte guest buffer`);
        let pos = 0;
        for (const p of pieces) {
          const lo = Math.max(at, pos);
          const hi = Math.min(at + data.length, pos + p.len);
          if (lo < hi) mem.set(data.subarray(lo - at, hi - at), p.offset + (lo - pos));
          pos += p.len;
        }
      },
      free: () => {
        if (freed || this.closed) return;
        freed = true;
        for (const x of taken) this.allocator.free(x.start, x.len);
        this.retryWaiting();
      },
    };
  }

  private startOrWait(qs: QueueState, attempt: () => boolean, reject: (e: Error) => void): void {
    if (qs.waiting.length === 0 && attempt()) return;
    qs.waiting.push({ attempt, reject });
    this.schedulePoll();
  }

  /** Records a chain just written (head = descs[0]) and makes it available. */
  private track(qs: QueueState, rec: Inflight): void {
    const head = rec.descs[0];
    qs.inflight[head] = rec;
    this.outstanding++;
    if (this.requestTimeoutMs > 0) {
      rec.timer = setTimeout(() => {
        // The device may still own the buffers: they stay reserved until it gives the chain back.
        rec.abandoned = true;
        rec.reject(new Error(`queue ${qs.index}: request at head ${head} did not complete within ${this.requestTimeoutMs} ms`));
      }, this.requestTimeoutMs);
    }
    qs.ring.publish(head);
    this.idlePolls = 0;
    this.schedulePoll();
  }

  /** Handles used element (id, len) of queue `qs`. */
  private complete(qs: QueueState, id: number, len: number): void {
    const rec = id < qs.inflight.length ? qs.inflight[id] : undefined;
    if (!rec) {
      this.anomalies.push(`queue ${qs.index}: used element for descriptor ${id} (len ${len}), which heads no outstanding chain`);
      return;
    }
    qs.inflight[id] = undefined;
    this.outstanding--;
    if (rec.timer) clearTimeout(rec.timer);
    if (len > rec.writableBytes) {
      this.anomalies.push(`queue ${qs.index}: head ${id} completed with used len ${len}, more than its ${rec.writableBytes} device-writable bytes`);
    }
    const mem = this.memory.bytes;
    const status = rec.statusOff >= 0 ? mem[rec.statusOff] : STATUS_NOT_WRITTEN;
    const data = rec.inOffs.map((o, i) => Buffer.from(mem.subarray(o, o + rec.inLens[i])));
    qs.ring.freeDescriptors(rec.descs);
    if (rec.block >= 0) this.allocator.free(rec.block, rec.blockLen);
    if (!rec.abandoned) rec.resolve({ status, data, usedLen: len, head: id });
  }

  /** Collects completions of every queue; returns how many there were. */
  private reapAll(): number {
    let n = 0;
    for (const qs of this.queues) n += qs.ring.reap((id, len) => this.complete(qs, id, len));
    if (n > 0) this.retryWaiting();
    return n;
  }

  /** Starts waiting submissions, in order per queue, while resources last. */
  private retryWaiting(): void {
    for (const qs of this.queues) {
      while (qs.waiting.length > 0 && qs.waiting[0].attempt()) qs.waiting.shift();
    }
  }

  private waitingCount(): number {
    let n = 0;
    for (const qs of this.queues) n += qs.waiting.length;
    return n;
  }

  private schedulePoll(): void {
    if (this.pollHandle !== null || this.closed) return;
    // Spin on setImmediate while completions are expected soon, then back off to a 1 ms timer.
    if (this.idlePolls < 256) this.pollHandle = { immediate: setImmediate(this.pollTick) };
    else this.pollHandle = { timer: setTimeout(this.pollTick, 1) };
  }

  private readonly pollTick = (): void => {
    this.pollHandle = null;
    if (this.closed) return;
    if (this.reapAll() > 0) this.idlePolls = 0;
    else this.idlePolls++;
    if (this.outstanding > 0 || this.waitingCount() > 0) this.schedulePoll();
  };

  private check(what: string, r: BlkCompletion): BlkCompletion {
    if (r.status !== Status.OK) throw new BlkRequestError(what, r.status, r.usedLen);
    return r;
  }

  /** Segment sizes for `length` bytes of data: at most size_max each (when negotiated). */
  private segments(length: number): number[] {
    const max = this.hasFeature(Feature.BLK_SIZE_MAX) && this.config.sizeMax > 0 ? this.config.sizeMax : 1 << 20;
    const segs: number[] = [];
    for (let done = 0; done < length; done += max) segs.push(Math.min(max, length - done));
    return segs;
  }

  /** Reads `length` bytes at `sector`; throws BlkRequestError unless the status is OK. */
  async read(sector: number, length: number, queue = 0): Promise<Buffer> {
    const segs = this.segments(length);
    const r = this.check(`read of ${length} bytes at sector ${sector}`, await this.submit(queue, { type: RequestType.IN, sector, inLengths: segs }));
    return r.data.length === 1 ? r.data[0] : Buffer.concat(r.data);
  }

  /** Writes `data` at `sector`; throws BlkRequestError unless the status is OK. */
  async write(sector: number, data: Uint8Array, queue = 0): Promise<void> {
    const out: Uint8Array[] = [];
    let off = 0;
    for (const len of this.segments(data.length)) {
      out.push(data.subarray(off, off + len));
      off += len;
    }
    this.check(`write of ${data.length} bytes at sector ${sector}`, await this.submit(queue, { type: RequestType.OUT, sector, out }));
  }

  /** Flushes the device's write cache; throws BlkRequestError unless the status is OK. */
  async flush(queue = 0): Promise<void> {
    this.check('flush', await this.submit(queue, { type: RequestType.FLUSH }));
  }

  /** Discards `numSectors` sectors at `sector` (needs VIRTIO_BLK_F_DISCARD); throws BlkRequestError unless the status is OK. */
  async discard(sector: number | bigint, numSectors: number, queue = 0): Promise<void> {
    const out = [encodeBlkRanges([{ sector, numSectors }])];
    this.check(`discard of ${numSectors} sectors at sector ${sector}`, await this.submit(queue, { type: RequestType.DISCARD, out }));
  }

  /** Zeroes `numSectors` sectors at `sector` (needs VIRTIO_BLK_F_WRITE_ZEROES); throws BlkRequestError unless the status is OK. */
  async writeZeroes(sector: number | bigint, numSectors: number, opts: { unmap?: boolean; queue?: number } = {}): Promise<void> {
    const out = [encodeBlkRanges([{ sector, numSectors, flags: opts.unmap ? WRITE_ZEROES_FLAG_UNMAP : 0 }])];
    this.check(`write zeroes of ${numSectors} sectors at sector ${sector}`, await this.submit(opts.queue ?? 0, { type: RequestType.WRITE_ZEROES, out }));
  }

  /** The device serial (GET_ID), without trailing NULs; throws BlkRequestError unless the status is OK. */
  async getId(queue = 0): Promise<string> {
    const r = this.check('get id', await this.submit(queue, { type: RequestType.GET_ID, inLengths: [ID_BYTES] }));
    const id = r.data[0];
    const end = id.indexOf(0);
    return id.subarray(0, end < 0 ? id.length : end).toString('utf8');
  }

  // -------------------------------------------------------------------------------------------------------
  // Shutdown

  /**
   * Stops every running queue (GET_VRING_BASE; skipped with graceful: false, an abrupt disconnect),
   * closes the socket, fails what is still outstanding, unmaps the memory and closes the eventfds.
   */
  async close(opts: { graceful?: boolean } = {}): Promise<void> {
    if (this.closed) return;
    if (opts.graceful !== false && !this.connection.isClosed) {
      for (const qs of this.queues) {
        if (!qs.running) continue;
        try {
          await this.stopQueue(qs.index);
        } catch {
          break; // the back-end is gone or refuses: nothing more to stop politely
        }
      }
    }
    this.reapAll();
    this.closed = true;
    this.connection.close();
    this.backendChannel?.destroy();
    this.backendChannel = null;
    if (this.pollHandle !== null) {
      if ('immediate' in this.pollHandle) clearImmediate(this.pollHandle.immediate);
      else clearTimeout(this.pollHandle.timer);
      this.pollHandle = null;
    }
    const gone = new Error('the client was closed before the request completed');
    for (const qs of this.queues) {
      for (const w of qs.waiting.splice(0)) w.reject(gone);
      for (let i = 0; i < qs.inflight.length; i++) {
        const rec = qs.inflight[i];
        if (!rec) continue;
        qs.inflight[i] = undefined;
        if (rec.timer) clearTimeout(rec.timer);
        if (!rec.abandoned) rec.reject(gone);
      }
      closeQuietly(qs.kickFd);
      closeQuietly(qs.callFd);
    }
    this.outstanding = 0;
    this.log?.close();
    this.log = null;
    this.memory.close();
  }
}
