/**
 * Unit tests for the virtio-blk request processor (src/blk/request-processor.ts).
 *
 * A GuestDriver plays the guest, a FakeBackend records what the processor asks of the disk and, when
 * a test says so, performs it against an in-memory disk image by following the iovecs.
 *
 * Guest memory (plain ArrayBuffers, hostAddr values are fake but distinct):
 *   rings  [0x000000, 0x010000)  host 0x10000000
 *   hole   [0x010000, 0x100000)  NOT guest memory
 *   data   [0x100000, 0x180000)  host 128 * 2^32 - 0x40000: DATA + 0x40000 is host 0x80_0000_0000, so iovec
 *                                bases need both 32-bit words and buffers there cross a 2^32 boundary.
 * The fake backend decodes every iovec base back to a guest address (base - hostAddr + guestAddr) and
 * fails the test if an iovec does not lie wholly inside one region, so each assertion on `iovs` checks
 * that the processor pointed the kernel at exactly the right guest bytes.
 */

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { BlkRequestProcessor, type BlkSettings, type LogFn } from "../../src/blk/request-processor.js";
import { RequestType, Status } from "../../src/blk/constants.js";
import type { BlockBackend } from "../../src/backend/types.js";
import { GuestMemory, type MappedRegion } from "../../src/memory/guest-memory.js";
import {
  SplitQueue,
  VIRTQ_DESC_F_INDIRECT as INDIRECT,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as WRITE,
  type RingAddresses,
} from "../../src/virtqueue/split.js";
import { GuestDriver, type GuestBuf } from "./guest-driver.js";

const RING_GPA = 0;
const RING_SIZE = 0x10000;
const RING_HOST = 0x1000_0000;
const HOLE_GPA = 0x10000;
const DATA_GPA = 0x100000;
const DATA_SIZE = 0x80000;
const DATA_HOST = 128 * 2 ** 32 - 0x40000;
const IOV_ADDR = 0x5555_0000_1000;
const TAG_BASE = 3 * 65536;
const ADDRS: RingAddresses = { descAddr: 0x0000, availAddr: 0x4000, usedAddr: 0x8000 };
/** Value pre-set in every status byte: still there means "never written". */
const SENTINEL = 0xee;
const EIO = -5;

interface Iov {
  gpa: number;
  len: number;
}

interface Call {
  op: "readv" | "writev" | "flush" | "discard" | "writeZeroes";
  /** writeZeroes only: the guest allowed deallocation. */
  unmap?: boolean;
  tag: number;
  offset: number;
  iovAddr: number;
  iovCnt: number;
  len: number;
  /** The iovec table decoded to guest addresses at the time of the call. */
  iovs: Iov[];
}

/** What tests look at in a data call (everything but the opaque native address). */
function shape(c: Call): { op: string; offset: number; len: number; iovCnt: number; iovs: Iov[] } {
  return { op: c.op, offset: c.offset, len: c.len, iovCnt: c.iovCnt, iovs: c.iovs };
}

/** A BlockBackend that records calls; `env.finish` performs them against `disk`. */
class FakeBackend implements BlockBackend {
  calls: Call[] = [];
  /** Disk image, only for small disks (huge fake disks are never read or written). */
  readonly disk: Uint8Array | null;

  constructor(
    readonly sizeBytes: number,
    readonly readOnly: boolean,
    private readonly decode: (iovAddr: number, iovCnt: number) => Iov[],
  ) {
    this.disk = sizeBytes <= 4 << 20 ? new Uint8Array(sizeBytes) : null;
    if (this.disk) for (let i = 0; i < sizeBytes; i++) this.disk[i] = (i * 7 + (i >> 9) * 3 + 1) & 0xff;
  }

  readv(tag: number, offset: number, iovAddr: number, iovCnt: number, len: number): void {
    this.calls.push({ op: "readv", tag, offset, iovAddr, iovCnt, len, iovs: this.decode(iovAddr, iovCnt) });
  }
  writev(tag: number, offset: number, iovAddr: number, iovCnt: number, len: number): void {
    this.calls.push({ op: "writev", tag, offset, iovAddr, iovCnt, len, iovs: this.decode(iovAddr, iovCnt) });
  }
  flush(tag: number): void {
    this.calls.push({ op: "flush", tag, offset: -1, iovAddr: 0, iovCnt: 0, len: 0, iovs: [] });
  }
  discard(tag: number, offset: number, len: number): void {
    this.calls.push({ op: "discard", tag, offset, iovAddr: 0, iovCnt: 0, len, iovs: [] });
  }
  writeZeroes(tag: number, offset: number, len: number, unmap: boolean): void {
    this.calls.push({ op: "writeZeroes", tag, offset, iovAddr: 0, iovCnt: 0, len, iovs: [], unmap });
  }

  /** Returns and forgets the calls made so far. */
  take(): Call[] {
    const c = this.calls;
    this.calls = [];
    return c;
  }
}

interface EnvOptions {
  size?: number;
  segMax?: number;
  writeback?: boolean;
  serial?: string;
  diskBytes?: number;
  readOnly?: boolean;
  /** Submit requests through indirect tables (one direct descriptor each). */
  indirect?: boolean;
  /** DISCARD / WRITE_ZEROES negotiated. */
  ranges?: boolean;
}

/** A request built with the standard framing: header, one descriptor per data segment, 1-byte status. */
interface Req {
  head: number;
  hdr: number;
  data: number[];
  segs: number[];
  st: number;
}

/** Guest memory, driver, queue, fake backend and the processor under test. */
class Env {
  readonly mem: GuestMemory;
  readonly drv: GuestDriver;
  readonly q: SplitQueue;
  readonly backend: FakeBackend;
  readonly proc: BlkRequestProcessor;
  readonly settings: BlkSettings;
  readonly iovArea: ArrayBuffer;
  readonly logs: { level: string; msg: string }[] = [];
  readonly size: number;
  readonly indirect: boolean;
  private nextData = DATA_GPA;
  private seed = 1;

  constructor(o: EnvOptions = {}) {
    this.size = o.size ?? 16;
    this.indirect = o.indirect ?? false;
    const regions: MappedRegion[] = [
      { guestAddr: RING_GPA, size: RING_SIZE, userAddr: 0x7f00_0000_0000, mmapOffset: 0, hostAddr: RING_HOST, bytes: new Uint8Array(RING_SIZE) },
      { guestAddr: DATA_GPA, size: DATA_SIZE, userAddr: 0x7f00_0010_0000, mmapOffset: 0, hostAddr: DATA_HOST, bytes: new Uint8Array(DATA_SIZE) },
    ];
    this.mem = new GuestMemory(regions);
    this.settings = {
      serial: new TextEncoder().encode(o.serial ?? "vhost-blk-0001"),
      segMax: o.segMax ?? 8,
      writeback: o.writeback ?? true,
      discard: o.ranges ?? false,
      writeZeroes: o.ranges ?? false,
      maxRangeSectors: 1024,
    };
    this.iovArea = new ArrayBuffer(BlkRequestProcessor.iovBytes(this.size, this.settings.segMax));
    this.backend = new FakeBackend(o.diskBytes ?? 1 << 20, o.readOnly ?? false, (a, n) => this.decodeIovs(a, n));
    this.drv = new GuestDriver(this.mem, this.size, ADDRS);
    this.q = new SplitQueue(this.mem, this.size, ADDRS, { eventIdx: false, indirect: true }, 0);
    const log: LogFn = (level, msg) => this.logs.push({ level, msg });
    this.proc = new BlkRequestProcessor(this.q, this.mem, this.backend, this.settings, this.iovArea, IOV_ADDR, TAG_BASE, log, "q3");
  }

