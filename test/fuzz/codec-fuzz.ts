/**
 * Property-based fuzzing of the vhost-user message codec (src/vhost-user/messages.ts), pure: random and
 * mutated headers and payloads through every decoder.
 *
 * Each decoder must either return, or throw the codec's own ProtocolError, never a RangeError, TypeError
 * or anything else. It is also checked against an independent reading of the rules it documents: it
 * accepts exactly the inputs the oracle accepts, and what it returns equals the fields read from the raw
 * bytes. Payloads are views at odd offsets of larger buffers (as Buffer pool slices are), so every
 * decoder must respect byteOffset.
 */
import fc from 'fast-check';
import {
  FLAG_NEED_REPLY, FLAG_REPLY, FrontendRequest as R, MAX_CONFIG_SIZE, MAX_PAYLOAD_SIZE, MEMORY_BASELINE_NREGIONS, ProtocolError,
  decodeConfig, decodeEmpty, decodeHeader, decodeInflight, decodeLog, decodeMemRegion, decodeMemTable, decodeReplyHeader, decodeU64,
  decodeVringAddr, decodeVringFd, decodeVringState, describe, encodeConfig, encodeHeader, encodeInflight, encodeLog, encodeMemRegion,
  encodeMemTable, encodeU64, encodeVringAddr, encodeVringState,
} from '../../src/vhost-user/messages.js';
import { Violation, check } from './violation.js';

const MAX_SAFE = Number.MAX_SAFE_INTEGER;
const MAX_SAFE_BIG = BigInt(MAX_SAFE);

/** Field reads of the oracle: little-endian, independent of the codec. */
class Raw {
  private readonly dv: DataView;
  constructor(readonly b: Uint8Array) {
    this.dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  }
  u16(o: number): number {
    return this.dv.getUint16(o, true);
  }
  u32(o: number): number {
    return this.dv.getUint32(o, true);
  }
  u64(o: number): bigint {
    return this.dv.getBigUint64(o, true);
  }
}

/** One decoder under test: how to call it, and what the oracle expects of an input (null: must be refused). */
interface DecoderCase {
  name: string;
  /** A well-formed encoding to start mutations from. */
  valid: fc.Arbitrary<Uint8Array>;
  decode: (b: Uint8Array) => unknown;
  /** The value the decoder must return for `b`, or null when `b` breaks a rule. */
  expect: (b: Uint8Array) => unknown;
}

const safe = fc.oneof(
  { weight: 3, arbitrary: fc.nat({ max: 0xffff_ffff }) },
  { weight: 1, arbitrary: fc.constantFrom(0, MAX_SAFE, MAX_SAFE - 4096, 2 ** 32, 2 ** 48) },
  { weight: 1, arbitrary: fc.maxSafeNat() },
);
const region = fc.record({ guestAddr: safe, size: safe, userAddr: safe, mmapOffset: safe });
/** Regions a real frontend would send: small, one after the other in guest space (the rest comes from the edits). */
const plausibleRegions = fc.array(fc.record({ gap: fc.oneof(fc.integer({ min: -2, max: 2 }), fc.nat({ max: 1 << 20 })), size: fc.integer({ min: 1, max: 1 << 30 }), userAddr: fc.nat({ max: 2 ** 47 }), mmapOffset: fc.nat({ max: 2 ** 32 }) }), { maxLength: 9 })
  .map((rs) => {
    let at = 0;
    return rs.map((r) => {
      const guestAddr = Math.max(0, at + r.gap);
      at = guestAddr + r.size;
      return { guestAddr, size: r.size, userAddr: r.userAddr, mmapOffset: r.mmapOffset };
    });
  });

/** Region fields as read from raw bytes, or null when a field or a range overflows 2^53-1 (or size is 0). */
function rawRegion(r: Raw, off: number, checkOffset: boolean): { guestAddr: number; size: number; userAddr: number; mmapOffset: number } | null {
  const g = r.u64(off);
  const s = r.u64(off + 8);
  const u = r.u64(off + 16);
  const m = checkOffset ? r.u64(off + 24) : 0n;
  if (g > MAX_SAFE_BIG || s > MAX_SAFE_BIG || u > MAX_SAFE_BIG || m > MAX_SAFE_BIG || s === 0n) return null;
  if (g + s > MAX_SAFE_BIG || u + s > MAX_SAFE_BIG || m + s > MAX_SAFE_BIG) return null;
  return { guestAddr: Number(g), size: Number(s), userAddr: Number(u), mmapOffset: Number(m) };
}

