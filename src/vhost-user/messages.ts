/**
 * The vhost-user wire format: request numbers, the 12-byte header, and payload codecs.
 *
 * Follows QEMU's docs/interop/vhost-user.rst, checked against what QEMU's hw/virtio/vhost-user.c
 * actually puts on the wire (which differs from the document in a few places, noted where it matters).
 * Pure functions over bytes: no sockets and no file descriptors; the caller carries ancillary fds alongside.
 *
 * Byte order: the spec says "machine native"; this daemon runs on little-endian Linux hosts only, so every
 * field is read and written little endian.
 *
 * Decoders treat their input as hostile: every payload size is checked exactly, every 64-bit address or size
 * must be an exact JS number (at most 2^53-1), and any violation throws a ProtocolError naming the request.
 * Feature words stay bigint. Encoders only check that each value fits its wire field (RangeError otherwise):
 * protocol rules are the decoders' job, so tests can build well-formed but invalid messages.
 */
import type { RegionDescriptor } from '../memory/guest-memory.js';

// ---------------------------------------------------------------------------------------------------------
// Request numbers

/** Requests sent by the front-end (QEMU) to the back-end over the main socket. */
export const FrontendRequest = {
  /** Get the device feature bits; reply u64. */
  GET_FEATURES: 1,
  /** Set the negotiated device feature bits; payload u64. */
  SET_FEATURES: 2,
  /** Session start: the sender becomes the owner. No payload. */
  SET_OWNER: 3,
  /** Deprecated: disable all rings. No payload. */
  RESET_OWNER: 4,
  /** Guest memory table; payload nregions+padding+regions, one fd per region. */
  SET_MEM_TABLE: 5,
  /** Dirty log area; QEMU sends a 16-byte log description (not the u64 the spec lists) with the log fd. */
  SET_LOG_BASE: 6,
  /** Log eventfd in ancillary data. No payload. */
  SET_LOG_FD: 7,
  /** Ring size; payload vring state. */
  SET_VRING_NUM: 8,
  /** Ring addresses; payload vring address description (40 bytes). */
  SET_VRING_ADDR: 9,
  /** Next available index; payload vring state. */
  SET_VRING_BASE: 10,
  /** Stop a ring and fetch its next available index; payload and reply vring state. */
  GET_VRING_BASE: 11,
  /** Kick eventfd; payload u64 (index | NOFD bit), fd in ancillary data. */
  SET_VRING_KICK: 12,
  /** Call eventfd; payload u64 (index | NOFD bit), fd in ancillary data. */
  SET_VRING_CALL: 13,
  /** Error eventfd; payload u64 (index | NOFD bit), fd in ancillary data. */
  SET_VRING_ERR: 14,
  /** Get the protocol feature bits; reply u64. */
  GET_PROTOCOL_FEATURES: 15,
  /** Set the negotiated protocol feature bits; payload u64. */
  SET_PROTOCOL_FEATURES: 16,
  /** Maximum number of queues (needs MQ); reply u64. */
  GET_QUEUE_NUM: 17,
  /** Enable (num=1) or disable (num=0) a ring; payload vring state. */
  SET_VRING_ENABLE: 18,
  /** net: broadcast a fake RARP; payload u64 holding a MAC. */
  SEND_RARP: 19,
  /** net: host MTU; payload u64. */
  NET_SET_MTU: 20,
  /** Back-end request channel socket in ancillary data (previously SET_SLAVE_REQ_FD). No payload. */
  SET_BACKEND_REQ_FD: 21,
  /** IOTLB update/invalidate; payload struct vhost_iotlb_msg; reply u64. */
  IOTLB_MSG: 22,
  /** Ring endianness for legacy devices; payload vring state. */
  SET_VRING_ENDIAN: 23,
  /** Read device config space; payload and reply config space (12 + size bytes). */
  GET_CONFIG: 24,
  /** Write device config space; payload config space. */
  SET_CONFIG: 25,
  /** crypto: create a session. */
  CREATE_CRYPTO_SESSION: 26,
  /** crypto: close a session; payload u64. */
  CLOSE_CRYPTO_SESSION: 27,
  /** Postcopy: open a userfaultfd; reply carries it. No payload. */
  POSTCOPY_ADVISE: 28,
  /** Postcopy: switch to postcopy mode. No payload. */
  POSTCOPY_LISTEN: 29,
  /** Postcopy finished; reply u64. No payload. */
  POSTCOPY_END: 30,
  /** Ask for an inflight-tracking buffer; payload and reply inflight description. */
  GET_INFLIGHT_FD: 31,
  /** Hand the inflight buffer back; payload inflight description, fd in ancillary data. */
  SET_INFLIGHT_FD: 32,
  /** gpu: protocol socket in ancillary data. */
  GPU_SET_SOCKET: 33,
  /** Disable all rings and reset device state. No payload. */
  RESET_DEVICE: 34,
  /** In-band kick (INBAND_NOTIFICATIONS); payload vring state. */
  VRING_KICK: 35,
  /** Maximum memory slots (CONFIGURE_MEM_SLOTS); reply u64. No payload. */
  GET_MAX_MEM_SLOTS: 36,
  /** Add one memory region; payload u64 padding + region (40 bytes), one fd. */
  ADD_MEM_REG: 37,
  /** Remove one memory region; payload u64 padding + region (40 bytes). */
  REM_MEM_REG: 38,
  /** Device status byte (STATUS); payload u64. */
  SET_STATUS: 39,
  /** Device status byte (STATUS); reply u64. No payload. */
  GET_STATUS: 40,
  /** Fetch a shared object's dma-buf fd; payload 16-byte UUID. */
  GET_SHARED_OBJECT: 41,
  /** Device state transfer channel; payload direction u32 + phase u32, fd; reply u64. */
  SET_DEVICE_STATE_FD: 42,
  /** Did the device state transfer succeed; reply u64. No payload. */
  CHECK_DEVICE_STATE: 43,
} as const;

