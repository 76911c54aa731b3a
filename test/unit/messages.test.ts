// The vhost-user message codec: numbers from vhost-user.rst, round trips, and refusal of malformed input.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { RegionDescriptor } from '../../src/memory/guest-memory.js';
import {
  FrontendRequest,
  BackendRequest,
  ProtocolFeature,
  VHOST_USER_F_PROTOCOL_FEATURES,
  HEADER_SIZE,
  MAX_PAYLOAD_SIZE,
  MAX_FDS,
  FLAG_REPLY,
  FLAG_NEED_REPLY,
  MEMORY_BASELINE_NREGIONS,
  MAX_CONFIG_SIZE,
  ProtocolError,
  requestName,
  backendRequestName,
  decodeHeader,
  decodeReplyHeader,
  decodeEmpty,
  decodeU64,
  decodeVringState,
  decodeVringAddr,
  decodeVringFd,
  decodeMemTable,
  decodeMemRegion,
  decodeConfig,
  decodeInflight,
  decodeLog,
  encodeHeader,
  encodeRequest,
  encodeBackendRequest,
  encodeReply,
  encodeU64,
  encodeVringState,
  encodeVringAddr,
  encodeVringFd,
  encodeMemTable,
  encodeMemRegion,
  encodeConfig,
  encodeInflight,
  encodeLog,
  encodeReplyU64,
  encodeReplyAck,
  encodeReplyVringState,
  encodeReplyConfig,
  encodeReplyInflight,
  describe,
  type VringAddr,
} from '../../src/vhost-user/messages.js';

const R = FrontendRequest;

/** Assert that fn throws a ProtocolError whose message contains every fragment. */
function throwsProtocol(fn: () => unknown, ...fragments: string[]): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof ProtocolError, `expected ProtocolError, got ${String(e)}`);
    for (const f of fragments) assert.ok(e.message.includes(f), `message "${e.message}" lacks "${f}"`);
    return true;
  });
}

/** Split an encoded message into its header fields and payload. */
function split(msg: Buffer): { request: number; flags: number; size: number; payload: Buffer } {
  return {
    request: msg.readUInt32LE(0),
    flags: msg.readUInt32LE(4),
    size: msg.readUInt32LE(8),
    payload: msg.subarray(HEADER_SIZE),
  };
}

function region(guestAddr: number, size: number, userAddr: number, mmapOffset: number): RegionDescriptor {
  return { guestAddr, size, userAddr, mmapOffset };
}

// --- constants -------------------------------------------------------------------------------------------

test('front-end request numbers match vhost-user.rst', () => {
  const expected: [string, number][] = [
    ['GET_FEATURES', 1], ['SET_FEATURES', 2], ['SET_OWNER', 3], ['RESET_OWNER', 4], ['SET_MEM_TABLE', 5],
    ['SET_LOG_BASE', 6], ['SET_LOG_FD', 7], ['SET_VRING_NUM', 8], ['SET_VRING_ADDR', 9], ['SET_VRING_BASE', 10],
    ['GET_VRING_BASE', 11], ['SET_VRING_KICK', 12], ['SET_VRING_CALL', 13], ['SET_VRING_ERR', 14],
    ['GET_PROTOCOL_FEATURES', 15], ['SET_PROTOCOL_FEATURES', 16], ['GET_QUEUE_NUM', 17], ['SET_VRING_ENABLE', 18],
    ['SEND_RARP', 19], ['NET_SET_MTU', 20], ['SET_BACKEND_REQ_FD', 21], ['IOTLB_MSG', 22], ['SET_VRING_ENDIAN', 23],
    ['GET_CONFIG', 24], ['SET_CONFIG', 25], ['CREATE_CRYPTO_SESSION', 26], ['CLOSE_CRYPTO_SESSION', 27],
    ['POSTCOPY_ADVISE', 28], ['POSTCOPY_LISTEN', 29], ['POSTCOPY_END', 30], ['GET_INFLIGHT_FD', 31],
    ['SET_INFLIGHT_FD', 32], ['GPU_SET_SOCKET', 33], ['RESET_DEVICE', 34], ['VRING_KICK', 35],
    ['GET_MAX_MEM_SLOTS', 36], ['ADD_MEM_REG', 37], ['REM_MEM_REG', 38], ['SET_STATUS', 39], ['GET_STATUS', 40],
    ['GET_SHARED_OBJECT', 41], ['SET_DEVICE_STATE_FD', 42], ['CHECK_DEVICE_STATE', 43],
  ];
  assert.deepEqual(Object.entries(FrontendRequest), expected);
});

