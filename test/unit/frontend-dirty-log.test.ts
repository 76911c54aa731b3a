// The front-end's dirty log: QEMU's sizing, bit layout, reading and clearing, snapshot diffs, and the
// SET_LOG_BASE reply rule. The protocol side runs against real back-ends in test/conformance/suite.ts.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { DirtyLog } from '../../src/memory/dirty-log.js';
import { fstatSync } from 'node:fs';
import {
  DirtyLogArea, dirtyLogBytes, logPage, isPageDirty, dirtyPagesOf, changedPages, logBaseReplyAccepted,
  LOG_PAGE_SIZE, LOG_CHUNK_BYTES, type MemorySnapshot,
} from '../../src/frontend/index.js';
import { mmap, munmap, view, MAP_SHARED, PROT_READ, PROT_WRITE } from '../../src/os/libc.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

describe('dirty log sizing (as QEMU: whole u64 words up to the last guest byte)', () => {
  test('one word covers 64 pages: sizes at and around the word boundaries', () => {
    assert.equal(LOG_CHUNK_BYTES, 64 * 4096);
    assert.equal(dirtyLogBytes([{ guestAddr: 0, size: 1 }]), 8);
    assert.equal(dirtyLogBytes([{ guestAddr: 0, size: LOG_CHUNK_BYTES }]), 8, 'exactly one chunk');
    assert.equal(dirtyLogBytes([{ guestAddr: 0, size: LOG_CHUNK_BYTES + 1 }]), 16, 'one byte into the second chunk');
    assert.equal(dirtyLogBytes([{ guestAddr: LOG_CHUNK_BYTES - 1, size: 1 }]), 8, 'last byte of the first chunk');
    assert.equal(dirtyLogBytes([{ guestAddr: 0, size: 64 * MiB }]), 2048, '64 MiB = 16384 pages = 2048 bytes');
  });

  test('the highest region decides, in any order; memory above 4 GiB and holes are covered from address 0', () => {
    const low = { guestAddr: 0, size: 3 * GiB };
    const high = { guestAddr: 4 * GiB, size: 1 * GiB };
    const want = (5 * GiB / LOG_CHUNK_BYTES) * 8;
    assert.equal(dirtyLogBytes([low, high]), want);
    assert.equal(dirtyLogBytes([high, low]), want);
    assert.equal(dirtyLogBytes([{ guestAddr: 4 * GiB + 4096, size: 4096 }]), (Math.floor((4 * GiB + 8191) / LOG_CHUNK_BYTES) + 1) * 8);
  });

  test('no regions or bad ranges are refused', () => {
    assert.throws(() => dirtyLogBytes([]), RangeError);
    assert.throws(() => dirtyLogBytes([{ guestAddr: 0, size: 0 }]), RangeError);
    assert.throws(() => dirtyLogBytes([{ guestAddr: -4096, size: 4096 }]), RangeError);
    assert.throws(() => dirtyLogBytes([{ guestAddr: 0.5, size: 4096 }]), RangeError);
  });
});

/** Marks [gpa, gpa+len) as the daemon's data plane does (src/memory/dirty-log.ts), so these bit-layout checks hold it to the bitmap the front-end reads. */
function mark(log: Uint8Array, gpa: number, len: number): void {
  new DirtyLog(log).mark(gpa, len);
}

describe('dirty log bits', () => {
  test('page p is bit p % 8 of byte p / 8', () => {
    const log = new Uint8Array(8);
    mark(log, 0, 1);
    assert.deepEqual([...log], [1, 0, 0, 0, 0, 0, 0, 0]);
    mark(log, 9 * 4096 + 123, 1); // page 9: byte 1, bit 1
    assert.equal(log[1], 0b10);
    mark(log, 63 * 4096, 4096); // page 63: byte 7, bit 7
    assert.equal(log[7], 0x80);
    assert.deepEqual(dirtyPagesOf(log), [0, 9, 63]);
    assert.ok(isPageDirty(log, 9) && !isPageDirty(log, 8) && !isPageDirty(log, 64), 'isPageDirty, and false past the end');
  });

  test('a range marks every page it touches, and only those; empty ranges mark nothing', () => {
    const log = new Uint8Array(16);
    mark(log, 4095, 2); // last byte of page 0, first of page 1
    mark(log, 10 * 4096, 3 * 4096); // pages 10..12 exactly
    mark(log, 20 * 4096 + 1, 0);
    assert.deepEqual(dirtyPagesOf(log), [0, 1, 10, 11, 12]);
  });

  test('matches a page-by-page reference on many ranges', () => {
    const pagesCovered = 256;
    const log = new Uint8Array(pagesCovered / 8);
    const expected = new Set<number>();
    let x = 12345;
    const rnd = (n: number) => { x = (x * 1103515245 + 12345) >>> 0; return x % n; };
    for (let i = 0; i < 60; i++) {
      const gpa = rnd((pagesCovered - 8) * 4096);
      const len = 1 + rnd(5 * 4096);
      mark(log, gpa, len);
      for (let a = gpa; a < gpa + len; a++) expected.add(logPage(a));
    }
    assert.deepEqual(dirtyPagesOf(log), [...expected].sort((a, b) => a - b));
  });

  test('a range past the end of the log marks what the log covers and is counted as missed', () => {
    const log = new Uint8Array(8);
    const d = new DirtyLog(log);
    d.mark(64 * 4096, 1);
    d.mark(63 * 4096, 4097);
    assert.deepEqual(dirtyPagesOf(log), [63]);
    assert.equal(d.missed, 2);
  });
});