/** Numeric value of a front-end request. */
export type FrontendRequestCode = (typeof FrontendRequest)[keyof typeof FrontendRequest];

/** Requests sent by the back-end to the front-end over the back-end request channel. */
export const BackendRequest = {
  /** IOTLB miss / access failure; payload struct vhost_iotlb_msg. */
  IOTLB_MSG: 1,
  /** Device config space changed; no payload. */
  CONFIG_CHANGE_MSG: 2,
  /** Host notifier for a queue; payload vring area description, fd. */
  VRING_HOST_NOTIFIER_MSG: 3,
  /** In-band call (INBAND_NOTIFICATIONS); payload vring state. */
  VRING_CALL: 4,
  /** In-band error (INBAND_NOTIFICATIONS); payload vring state. */
  VRING_ERR: 5,
  /** Export a shared object; payload 16-byte UUID. */
  SHARED_OBJECT_ADD: 6,
  /** Withdraw a shared object; payload 16-byte UUID. */
  SHARED_OBJECT_REMOVE: 7,
  /** Look up a shared object; payload 16-byte UUID; reply fd + u64. */
  SHARED_OBJECT_LOOKUP: 8,
} as const;

/** Numeric value of a back-end request. */
export type BackendRequestCode = (typeof BackendRequest)[keyof typeof BackendRequest];

/** Protocol feature bit numbers (VHOST_USER_PROTOCOL_F_*), exchanged with GET/SET_PROTOCOL_FEATURES. */
export const ProtocolFeature = {
  /** Multiple queues; GET_QUEUE_NUM. */
  MQ: 0,
  /** Dirty log in shared memory passed with SET_LOG_BASE. */
  LOG_SHMFD: 1,
  /** SEND_RARP. */
  RARP: 2,
  /** need_reply flag honoured on every request. */
  REPLY_ACK: 3,
  /** NET_SET_MTU (the spec calls it F_MTU). */
  NET_MTU: 4,
  /** Back-end request channel (previously SLAVE_REQ). */
  BACKEND_REQ: 5,
  /** SET_VRING_ENDIAN. */
  CROSS_ENDIAN: 6,
  /** crypto sessions. */
  CRYPTO_SESSION: 7,
  /** Postcopy migration with userfaultfd. */
  PAGEFAULT: 8,
  /** GET_CONFIG / SET_CONFIG / CONFIG_CHANGE_MSG. */
  CONFIG: 9,
  /** fds on the back-end request channel (previously SLAVE_SEND_FD). */
  BACKEND_SEND_FD: 10,
  /** VRING_HOST_NOTIFIER_MSG. */
  HOST_NOTIFIER: 11,
  /** GET_INFLIGHT_FD / SET_INFLIGHT_FD. */
  INFLIGHT_SHMFD: 12,
  /** RESET_DEVICE. */
  RESET_DEVICE: 13,
  /** VRING_KICK / VRING_CALL / VRING_ERR messages instead of eventfds. */
  INBAND_NOTIFICATIONS: 14,
  /** GET_MAX_MEM_SLOTS / ADD_MEM_REG / REM_MEM_REG. */
  CONFIGURE_MEM_SLOTS: 15,
  /** SET_STATUS / GET_STATUS. */
  STATUS: 16,
  /** Xen mappings: memory regions grow to 40 bytes (flags u32 + domid u32). */
  XEN_MMAP: 17,
  /** Shared objects (dma-buf) by UUID. */
  SHARED_OBJECT: 18,
  /** SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE. */
  DEVICE_STATE: 19,
} as const;

/** Device feature bit 30: the back-end speaks GET/SET_PROTOCOL_FEATURES. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;

/** Device feature bit 26 (VHOST_F_LOG_ALL): the front-end asks for dirty logging. */
export const VHOST_F_LOG_ALL = 26;

/** Bit number in SET_VRING_ADDR flags: log used-ring writes at logGuestAddr. */
export const VHOST_VRING_F_LOG = 0;

const FRONTEND_NAMES = new Map<number, string>(Object.entries(FrontendRequest).map(([k, v]) => [v, k]));
const BACKEND_NAMES = new Map<number, string>(Object.entries(BackendRequest).map(([k, v]) => [v, k]));

/** Name of a front-end request for log lines ("SET_VRING_ADDR"), or "unknown request N". */
export function requestName(n: number): string {
  return FRONTEND_NAMES.get(n) ?? `unknown request ${n}`;
}

/** Name of a back-end request for log lines ("CONFIG_CHANGE_MSG"), or "unknown backend request N". */
export function backendRequestName(n: number): string {
  return BACKEND_NAMES.get(n) ?? `unknown backend request ${n}`;
}