  /** Reads the iovec table the processor built and translates each base back to a guest address. */
  decodeIovs(iovAddr: number, iovCnt: number): Iov[] {
    const off = iovAddr - IOV_ADDR;
    assert.ok(Number.isInteger(off) && off >= 0 && off % 16 === 0, `iovAddr 0x${iovAddr.toString(16)} is not an iovec in the area`);
    assert.ok(iovCnt >= 1 && off + 16 * iovCnt <= this.iovArea.byteLength, `iovec table [${off}, +${iovCnt}) outside the ${this.iovArea.byteLength}-byte area`);
    const dv = new DataView(this.iovArea);
    const out: Iov[] = [];
    for (let i = 0; i < iovCnt; i++) {
      const base = Number(dv.getBigUint64(off + 16 * i, true));
      const len = Number(dv.getBigUint64(off + 16 * i + 8, true));
      const r = this.mem.regions.find((r) => base >= r.hostAddr && base + len <= r.hostAddr + r.size);
      assert.ok(r, `iovec ${i} [host 0x${base.toString(16)}, +${len}) is not inside guest memory`);
      out.push({ gpa: base - r.hostAddr + r.guestAddr, len });
    }
    return out;
  }

  /** Bump-allocates guest data memory. */
  alloc(len: number, align = 16): number {
    const a = Math.ceil(this.nextData / align) * align;
    assert.ok(a + len <= DATA_GPA + DATA_SIZE, "test bug: data region exhausted");
    this.nextData = a + len;
    return a;
  }

  /** Moves the allocator to `gpa` (to place buffers at chosen addresses). */
  allocAt(gpa: number, len: number): number {
    assert.ok(gpa >= DATA_GPA && gpa + len <= DATA_GPA + DATA_SIZE);
    this.nextData = gpa + len;
    return gpa;
  }

  view(gpa: number, len: number): Uint8Array {
    const s = this.mem.slice(gpa, len);
    assert.ok(s, "test bug: range not in guest memory");
    return s;
  }

  dv(gpa: number, len: number): DataView {
    const s = this.view(gpa, len);
    return new DataView(s.buffer, s.byteOffset, len);
  }

  /** A copy of guest bytes. */
  bytes(gpa: number, len: number): Uint8Array {
    return this.view(gpa, len).slice();
  }

  /** Fills guest bytes with a pattern unique to this call. */
  fill(gpa: number, len: number): Uint8Array {
    const s = this.view(gpa, len);
    const seed = this.seed++;
    for (let i = 0; i < len; i++) s[i] = (seed * 37 + i * 11 + (i >> 8)) & 0xff;
    return s.slice();
  }

  /** Writes a 16-byte virtio_blk_outhdr at `gpa`; `sectorHi` sets the upper 32 bits of the sector. */
  writeHeader(gpa: number, type: number, sector: number, sectorHi?: number): void {
    const v = this.dv(gpa, 16);
    v.setUint32(0, type, true);
    v.setUint32(4, 0, true);
    v.setUint32(8, sector % 2 ** 32, true);
    v.setUint32(12, sectorHi ?? Math.floor(sector / 2 ** 32), true);
  }

  header(type: number, sector: number, sectorHi?: number): number {
    const a = this.alloc(16);
    this.writeHeader(a, type, sector, sectorHi);
    return a;
  }

  /** A buffer whose last byte (the status byte) holds SENTINEL. */
  statusBuf(len = 1): number {
    const a = this.alloc(len);
    this.view(a + len - 1, 1)[0] = SENTINEL;
    return a;
  }

  status(gpa: number): number {
    return this.view(gpa, 1)[0];
  }

  submit(bufs: GuestBuf[]): number {
    return this.indirect ? this.drv.submitIndirect(this.alloc(16 * bufs.length), bufs) : this.drv.submit(bufs);
  }

  /** Standard framing; data buffers are pre-filled (the data to write, or garbage a read must replace). */
  req(type: number, sector: number, segs: number[], sectorHi?: number): Req {
    const hdr = this.header(type, sector, sectorHi);
    const data = segs.map((len) => {
      const a = this.alloc(len);
      this.fill(a, len);
      return a;
    });
    const st = this.statusBuf();
    const devWrites = type !== RequestType.OUT;
    const head = this.submit([
      { addr: hdr, len: 16 },
      ...data.map((addr, k) => ({ addr, len: segs[k], write: devWrites })),
      { addr: st, len: 1, write: true },
    ]);
    return { head, hdr, data, segs, st };
  }

  /** Copies `n` bytes between the disk and the call's iovecs, as the kernel would. */
  perform(c: Call, n: number): void {
    const disk = this.backend.disk;
    assert.ok(disk, "test bug: disk too large to perform I/O");
    assert.ok(c.offset + n <= disk.length, "the backend was asked to go past the end of the disk");
    let pos = c.offset;
    let left = n;
    for (const iov of c.iovs) {
      if (left === 0) break;
      const k = Math.min(left, iov.len);
      const g = this.view(iov.gpa, k);
      if (c.op === "readv") g.set(disk.subarray(pos, pos + k));
      else disk.set(g, pos);
      pos += k;
      left -= k;
    }
  }

  /** Performs `n` bytes of a data call (all by default; nothing for a flush) and completes it with `n`. */
  finish(c: Call, n = c.len): void {
    if (c.op !== "flush" && n > 0) this.perform(c, n);
    this.proc.complete(c.tag - TAG_BASE, n);
  }

  /** Completes a call with -errno. */
  fail(c: Call, errno = EIO): void {
    this.proc.complete(c.tag - TAG_BASE, errno);
  }

  /** Takes exactly one backend call. */
  one(): Call {
    const calls = this.backend.take();
    assert.equal(calls.length, 1, `expected one backend call, got ${JSON.stringify(calls.map(shape))}`);
    const c = calls[0];
    assert.ok(c.tag >= TAG_BASE && c.tag < TAG_BASE + this.size, `tag ${c.tag} is not tagBase + slot`);
    return c;
  }

  noBackend(): void {
    assert.deepEqual(this.backend.take().map(shape), [], "the backend must not be called");
  }

  diskBytes(offset: number, len: number): Uint8Array {
    assert.ok(this.backend.disk);
    return this.backend.disk.slice(offset, offset + len);
  }

  /** Asserts a request finished without backend I/O: status, used entry, nothing in flight. */
  expectDone(head: number, st: number, status: number, usedLen = 1): void {
    assert.deepEqual(this.drv.takeUsed(), [{ id: head, len: usedLen }]);
    assert.equal(this.status(st), status, "status byte");
    assert.equal(this.proc.inFlight, 0);
  }
}

/** Guest bytes of the data segments of `r`, concatenated. */
function segBytes(e: Env, r: Req): Uint8Array {
  const total = r.segs.reduce((a, b) => a + b, 0);
  const out = new Uint8Array(total);
  let p = 0;
  r.data.forEach((a, k) => {
    out.set(e.bytes(a, r.segs[k]), p);
    p += r.segs[k];
  });
  return out;
}