test('back-end request numbers match vhost-user.rst', () => {
  assert.deepEqual(Object.entries(BackendRequest), [
    ['IOTLB_MSG', 1], ['CONFIG_CHANGE_MSG', 2], ['VRING_HOST_NOTIFIER_MSG', 3], ['VRING_CALL', 4], ['VRING_ERR', 5],
    ['SHARED_OBJECT_ADD', 6], ['SHARED_OBJECT_REMOVE', 7], ['SHARED_OBJECT_LOOKUP', 8],
  ]);
});

test('protocol feature bits match vhost-user.rst', () => {
  assert.deepEqual(Object.entries(ProtocolFeature), [
    ['MQ', 0], ['LOG_SHMFD', 1], ['RARP', 2], ['REPLY_ACK', 3], ['NET_MTU', 4], ['BACKEND_REQ', 5],
    ['CROSS_ENDIAN', 6], ['CRYPTO_SESSION', 7], ['PAGEFAULT', 8], ['CONFIG', 9], ['BACKEND_SEND_FD', 10],
    ['HOST_NOTIFIER', 11], ['INFLIGHT_SHMFD', 12], ['RESET_DEVICE', 13], ['INBAND_NOTIFICATIONS', 14],
    ['CONFIGURE_MEM_SLOTS', 15], ['STATUS', 16], ['XEN_MMAP', 17], ['SHARED_OBJECT', 18], ['DEVICE_STATE', 19],
  ]);
  assert.equal(VHOST_USER_F_PROTOCOL_FEATURES, 30);
  assert.equal(HEADER_SIZE, 12);
  assert.equal(MAX_PAYLOAD_SIZE, 4096);
  assert.equal(MAX_FDS, 32);
});

test('requestName names known requests and flags unknown ones', () => {
  assert.equal(requestName(9), 'SET_VRING_ADDR');
  assert.equal(requestName(1), 'GET_FEATURES');
  assert.equal(requestName(43), 'CHECK_DEVICE_STATE');
  assert.equal(requestName(99), 'unknown request 99');
  assert.equal(requestName(0), 'unknown request 0');
  assert.equal(backendRequestName(2), 'CONFIG_CHANGE_MSG');
  assert.equal(backendRequestName(77), 'unknown backend request 77');
});

// --- header ----------------------------------------------------------------------------------------------

test('request header round trip, with and without NEED_REPLY', () => {
  const payload = encodeVringState(1, 256);
  const plain = encodeRequest(R.SET_VRING_NUM, payload);
  assert.equal(plain.length, HEADER_SIZE + 8);
  assert.deepEqual(decodeHeader(plain), { request: 8, flags: 1, size: 8, needReply: false });
  const acked = encodeRequest(R.SET_VRING_NUM, payload, true);
  assert.deepEqual(decodeHeader(acked), { request: 8, flags: 1 | FLAG_NEED_REPLY, size: 8, needReply: true });
  assert.deepEqual(decodeHeader(encodeRequest(R.GET_FEATURES)), { request: 1, flags: 1, size: 0, needReply: false });
});

test('decodeHeader reads only the first 12 bytes of a longer buffer', () => {
  const msg = encodeRequest(R.SET_FEATURES, encodeU64(5n));
  const h = decodeHeader(msg);
  assert.equal(h.size, 8);
  assert.deepEqual(decodeU64(h.request, msg.subarray(HEADER_SIZE, HEADER_SIZE + h.size)), 5n);
});

test('decodeHeader refuses a short header', () => {
  throwsProtocol(() => decodeHeader(new Uint8Array(11)), 'header is 11 bytes, expected 12');
});

test('decodeHeader refuses any version but 1, naming the request', () => {
  for (const version of [0, 2, 3]) {
    throwsProtocol(() => decodeHeader(encodeHeader(R.SET_VRING_ADDR, version, 40)), 'SET_VRING_ADDR', `version ${version}`);
  }
});

test('decodeHeader refuses the REPLY bit on a request', () => {
  throwsProtocol(() => decodeHeader(encodeHeader(R.GET_FEATURES, 1 | FLAG_REPLY, 0)), 'GET_FEATURES', 'REPLY');
});

