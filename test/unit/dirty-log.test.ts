/**
 * The migration dirty log (src/memory/dirty-log.ts) and its use through GuestMemory: which bits a write
 * sets, QEMU's sizing, and that no mark ever lands outside the bitmap.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DirtyLog, dirtyLogBytes, DIRTY_LOG_PAGE } from '../../src/memory/dirty-log.js';
import { GuestMemory } from '../../src/memory/guest-memory.js';

/** Page numbers whose bit is set. */
function pagesSet(bits: Uint8Array): number[] {
  const out: number[] = [];
  for (let i = 0; i < bits.length * 8; i++) if (bits[i >> 3] & (1 << (i & 7))) out.push(i);
  return out;
}

test('dirtyLogBytes sizes the bitmap as QEMU does: whole u64 words, one bit per 4 KiB page', () => {
  assert.equal(dirtyLogBytes(0), 0);
  assert.equal(dirtyLogBytes(1), 8);
  assert.equal(dirtyLogBytes(64 * DIRTY_LOG_PAGE), 8);
  assert.equal(dirtyLogBytes(64 * DIRTY_LOG_PAGE + 1), 16);
  assert.equal(dirtyLogBytes(2 ** 30), 2 ** 30 / DIRTY_LOG_PAGE / 8);
});

test('a write marks exactly the pages it touches, across page and byte boundaries', () => {
  const bits = new Uint8Array(8);
  const log = new DirtyLog(bits);
  log.mark(0, 1);
  log.mark(DIRTY_LOG_PAGE * 3 - 1, 2); // pages 2 and 3
  log.mark(DIRTY_LOG_PAGE * 7 + 100, DIRTY_LOG_PAGE * 10); // pages 7..17: crosses two bitmap bytes, one whole
  log.mark(DIRTY_LOG_PAGE * 40, 0); // nothing
  assert.deepEqual(pagesSet(bits), [0, 2, 3, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]);
  assert.ok(log.isDirty(DIRTY_LOG_PAGE * 17 + 5));
  assert.ok(!log.isDirty(DIRTY_LOG_PAGE * 18));
  assert.equal(log.missed, 0);
});

test('marks keep bits the front-end set and leave cleared ones cleared elsewhere', () => {
  const bits = new Uint8Array(8);
  bits[1] = 0b1000_0001; // pages 8 and 15, set by someone else
  const log = new DirtyLog(bits);
  log.mark(DIRTY_LOG_PAGE * 9, 1);
  assert.deepEqual(pagesSet(bits), [8, 9, 15]);
});

test('a mark past the end of the bitmap never writes outside it, and is counted', () => {
  const backing = new Uint8Array(16).fill(0);
  const bits = backing.subarray(0, 8); // 64 pages; the next 8 bytes stand for whatever follows the mapping
  const log = new DirtyLog(bits);
  assert.equal(log.coveredBytes, 64 * DIRTY_LOG_PAGE);
  log.mark(DIRTY_LOG_PAGE * 62, DIRTY_LOG_PAGE * 10);
  log.mark(DIRTY_LOG_PAGE * 1000, 1);
  assert.deepEqual(pagesSet(bits), [62, 63]);
  assert.deepEqual([...backing.subarray(8)], new Array(8).fill(0));
  assert.equal(log.missed, 2);
});

test('GuestMemory.write and writeU8 mark their pages while a log is set, and nothing without one', () => {
  const buf = new ArrayBuffer(0x10000);
  const mem = new GuestMemory([{ guestAddr: 0x100000, size: 0x10000, userAddr: 0, mmapOffset: 0, hostAddr: 0, bytes: new Uint8Array(buf) }]);
  const bits = new Uint8Array(dirtyLogBytes(0x110000));
  assert.ok(mem.write(0x100010, new Uint8Array([1, 2, 3])));
  assert.deepEqual(pagesSet(bits), []);
  mem.dirtyLog = new DirtyLog(bits);
  assert.ok(mem.write(0x101ffe, new Uint8Array([1, 2, 3]))); // pages 0x101 and 0x102
  assert.ok(mem.writeU8(0x10f000, 7));
  assert.ok(!mem.writeU8(0x200000, 7)); // outside guest memory: refused, not marked
  assert.deepEqual(pagesSet(bits), [0x101, 0x102, 0x10f]);
});