describe("reads (IN)", () => {
  test("3 segments: iovecs are exactly the data buffers, offset = sector * 512, used len = data + 1", () => {
    const e = new Env();
    const r = e.req(RequestType.IN, 5, [512, 1024, 512]);
    assert.equal(e.proc.pump(), 1);
    const c = e.one();
    assert.deepEqual(shape(c), {
      op: "readv",
      offset: 5 * 512,
      len: 2048,
      iovCnt: 3,
      iovs: [
        { gpa: r.data[0], len: 512 },
        { gpa: r.data[1], len: 1024 },
        { gpa: r.data[2], len: 512 },
      ],
    });
    // Nothing is reported before the backend completes.
    assert.equal(e.proc.inFlight, 1);
    assert.deepEqual(e.drv.takeUsed(), []);
    assert.equal(e.status(r.st), SENTINEL);

    e.finish(c);
    e.expectDone(r.head, r.st, Status.OK, 2049);
    assert.deepEqual(segBytes(e, r), e.diskBytes(5 * 512, 2048));
  });

  test("data sharing the status descriptor: the status byte is excluded from the iovecs", () => {
    const e = new Env();
    const hdr = e.header(RequestType.IN, 9);
    const d0 = e.alloc(512);
    const tail = e.statusBuf(513); // 512 data bytes, then the status byte
    const head = e.submit([
      { addr: hdr, len: 16 },
      { addr: d0, len: 512, write: true },
      { addr: tail, len: 513, write: true },
    ]);
    e.proc.pump();
    const c = e.one();
    assert.deepEqual(shape(c), {
      op: "readv",
      offset: 9 * 512,
      len: 1024,
      iovCnt: 2,
      iovs: [
        { gpa: d0, len: 512 },
        { gpa: tail, len: 512 },
      ],
    });
    e.finish(c);
    e.expectDone(head, tail + 512, Status.OK, 1025);
    assert.deepEqual(e.bytes(tail, 512), e.diskBytes(9 * 512 + 512, 512));
  });

  test("sub-sector segments are fine as long as the total is a multiple of 512", () => {
    const e = new Env();
    const r = e.req(RequestType.IN, 0, [100, 300, 112]);
    e.proc.pump();
    const c = e.one();
    assert.equal(c.len, 512);
    assert.deepEqual(c.iovs, [
      { gpa: r.data[0], len: 100 },
      { gpa: r.data[1], len: 300 },
      { gpa: r.data[2], len: 112 },
    ]);
    e.finish(c);
    e.expectDone(r.head, r.st, Status.OK, 513);
    assert.deepEqual(segBytes(e, r), e.diskBytes(0, 512));
  });

  test("64-bit sector numbers use both header words and give exact byte offsets", () => {
    const sector = 2 ** 33 + 3;
    const e = new Env({ diskBytes: (sector + 8) * 512 }); // a huge fake disk, never touched
    const r = e.req(RequestType.IN, sector, [4096]);
    e.proc.pump();
    const c = e.one();
    assert.equal(c.offset, sector * 512);
    assert.equal(c.len, 4096);
    e.proc.complete(c.tag - TAG_BASE, 4096);
    e.expectDone(r.head, r.st, Status.OK, 4097);
  });

  test("requests submitted through indirect tables", () => {
    const e = new Env({ indirect: true });
    const r = e.req(RequestType.IN, 2, [512, 512]);
    e.proc.pump();
    const c = e.one();
    assert.deepEqual(c.iovs, [
      { gpa: r.data[0], len: 512 },
      { gpa: r.data[1], len: 512 },
    ]);
    e.finish(c);
    e.expectDone(r.head, r.st, Status.OK, 1025);
  });
});

describe("writes (OUT) and message framing", () => {
  test("header and data in the SAME descriptor: the iovec starts after the 16 header bytes", () => {
    const e = new Env();
    const buf = e.alloc(16 + 1024);
    e.writeHeader(buf, RequestType.OUT, 12);
    const data = e.fill(buf + 16, 1024);
    const st = e.statusBuf();
    const before = e.diskBytes(12 * 512 - 16, 16);
    const after = e.diskBytes(14 * 512, 16);
    const head = e.submit([
      { addr: buf, len: 16 + 1024 },
      { addr: st, len: 1, write: true },
    ]);
    assert.equal(e.proc.pump(), 1);
    const c = e.one();
    assert.deepEqual(shape(c), { op: "writev", offset: 12 * 512, len: 1024, iovCnt: 1, iovs: [{ gpa: buf + 16, len: 1024 }] });
    assert.equal(e.status(st), SENTINEL);
    e.finish(c);
    e.expectDone(head, st, Status.OK, 1);
    assert.deepEqual(e.diskBytes(12 * 512, 1024), data, "exactly the data, no header bytes, reached the disk");
    assert.deepEqual(e.diskBytes(12 * 512 - 16, 16), before);
    assert.deepEqual(e.diskBytes(14 * 512, 16), after);
  });

  test("header and data in separate descriptors", () => {
    const e = new Env();
    const r = e.req(RequestType.OUT, 30, [512, 1024, 2048]);
    const data = segBytes(e, r);
    e.proc.pump();
    const c = e.one();
    assert.deepEqual(shape(c), {
      op: "writev",
      offset: 30 * 512,
      len: 3584,
      iovCnt: 3,
      iovs: [
        { gpa: r.data[0], len: 512 },
        { gpa: r.data[1], len: 1024 },
        { gpa: r.data[2], len: 2048 },
      ],
    });
    e.finish(c);
    e.expectDone(r.head, r.st, Status.OK, 1);
    assert.deepEqual(e.diskBytes(30 * 512, 3584), data);
  });

  test("a write's used len is 1 even with a large status descriptor", () => {
    const e = new Env();
    const hdr = e.header(RequestType.OUT, 1);
    const d = e.alloc(512);
    e.fill(d, 512);
    const st = e.statusBuf(64);
    const head = e.submit([
      { addr: hdr, len: 16 },
      { addr: d, len: 512 },
      { addr: st, len: 64, write: true },
    ]);
    e.proc.pump();
    const c = e.one();
    assert.deepEqual(c.iovs, [{ gpa: d, len: 512 }]);
    e.finish(c);
    e.expectDone(head, st + 63, Status.OK, 1);
  });

  test("IN header split 8 + 8 across two descriptors (at unrelated addresses)", () => {
    const e = new Env();
    // The first descriptor is 8 bytes long, but 16 contiguous bytes there would read as sector 1000.
    const a = e.header(RequestType.IN, 1000);
    const b = e.alloc(8);
    e.dv(b, 8).setUint32(0, 7, true); // sector low word
    e.dv(b, 8).setUint32(4, 0, true); // sector high word
    const d = e.alloc(512);
    const st = e.statusBuf();
    const head = e.submit([
      { addr: a, len: 8 },
      { addr: b, len: 8 },
      { addr: d, len: 512, write: true },
      { addr: st, len: 1, write: true },
    ]);
    e.proc.pump();
    const c = e.one();
    assert.deepEqual(shape(c), { op: "readv", offset: 7 * 512, len: 512, iovCnt: 1, iovs: [{ gpa: d, len: 512 }] });
    e.finish(c);
    e.expectDone(head, st, Status.OK, 513);
  });

  test("OUT header split 8 + (8 + data): data starts 8 bytes into the second descriptor", () => {
    const e = new Env();
    const a = e.alloc(8);
    const b = e.alloc(8 + 512);
    const full = e.alloc(16);
    e.writeHeader(full, RequestType.OUT, 40);
    e.view(a, 8).set(e.bytes(full, 8));
    e.view(b, 8).set(e.bytes(full + 8, 8));
    const data = e.fill(b + 8, 512);
    const st = e.statusBuf();
    const head = e.submit([
      { addr: a, len: 8 },
      { addr: b, len: 8 + 512 },
      { addr: st, len: 1, write: true },
    ]);
    e.proc.pump();
    const c = e.one();
    assert.deepEqual(shape(c), { op: "writev", offset: 40 * 512, len: 512, iovCnt: 1, iovs: [{ gpa: b + 8, len: 512 }] });
    e.finish(c);
    e.expectDone(head, st, Status.OK, 1);
    assert.deepEqual(e.diskBytes(40 * 512, 512), data);
  });

  test("OUT header over three descriptors 4 + 4 + (8 + data), then another data descriptor", () => {
    const e = new Env();
    const full = e.alloc(16);
    e.writeHeader(full, RequestType.OUT, 3);
    const p0 = e.alloc(4);
    const p1 = e.alloc(4);
    const p2 = e.alloc(8 + 256);
    e.view(p0, 4).set(e.bytes(full, 4));
    e.view(p1, 4).set(e.bytes(full + 4, 4));
    e.view(p2, 8).set(e.bytes(full + 8, 8));
    e.fill(p2 + 8, 256);
    const d = e.alloc(256);
    e.fill(d, 256);
    const st = e.statusBuf();
    const head = e.submit([
      { addr: p0, len: 4 },
      { addr: p1, len: 4 },
      { addr: p2, len: 8 + 256 },
      { addr: d, len: 256 },
      { addr: st, len: 1, write: true },
    ]);
    e.proc.pump();
    const c = e.one();
    assert.deepEqual(shape(c), {
      op: "writev",
      offset: 3 * 512,
      len: 512,
      iovCnt: 2,
      iovs: [
        { gpa: p2 + 8, len: 256 },
        { gpa: d, len: 256 },
      ],
    });
    e.finish(c);
    e.expectDone(head, st, Status.OK, 1);
  });

  test("a read-only disk gets no writev and the guest sees IOERR; reads still work", () => {
    const e = new Env({ readOnly: true });
    const w = e.req(RequestType.OUT, 0, [512]);
    assert.equal(e.proc.pump(), 1);
    e.noBackend();
    e.expectDone(w.head, w.st, Status.IOERR, 1);
    const r = e.req(RequestType.IN, 0, [512]);
    e.proc.pump();
    const c = e.one();
    assert.equal(c.op, "readv");
    e.finish(c);
    e.expectDone(r.head, r.st, Status.OK, 513);
  });
});