test('decodeHeader refuses a size above MAX_PAYLOAD_SIZE and accepts exactly the maximum', () => {
  throwsProtocol(() => decodeHeader(encodeHeader(R.SET_MEM_TABLE, 1, MAX_PAYLOAD_SIZE + 1)), 'SET_MEM_TABLE', '4097', '4096');
  throwsProtocol(() => decodeHeader(encodeHeader(R.SET_MEM_TABLE, 1, 0xffffffff)), 'SET_MEM_TABLE', 'exceeds');
  assert.equal(decodeHeader(encodeHeader(R.SET_MEM_TABLE, 1, MAX_PAYLOAD_SIZE)).size, MAX_PAYLOAD_SIZE);
});

test('decodeHeader on the back-end channel uses back-end names', () => {
  const msg = encodeBackendRequest(BackendRequest.CONFIG_CHANGE_MSG, undefined, true);
  assert.deepEqual(decodeHeader(msg, 'backend'), { request: 2, flags: 1 | FLAG_NEED_REPLY, size: 0, needReply: true });
  throwsProtocol(() => decodeHeader(encodeHeader(2, 0, 0), 'backend'), 'CONFIG_CHANGE_MSG', 'version 0');
});

test('protocol errors carry the request number', () => {
  try {
    decodeHeader(encodeHeader(R.SET_CONFIG, 2, 0));
    assert.fail('expected a throw');
  } catch (e) {
    assert.ok(e instanceof ProtocolError);
    assert.equal(e.request, R.SET_CONFIG);
    assert.equal(e.name, 'ProtocolError');
  }
});

test('decodeReplyHeader accepts replies and refuses non-replies or NEED_REPLY on a reply', () => {
  assert.deepEqual(decodeReplyHeader(encodeReplyU64(R.GET_FEATURES, 1n)), { request: 1, flags: 5, size: 8, needReply: false });
  throwsProtocol(() => decodeReplyHeader(encodeRequest(R.GET_FEATURES)), 'GET_FEATURES', 'without the REPLY flag');
  throwsProtocol(() => decodeReplyHeader(encodeHeader(R.GET_FEATURES, 1 | FLAG_REPLY | FLAG_NEED_REPLY, 8)), 'NEED_REPLY');
  throwsProtocol(() => decodeReplyHeader(encodeHeader(R.GET_FEATURES, 2 | FLAG_REPLY, 8)), 'version 2');
});

test('encodeRequest and encodeReply refuse payloads above MAX_PAYLOAD_SIZE', () => {
  assert.throws(() => encodeRequest(R.SET_CONFIG, new Uint8Array(MAX_PAYLOAD_SIZE + 1)), RangeError);
  assert.throws(() => encodeReply(R.GET_CONFIG, new Uint8Array(MAX_PAYLOAD_SIZE + 1)), RangeError);
  assert.equal(encodeRequest(R.SET_CONFIG, new Uint8Array(MAX_PAYLOAD_SIZE)).length, HEADER_SIZE + MAX_PAYLOAD_SIZE);
});

test('encodeHeader checks field widths only', () => {
  assert.throws(() => encodeHeader(2 ** 32, 1, 0), RangeError);
  assert.throws(() => encodeHeader(1, -1, 0), RangeError);
  assert.throws(() => encodeHeader(1, 1, 1.5), RangeError);
  assert.deepEqual([...encodeHeader(0x01020304, 0xff, 0x10)], [4, 3, 2, 1, 0xff, 0, 0, 0, 0x10, 0, 0, 0]);
});

// --- empty and u64 ---------------------------------------------------------------------------------------

test('decodeEmpty accepts nothing and refuses any payload', () => {
  decodeEmpty(R.GET_FEATURES, new Uint8Array(0));
  throwsProtocol(() => decodeEmpty(R.SET_OWNER, new Uint8Array(8)), 'SET_OWNER', 'payload is 8 bytes, expected 0');
});

test('u64 round trip keeps values above 2^53 exact as bigint', () => {
  for (const v of [0n, 1n, (1n << 53n) + 1n, (1n << 63n) | (1n << 32n) | 1n, (1n << 64n) - 1n]) {
    const msg = split(encodeRequest(R.SET_FEATURES, encodeU64(v)));
    assert.equal(msg.size, 8);
    assert.equal(decodeU64(R.SET_FEATURES, msg.payload), v);
  }
  assert.deepEqual([...encodeU64(0x0102030405060708n)], [8, 7, 6, 5, 4, 3, 2, 1]);
});