// ---------------------------------------------------------------------------------------------------------
// Header

/** Size of the message header: request u32, flags u32, size u32. */
export const HEADER_SIZE = 12;
/** Largest payload accepted; any bigger size in a header is refused. */
export const MAX_PAYLOAD_SIZE = 4096;
/** Most fds accepted with one message on the main socket (the back-end may refuse more). */
export const MAX_FDS = 32;
/** Most fds the back-end may send with one message on the back-end request channel. */
export const BACKEND_MAX_FDS = 8;
/** The only protocol version (flags bits 0-1). */
export const VHOST_USER_VERSION = 1;
/** Flags bits 0-1: protocol version. */
export const FLAG_VERSION_MASK = 0x3;
/** Flags bit 2: this message is a reply. */
export const FLAG_REPLY = 0x4;
/** Flags bit 3: the sender wants a reply (REPLY_ACK). */
export const FLAG_NEED_REPLY = 0x8;

/** SET_VRING_KICK/CALL/ERR payload bits 0-7: ring index. */
export const VRING_IDX_MASK = 0xff;
/** SET_VRING_KICK/CALL/ERR payload bit 8: no fd was passed (poll instead). */
export const VRING_NOFD_MASK = 0x100;
/** Most regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MEMORY_BASELINE_NREGIONS = 8;
/** Largest config space access (VHOST_USER_MAX_CONFIG_SIZE). */
export const MAX_CONFIG_SIZE = 256;
/** Config header size before the data bytes: offset, size, flags. */
export const CONFIG_HEADER_SIZE = 12;
/** Config access flag: a writable field written by the driver. */
export const CONFIG_FLAG_WRITABLE = 0;
/** Config access flag: written for live migration. */
export const CONFIG_FLAG_MIGRATION = 1;

/** Payload sizes of the fixed-size payloads, as QEMU sends them. */
export const PayloadSize = {
  /** A single u64. */
  U64: 8,
  /** struct vhost_vring_state: index u32, num u32. */
  VRING_STATE: 8,
  /** struct vhost_vring_addr: index, flags, then four u64 addresses. */
  VRING_ADDR: 40,
  /** One memory region: guest address, size, user address, mmap offset (u64 each). */
  MEM_REGION: 32,
  /** SET_MEM_TABLE prefix: nregions u32 + padding u32. */
  MEM_TABLE_HEADER: 8,
  /** ADD_MEM_REG / REM_MEM_REG: u64 padding + one region. */
  MEM_REG_MSG: 40,
  /** VhostUserLog: mmap size u64, mmap offset u64. */
  LOG: 16,
  /** VhostUserInflight as QEMU sends it: 20 bytes of fields padded to 24 by C alignment. */
  INFLIGHT: 24,
  /** VhostUserInflight without the trailing padding (accepted from packed-struct front-ends). */
  INFLIGHT_PACKED: 20,
} as const;

/** A decoded message header. */
export interface MessageHeader {
  /** Request number (FrontendRequest, or BackendRequest on the back-end channel). */
  readonly request: number;
  /** Raw flags word. */
  readonly flags: number;
  /** Payload size in bytes that follows the header. */
  readonly size: number;
  /** The sender set NEED_REPLY: answer with encodeReplyAck unless the request has its own reply. */
  readonly needReply: boolean;
}

/** Which socket a message travels on; selects the request names used in errors. */
export type Channel = 'frontend' | 'backend';

/** A message that breaks the protocol; the message names the request and what is wrong. */
export class ProtocolError extends Error {
  /** Request number of the offending message, when known. */
  readonly request: number | undefined;

  /** `message` should start with the request name, e.g. "SET_VRING_ADDR: payload is 12 bytes, expected 40". */
  constructor(message: string, request?: number) {
    super(message);
    this.name = 'ProtocolError';
    this.request = request;
  }
}

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const U64_LIMIT = 1n << 64n;
const EMPTY = new Uint8Array(0);

function hex(v: number | bigint): string {
  return `0x${v.toString(16)}`;
}

function nameOf(req: number, channel: Channel): string {
  return channel === 'backend' ? backendRequestName(req) : requestName(req);
}

function fail(req: number, what: string, label?: string): never {
  throw new ProtocolError(`${label ?? requestName(req)}: ${what}`, req);
}