describe("other request types", () => {
  test("FLUSH goes to backend.flush and completes when it does", () => {
    const e = new Env();
    const r = e.req(RequestType.FLUSH, 0, []);
    assert.equal(e.proc.pump(), 1);
    const c = e.one();
    assert.equal(c.op, "flush");
    assert.equal(e.proc.inFlight, 1);
    assert.deepEqual(e.drv.takeUsed(), []);
    assert.equal(e.status(r.st), SENTINEL);
    e.finish(c, 0);
    e.expectDone(r.head, r.st, Status.OK, 1);
  });

  test("a failed FLUSH gives IOERR", () => {
    const e = new Env();
    const r = e.req(RequestType.FLUSH, 0, []);
    e.proc.pump();
    e.fail(e.one());
    e.expectDone(r.head, r.st, Status.IOERR, 1);
  });

  test("GET_ID writes the serial NUL padded to 20 bytes; used len 21; no backend call", () => {
    const e = new Env({ serial: "vhost-blk-0001" });
    const r = e.req(RequestType.GET_ID, 0, [20]);
    assert.equal(e.proc.pump(), 1);
    e.noBackend();
    const want = new Uint8Array(20);
    want.set(new TextEncoder().encode("vhost-blk-0001"));
    assert.deepEqual(e.bytes(r.data[0], 20), want);
    e.expectDone(r.head, r.st, Status.OK, 21);
  });

  test("GET_ID with a larger buffer writes only 20 bytes; a 20-byte serial has no NUL", () => {
    const e = new Env({ serial: "ABCDEFGHIJKLMNOPQRST" });
    const r = e.req(RequestType.GET_ID, 0, [512]);
    const tail = e.bytes(r.data[0] + 20, 492);
    e.proc.pump();
    e.noBackend();
    assert.deepEqual(e.bytes(r.data[0], 20), new TextEncoder().encode("ABCDEFGHIJKLMNOPQRST"));
    assert.deepEqual(e.bytes(r.data[0] + 20, 492), tail, "bytes after the 20 ID bytes are untouched");
    e.expectDone(r.head, r.st, Status.OK, 21);
  });

  test("GET_ID buffer split over two descriptors, the second shared with the status byte", () => {
    const e = new Env({ serial: "0123456789abcdef" });
    const hdr = e.header(RequestType.GET_ID, 0);
    const a = e.alloc(12);
    const b = e.statusBuf(9);
    const head = e.submit([
      { addr: hdr, len: 16 },
      { addr: a, len: 12, write: true },
      { addr: b, len: 9, write: true },
    ]);
    e.proc.pump();
    e.noBackend();
    assert.deepEqual(e.bytes(a, 12), new TextEncoder().encode("0123456789ab"));
    assert.deepEqual(e.bytes(b, 8), new Uint8Array([0x63, 0x64, 0x65, 0x66, 0, 0, 0, 0]));
    e.expectDone(head, b + 8, Status.OK, 21);
  });

  test("GET_ID into a buffer shorter than 20 bytes writes what fits before the status byte", () => {
    const e = new Env({ serial: "0123456789abcdef" });
    const hdr = e.header(RequestType.GET_ID, 0);
    const b = e.statusBuf(10); // 9 ID bytes, then the status byte
    const after = e.alloc(16);
    const guard = e.fill(after, 16);
    const head = e.submit([
      { addr: hdr, len: 16 },
      { addr: b, len: 10, write: true },
    ]);
    e.proc.pump();
    e.noBackend();
    assert.deepEqual(e.bytes(b, 9), new TextEncoder().encode("012345678"));
    assert.deepEqual(e.bytes(after, 16), guard);
    e.expectDone(head, b + 9, Status.OK, 10);
  });

  for (const [name, type] of [
    ["unknown type 99", 99],
    ["DISCARD", RequestType.DISCARD],
    ["WRITE_ZEROES", RequestType.WRITE_ZEROES],
    ["GET_LIFETIME", RequestType.GET_LIFETIME],
  ] as const) {
    test(`${name} gives UNSUPP without touching the backend`, () => {
      const e = new Env();
      const r = e.req(type, 0, [512]);
      const data = e.bytes(r.data[0], 512);
      assert.equal(e.proc.pump(), 1);
      e.noBackend();
      assert.deepEqual(e.bytes(r.data[0], 512), data);
      e.expectDone(r.head, r.st, Status.UNSUPP, 1);
    });
  }
});