describe('SET_LOG_BASE replies', () => {
  const u64 = (v: bigint) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(v); return b; };
  test('accepted: no payload (DPDK), 0, or the mmap size sent back (libvhost-user)', () => {
    assert.deepEqual(logBaseReplyAccepted(Buffer.alloc(0), 2048), { accepted: true, value: null });
    assert.deepEqual(logBaseReplyAccepted(u64(0n), 2048), { accepted: true, value: 0n });
    assert.deepEqual(logBaseReplyAccepted(u64(2048n), 2048), { accepted: true, value: 2048n });
  });
  test('refused: any other value, or a payload that is not a u64', () => {
    assert.deepEqual(logBaseReplyAccepted(u64(1n), 2048), { accepted: false, value: 1n });
    assert.deepEqual(logBaseReplyAccepted(u64(2056n), 2048), { accepted: false, value: 2056n });
    assert.equal(logBaseReplyAccepted(Buffer.alloc(4), 2048).accepted, false);
  });
});

describe('memory snapshots', () => {
  test('changedPages names guest pages (not offsets) of every region that differs', () => {
    const a0 = Buffer.alloc(4 * 4096);
    const a1 = Buffer.alloc(2 * 4096);
    const before: MemorySnapshot = { regions: [{ guestAddr: 0, bytes: a0 }, { guestAddr: 4 * GiB, bytes: a1 }] };
    const b0 = Buffer.from(a0);
    const b1 = Buffer.from(a1);
    b0[4095] = 1; // page 0, last byte
    b0[3 * 4096] = 1; // page 3, first byte
    b1[4096 + 7] = 9; // second page of the high region
    const after: MemorySnapshot = { regions: [{ guestAddr: 0, bytes: b0 }, { guestAddr: 4 * GiB, bytes: b1 }] };
    assert.deepEqual(changedPages(before, after), [0, 3, 4 * GiB / 4096 + 1]);
    assert.deepEqual(changedPages(before, before), []);
  });
  test('snapshots of different layouts are refused', () => {
    const s: MemorySnapshot = { regions: [{ guestAddr: 0, bytes: Buffer.alloc(4096) }] };
    assert.throws(() => changedPages(s, { regions: [{ guestAddr: 4096, bytes: Buffer.alloc(4096) }] }), /differ in layout/);
  });
});

describe('DirtyLogArea (a shared memfd)', () => {
  test('a second mapping of its fd (what the back-end maps) writes bits the log reads; takePages clears them', () => {
    const log = DirtyLogArea.create(16);
    try {
      assert.equal(fstatSync(log.fd).size, 16, 'memfd size = mmap_size');
      assert.equal(log.coveredBytes, 128 * LOG_PAGE_SIZE);
      const addr = mmap(16, PROT_READ | PROT_WRITE, MAP_SHARED, log.fd, 0);
      try {
        const theirs = new Uint8Array(view(addr, 16));
        theirs[0] |= 0b101; // pages 0 and 2
        theirs[15] |= 0x80; // page 127
        assert.deepEqual(log.pages(), [0, 2, 127]);
        assert.deepEqual(log.pages(), [0, 2, 127], 'pages() only reads');
        assert.deepEqual(log.takePages(), [0, 2, 127]);
        assert.deepEqual([...theirs], new Array(16).fill(0), 'the other mapping sees the log cleared');
        assert.equal(log.addPages([5, 64, 128, 1000]), 2, 'pages past the end are counted, not set');
        assert.equal(theirs[0], 1 << 5);
        assert.equal(theirs[8], 1);
        log.clear();
        assert.deepEqual(log.pages(), []);
      } finally {
        munmap(addr, 16);
      }
    } finally {
      log.close();
      log.close();
    }
    assert.throws(() => log.pages(), /closed/);
  });

  test('sizes that are not positive multiples of 8 are refused', () => {
    for (const n of [0, 4, 12, -8]) assert.throws(() => DirtyLogArea.create(n), RangeError, `size ${n}`);
  });
});