function dataView(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

function expectSize(req: number, payload: Uint8Array, expected: number, label?: string): void {
  if (payload.length !== expected) fail(req, `payload is ${payload.length} bytes, expected ${expected}`, label);
}

/** Read a u64 that must be an exact JS number. */
function readSafe(req: number, dv: DataView, off: number, field: string, label?: string): number {
  const v = dv.getBigUint64(off, true);
  if (v > MAX_SAFE) fail(req, `${field} ${hex(v)} exceeds 2^53-1`, label);
  return Number(v);
}

function checkHeaderCommon(buf: Uint8Array, channel: Channel): MessageHeader {
  if (buf.length < HEADER_SIZE) {
    throw new ProtocolError(`message header is ${buf.length} bytes, expected ${HEADER_SIZE}`);
  }
  const dv = dataView(buf);
  const request = dv.getUint32(0, true);
  const flags = dv.getUint32(4, true);
  const size = dv.getUint32(8, true);
  const label = nameOf(request, channel);
  const version = flags & FLAG_VERSION_MASK;
  if (version !== VHOST_USER_VERSION) {
    fail(request, `unsupported protocol version ${version} (flags ${hex(flags)}), expected ${VHOST_USER_VERSION}`, label);
  }
  if (size > MAX_PAYLOAD_SIZE) fail(request, `payload size ${size} exceeds the maximum ${MAX_PAYLOAD_SIZE}`, label);
  return { request, flags, size, needReply: (flags & FLAG_NEED_REPLY) !== 0 };
}

/**
 * Decode and validate the header of a request (the first 12 bytes of `buf`): version must be 1, the REPLY bit
 * must be clear, and size at most MAX_PAYLOAD_SIZE. Flag bits above bit 3 are ignored.
 */
export function decodeHeader(buf: Uint8Array, channel: Channel = 'frontend'): MessageHeader {
  const h = checkHeaderCommon(buf, channel);
  if ((h.flags & FLAG_REPLY) !== 0) {
    fail(h.request, `REPLY flag set on a request (flags ${hex(h.flags)})`, nameOf(h.request, channel));
  }
  return h;
}

/**
 * Decode and validate the header of a reply (for front-end code): version 1, REPLY set, NEED_REPLY clear
 * (QEMU insists on flags == 0x5 exactly), size at most MAX_PAYLOAD_SIZE.
 */
export function decodeReplyHeader(buf: Uint8Array, channel: Channel = 'frontend'): MessageHeader {
  const h = checkHeaderCommon(buf, channel);
  const label = nameOf(h.request, channel);
  if ((h.flags & FLAG_REPLY) === 0) fail(h.request, `reply without the REPLY flag (flags ${hex(h.flags)})`, label);
  if ((h.flags & FLAG_NEED_REPLY) !== 0) fail(h.request, `NEED_REPLY flag set on a reply (flags ${hex(h.flags)})`, label);
  return h;
}

// ---------------------------------------------------------------------------------------------------------
// Payload types

/** struct vhost_vring_state. */
export interface VringState {
  /** Ring index. */
  readonly index: number;
  /** Size, base index, enable flag or endianness, depending on the request. */
  readonly num: number;
}

/** struct vhost_vring_addr; ring addresses are front-end user addresses (IOVAs with IOMMU_PLATFORM). */
export interface VringAddr {
  /** Ring index. */
  readonly index: number;
  /** Ring flags; bit VHOST_VRING_F_LOG asks for used-ring logging. */
  readonly flags: number;
  /** Descriptor table address. */
  readonly descUserAddr: number;
  /** Used ring address. */
  readonly usedUserAddr: number;
  /** Available ring address. */
  readonly availUserAddr: number;
  /** Guest physical address the used ring is logged at. */
  readonly logGuestAddr: number;
}

/** SET_VRING_KICK / CALL / ERR payload. */
export interface VringFd {
  /** Ring index (bits 0-7). */
  readonly index: number;
  /** Bit 8: no fd accompanies the message; poll instead. */
  readonly noFd: boolean;
}

/** GET_CONFIG / SET_CONFIG payload. */
export interface ConfigSpace {
  /** Offset into the device config space. */
  readonly offset: number;
  /** Number of bytes accessed (equals data.length). */
  readonly size: number;
  /** CONFIG_FLAG_WRITABLE or CONFIG_FLAG_MIGRATION. */
  readonly flags: number;
  /** The bytes (a copy, never a view of the receive buffer). */
  readonly data: Uint8Array;
}

/** VhostUserInflight. */
export interface InflightDescription {
  /** Size of the inflight area (0 in a GET_INFLIGHT_FD request). */
  readonly mmapSize: number;
  /** Offset of the area in the fd. */
  readonly mmapOffset: number;
  /** Number of virtqueues. */
  readonly numQueues: number;
  /** Size of each virtqueue. */
  readonly queueSize: number;
}

/** VhostUserLog, the SET_LOG_BASE payload. */
export interface LogDescription {
  /** Size of the log area in bytes. */
  readonly mmapSize: number;
  /** Offset of the log in the fd. */
  readonly mmapOffset: number;
}

// ---------------------------------------------------------------------------------------------------------
// Decoders

/** Check that a request carries no payload (GET_FEATURES, SET_OWNER, GET_QUEUE_NUM, ...). */
export function decodeEmpty(req: number, payload: Uint8Array): void {
  expectSize(req, payload, 0);
}

/** A u64 payload, exactly 8 bytes (SET_FEATURES, SET_PROTOCOL_FEATURES, SET_STATUS, replies, ...). */
export function decodeU64(req: number, payload: Uint8Array): bigint {
  expectSize(req, payload, PayloadSize.U64);
  return dataView(payload).getBigUint64(0, true);
}

/** A vring state, exactly 8 bytes (SET_VRING_NUM/BASE/ENABLE/ENDIAN, GET_VRING_BASE, VRING_KICK). */
export function decodeVringState(req: number, payload: Uint8Array): VringState {
  expectSize(req, payload, PayloadSize.VRING_STATE);
  const dv = dataView(payload);
  return { index: dv.getUint32(0, true), num: dv.getUint32(4, true) };
}

/** SET_VRING_ADDR payload, exactly 40 bytes: index, flags, descriptor, used, available, log. */
export function decodeVringAddr(payload: Uint8Array): VringAddr {
  const req = FrontendRequest.SET_VRING_ADDR;
  expectSize(req, payload, PayloadSize.VRING_ADDR);
  const dv = dataView(payload);
  return {
    index: dv.getUint32(0, true),
    flags: dv.getUint32(4, true),
    descUserAddr: readSafe(req, dv, 8, 'descriptor address'),
    usedUserAddr: readSafe(req, dv, 16, 'used ring address'),
    availUserAddr: readSafe(req, dv, 24, 'available ring address'),
    logGuestAddr: readSafe(req, dv, 32, 'log guest address'),
  };
}

/** SET_VRING_KICK/CALL/ERR payload: u64 with index in bits 0-7 and NOFD in bit 8; any other bit is refused. */
export function decodeVringFd(req: number, payload: Uint8Array): VringFd {
  expectSize(req, payload, PayloadSize.U64);
  const v = dataView(payload).getBigUint64(0, true);
  const stray = v & ~BigInt(VRING_IDX_MASK | VRING_NOFD_MASK);
  if (stray !== 0n) fail(req, `payload ${hex(v)} has bits set outside index and NOFD (${hex(stray)})`);
  const n = Number(v);
  return { index: n & VRING_IDX_MASK, noFd: (n & VRING_NOFD_MASK) !== 0 };
}

/** Read and check one 32-byte region at `off`; `checkOffset` false skips the mmap offset (REM_MEM_REG). */
function readRegion(req: number, dv: DataView, off: number, what: string, checkOffset: boolean): RegionDescriptor {
  const guestAddr = readSafe(req, dv, off, `${what} guest address`);
  const size = readSafe(req, dv, off + 8, `${what} size`);
  const userAddr = readSafe(req, dv, off + 16, `${what} user address`);
  if (size === 0) fail(req, `${what} at guest ${hex(guestAddr)} has size 0`);
  if (guestAddr + size > Number.MAX_SAFE_INTEGER) {
    fail(req, `${what} guest range ${hex(guestAddr)} + ${hex(size)} overflows`);
  }
  if (userAddr + size > Number.MAX_SAFE_INTEGER) {
    fail(req, `${what} user range ${hex(userAddr)} + ${hex(size)} overflows`);
  }
  let mmapOffset = 0;
  if (checkOffset) {
    mmapOffset = readSafe(req, dv, off + 24, `${what} mmap offset`);
    if (mmapOffset + size > Number.MAX_SAFE_INTEGER) {
      fail(req, `${what} mmap range ${hex(mmapOffset)} + ${hex(size)} overflows`);
    }
  }
  return { guestAddr, size, userAddr, mmapOffset };
}

/**
 * SET_MEM_TABLE payload: nregions u32, padding u32, then exactly nregions 32-byte regions (QEMU sends only the
 * regions in use, so the size is 8 + 32*n). At most MEMORY_BASELINE_NREGIONS; regions must be non-empty, not
 * overflow, and not overlap in guest space. Order is preserved: region i goes with fd i.
 */
export function decodeMemTable(payload: Uint8Array): RegionDescriptor[] {
  const req = FrontendRequest.SET_MEM_TABLE;
  if (payload.length < PayloadSize.MEM_TABLE_HEADER) {
    fail(req, `payload is ${payload.length} bytes, expected at least ${PayloadSize.MEM_TABLE_HEADER}`);
  }
  const dv = dataView(payload);
  const n = dv.getUint32(0, true);
  if (n > MEMORY_BASELINE_NREGIONS) fail(req, `${n} regions, at most ${MEMORY_BASELINE_NREGIONS} allowed`);
  const expected = PayloadSize.MEM_TABLE_HEADER + PayloadSize.MEM_REGION * n;
  if (payload.length !== expected) fail(req, `payload is ${payload.length} bytes, expected ${expected} for ${n} regions`);
  const regions: RegionDescriptor[] = [];
  for (let i = 0; i < n; i++) {
    regions.push(readRegion(req, dv, PayloadSize.MEM_TABLE_HEADER + PayloadSize.MEM_REGION * i, `region ${i}`, true));
  }
  const sorted = [...regions].sort((a, b) => a.guestAddr - b.guestAddr);
  for (let i = 1; i < sorted.length; i++) {
    const prev = sorted[i - 1];
    if (prev.guestAddr + prev.size > sorted[i].guestAddr) {
      fail(req, `regions at guest ${hex(prev.guestAddr)} and ${hex(sorted[i].guestAddr)} overlap`);
    }
  }
  return regions;
}

/**
 * ADD_MEM_REG / REM_MEM_REG payload, exactly 40 bytes: u64 padding + one region. For REM_MEM_REG the spec says
 * the mmap offset is ignored, so it is neither checked nor returned (mmapOffset is 0).
 */
export function decodeMemRegion(req: number, payload: Uint8Array): RegionDescriptor {
  expectSize(req, payload, PayloadSize.MEM_REG_MSG);
  return readRegion(req, dataView(payload), 8, 'region', req !== FrontendRequest.REM_MEM_REG);
}

/**
 * GET_CONFIG / SET_CONFIG payload: offset u32, size u32, flags u32, then `size` bytes. size must be at most
 * MAX_CONFIG_SIZE, offset+size must stay inside it, and the payload must be exactly 12 + size bytes.
 */
export function decodeConfig(req: number, payload: Uint8Array): ConfigSpace {
  if (payload.length < CONFIG_HEADER_SIZE) {
    fail(req, `payload is ${payload.length} bytes, expected at least ${CONFIG_HEADER_SIZE}`);
  }
  const dv = dataView(payload);
  const offset = dv.getUint32(0, true);
  const size = dv.getUint32(4, true);
  const flags = dv.getUint32(8, true);
  if (size > MAX_CONFIG_SIZE) fail(req, `config size ${size} exceeds the maximum ${MAX_CONFIG_SIZE}`);
  if (offset + size > MAX_CONFIG_SIZE) fail(req, `config range ${offset} + ${size} exceeds ${MAX_CONFIG_SIZE}`);
  if (payload.length !== CONFIG_HEADER_SIZE + size) {
    fail(req, `payload is ${payload.length} bytes, expected ${CONFIG_HEADER_SIZE + size} for config size ${size}`);
  }
  // A copy: Buffer#slice would alias the receive buffer.
  return { offset, size, flags, data: Uint8Array.from(payload.subarray(CONFIG_HEADER_SIZE, CONFIG_HEADER_SIZE + size)) };
}

/**
 * GET_INFLIGHT_FD / SET_INFLIGHT_FD payload (and the GET_INFLIGHT_FD reply): mmap size u64, mmap offset u64,
 * num queues u16, queue size u16. QEMU sends 24 bytes (C padding); 20 is accepted from packed senders.
 * `req` only names the request in errors.
 */
export function decodeInflight(payload: Uint8Array, req?: number): InflightDescription {
  const code = req ?? FrontendRequest.SET_INFLIGHT_FD;
  const label = req === undefined ? 'GET_INFLIGHT_FD/SET_INFLIGHT_FD' : undefined;
  if (payload.length !== PayloadSize.INFLIGHT && payload.length !== PayloadSize.INFLIGHT_PACKED) {
    fail(code, `payload is ${payload.length} bytes, expected ${PayloadSize.INFLIGHT} (or ${PayloadSize.INFLIGHT_PACKED})`, label);
  }
  const dv = dataView(payload);
  const mmapSize = readSafe(code, dv, 0, 'mmap size', label);
  const mmapOffset = readSafe(code, dv, 8, 'mmap offset', label);
  if (mmapOffset + mmapSize > Number.MAX_SAFE_INTEGER) {
    fail(code, `mmap range ${hex(mmapOffset)} + ${hex(mmapSize)} overflows`, label);
  }
  return { mmapSize, mmapOffset, numQueues: dv.getUint16(16, true), queueSize: dv.getUint16(18, true) };
}

/** SET_LOG_BASE payload as QEMU sends it: exactly 16 bytes, mmap size u64 + mmap offset u64. */
export function decodeLog(payload: Uint8Array): LogDescription {
  const req = FrontendRequest.SET_LOG_BASE;
  expectSize(req, payload, PayloadSize.LOG);
  const dv = dataView(payload);
  const mmapSize = readSafe(req, dv, 0, 'log size');
  const mmapOffset = readSafe(req, dv, 8, 'log offset');
  if (mmapOffset + mmapSize > Number.MAX_SAFE_INTEGER) fail(req, `log range ${hex(mmapOffset)} + ${hex(mmapSize)} overflows`);
  return { mmapSize, mmapOffset };
}

// ---------------------------------------------------------------------------------------------------------
// Encoders

function checkU32(value: number, field: string): number {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) throw new RangeError(`${field} ${value} does not fit in a u32`);
  return value;
}