describe("bad requests", () => {
  test("header in a device-writable descriptor (no readable bytes) gives IOERR", () => {
    const e = new Env();
    const hdr = e.header(RequestType.IN, 0); // a valid header, but the guest marked it device-writable
    const d = e.alloc(512);
    const st = e.statusBuf();
    const head = e.submit([
      { addr: hdr, len: 16, write: true },
      { addr: d, len: 512, write: true },
      { addr: st, len: 1, write: true },
    ]);
    assert.equal(e.proc.pump(), 1);
    e.noBackend();
    e.expectDone(head, st, Status.IOERR, 1);
  });

  test("a write whose data the guest marked device-writable gives IOERR, not a silent zero-byte write", () => {
    const e = new Env();
    const hdr = e.header(RequestType.OUT, 0);
    const d = e.alloc(512);
    const st = e.statusBuf();
    const head = e.submit([
      { addr: hdr, len: 16 },
      { addr: d, len: 512, write: true },
      { addr: st, len: 1, write: true },
    ]);
    e.proc.pump();
    e.noBackend();
    e.expectDone(head, st, Status.IOERR, 1);
  });

  test("a read whose data the guest marked device-readable gives IOERR", () => {
    const e = new Env();
    const hdr = e.header(RequestType.IN, 0);
    const d = e.alloc(512);
    const st = e.statusBuf();
    const head = e.submit([
      { addr: hdr, len: 16 },
      { addr: d, len: 512 },
      { addr: st, len: 1, write: true },
    ]);
    e.proc.pump();
    e.noBackend();
    e.expectDone(head, st, Status.IOERR, 1);
  });

  test("fewer than 16 readable header bytes gives IOERR", () => {
    const e = new Env();
    const hdr = e.header(RequestType.IN, 0);
    const d = e.alloc(512);
    const st = e.statusBuf();
    const head = e.submit([
      { addr: hdr, len: 8 },
      { addr: d, len: 512, write: true },
      { addr: st, len: 1, write: true },
    ]);
    e.proc.pump();
    e.noBackend();
    e.expectDone(head, st, Status.IOERR, 1);
  });

  test("read-only status byte: used len 0, status untouched, backend not called", () => {
    const e = new Env();
    const hdr = e.header(RequestType.OUT, 0);
    const d = e.alloc(512);
    const st = e.statusBuf();
    const head = e.submit([
      { addr: hdr, len: 16 },
      { addr: d, len: 512 },
      { addr: st, len: 1 },
    ]);
    assert.equal(e.proc.pump(), 1);
    e.noBackend();
    e.expectDone(head, st, SENTINEL, 0);
  });

  test("zero-length status descriptor: used len 0, nothing written", () => {
    const e = new Env();
    const hdr = e.header(RequestType.IN, 0);
    const d = e.alloc(512);
    const before = e.fill(d, 512);
    const st = e.statusBuf();
    const head = e.submit([
      { addr: hdr, len: 16 },
      { addr: d, len: 512, write: true },
      { addr: st, len: 0, write: true },
    ]);
    e.proc.pump();
    e.noBackend();
    e.expectDone(head, st, SENTINEL, 0);
    assert.deepEqual(e.bytes(d, 512), before);
  });

  const DISK_SECTORS = 64;
  const pastEnd: [string, number, number[], number, number?][] = [
    ["read starting at the capacity", RequestType.IN, [512], 64],
    ["read straddling the end", RequestType.IN, [1024], 63],
    ["write straddling the end", RequestType.OUT, [2048, 2048], 60],
    ["read at sector 2^32 (high header word)", RequestType.IN, [512], 0, 1],
    ["read at sector 2^64 - 1", RequestType.IN, [512], 0xffffffff, 0xffffffff],
  ];
  for (const [name, type, segs, sector, hi] of pastEnd) {
    test(`past the end of the disk: ${name} gives IOERR, no backend call`, () => {
      const e = new Env({ diskBytes: DISK_SECTORS * 512 });
      const r = e.req(type, sector, segs, hi);
      const data = segBytes(e, r);
      assert.equal(e.proc.pump(), 1);
      e.noBackend();
      e.expectDone(r.head, r.st, Status.IOERR, 1);
      assert.deepEqual(segBytes(e, r), data, "guest data untouched");
    });
  }

  test("the last sector of the disk is reachable (boundary)", () => {
    const e = new Env({ diskBytes: DISK_SECTORS * 512 });
    const r = e.req(RequestType.OUT, 62, [1024]);
    const data = segBytes(e, r);
    e.proc.pump();
    const c = e.one();
    assert.equal(c.offset, 62 * 512);
    e.finish(c);
    e.expectDone(r.head, r.st, Status.OK, 1);
    assert.deepEqual(e.diskBytes(62 * 512, 1024), data);
  });

  for (const [name, type, segs] of [
    ["read of 100 bytes", RequestType.IN, [100]],
    ["read of 513 bytes", RequestType.IN, [512, 1]],
    ["write of 300 bytes", RequestType.OUT, [300]],
  ] as const) {
    test(`length not a multiple of 512: ${name} gives IOERR`, () => {
      const e = new Env();
      const r = e.req(type, 0, [...segs]);
      e.proc.pump();
      e.noBackend();
      e.expectDone(r.head, r.st, Status.IOERR, 1);
    });
  }

  test("more data segments than seg_max gives IOERR; exactly seg_max is served", () => {
    const e = new Env({ segMax: 4 });
    const bad = e.req(RequestType.IN, 0, [512, 512, 512, 512, 512]);
    e.proc.pump();
    e.noBackend();
    e.expectDone(bad.head, bad.st, Status.IOERR, 1);

    const ok = e.req(RequestType.IN, 0, [512, 512, 512, 512]);
    e.proc.pump();
    const c = e.one();
    assert.equal(c.iovCnt, 4);
    assert.deepEqual(c.iovs, ok.data.map((gpa) => ({ gpa, len: 512 })));
    e.finish(c);
    e.expectDone(ok.head, ok.st, Status.OK, 4 * 512 + 1);
  });

  test("seg_max counts data in the status descriptor and not a header-only descriptor", () => {
    const e = new Env({ segMax: 2 });
    // IN: 2 data descriptors + data in the status descriptor = 3 segments > 2.
    const hdr = e.header(RequestType.IN, 0);
    const d0 = e.alloc(512);
    const d1 = e.alloc(512);
    const tail = e.statusBuf(513);
    const h1 = e.submit([
      { addr: hdr, len: 16 },
      { addr: d0, len: 512, write: true },
      { addr: d1, len: 512, write: true },
      { addr: tail, len: 513, write: true },
    ]);
    e.proc.pump();
    e.noBackend();
    e.expectDone(h1, tail + 512, Status.IOERR, 1);

    // OUT: header-only descriptor + 2 data descriptors = 2 segments: served.
    const w = e.req(RequestType.OUT, 0, [512, 512]);
    e.proc.pump();
    const c = e.one();
    assert.equal(c.iovCnt, 2);
    e.finish(c);
    e.expectDone(w.head, w.st, Status.OK, 1);

    // OUT: header + data in one descriptor + 2 more data descriptors = 3 segments > 2.
    const buf = e.alloc(16 + 512);
    e.writeHeader(buf, RequestType.OUT, 0);
    const d2 = e.alloc(512);
    const d3 = e.alloc(512);
    const st = e.statusBuf();
    const h3 = e.submit([
      { addr: buf, len: 16 + 512 },
      { addr: d2, len: 512 },
      { addr: d3, len: 512 },
      { addr: st, len: 1, write: true },
    ]);
    e.proc.pump();
    e.noBackend();
    e.expectDone(h3, st, Status.IOERR, 1);
  });

  test("a descriptor outside guest memory: used len 0 and the queue serves the next request", () => {
    const e = new Env();
    const hdr = e.header(RequestType.IN, 0);
    const st = e.statusBuf();
    const bad = e.submit([
      { addr: hdr, len: 16 },
      { addr: HOLE_GPA + 0x100, len: 512, write: true },
      { addr: st, len: 1, write: true },
    ]);
    const good = e.req(RequestType.IN, 4, [512]);
    assert.equal(e.proc.pump(), 2);
    const c = e.one();
    assert.deepEqual(shape(c), { op: "readv", offset: 4 * 512, len: 512, iovCnt: 1, iovs: [{ gpa: good.data[0], len: 512 }] });
    assert.deepEqual(e.drv.takeUsed(), [{ id: bad, len: 0 }]);
    assert.equal(e.status(st), SENTINEL);
    assert.equal(e.proc.hasNewUsed, true);
    assert.ok(e.logs.some((l) => /bad descriptor chain/.test(l.msg)), "the bad chain is logged");
    e.finish(c);
    e.expectDone(good.head, good.st, Status.OK, 513);
  });

  test("rejected requests give their slot back (queue of 4, many rejections, then 4 good reads)", () => {
    // seg_max 1 so that a 4-descriptor chain (the most a queue of 4 allows) can exceed it.
    const e = new Env({ size: 4, segMax: 1, indirect: true, diskBytes: 64 * 512 });
    for (let round = 0; round < 3; round++) {
      const bad = [
        e.req(RequestType.IN, 64, [512]), // past the end
        e.req(RequestType.IN, 0, [100]), // not a multiple of 512
        e.req(RequestType.IN, 0, [512, 512]), // more than seg_max
        e.req(RequestType.OUT, 0, [512, 512]), // more than seg_max
      ];
      assert.equal(e.proc.pump(), 4);
      e.noBackend();
      assert.deepEqual(
        e.drv.takeUsed(),
        bad.map((r) => ({ id: r.head, len: 1 })),
      );
      for (const r of bad) assert.equal(e.status(r.st), Status.IOERR);
      const empty = e.req(RequestType.IN, 0, []); // no data: completes at once
      assert.equal(e.proc.pump(), 1);
      e.expectDone(empty.head, empty.st, Status.OK, 1);
    }
    const good = [0, 1, 2, 3].map((s) => e.req(RequestType.IN, s, [512]));
    assert.equal(e.proc.pump(), 4);
    const calls = e.backend.take();
    assert.equal(calls.length, 4, "every slot is free again");
    assert.equal(e.proc.inFlight, 4);
    for (const c of calls) e.finish(c);
    assert.equal(e.proc.inFlight, 0);
    assert.deepEqual(
      e.drv.takeUsed().map((u) => u.id),
      good.map((r) => r.head),
    );
  });

  test("a broken ring stops the processor and is logged once", () => {
    const e = new Env();
    e.drv.setAvailIdx(e.size + 1);
    assert.equal(e.proc.pump(), 0);
    assert.equal(e.proc.pump(), 0);
    e.noBackend();
    assert.deepEqual(e.drv.takeUsed(), []);
    const errors = e.logs.filter((l) => l.level === "error");
    assert.equal(errors.length, 1);
    assert.match(errors[0].msg, /q3: ring is broken/);
  });

  test("a misbehaving guest cannot flood the log", () => {
    const e = new Env();
    for (let i = 0; i < 150; i++) {
      e.req(RequestType.IN, 0, [100]);
      e.proc.pump();
      e.drv.takeUsed();
    }
    assert.equal(e.logs.length, 101);
    assert.match(e.logs[100].msg, /no longer logged/);
  });
});