function headerExpect(b: Uint8Array, reply: boolean): unknown {
  if (b.length < 12) return null;
  const r = new Raw(b);
  const request = r.u32(0);
  const flags = r.u32(4);
  const size = r.u32(8);
  if ((flags & 3) !== 1 || size > MAX_PAYLOAD_SIZE) return null;
  if (reply ? (flags & FLAG_REPLY) === 0 || (flags & FLAG_NEED_REPLY) !== 0 : (flags & FLAG_REPLY) !== 0) return null;
  return { request, flags, size, needReply: (flags & FLAG_NEED_REPLY) !== 0 };
}

const headerValid = fc.tuple(fc.oneof(fc.nat({ max: 50 }), fc.nat({ max: 0xffffffff })), fc.constantFrom(1, 5, 9, 13, 0x101), fc.oneof(fc.nat({ max: 4200 }), fc.nat({ max: 0xffffffff })))
  .map(([q, f, s]) => encodeHeader(q, f, s) as Uint8Array);

/** Every decoder of messages.ts, with its oracle. */
const DECODERS: DecoderCase[] = [
  { name: 'decodeHeader', valid: headerValid, decode: (b) => decodeHeader(b), expect: (b) => headerExpect(b, false) },
  { name: 'decodeHeader(backend)', valid: headerValid, decode: (b) => decodeHeader(b, 'backend'), expect: (b) => headerExpect(b, false) },
  { name: 'decodeReplyHeader', valid: headerValid, decode: (b) => decodeReplyHeader(b), expect: (b) => headerExpect(b, true) },
  { name: 'decodeEmpty', valid: fc.constant(new Uint8Array(0)), decode: (b) => decodeEmpty(R.SET_OWNER, b), expect: (b) => (b.length === 0 ? undefined : null) },
  {
    name: 'decodeU64', valid: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }).map((v) => encodeU64(v) as Uint8Array),
    decode: (b) => decodeU64(R.SET_FEATURES, b), expect: (b) => (b.length === 8 ? new Raw(b).u64(0) : null),
  },
  {
    name: 'decodeVringState', valid: fc.tuple(fc.nat({ max: 0xffffffff }), fc.nat({ max: 0xffffffff })).map(([i, n]) => encodeVringState(i, n) as Uint8Array),
    decode: (b) => decodeVringState(R.SET_VRING_NUM, b), expect: (b) => (b.length === 8 ? { index: new Raw(b).u32(0), num: new Raw(b).u32(4) } : null),
  },
  {
    name: 'decodeVringAddr',
    valid: fc.record({ index: fc.nat({ max: 0xffffffff }), flags: fc.nat({ max: 0xffffffff }), descUserAddr: safe, usedUserAddr: safe, availUserAddr: safe, logGuestAddr: safe })
      .map((a) => encodeVringAddr(a) as Uint8Array),
    decode: (b) => decodeVringAddr(b),
    expect: (b) => {
      if (b.length !== 40) return null;
      const r = new Raw(b);
      const w = [8, 16, 24, 32].map((o) => r.u64(o));
      if (w.some((v) => v > MAX_SAFE_BIG)) return null;
      return { index: r.u32(0), flags: r.u32(4), descUserAddr: Number(w[0]), usedUserAddr: Number(w[1]), availUserAddr: Number(w[2]), logGuestAddr: Number(w[3]) };
    },
  },
  {
    name: 'decodeVringFd',
    valid: fc.oneof(fc.nat({ max: 0x1ff }), fc.constantFrom(0x200, 0x2ff, 0x3ff, 2 ** 32, 2 ** 53), fc.nat({ max: 0xffffffff })).map((v) => encodeU64(BigInt(v)) as Uint8Array),
    decode: (b) => decodeVringFd(R.SET_VRING_KICK, b),
    expect: (b) => {
      if (b.length !== 8) return null;
      const v = new Raw(b).u64(0);
      if (v > 0x1ffn) return null;
      return { index: Number(v & 0xffn), noFd: (v & 0x100n) !== 0n };
    },
  },
  {
    name: 'decodeMemTable', valid: fc.oneof(plausibleRegions, fc.array(region, { maxLength: 9 })).map((rs) => encodeMemTable(rs) as Uint8Array),
    decode: (b) => decodeMemTable(b),
    expect: (b) => {
      if (b.length < 8) return null;
      const r = new Raw(b);
      const n = r.u32(0);
      if (n > MEMORY_BASELINE_NREGIONS || b.length !== 8 + 32 * n) return null;
      const out = [];
      for (let i = 0; i < n; i++) {
        const x = rawRegion(r, 8 + 32 * i, true);
        if (!x) return null;
        out.push(x);
      }
      for (let i = 0; i < n; i++) {
        for (let j = 0; j < n; j++) {
          if (i !== j && out[i].guestAddr <= out[j].guestAddr && out[j].guestAddr < out[i].guestAddr + out[i].size) return null;
        }
      }
      return out;
    },
  },
  {
    name: 'decodeMemRegion(ADD)', valid: fc.oneof(region, plausibleRegions.filter((r) => r.length > 0).map((r) => r[0])).map((x) => encodeMemRegion(x) as Uint8Array),
    decode: (b) => decodeMemRegion(R.ADD_MEM_REG, b), expect: (b) => (b.length === 40 ? rawRegion(new Raw(b), 8, true) : null),
  },
  {
    name: 'decodeMemRegion(REM)', valid: fc.oneof(region, plausibleRegions.filter((r) => r.length > 0).map((r) => r[0])).map((x) => encodeMemRegion(x) as Uint8Array),
    decode: (b) => decodeMemRegion(R.REM_MEM_REG, b), expect: (b) => (b.length === 40 ? rawRegion(new Raw(b), 8, false) : null),
  },
  {
    name: 'decodeConfig',
    valid: fc.tuple(fc.nat({ max: 300 }), fc.nat({ max: 300 }), fc.nat({ max: 2 })).chain(([o, s, f]) => fc.uint8Array({ minLength: s, maxLength: s }).map((d) => encodeConfig(o, s, f, d) as Uint8Array)),
    decode: (b) => decodeConfig(R.SET_CONFIG, b),
    expect: (b) => {
      if (b.length < 12) return null;
      const r = new Raw(b);
      const offset = r.u32(0);
      const size = r.u32(4);
      if (size > MAX_CONFIG_SIZE || offset + size > MAX_CONFIG_SIZE || b.length !== 12 + size) return null;
      return { offset, size, flags: r.u32(8), data: Uint8Array.from(b.subarray(12)) };
    },
  },
  {
    name: 'decodeInflight',
    valid: fc.record({ mmapSize: safe, mmapOffset: safe, numQueues: fc.nat({ max: 0xffff }), queueSize: fc.nat({ max: 0xffff }) })
      .chain((x) => fc.boolean().map((packed) => (packed ? encodeInflight(x).subarray(0, 20) : encodeInflight(x)) as Uint8Array)),
    decode: (b) => decodeInflight(b, R.SET_INFLIGHT_FD),
    expect: (b) => {
      if (b.length !== 24 && b.length !== 20) return null;
      const r = new Raw(b);
      const s = r.u64(0);
      const o = r.u64(8);
      if (s > MAX_SAFE_BIG || o > MAX_SAFE_BIG || s + o > MAX_SAFE_BIG) return null;
      return { mmapSize: Number(s), mmapOffset: Number(o), numQueues: r.u16(16), queueSize: r.u16(18) };
    },
  },
  {
    name: 'decodeLog', valid: fc.record({ mmapSize: safe, mmapOffset: safe }).map((x) => encodeLog(x) as Uint8Array),
    decode: (b) => decodeLog(b),
    expect: (b) => {
      if (b.length !== 16) return null;
      const r = new Raw(b);
      const s = r.u64(0);
      const o = r.u64(8);
      if (s > MAX_SAFE_BIG || o > MAX_SAFE_BIG || s + o > MAX_SAFE_BIG) return null;
      return { mmapSize: Number(s), mmapOffset: Number(o) };
    },
  },
];