function checkU16(value: number, field: string): number {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff) throw new RangeError(`${field} ${value} does not fit in a u16`);
  return value;
}

function checkSafe(value: number, field: string): bigint {
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`${field} ${value} is not a non-negative safe integer`);
  return BigInt(value);
}

function checkU64(value: bigint, field: string): bigint {
  if (value < 0n || value >= U64_LIMIT) throw new RangeError(`${field} ${value} does not fit in a u64`);
  return value;
}

/** A raw 12-byte header; only field widths are checked, so tests can forge any flags or size. */
export function encodeHeader(request: number, flags: number, size: number): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  b.writeUInt32LE(checkU32(request, 'request'), 0);
  b.writeUInt32LE(checkU32(flags, 'flags'), 4);
  b.writeUInt32LE(checkU32(size, 'size'), 8);
  return b;
}

function encodeMessage(request: number, flags: number, payload: Uint8Array): Buffer {
  if (payload.length > MAX_PAYLOAD_SIZE) {
    throw new RangeError(`payload of ${payload.length} bytes exceeds the maximum ${MAX_PAYLOAD_SIZE}`);
  }
  return Buffer.concat([encodeHeader(request, flags, payload.length), payload]);
}

/** A front-end request: header (version 1, NEED_REPLY if asked) + payload. */
export function encodeRequest(req: number, payload: Uint8Array = EMPTY, needReply = false): Buffer {
  return encodeMessage(req, VHOST_USER_VERSION | (needReply ? FLAG_NEED_REPLY : 0), payload);
}