describe("backend completions", () => {
  test("read error (-EIO) gives IOERR with used len 1", () => {
    const e = new Env();
    const r = e.req(RequestType.IN, 0, [512, 512]);
    e.proc.pump();
    e.fail(e.one());
    e.expectDone(r.head, r.st, Status.IOERR, 1);
    assert.ok(e.logs.some((l) => /errno 5/.test(l.msg)));
  });

  test("write error (-EIO) gives IOERR", () => {
    const e = new Env();
    const r = e.req(RequestType.OUT, 0, [512]);
    e.proc.pump();
    e.fail(e.one());
    e.expectDone(r.head, r.st, Status.IOERR, 1);
  });

  test("short read: the remainder is resubmitted with advanced iovecs and offset, then OK", () => {
    const e = new Env();
    const r = e.req(RequestType.IN, 5, [512, 1024, 512]);
    e.proc.pump();
    const c1 = e.one();
    e.finish(c1, 768); // half of the second segment still to do
    const c2 = e.one();
    assert.equal(c2.tag, c1.tag);
    assert.deepEqual(shape(c2), {
      op: "readv",
      offset: 5 * 512 + 768,
      len: 2048 - 768,
      iovCnt: 2,
      iovs: [
        { gpa: r.data[1] + 256, len: 768 },
        { gpa: r.data[2], len: 512 },
      ],
    });
    assert.deepEqual(e.drv.takeUsed(), [], "not complete yet");
    assert.equal(e.status(r.st), SENTINEL);
    assert.equal(e.proc.inFlight, 1);
    e.finish(c2);
    e.expectDone(r.head, r.st, Status.OK, 2049);
    assert.deepEqual(segBytes(e, r), e.diskBytes(5 * 512, 2048));
  });

  test("short read ending exactly on a segment boundary", () => {
    const e = new Env();
    const r = e.req(RequestType.IN, 0, [512, 1024, 512]);
    e.proc.pump();
    e.finish(e.one(), 512);
    const c2 = e.one();
    assert.deepEqual(shape(c2), {
      op: "readv",
      offset: 512,
      len: 1536,
      iovCnt: 2,
      iovs: [
        { gpa: r.data[1], len: 1024 },
        { gpa: r.data[2], len: 512 },
      ],
    });
    e.finish(c2);
    e.expectDone(r.head, r.st, Status.OK, 2049);
    assert.deepEqual(segBytes(e, r), e.diskBytes(0, 2048));
  });

  test("many short reads of odd sizes still deliver every byte to the right place", () => {
    const e = new Env();
    const r = e.req(RequestType.IN, 11, [512, 1536, 100, 412, 2048]);
    e.proc.pump();
    let c = e.one();
    let expectOffset = 11 * 512;
    let rounds = 0;
    for (;;) {
      assert.equal(c.offset, expectOffset);
      assert.equal(c.iovs.reduce((a, v) => a + v.len, 0), c.len, "iovecs cover exactly the remaining length");
      const n = Math.min(c.len, 300);
      e.finish(c, n);
      expectOffset += n;
      rounds++;
      if (n === c.len) break;
      c = e.one();
    }
    assert.equal(rounds, Math.ceil(4608 / 300));
    e.noBackend();
    e.expectDone(r.head, r.st, Status.OK, 4609);
    assert.deepEqual(segBytes(e, r), e.diskBytes(11 * 512, 4608));
  });

  test("short read across a host 2^32 boundary carries into the high word", () => {
    const e = new Env();
    const hdr = e.header(RequestType.IN, 0);
    const d = e.allocAt(DATA_GPA + 0x40000 - 0x100, 1024); // host [128 * 2^32 - 0x100, +1024)
    const st = e.statusBuf();
    const head = e.submit([
      { addr: hdr, len: 16 },
      { addr: d, len: 1024, write: true },
      { addr: st, len: 1, write: true },
    ]);
    e.proc.pump();
    const c1 = e.one();
    assert.deepEqual(c1.iovs, [{ gpa: d, len: 1024 }]);
    e.finish(c1, 0x100);
    const c2 = e.one();
    assert.deepEqual(c2.iovs, [{ gpa: DATA_GPA + 0x40000, len: 1024 - 0x100 }]);
    e.finish(c2, 0x80);
    const c3 = e.one();
    assert.deepEqual(c3.iovs, [{ gpa: DATA_GPA + 0x40080, len: 1024 - 0x180 }]);
    assert.equal(c3.offset, 0x180);
    e.finish(c3);
    e.expectDone(head, st, Status.OK, 1025);
    assert.deepEqual(e.bytes(d, 1024), e.diskBytes(0, 1024));
  });

  test("short write: the remainder is resubmitted and the disk ends up with all the data", () => {
    const e = new Env();
    const r = e.req(RequestType.OUT, 20, [1024, 1024]);
    const data = segBytes(e, r);
    e.proc.pump();
    e.finish(e.one(), 1536);
    const c2 = e.one();
    assert.deepEqual(shape(c2), { op: "writev", offset: 20 * 512 + 1536, len: 512, iovCnt: 1, iovs: [{ gpa: r.data[1] + 512, len: 512 }] });
    e.finish(c2);
    e.expectDone(r.head, r.st, Status.OK, 1);
    assert.deepEqual(e.diskBytes(20 * 512, 2048), data);
  });

  test("a completion with no progress gives IOERR", () => {
    const e = new Env();
    const r = e.req(RequestType.IN, 0, [1024]);
    e.proc.pump();
    e.finish(e.one(), 512);
    e.finish(e.one(), 0);
    e.noBackend();
    e.expectDone(r.head, r.st, Status.IOERR, 1);
  });

  test("out-of-order completions: each request gets its own status and used entry", () => {
    const e = new Env();
    const a = e.req(RequestType.IN, 0, [512]);
    const b = e.req(RequestType.IN, 8, [1024]);
    const w = e.req(RequestType.OUT, 16, [512]);
    assert.equal(e.proc.pump(), 3);
    const [ca, cb, cw] = e.backend.take();
    assert.deepEqual([ca.op, cb.op, cw.op], ["readv", "readv", "writev"]);
    assert.equal(new Set([ca.tag, cb.tag, cw.tag]).size, 3, "distinct tags");
    assert.equal(new Set([ca.iovAddr, cb.iovAddr, cw.iovAddr]).size, 3, "distinct iovec tables");
    e.finish(cw);
    e.fail(ca);
    e.finish(cb);
    assert.deepEqual(e.drv.takeUsed(), [
      { id: w.head, len: 1 },
      { id: a.head, len: 1 },
      { id: b.head, len: 1025 },
    ]);
    assert.equal(e.status(w.st), Status.OK);
    assert.equal(e.status(a.st), Status.IOERR);
    assert.equal(e.status(b.st), Status.OK);
    assert.equal(e.proc.inFlight, 0);
  });

  test("a completion for an idle slot, or a second one for the same slot, is ignored", () => {
    const e = new Env();
    e.proc.complete(0, 512);
    assert.deepEqual(e.drv.takeUsed(), []);
    assert.equal(e.proc.inFlight, 0);
    const r = e.req(RequestType.IN, 0, [512]);
    e.proc.pump();
    const c = e.one();
    e.finish(c);
    e.expectDone(r.head, r.st, Status.OK, 513);
    e.proc.complete(c.tag - TAG_BASE, 512);
    assert.deepEqual(e.drv.takeUsed(), []);
    assert.equal(e.proc.inFlight, 0);
    assert.equal(e.logs.filter((l) => /idle slot/.test(l.msg)).length, 2);
  });
});