/** An edit of a valid encoding: set a byte, set a u64 to an edge value, truncate or extend. */
export type Edit = { k: 'byte'; at: number; v: number } | { k: 'u64'; at: number; v: bigint } | { k: 'cut'; at: number } | { k: 'grow'; bytes: Uint8Array };

export const editArb: fc.Arbitrary<Edit> = fc.oneof(
  fc.record({ k: fc.constant('byte' as const), at: fc.nat(), v: fc.nat({ max: 255 }) }),
  fc.record({ k: fc.constant('u64' as const), at: fc.nat(), v: fc.constantFrom(0n, 1n, MAX_SAFE_BIG, MAX_SAFE_BIG + 1n, 2n ** 63n, 2n ** 64n - 1n, 0xffff_ffffn) }),
  fc.record({ k: fc.constant('cut' as const), at: fc.nat() }),
  fc.record({ k: fc.constant('grow' as const), bytes: fc.uint8Array({ minLength: 1, maxLength: 40 }) }),
);

/** `start` with `edits` applied (a copy). */
export function applyEdits(start: Uint8Array, edits: Edit[]): Uint8Array {
  let b = Uint8Array.from(start);
  for (const e of edits) {
    if (e.k === 'byte') {
      if (b.length > 0) b[e.at % b.length] = e.v;
    } else if (e.k === 'u64') {
      if (b.length >= 8) new DataView(b.buffer).setBigUint64(8 * (e.at % Math.floor(b.length / 8)), e.v, true);
    } else if (e.k === 'cut') {
      b = b.slice(0, e.at % (b.length + 1));
    } else {
      const n = new Uint8Array(b.length + e.bytes.length);
      n.set(b);
      n.set(e.bytes, b.length);
      b = n;
    }
  }
  return b;
}

