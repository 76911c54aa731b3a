// Helpers of the conformance suite's dirty log tests: guest buffers at chosen guest addresses, one page or
// more each, labelled by what they hold, and raw virtio-blk chains over them whose device-written bytes
// surely change (so a complete log must mark every page they are on).
import assert from 'node:assert/strict';
import {
  logPage, LOG_PAGE_SIZE, STATUS_NOT_WRITTEN, encodeBlkRanges, statusName,
  type GuestBuffer, type GuestRange, type MemorySnapshot, type RawDescriptor, type VhostUserBlkClient,
} from '../../src/frontend/index.js';
import { Feature, RequestType, Status } from '../../src/blk/constants.js';
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../../src/virtqueue/queue.js';

/** What each guest page of a test holds, for failure messages ("queue 1 used ring", "queue 0 read data 2"). */
export class PageLabels {
  private readonly labels = new Map<number, string[]>();

  /** Labels every page of guest range `r`. */
  add(r: GuestRange, label: string): void {
    for (let p = logPage(r.guestAddr); p <= logPage(r.guestAddr + r.size - 1); p++) {
      const l = this.labels.get(p);
      if (l) l.push(label);
      else this.labels.set(p, [label]);
    }
  }

  /** True if some label covers page `page`. */
  has(page: number): boolean {
    return this.labels.has(page);
  }

  /** Every labelled page. */
  pages(): number[] {
    return [...this.labels.keys()].sort((a, b) => a - b);
  }

  /**
   * One line per page: its guest address, what it holds, and (with snapshots) where its bytes first
   * changed; at most `max` pages, then how many more.
   */
  describe(pages: readonly number[], snapshots?: { before: MemorySnapshot; after: MemorySnapshot }, max = 24): string {
    const lines = pages.slice(0, max).map((p) => {
      const what = this.labels.get(p)?.join(', ') ?? 'no buffer or ring of this test';
      return `  page ${p} (guest 0x${(p * LOG_PAGE_SIZE).toString(16)}): ${what}${snapshots ? firstChange(p, snapshots.before, snapshots.after) : ''}`;
    });
    if (pages.length > max) lines.push(`  ... and ${pages.length - max} more`);
    return lines.join('\n');
  }
}

function firstChange(page: number, before: MemorySnapshot, after: MemorySnapshot): string {
  const gpa = page * LOG_PAGE_SIZE;
  for (let i = 0; i < before.regions.length; i++) {
    const a = before.regions[i];
    if (gpa < a.guestAddr || gpa >= a.guestAddr + a.bytes.length) continue;
    const b = after.regions[i].bytes;
    const off = gpa - a.guestAddr;
    for (let k = 0; k < LOG_PAGE_SIZE && off + k < a.bytes.length; k++) {
      if (a.bytes[off + k] !== b[off + k]) return `; first changed byte at +${k}: 0x${a.bytes[off + k].toString(16)} -> 0x${b[off + k].toString(16)}`;
    }
    return '; unchanged';
  }
  return '';
}

/**
 * Hands out guest buffers (client.allocGuest) page by page from the given guest ranges in turn, each on
 * pages of its own, at an offset inside its first page when asked.
 */
export class GuestPlacer {
  private readonly cursors: Array<{ at: number; end: number }>;
  private next = 0;
  /** Every buffer handed out, for free(). */
  readonly buffers: GuestBuffer[] = [];

  /** Places buffers in `ranges` (page-aligned guest ranges of `client`'s memory no one else uses). */
  constructor(private readonly client: VhostUserBlkClient, ranges: readonly GuestRange[]) {
    this.cursors = ranges.map((r) => ({ at: r.guestAddr, end: r.guestAddr + r.size }));
  }

  /** A `length`-byte buffer starting `inPage` bytes into a fresh page, in the next range (round robin). */
  take(length: number, inPage = 0): GuestBuffer {
    const c = this.cursors[this.next++ % this.cursors.length];
    const gpa = c.at + inPage;
    const pages = Math.ceil((inPage + length) / LOG_PAGE_SIZE);
    if (c.at + pages * LOG_PAGE_SIZE > c.end) throw new RangeError(`no room for ${length} bytes in the guest range ending at 0x${c.end.toString(16)}`);
    c.at += pages * LOG_PAGE_SIZE;
    const b = this.client.allocGuest(gpa, length);
    this.buffers.push(b);
    return b;
  }

  /** Frees every buffer handed out. */
  free(): void {
    for (const b of this.buffers.splice(0)) b.free();
  }
}

/** One planned raw request: its chain, the pages the device must change, and the check of its outcome. */
export interface PlannedRequest {
  /** Queue it goes to. */
  queue: number;
  /** What it is, for messages. */
  what: string;
  /** The raw chain. */
  descriptors: RawDescriptor[];
  /** Guest ranges the device writes and that surely change (status byte, read data, id). */
  deviceWritten: GuestRange[];
  /** Throws unless the request completed as expected (status OK, read data as on the disk). */
  check(usedLen: number): void;
}

/** Options of planRequest. */
export interface PlanOptions {
  /** Queue. */
  queue: number;
  /** Request type (IN, OUT, FLUSH, GET_ID, DISCARD). */
  type: number;
  /** Starting sector (IN, OUT). */
  sector?: number;
  /** IN: segment sizes, each on pages of its own, `inPage` bytes into its first page; OUT: the data (one segment). */
  segments?: ReadonlyArray<{ length: number; inPage?: number }>;
  /** OUT: the data written (one segment per `segments` entry, or one). IN: the data the disk holds there. */
  data?: Buffer;
  /** DISCARD: sectors discarded from `sector`. */
  numSectors?: number;
  /** Put the chain in an indirect table (in a page of its own). */
  indirect?: boolean;
  /** Labels of the request's pages. */
  labels: PageLabels;
  /** What the guest id buffer is filled with before the request (and read data buffers): never what the device writes. */
  fill?: number;
}