test('decodeU64 refuses anything but 8 bytes, naming the request', () => {
  throwsProtocol(() => decodeU64(R.SET_FEATURES, new Uint8Array(0)), 'SET_FEATURES', 'payload is 0 bytes, expected 8');
  throwsProtocol(() => decodeU64(R.SET_PROTOCOL_FEATURES, new Uint8Array(4)), 'SET_PROTOCOL_FEATURES', '4 bytes');
  throwsProtocol(() => decodeU64(R.SET_STATUS, new Uint8Array(16)), 'SET_STATUS', '16 bytes');
});

test('encodeU64 refuses values outside u64', () => {
  assert.throws(() => encodeU64(-1n), RangeError);
  assert.throws(() => encodeU64(1n << 64n), RangeError);
});

test('decodeU64 works on a view into a larger buffer at an odd offset', () => {
  const big = Buffer.alloc(21);
  big.writeBigUInt64LE(0xdeadbeefcafef00dn, 13);
  assert.equal(decodeU64(R.SET_FEATURES, big.subarray(13)), 0xdeadbeefcafef00dn);
});

// --- vring state / addr / fd -----------------------------------------------------------------------------

test('vring state round trip for every request that carries one', () => {
  for (const req of [R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE, R.VRING_KICK]) {
    const msg = split(encodeRequest(req, encodeVringState(3, 0xffffffff)));
    assert.equal(msg.request, req);
    assert.deepEqual(decodeVringState(req, msg.payload), { index: 3, num: 0xffffffff });
  }
  assert.throws(() => encodeVringState(-1, 0), RangeError);
  assert.throws(() => encodeVringState(0, 2 ** 32), RangeError);
});

test('decodeVringState refuses wrong sizes, naming the request', () => {
  throwsProtocol(() => decodeVringState(R.SET_VRING_NUM, new Uint8Array(4)), 'SET_VRING_NUM', 'payload is 4 bytes, expected 8');
  throwsProtocol(() => decodeVringState(R.GET_VRING_BASE, new Uint8Array(12)), 'GET_VRING_BASE', '12 bytes');
});

test('vring addr round trip keeps the spec field order', () => {
  const addr: VringAddr = {
    index: 1,
    flags: 1,
    descUserAddr: 0x7f00_1234_0000,
    usedUserAddr: 0x7f00_1234_2000,
    availUserAddr: 0x7f00_1234_1000,
    logGuestAddr: 0x1_0000_2000,
  };
  const payload = encodeVringAddr(addr);
  assert.equal(payload.length, 40);
  // index, flags, descriptor, used, available, log
  assert.equal(payload.readUInt32LE(0), 1);
  assert.equal(payload.readBigUInt64LE(8), BigInt(addr.descUserAddr));
  assert.equal(payload.readBigUInt64LE(16), BigInt(addr.usedUserAddr));
  assert.equal(payload.readBigUInt64LE(24), BigInt(addr.availUserAddr));
  assert.equal(payload.readBigUInt64LE(32), BigInt(addr.logGuestAddr));
  assert.deepEqual(decodeVringAddr(payload), addr);
});

test('decodeVringAddr refuses a wrong size with the exact message', () => {
  throwsProtocol(() => decodeVringAddr(new Uint8Array(12)), 'SET_VRING_ADDR: payload is 12 bytes, expected 40');
  throwsProtocol(() => decodeVringAddr(new Uint8Array(48)), 'SET_VRING_ADDR: payload is 48 bytes, expected 40');
});

test('decodeVringAddr refuses addresses that are not exact JS numbers', () => {
  const payload = encodeVringAddr({ index: 0, flags: 0, descUserAddr: 0, usedUserAddr: 0, availUserAddr: 0, logGuestAddr: 0 });
  payload.writeBigUInt64LE(1n << 53n, 16);
  throwsProtocol(() => decodeVringAddr(payload), 'SET_VRING_ADDR', 'used ring address', '2^53');
  assert.throws(() => encodeVringAddr({ index: 0, flags: 0, descUserAddr: 2 ** 53, usedUserAddr: 0, availUserAddr: 0, logGuestAddr: 0 }), RangeError);
});