describe("writethrough (writeback = false)", () => {
  test("a completed write is flushed before the status is written", () => {
    const e = new Env({ writeback: false });
    const r = e.req(RequestType.OUT, 0, [512]);
    e.proc.pump();
    const w = e.one();
    assert.equal(w.op, "writev");
    e.finish(w);
    const f = e.one();
    assert.equal(f.op, "flush");
    assert.equal(f.tag, w.tag, "the flush uses the request's slot");
    assert.equal(e.status(r.st), SENTINEL, "not acknowledged before the flush completes");
    assert.deepEqual(e.drv.takeUsed(), []);
    assert.equal(e.proc.inFlight, 1);
    e.finish(f, 0);
    e.noBackend();
    e.expectDone(r.head, r.st, Status.OK, 1);
  });

  test("a failed flush after a write gives IOERR", () => {
    const e = new Env({ writeback: false });
    const r = e.req(RequestType.OUT, 0, [512]);
    e.proc.pump();
    e.finish(e.one());
    e.fail(e.one());
    e.expectDone(r.head, r.st, Status.IOERR, 1);
  });

  test("a short write is completed first, then flushed once", () => {
    const e = new Env({ writeback: false });
    const r = e.req(RequestType.OUT, 0, [1024]);
    e.proc.pump();
    e.finish(e.one(), 512);
    const w2 = e.one();
    assert.equal(w2.op, "writev");
    e.finish(w2);
    const f = e.one();
    assert.equal(f.op, "flush");
    e.finish(f, 0);
    e.expectDone(r.head, r.st, Status.OK, 1);
  });

  test("a failed write is not flushed", () => {
    const e = new Env({ writeback: false });
    const r = e.req(RequestType.OUT, 0, [512]);
    e.proc.pump();
    e.fail(e.one());
    e.noBackend();
    e.expectDone(r.head, r.st, Status.IOERR, 1);
  });

  test("reads are not flushed", () => {
    const e = new Env({ writeback: false });
    const r = e.req(RequestType.IN, 0, [512]);
    e.proc.pump();
    e.finish(e.one());
    e.noBackend();
    e.expectDone(r.head, r.st, Status.OK, 513);
  });

  test("writeback = true: no flush after a write", () => {
    const e = new Env({ writeback: true });
    const r = e.req(RequestType.OUT, 0, [512]);
    e.proc.pump();
    e.finish(e.one());
    e.noBackend();
    e.expectDone(r.head, r.st, Status.OK, 1);
  });

  test("switching to writethrough while a write is in flight takes effect at its completion", () => {
    const e = new Env({ writeback: true });
    const r = e.req(RequestType.OUT, 0, [512]);
    e.proc.pump();
    const w = e.one();
    e.settings.writeback = false;
    e.finish(w);
    const f = e.one();
    assert.equal(f.op, "flush");
    assert.deepEqual(e.drv.takeUsed(), []);
    e.finish(f, 0);
    e.expectDone(r.head, r.st, Status.OK, 1);
  });
});

describe("slots and notification state", () => {
  test("queue of 4: pump stops taking requests while 4 are in flight and resumes after completions", () => {
    const e = new Env({ size: 4, indirect: true });
    const first = [0, 1, 2, 3].map((s) => e.req(RequestType.IN, s, [512]));
    assert.equal(e.proc.pump(), 4);
    const calls = e.backend.take();
    assert.equal(calls.length, 4);
    assert.equal(e.proc.inFlight, 4);
    assert.deepEqual([...new Set(calls.map((c) => c.tag))].sort(), [0, 1, 2, 3].map((s) => TAG_BASE + s));
    // The four iovec tables must not overlap.
    const ranges = calls.map((c) => [c.iovAddr, c.iovAddr + 16 * c.iovCnt]).sort((x, y) => x[0] - y[0]);
    for (let i = 1; i < ranges.length; i++) assert.ok(ranges[i][0] >= ranges[i - 1][1], "iovec tables overlap");

    // More requests become available (the test reuses the four direct descriptors, which the processor no
    // longer looks at once it has copied the chains): no slot is free, so none may be taken.
    const more: Req[] = [];
    for (let k = 0; k < 4; k++) {
      const hdr = e.header(RequestType.IN, 10 + k);
      const d = e.alloc(512);
      const st = e.statusBuf();
      const table = e.alloc(48);
      e.drv.setDesc(table, 0, hdr, 16, NEXT, 1);
      e.drv.setDesc(table, 1, d, 512, NEXT | WRITE, 2);
      e.drv.setDesc(table, 2, st, 1, WRITE, 0);
      e.drv.desc(k, table, 48, INDIRECT);
      e.drv.publish(k);
      more.push({ head: k, hdr, data: [d], segs: [512], st });
    }
    assert.equal(e.proc.pump(), 0);
    e.noBackend();
    assert.equal(e.proc.inFlight, 4);
    assert.equal(e.q.lastAvailIdx, 4, "nothing consumed from the avail ring");

    // One completion frees one slot: exactly one more request is taken.
    e.finish(calls[2]);
    assert.equal(e.proc.inFlight, 3);
    assert.equal(e.proc.pump(), 1);
    const c5 = e.one();
    assert.equal(c5.tag, calls[2].tag, "the freed slot is reused");
    assert.equal(c5.offset, 10 * 512);
    assert.equal(e.proc.inFlight, 4);
    assert.equal(e.proc.pump(), 0);

    for (const c of [calls[0], calls[1], calls[3], c5]) e.finish(c);
    assert.equal(e.proc.inFlight, 0);
    assert.equal(e.proc.pump(), 3);
    const rest = e.backend.take();
    assert.deepEqual(
      rest.map((c) => c.offset),
      [11, 12, 13].map((s) => s * 512),
    );
    for (const c of rest) e.finish(c);
    assert.equal(e.proc.inFlight, 0);
    const used = e.drv.takeUsed();
    assert.equal(used.length, 8);
    assert.ok(used.every((u) => u.len === 513));
    for (const r of [...first, ...more]) assert.equal(e.status(r.st), Status.OK);
    assert.equal(e.q.lastAvailIdx, 8);
  });

  test("requests that need no I/O do not use up slots", () => {
    const e = new Env({ size: 4, indirect: true });
    const reads = [0, 1, 2, 3].map((s) => e.req(RequestType.IN, s, [512]));
    e.proc.pump();
    assert.equal(e.proc.inFlight, 4);
    const calls = e.backend.take();
    for (const c of calls) e.finish(c);
    assert.equal(e.drv.takeUsed().length, 4);
    // With all slots free again, a batch of 4 immediate requests is served in full.
    const ids = [0, 1, 2, 3].map(() => e.req(RequestType.GET_ID, 0, [20]));
    assert.equal(e.proc.pump(), 4);
    assert.equal(e.proc.inFlight, 0);
    assert.equal(e.drv.takeUsed().length, 4);
    for (const r of [...reads, ...ids]) assert.equal(e.status(r.st), Status.OK);
  });

  test("hasNewUsed is set by completions, not by submissions", () => {
    const e = new Env();
    assert.equal(e.proc.hasNewUsed, false);
    const r = e.req(RequestType.IN, 0, [512]);
    e.proc.pump();
    assert.equal(e.proc.hasNewUsed, false, "a submitted request adds no used entry");
    e.finish(e.one());
    assert.equal(e.proc.hasNewUsed, true);
    e.expectDone(r.head, r.st, Status.OK, 513);

    e.proc.hasNewUsed = false; // the worker clears it after its notification check
    const f = e.req(RequestType.FLUSH, 0, []);
    e.proc.pump();
    const c = e.one();
    assert.equal(e.proc.hasNewUsed, false);
    e.finish(c, 0);
    assert.equal(e.proc.hasNewUsed, true);

    e.proc.hasNewUsed = false;
    e.req(RequestType.IN, 0, [100]); // rejected at once
    e.proc.pump();
    assert.equal(e.proc.hasNewUsed, true, "an immediate completion sets it too");
    assert.equal(e.status(f.st), Status.OK);
  });

  test("the iovec area must hold slots x (seg_max + 1) iovecs", () => {
    const e = new Env({ size: 8, segMax: 6 });
    assert.equal(BlkRequestProcessor.iovBytes(8, 6), 8 * 7 * 16);
    const small = new ArrayBuffer(BlkRequestProcessor.iovBytes(8, 6) - 16);
    assert.throws(
      () => new BlkRequestProcessor(e.q, e.mem, e.backend, e.settings, small, IOV_ADDR, 0, () => {}, "x"),
      RangeError,
    );
  });
});