const HEADER_LEN = 16;
const STATUS_AT = 512;

/**
 * Writes a request's header and buffers into guest memory (header and status byte, preset to 0xff, in a
 * page of their own; every data buffer in pages of its own, device-writable ones filled with `fill`) and
 * returns the raw chain to publish. Nothing is published yet: a snapshot taken now sees the driver's part done.
 */
export function planRequest(c: VhostUserBlkClient, placer: GuestPlacer, o: PlanOptions): PlannedRequest {
  const name = ({ [RequestType.IN]: 'read', [RequestType.OUT]: 'write', [RequestType.FLUSH]: 'flush', [RequestType.GET_ID]: 'GET_ID', [RequestType.DISCARD]: 'discard' } as Record<number, string>)[o.type] ?? `type ${o.type}`;
  const what = `queue ${o.queue} ${name}${o.sector !== undefined ? ` at sector ${o.sector}` : ''}${o.indirect ? ' (indirect)' : ''}`;
  const fill = o.fill ?? 0xa5;
  const hdr = placer.take(LOG_PAGE_SIZE);
  const header = Buffer.alloc(LOG_PAGE_SIZE);
  header.writeUInt32LE(o.type, 0);
  header.writeBigUInt64LE(BigInt(o.sector ?? 0), 8);
  header[STATUS_AT] = STATUS_NOT_WRITTEN;
  hdr.write(header);
  o.labels.add({ guestAddr: hdr.gpa, size: hdr.length }, `${what}: header and status byte`);
  const chain: Array<{ addr: number; len: number; flags: number }> = [{ addr: hdr.gpa, len: HEADER_LEN, flags: 0 }];
  const deviceWritten: GuestRange[] = [{ guestAddr: hdr.gpa + STATUS_AT, size: 1 }];
  const inBufs: GuestBuffer[] = [];
  if (o.type === RequestType.IN) {
    (o.segments ?? []).forEach((s, i) => {
      const b = placer.take(s.length, s.inPage ?? 0);
      b.write(Buffer.alloc(s.length, fill));
      o.labels.add({ guestAddr: b.gpa, size: b.length }, `${what}: data segment ${i} (${s.length} bytes)`);
      chain.push({ addr: b.gpa, len: s.length, flags: VIRTQ_DESC_F_WRITE });
      deviceWritten.push({ guestAddr: b.gpa, size: b.length });
      inBufs.push(b);
    });
  } else if (o.type === RequestType.OUT) {
    const b = placer.take(o.data!.length);
    b.write(o.data!);
    o.labels.add({ guestAddr: b.gpa, size: b.length }, `${what}: data (device-readable)`);
    chain.push({ addr: b.gpa, len: b.length, flags: 0 });
  } else if (o.type === RequestType.GET_ID) {
    const b = placer.take(20, 100);
    b.write(Buffer.alloc(20, fill));
    o.labels.add({ guestAddr: b.gpa, size: b.length }, `${what}: 20-byte id buffer`);
    chain.push({ addr: b.gpa, len: 20, flags: VIRTQ_DESC_F_WRITE });
    deviceWritten.push({ guestAddr: b.gpa, size: b.length });
    inBufs.push(b);
  } else if (o.type === RequestType.DISCARD) {
    const b = placer.take(16);
    b.write(encodeBlkRanges([{ sector: o.sector!, numSectors: o.numSectors! }]));
    o.labels.add({ guestAddr: b.gpa, size: b.length }, `${what}: range (device-readable)`);
    chain.push({ addr: b.gpa, len: 16, flags: 0 });
    // The header's sector is 0 for a discard; the range says where.
    header.writeBigUInt64LE(0n, 8);
    hdr.write(header);
  }
  chain.push({ addr: hdr.gpa + STATUS_AT, len: 1, flags: VIRTQ_DESC_F_WRITE });

  let descriptors: RawDescriptor[];
  if (o.indirect) {
    const table = placer.take(16 * chain.length);
    const t = Buffer.alloc(16 * chain.length);
    const dv = new DataView(t.buffer, t.byteOffset, t.length);
    const ring = c.hasFeature(Feature.RING_PACKED) ? c.packedRing(o.queue) : c.ring(o.queue);
    chain.forEach((d, i) => ring.writeIndirectEntry(dv, i, chain.length, d.addr, d.len, d.flags));
    table.write(t);
    o.labels.add({ guestAddr: table.gpa, size: table.length }, `${what}: indirect table`);
    descriptors = [{ addr: table.gpa, len: t.length, flags: VIRTQ_DESC_F_INDIRECT }];
  } else {
    descriptors = chain.map((d, i) => ({ ...d, flags: d.flags | (i < chain.length - 1 ? VIRTQ_DESC_F_NEXT : 0) }));
  }

  const check = (usedLen: number): void => {
    const status = hdr.read()[STATUS_AT];
    assert.equal(status, Status.OK, `${what}: status ${statusName(status)}, used len ${usedLen}`);
    if (o.type === RequestType.IN && o.data) {
      const got = Buffer.concat(inBufs.map((b) => b.read()));
      assert.ok(got.equals(o.data), `${what}: the data read is not what the disk holds`);
    }
    if (o.type === RequestType.GET_ID) {
      assert.ok(!inBufs[0].read().equals(Buffer.alloc(20, fill)), `${what}: the id buffer still holds its fill bytes`);
    }
  };
  return { queue: o.queue, what, descriptors, deviceWritten, check };
}