test('vring fd round trip for kick, call and err', () => {
  for (const req of [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR]) {
    assert.deepEqual(decodeVringFd(req, encodeVringFd(0, false)), { index: 0, noFd: false });
    assert.deepEqual(decodeVringFd(req, encodeVringFd(255, true)), { index: 255, noFd: true });
  }
  assert.equal(encodeVringFd(2, true).readBigUInt64LE(0), 0x102n);
  assert.throws(() => encodeVringFd(256, false), RangeError);
});

test('decodeVringFd refuses stray high bits and wrong sizes', () => {
  throwsProtocol(() => decodeVringFd(R.SET_VRING_KICK, encodeU64(0x200n | 1n)), 'SET_VRING_KICK', '0x201');
  throwsProtocol(() => decodeVringFd(R.SET_VRING_CALL, encodeU64(1n << 63n)), 'SET_VRING_CALL', 'outside index and NOFD');
  throwsProtocol(() => decodeVringFd(R.SET_VRING_ERR, new Uint8Array(4)), 'SET_VRING_ERR', 'payload is 4 bytes, expected 8');
});

// --- memory table and regions ----------------------------------------------------------------------------

test('mem table round trip with one region and with eight', () => {
  const one = [region(0, 0x4000_0000, 0x7f12_0000_0000, 0)];
  const table1 = encodeMemTable(one);
  assert.equal(table1.length, 8 + 32);
  assert.deepEqual(decodeMemTable(table1), one);

  // Eight regions in a non-sorted order: order must be preserved (region i goes with fd i).
  const eight = Array.from({ length: 8 }, (_, i) => region((7 - i) * 0x1000_0000, 0x1000_0000, 0x7f00_0000_0000 + i * 0x1000_0000, i * 4096));
  const msg = split(encodeRequest(R.SET_MEM_TABLE, encodeMemTable(eight)));
  assert.equal(msg.size, 8 + 32 * 8);
  assert.deepEqual(decodeMemTable(msg.payload), eight);
});

test('mem table with regions above 4 GiB and large offsets survives exactly', () => {
  const rs = [region(0x1_0000_0000, 0x2_0000_0000, 0x7fff_0000_0000, 0x8000_0000), region(0, 0xc000_0000, 0x7ffe_0000_0000, 0)];
  assert.deepEqual(decodeMemTable(encodeMemTable(rs)), rs);
});

test('decodeMemTable refuses more than 8 regions', () => {
  const nine = Array.from({ length: 9 }, (_, i) => region(i * 0x1000, 0x1000, 0x1000 * i, 0));
  assert.equal(MEMORY_BASELINE_NREGIONS, 8);
  throwsProtocol(() => decodeMemTable(encodeMemTable(nine)), 'SET_MEM_TABLE', '9 regions', 'at most 8');
});

test('decodeMemTable refuses a size inconsistent with nregions', () => {
  const two = encodeMemTable([region(0, 0x1000, 0x1000, 0), region(0x1000, 0x1000, 0x2000, 0)]);
  throwsProtocol(() => decodeMemTable(two.subarray(0, 8 + 32)), 'SET_MEM_TABLE', 'payload is 40 bytes, expected 72 for 2 regions');
  throwsProtocol(() => decodeMemTable(Buffer.concat([two, Buffer.alloc(8)])), 'SET_MEM_TABLE', '80 bytes, expected 72');
  // A full-size (8-slot) union as a sloppy front-end might send it with nregions 2.
  const padded = Buffer.concat([two, Buffer.alloc(32 * 6)]);
  throwsProtocol(() => decodeMemTable(padded), 'SET_MEM_TABLE', 'expected 72');
  throwsProtocol(() => decodeMemTable(new Uint8Array(4)), 'SET_MEM_TABLE', 'payload is 4 bytes, expected at least 8');
});