describe("DISCARD and WRITE_ZEROES", () => {
  /** Submits header + one 16-byte range (or `ranges` raw bytes) + status. */
  function rangeReq(e: Env, type: number, sector: number, sectors: number, flags: number, extra = 0): { head: number; st: number } {
    const hdr = e.header(type, 0);
    const r = e.alloc(16 + extra);
    const dv = new DataView(e.view(r, 16 + extra).buffer, e.view(r, 16 + extra).byteOffset, 16 + extra);
    dv.setUint32(0, sector >>> 0, true);
    dv.setUint32(4, Math.floor(sector / 2 ** 32), true);
    dv.setUint32(8, sectors, true);
    dv.setUint32(12, flags, true);
    const st = e.statusBuf();
    const head = e.submit([{ addr: hdr, len: 16 }, { addr: r, len: 16 + extra }, { addr: st, len: 1, write: true }]);
    e.proc.pump();
    return { head, st };
  }

  test("a discard punches the byte range it names and completes OK", () => {
    const e = new Env({ ranges: true });
    const r = rangeReq(e, RequestType.DISCARD, 8, 16, 0);
    const c = e.one();
    assert.equal(c.op, "discard");
    assert.equal(c.offset, 8 * 512);
    assert.equal(c.len, 16 * 512);
    e.proc.complete(c.tag - TAG_BASE, 0);
    e.expectDone(r.head, r.st, Status.OK, 1);
  });

  test("write-zeroes passes the UNMAP flag through, and falls back to punching holes when zero-range is refused", () => {
    const e = new Env({ ranges: true });
    const a = rangeReq(e, RequestType.WRITE_ZEROES, 0, 8, 1);
    const ca = e.one();
    assert.deepEqual([ca.op, ca.unmap, ca.offset, ca.len], ["writeZeroes", true, 0, 4096]);
    e.proc.complete(ca.tag - TAG_BASE, 0);
    e.expectDone(a.head, a.st, Status.OK, 1);
    const b = rangeReq(e, RequestType.WRITE_ZEROES, 100, 4, 0);
    const cb = e.one();
    assert.equal(cb.unmap, false);
    e.proc.complete(cb.tag - TAG_BASE, -95 /* EOPNOTSUPP */);
    const retry = e.one();
    assert.deepEqual([retry.op, retry.unmap, retry.offset, retry.len], ["writeZeroes", true, 100 * 512, 4 * 512]);
    assert.deepEqual(e.drv.takeUsed(), [], "not complete before the fallback finishes");
    e.proc.complete(retry.tag - TAG_BASE, 0);
    e.expectDone(b.head, b.st, Status.OK, 1);
  });

  test("a discard the filesystem cannot do is acknowledged (discard is a hint); other errors are IOERR", () => {
    const e = new Env({ ranges: true });
    const a = rangeReq(e, RequestType.DISCARD, 0, 8, 0);
    e.proc.complete(e.one().tag - TAG_BASE, -95);
    e.expectDone(a.head, a.st, Status.OK, 1);
    const b = rangeReq(e, RequestType.WRITE_ZEROES, 0, 8, 1);
    e.proc.complete(e.one().tag - TAG_BASE, -5);
    e.expectDone(b.head, b.st, Status.IOERR, 1);
  });

  test("UNMAP on a discard and unknown flags are UNSUPP; ranges past the end, too long or more than one are IOERR", () => {
    const e = new Env({ ranges: true, diskBytes: 1 << 20 });
    const cases: Array<[number, number, number, number, number, number]> = [
      [RequestType.DISCARD, 0, 8, 1, 0, Status.UNSUPP],
      [RequestType.WRITE_ZEROES, 0, 8, 2, 0, Status.UNSUPP],
      [RequestType.DISCARD, 2040, 16, 0, 0, Status.IOERR], // straddles the end of a 2048-sector disk
      [RequestType.WRITE_ZEROES, 0, 1025, 0, 0, Status.IOERR], // longer than maxRangeSectors
      [RequestType.DISCARD, 0, 8, 0, 16, Status.IOERR], // two ranges
    ];
    for (const [type, sector, sectors, flags, extra, status] of cases) {
      const r = rangeReq(e, type, sector, sectors, flags, extra);
      e.noBackend();
      e.expectDone(r.head, r.st, status, 1);
    }
  });

  test("without the features negotiated both are UNSUPP; a read-only disk refuses them with IOERR", () => {
    const off = new Env({ ranges: false });
    const a = rangeReq(off, RequestType.WRITE_ZEROES, 0, 8, 0);
    off.noBackend();
    off.expectDone(a.head, a.st, Status.UNSUPP, 1);
    const ro = new Env({ ranges: true, readOnly: true });
    const b = rangeReq(ro, RequestType.DISCARD, 0, 8, 0);
    ro.noBackend();
    ro.expectDone(b.head, b.st, Status.IOERR, 1);
  });

  test("in writethrough mode write-zeroes is made durable before it completes", () => {
    const e = new Env({ ranges: true, writeback: false });
    const r = rangeReq(e, RequestType.WRITE_ZEROES, 0, 8, 0);
    e.proc.complete(e.one().tag - TAG_BASE, 0);
    const f = e.one();
    assert.equal(f.op, "flush");
    assert.deepEqual(e.drv.takeUsed(), []);
    e.proc.complete(f.tag - TAG_BASE, 0);
    e.expectDone(r.head, r.st, Status.OK, 1);
  });
});