/** A back-end request on the back-end channel (CONFIG_CHANGE_MSG has no payload). */
export function encodeBackendRequest(req: number, payload: Uint8Array = EMPTY, needReply = false): Buffer {
  return encodeMessage(req, VHOST_USER_VERSION | (needReply ? FLAG_NEED_REPLY : 0), payload);
}

/** A reply: header (version 1 | REPLY, exactly what QEMU accepts) + payload. */
export function encodeReply(req: number, payload: Uint8Array = EMPTY): Buffer {
  return encodeMessage(req, VHOST_USER_VERSION | FLAG_REPLY, payload);
}

/** u64 payload. */
export function encodeU64(value: bigint): Buffer {
  const b = Buffer.alloc(PayloadSize.U64);
  b.writeBigUInt64LE(checkU64(value, 'value'), 0);
  return b;
}

/** Vring state payload. */
export function encodeVringState(index: number, num: number): Buffer {
  const b = Buffer.alloc(PayloadSize.VRING_STATE);
  b.writeUInt32LE(checkU32(index, 'index'), 0);
  b.writeUInt32LE(checkU32(num, 'num'), 4);
  return b;
}

/** SET_VRING_ADDR payload. */
export function encodeVringAddr(addr: VringAddr): Buffer {
  const b = Buffer.alloc(PayloadSize.VRING_ADDR);
  b.writeUInt32LE(checkU32(addr.index, 'index'), 0);
  b.writeUInt32LE(checkU32(addr.flags, 'flags'), 4);
  b.writeBigUInt64LE(checkSafe(addr.descUserAddr, 'descUserAddr'), 8);
  b.writeBigUInt64LE(checkSafe(addr.usedUserAddr, 'usedUserAddr'), 16);
  b.writeBigUInt64LE(checkSafe(addr.availUserAddr, 'availUserAddr'), 24);
  b.writeBigUInt64LE(checkSafe(addr.logGuestAddr, 'logGuestAddr'), 32);
  return b;
}