test('decodeMemTable refuses zero-size, overflowing and overlapping regions', () => {
  throwsProtocol(() => decodeMemTable(encodeMemTable([region(0x1000, 0, 0x1000, 0)])), 'SET_MEM_TABLE', 'region 0', 'size 0');
  const big = Number.MAX_SAFE_INTEGER - 0xfff; // guestAddr fits, guestAddr + size does not
  throwsProtocol(() => decodeMemTable(encodeMemTable([region(big, 0x2000, 0, 0)])), 'SET_MEM_TABLE', 'guest range', 'overflows');
  throwsProtocol(() => decodeMemTable(encodeMemTable([region(0, 0x2000, big, 0)])), 'SET_MEM_TABLE', 'user range', 'overflows');
  throwsProtocol(() => decodeMemTable(encodeMemTable([region(0, 0x2000, 0, big)])), 'SET_MEM_TABLE', 'mmap range', 'overflows');
  const raw = encodeMemTable([region(0, 0x1000, 0, 0)]);
  raw.writeBigUInt64LE(0xffff_ffff_ffff_f000n, 8); // guest address of region 0 near 2^64
  throwsProtocol(() => decodeMemTable(raw), 'SET_MEM_TABLE', 'region 0 guest address', '2^53');
  const overlap = [region(0, 0x2000, 0x10000, 0), region(0x1000, 0x2000, 0x20000, 0)];
  throwsProtocol(() => decodeMemTable(encodeMemTable(overlap)), 'SET_MEM_TABLE', 'overlap');
  // Adjacent regions are fine.
  const adjacent = [region(0x1000, 0x1000, 0x10000, 0), region(0, 0x1000, 0x20000, 0)];
  assert.deepEqual(decodeMemTable(encodeMemTable(adjacent)), adjacent);
});

test('an empty mem table decodes to no regions', () => {
  const payload = encodeMemTable([]);
  assert.equal(payload.length, 8);
  assert.deepEqual(decodeMemTable(payload), []);
});

test('single memory region round trip for ADD_MEM_REG; REM_MEM_REG ignores the mmap offset', () => {
  const r = region(0x1_0000_0000, 0x4000_0000, 0x7f55_0000_0000, 0x1000);
  const payload = encodeMemRegion(r);
  assert.equal(payload.length, 40);
  assert.equal(payload.readBigUInt64LE(0), 0n);
  assert.deepEqual(decodeMemRegion(R.ADD_MEM_REG, payload), r);
  const rem = encodeMemRegion(r);
  rem.writeBigUInt64LE((1n << 64n) - 1n, 32); // garbage offset: ignored per spec
  assert.deepEqual(decodeMemRegion(R.REM_MEM_REG, rem), { ...r, mmapOffset: 0 });
});

test('decodeMemRegion refuses wrong sizes, empty and overflowing regions', () => {
  throwsProtocol(() => decodeMemRegion(R.ADD_MEM_REG, new Uint8Array(32)), 'ADD_MEM_REG', 'payload is 32 bytes, expected 40');
  // XEN_MMAP-sized region (48) is not accepted: we never negotiate XEN_MMAP.
  throwsProtocol(() => decodeMemRegion(R.REM_MEM_REG, new Uint8Array(48)), 'REM_MEM_REG', '48 bytes');
  throwsProtocol(() => decodeMemRegion(R.ADD_MEM_REG, encodeMemRegion(region(0, 0, 0, 0))), 'ADD_MEM_REG', 'size 0');
  throwsProtocol(
    () => decodeMemRegion(R.ADD_MEM_REG, encodeMemRegion(region(Number.MAX_SAFE_INTEGER, 1, 0, 0))),
    'ADD_MEM_REG',
    'overflows',
  );
});

// --- config ----------------------------------------------------------------------------------------------

test('config round trip for GET_CONFIG and SET_CONFIG; decoded data is a copy', () => {
  const data = Uint8Array.from({ length: 60 }, (_, i) => i + 1);
  const payload = encodeConfig(0, 60, 0, data);
  assert.equal(payload.length, 72);
  const c = decodeConfig(R.GET_CONFIG, payload);
  assert.deepEqual({ ...c, data: [...c.data] }, { offset: 0, size: 60, flags: 0, data: [...data] });
  payload[12] = 0xee;
  assert.equal(c.data[0], 1);

  const set = decodeConfig(R.SET_CONFIG, encodeConfig(32, 1, 1, Uint8Array.of(1)));
  assert.deepEqual({ ...set, data: [...set.data] }, { offset: 32, size: 1, flags: 1, data: [1] });
});

test('GET_CONFIG request as QEMU sends it: 12 + size bytes of which the data are zero', () => {
  const msg = split(encodeRequest(R.GET_CONFIG, encodeConfig(0, 60, 0)));
  assert.equal(msg.size, 72);
  const c = decodeConfig(R.GET_CONFIG, msg.payload);
  assert.equal(c.size, 60);
  assert.ok(c.data.every((b) => b === 0));
});