/** One codec case: which decoder, its input, and where the input sits in a larger buffer. */
export interface CodecCase {
  decoder: number;
  bytes: Uint8Array;
  /** Byte offset of the input inside its backing buffer (odd ones included). */
  offset: number;
  /** Request number handed to describe(). */
  describeReq: number;
}

/** fast-check arbitrary: mostly mutated valid encodings, sometimes fully random bytes. */
export const codecCaseArb: fc.Arbitrary<CodecCase> = fc.nat({ max: DECODERS.length - 1 }).chain((decoder) => fc.record({
  decoder: fc.constant(decoder),
  bytes: fc.oneof(
    { weight: 2, arbitrary: DECODERS[decoder].valid },
    { weight: 5, arbitrary: fc.tuple(DECODERS[decoder].valid, fc.array(editArb, { minLength: 1, maxLength: 4 })).map(([v, e]) => applyEdits(v, e)) },
    { weight: 2, arbitrary: fc.uint8Array({ maxLength: 320 }) },
  ),
  offset: fc.nat({ max: 9 }),
  describeReq: fc.oneof(fc.constantFrom(...Object.values(R)), fc.nat({ max: 0xffffffff })),
}));

/** Counts of what the codec cases exercised. */
export const codecStats = { cases: 0, accepted: 0, refused: 0 };

function same(a: unknown, b: unknown): boolean {
  if (a instanceof Uint8Array && b instanceof Uint8Array) return a.length === b.length && a.every((x, i) => x === b[i]);
  if (typeof a !== 'object' || a === null || typeof b !== 'object' || b === null) return a === b;
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  return ka.length === kb.length && ka.every((k) => same((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k]));
}

function show(v: unknown): string {
  return JSON.stringify(v, (_k, x) => (typeof x === 'bigint' ? `${x}n` : x instanceof Uint8Array ? Array.from(x) : x));
}

/** Runs one codec case; throws Violation on a broken rule. */
export function runCodecCase(c: CodecCase): void {
  codecStats.cases++;
  const d = DECODERS[c.decoder];
  // The input as a view at `offset` of a bigger buffer, with junk around it.
  const backing = new Uint8Array(c.offset + c.bytes.length + 7).fill(0xa5);
  backing.set(c.bytes, c.offset);
  const input = backing.subarray(c.offset, c.offset + c.bytes.length);
  const expected = d.expect(Uint8Array.from(c.bytes));
  let got: unknown;
  let err: unknown = null;
  try {
    got = d.decode(input);
  } catch (e) {
    err = e;
  }
  const what = `${d.name}(${c.bytes.length} bytes at offset ${c.offset})`;
  if (err !== null) {
    check(err instanceof ProtocolError, `${what} threw ${(err as Error)?.name}: ${(err as Error)?.message}`);
    check(expected === null, `${what} refused an input the documented rules accept: ${(err as Error).message}; expected ${show(expected)}`);
    check((err as Error).message.length > 0, `${what}: empty error message`);
    codecStats.refused++;
  } else {
    check(expected !== null, `${what} accepted an input the documented rules refuse: returned ${show(got)}`);
    check(same(got, expected), `${what} returned ${show(got)}, the raw bytes say ${show(expected)}`);
    codecStats.accepted++;
    if (got && typeof got === 'object' && 'data' in got) {
      // The config data must be a copy: the receive buffer is reused.
      backing.fill(0x5a);
      check(same((got as { data: Uint8Array }).data, (expected as { data: Uint8Array }).data), `${what}: the returned data aliases the input buffer`);
    }
  }
  // describe() is for logs: it must never throw, whatever the payload.
  try {
    const s = describe(c.describeReq, input);
    check(typeof s === 'string' && s.length > 0, `describe(${c.describeReq}) returned ${show(s)}`);
  } catch (e) {
    if (e instanceof Violation) throw e;
    throw new Violation(`describe(${c.describeReq}, ${c.bytes.length} bytes) threw ${(e as Error)?.name}: ${(e as Error)?.message}`);
  }
}

/** The property fast-check checks. */
export const codecProperty = (): fc.IProperty<[CodecCase]> => fc.property(codecCaseArb, (c) => runCodecCase(c));