/** SET_VRING_KICK/CALL/ERR payload: index 0-255, NOFD bit when no fd is sent. */
export function encodeVringFd(index: number, noFd: boolean): Buffer {
  if (!Number.isInteger(index) || index < 0 || index > VRING_IDX_MASK) throw new RangeError(`ring index ${index} does not fit in 8 bits`);
  return encodeU64(BigInt(index | (noFd ? VRING_NOFD_MASK : 0)));
}

function writeRegion(b: Buffer, off: number, r: RegionDescriptor): void {
  b.writeBigUInt64LE(checkSafe(r.guestAddr, 'guestAddr'), off);
  b.writeBigUInt64LE(checkSafe(r.size, 'size'), off + 8);
  b.writeBigUInt64LE(checkSafe(r.userAddr, 'userAddr'), off + 16);
  b.writeBigUInt64LE(checkSafe(r.mmapOffset, 'mmapOffset'), off + 24);
}

/** SET_MEM_TABLE payload with exactly regions.length regions (8 + 32*n bytes, as QEMU sends it). */
export function encodeMemTable(regions: readonly RegionDescriptor[]): Buffer {
  const b = Buffer.alloc(PayloadSize.MEM_TABLE_HEADER + PayloadSize.MEM_REGION * regions.length);
  b.writeUInt32LE(checkU32(regions.length, 'region count'), 0);
  regions.forEach((r, i) => writeRegion(b, PayloadSize.MEM_TABLE_HEADER + PayloadSize.MEM_REGION * i, r));
  return b;
}

/** ADD_MEM_REG / REM_MEM_REG payload: zero padding + one region. */
export function encodeMemRegion(region: RegionDescriptor): Buffer {
  const b = Buffer.alloc(PayloadSize.MEM_REG_MSG);
  writeRegion(b, 8, region);
  return b;
}

/** GET_CONFIG / SET_CONFIG payload; data defaults to `size` zero bytes (what QEMU sends with GET_CONFIG). */
export function encodeConfig(offset: number, size: number, flags: number, data?: Uint8Array): Buffer {
  if (!Number.isInteger(size) || size < 0 || size > MAX_PAYLOAD_SIZE - CONFIG_HEADER_SIZE) {
    throw new RangeError(`config size ${size} cannot fit in a message`);
  }
  const bytes = data ?? new Uint8Array(size);
  if (bytes.length !== size) throw new RangeError(`config data is ${bytes.length} bytes, size says ${size}`);
  const b = Buffer.alloc(CONFIG_HEADER_SIZE + size);
  b.writeUInt32LE(checkU32(offset, 'offset'), 0);
  b.writeUInt32LE(size, 4);
  b.writeUInt32LE(checkU32(flags, 'flags'), 8);
  b.set(bytes, CONFIG_HEADER_SIZE);
  return b;
}

/** Inflight description payload, 24 bytes like QEMU's struct. */
export function encodeInflight(info: InflightDescription): Buffer {
  const b = Buffer.alloc(PayloadSize.INFLIGHT);
  b.writeBigUInt64LE(checkSafe(info.mmapSize, 'mmapSize'), 0);
  b.writeBigUInt64LE(checkSafe(info.mmapOffset, 'mmapOffset'), 8);
  b.writeUInt16LE(checkU16(info.numQueues, 'numQueues'), 16);
  b.writeUInt16LE(checkU16(info.queueSize, 'queueSize'), 18);
  return b;
}