test('decodeConfig refuses sizes above 256, out-of-range offsets and inconsistent lengths', () => {
  assert.equal(MAX_CONFIG_SIZE, 256);
  const over = Buffer.alloc(12 + 257);
  over.writeUInt32LE(257, 4);
  throwsProtocol(() => decodeConfig(R.SET_CONFIG, over), 'SET_CONFIG', 'config size 257', '256');
  throwsProtocol(() => decodeConfig(R.SET_CONFIG, encodeConfig(250, 8, 0)), 'SET_CONFIG', '250 + 8');
  const full = encodeConfig(0, 256, 0);
  assert.equal(decodeConfig(R.GET_CONFIG, full).size, 256);
  const short = encodeConfig(0, 60, 0).subarray(0, 12 + 59);
  throwsProtocol(() => decodeConfig(R.GET_CONFIG, short), 'GET_CONFIG', 'payload is 71 bytes, expected 72 for config size 60');
  const long = Buffer.concat([encodeConfig(0, 4, 0), Buffer.alloc(1)]);
  throwsProtocol(() => decodeConfig(R.SET_CONFIG, long), 'SET_CONFIG', '17 bytes, expected 16');
  throwsProtocol(() => decodeConfig(R.GET_CONFIG, new Uint8Array(8)), 'GET_CONFIG', 'expected at least 12');
  const huge = Buffer.alloc(12);
  huge.writeUInt32LE(0xffffffff, 4);
  throwsProtocol(() => decodeConfig(R.SET_CONFIG, huge), 'SET_CONFIG', 'exceeds the maximum');
});

test('encodeConfig refuses data whose length disagrees with size', () => {
  assert.throws(() => encodeConfig(0, 4, 0, new Uint8Array(3)), RangeError);
  assert.throws(() => encodeReplyConfig(0, 4, 0, new Uint8Array(5)), RangeError);
});

// --- inflight and log ------------------------------------------------------------------------------------

test('inflight round trip at 24 bytes; 20-byte packed form also accepted', () => {
  const info = { mmapSize: 0x21000, mmapOffset: 0, numQueues: 4, queueSize: 256 };
  const payload = encodeInflight(info);
  assert.equal(payload.length, 24);
  assert.deepEqual(decodeInflight(payload), info);
  assert.deepEqual(decodeInflight(payload.subarray(0, 20), R.SET_INFLIGHT_FD), info);
  // GET_INFLIGHT_FD request as QEMU sends it: sizes zero, queue count and size set.
  const get = split(encodeRequest(R.GET_INFLIGHT_FD, encodeInflight({ mmapSize: 0, mmapOffset: 0, numQueues: 1, queueSize: 128 })));
  assert.equal(get.size, 24);
  assert.deepEqual(decodeInflight(get.payload, R.GET_INFLIGHT_FD), { mmapSize: 0, mmapOffset: 0, numQueues: 1, queueSize: 128 });
});

test('decodeInflight refuses wrong sizes and unsafe values, naming the request', () => {
  throwsProtocol(() => decodeInflight(new Uint8Array(16), R.GET_INFLIGHT_FD), 'GET_INFLIGHT_FD', 'payload is 16 bytes, expected 24');
  throwsProtocol(() => decodeInflight(new Uint8Array(32)), 'INFLIGHT_FD', '32 bytes');
  const bad = encodeInflight({ mmapSize: 0, mmapOffset: 0, numQueues: 1, queueSize: 1 });
  bad.writeBigUInt64LE(1n << 60n, 0);
  throwsProtocol(() => decodeInflight(bad, R.SET_INFLIGHT_FD), 'SET_INFLIGHT_FD', 'mmap size', '2^53');
  assert.throws(() => encodeInflight({ mmapSize: 0, mmapOffset: 0, numQueues: 65536, queueSize: 1 }), RangeError);
});

test('SET_LOG_BASE log description round trip; a bare u64 is refused', () => {
  const log = { mmapSize: 0x40000, mmapOffset: 0 };
  const msg = split(encodeRequest(R.SET_LOG_BASE, encodeLog(log)));
  assert.equal(msg.size, 16);
  assert.deepEqual(decodeLog(msg.payload), log);
  throwsProtocol(() => decodeLog(new Uint8Array(8)), 'SET_LOG_BASE', 'payload is 8 bytes, expected 16');
});

// --- replies ---------------------------------------------------------------------------------------------