/** SET_LOG_BASE payload (16 bytes, as QEMU sends it). */
export function encodeLog(log: LogDescription): Buffer {
  const b = Buffer.alloc(PayloadSize.LOG);
  b.writeBigUInt64LE(checkSafe(log.mmapSize, 'mmapSize'), 0);
  b.writeBigUInt64LE(checkSafe(log.mmapOffset, 'mmapOffset'), 8);
  return b;
}

/** Reply carrying a u64 (GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, ...). */
export function encodeReplyU64(req: number, value: bigint): Buffer {
  return encodeReply(req, encodeU64(value));
}

/** REPLY_ACK answer: u64 0 on success, 1 on failure. */
export function encodeReplyAck(req: number, ok: boolean): Buffer {
  return encodeReply(req, encodeU64(ok ? 0n : 1n));
}

/** Reply carrying a vring state (GET_VRING_BASE). */
export function encodeReplyVringState(req: number, index: number, num: number): Buffer {
  return encodeReply(req, encodeVringState(index, num));
}

/** GET_CONFIG reply; offset and size must echo the request. An error is signalled by encodeReply(GET_CONFIG). */
export function encodeReplyConfig(offset: number, size: number, flags: number, data: Uint8Array): Buffer {
  return encodeReply(FrontendRequest.GET_CONFIG, encodeConfig(offset, size, flags, data));
}

/** GET_INFLIGHT_FD reply (24-byte payload; QEMU refuses any other size). */
export function encodeReplyInflight(info: InflightDescription): Buffer {
  return encodeReply(FrontendRequest.GET_INFLIGHT_FD, encodeInflight(info));
}

// ---------------------------------------------------------------------------------------------------------
// Logging

/** One-line human description of a front-end request for logs; malformed payloads are marked, not thrown. */
export function describe(req: number, payload: Uint8Array): string {
  const name = requestName(req);
  try {
    switch (req) {
      case FrontendRequest.SET_FEATURES:
      case FrontendRequest.SET_PROTOCOL_FEATURES:
      case FrontendRequest.SET_STATUS:
      case FrontendRequest.NET_SET_MTU:
        return `${name} ${hex(decodeU64(req, payload))}`;
      case FrontendRequest.SET_VRING_NUM:
      case FrontendRequest.SET_VRING_BASE:
      case FrontendRequest.GET_VRING_BASE:
      case FrontendRequest.SET_VRING_ENABLE:
      case FrontendRequest.SET_VRING_ENDIAN:
      case FrontendRequest.VRING_KICK: {
        const s = decodeVringState(req, payload);
        return `${name} index=${s.index} num=${s.num}`;
      }
      case FrontendRequest.SET_VRING_ADDR: {
        const a = decodeVringAddr(payload);
        return `${name} index=${a.index} flags=${hex(a.flags)} desc=${hex(a.descUserAddr)} used=${hex(a.usedUserAddr)} avail=${hex(a.availUserAddr)} log=${hex(a.logGuestAddr)}`;
      }
      case FrontendRequest.SET_VRING_KICK:
      case FrontendRequest.SET_VRING_CALL:
      case FrontendRequest.SET_VRING_ERR: {
        const f = decodeVringFd(req, payload);
        return `${name} index=${f.index}${f.noFd ? ' nofd' : ''}`;
      }
      case FrontendRequest.SET_MEM_TABLE: {
        const rs = decodeMemTable(payload);
        return `${name} ${rs.length} regions: ${rs.map((r) => `gpa=${hex(r.guestAddr)} size=${hex(r.size)} uva=${hex(r.userAddr)} off=${hex(r.mmapOffset)}`).join(', ')}`;
      }
      case FrontendRequest.ADD_MEM_REG:
      case FrontendRequest.REM_MEM_REG: {
        const r = decodeMemRegion(req, payload);
        return `${name} gpa=${hex(r.guestAddr)} size=${hex(r.size)} uva=${hex(r.userAddr)} off=${hex(r.mmapOffset)}`;
      }
      case FrontendRequest.GET_CONFIG:
      case FrontendRequest.SET_CONFIG: {
        const c = decodeConfig(req, payload);
        return `${name} offset=${c.offset} size=${c.size} flags=${c.flags}`;
      }
      case FrontendRequest.GET_INFLIGHT_FD:
      case FrontendRequest.SET_INFLIGHT_FD: {
        const i = decodeInflight(payload, req);
        return `${name} mmap_size=${i.mmapSize} mmap_offset=${i.mmapOffset} num_queues=${i.numQueues} queue_size=${i.queueSize}`;
      }
      case FrontendRequest.SET_LOG_BASE: {
        const l = decodeLog(payload);
        return `${name} mmap_size=${l.mmapSize} mmap_offset=${l.mmapOffset}`;
      }
      default:
        return payload.length === 0 ? name : `${name} (${payload.length} bytes)`;
    }
  } catch (e) {
    if (e instanceof ProtocolError) return `${name} (malformed: ${e.message})`;
    throw e;
  }
}