test('u64 replies carry version|REPLY and the value', () => {
  const features = (1n << 63n) | (1n << 32n) | (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES));
  const msg = split(encodeReplyU64(R.GET_FEATURES, features));
  assert.deepEqual({ request: msg.request, flags: msg.flags, size: msg.size }, { request: 1, flags: 0x5, size: 8 });
  assert.equal(decodeU64(msg.request, msg.payload), features);
});

test('reply-ack is 0 on success and non-zero on failure', () => {
  const ok = split(encodeReplyAck(R.SET_MEM_TABLE, true));
  assert.deepEqual({ request: ok.request, flags: ok.flags, size: ok.size }, { request: 5, flags: 0x5, size: 8 });
  assert.equal(decodeU64(ok.request, ok.payload), 0n);
  const bad = split(encodeReplyAck(R.SET_MEM_TABLE, false));
  assert.notEqual(decodeU64(bad.request, bad.payload), 0n);
});

test('GET_VRING_BASE reply round trip', () => {
  const msg = split(encodeReplyVringState(R.GET_VRING_BASE, 2, 1234));
  assert.deepEqual(decodeReplyHeader(encodeReplyVringState(R.GET_VRING_BASE, 2, 1234)), { request: 11, flags: 5, size: 8, needReply: false });
  assert.deepEqual(decodeVringState(msg.request, msg.payload), { index: 2, num: 1234 });
});

test('GET_CONFIG reply round trip; an empty reply signals an error', () => {
  const data = Uint8Array.from({ length: 60 }, (_, i) => 255 - i);
  const msg = split(encodeReplyConfig(0, 60, 0, data));
  assert.deepEqual({ request: msg.request, flags: msg.flags, size: msg.size }, { request: R.GET_CONFIG, flags: 5, size: 72 });
  const c = decodeConfig(msg.request, msg.payload);
  assert.deepEqual([...c.data], [...data]);
  const err = split(encodeReply(R.GET_CONFIG));
  assert.deepEqual({ request: err.request, flags: err.flags, size: err.size }, { request: R.GET_CONFIG, flags: 5, size: 0 });
});

test('GET_INFLIGHT_FD reply is 24 bytes and round trips', () => {
  const info = { mmapSize: 4096 * 3, mmapOffset: 4096, numQueues: 2, queueSize: 1024 };
  const msg = split(encodeReplyInflight(info));
  assert.deepEqual({ request: msg.request, flags: msg.flags, size: msg.size }, { request: R.GET_INFLIGHT_FD, flags: 5, size: 24 });
  assert.deepEqual(decodeInflight(msg.payload, msg.request), info);
});

test('CONFIG_CHANGE_MSG on the back-end channel has no payload', () => {
  const msg = split(encodeBackendRequest(BackendRequest.CONFIG_CHANGE_MSG));
  assert.deepEqual({ request: msg.request, flags: msg.flags, size: msg.size }, { request: 2, flags: 1, size: 0 });
  assert.equal(msg.payload.length, 0);
  assert.equal(split(encodeBackendRequest(BackendRequest.CONFIG_CHANGE_MSG, undefined, true)).flags, 1 | FLAG_NEED_REPLY);
});

// --- describe --------------------------------------------------------------------------------------------

test('describe formats known payloads and marks malformed ones without throwing', () => {
  assert.equal(describe(R.SET_VRING_NUM, encodeVringState(0, 256)), 'SET_VRING_NUM index=0 num=256');
  assert.equal(describe(R.SET_VRING_KICK, encodeVringFd(1, true)), 'SET_VRING_KICK index=1 nofd');
  assert.equal(describe(R.SET_FEATURES, encodeU64(0x140000000n)), 'SET_FEATURES 0x140000000');
  assert.match(describe(R.SET_MEM_TABLE, encodeMemTable([region(0, 0x1000, 0x7000, 0)])), /^SET_MEM_TABLE 1 regions: gpa=0x0 size=0x1000/);
  assert.equal(describe(R.GET_FEATURES, new Uint8Array(0)), 'GET_FEATURES');
  assert.equal(describe(99, new Uint8Array(3)), 'unknown request 99 (3 bytes)');
  assert.match(describe(R.SET_VRING_ADDR, new Uint8Array(12)), /^SET_VRING_ADDR \(malformed: SET_VRING_ADDR: payload is 12 bytes, expected 40\)$/);
});
