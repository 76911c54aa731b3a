// io_uring driven from TypeScript: real syscalls on real files, no mocks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, openSync, readFileSync, rmSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { IoUring, IORING_OP_NOP, IORING_OP_WRITEV, IORING_OP_READV, IORING_OP_FSYNC, IORING_OP_READ, IORING_FSYNC_DATASYNC } from '../../src/os/uring.js';
import { allocNative, eventfd, eventfdSignal, closeFd } from '../../src/os/libc.js';

function collect(ring: IoUring, want: number): Map<number, number> {
  const results = new Map<number, number>();
  while (results.size < want) {
    ring.enter(1);
    ring.reap((ud, res) => results.set(ud, res));
  }
  return results;
}

test('writev, fdatasync and readv through io_uring move bytes between native memory and a file', () => {
  const dir = mkdtempSync(join(tmpdir(), 'uring-'));
  const ring = new IoUring(8);
  try {
    const path = join(dir, 'f');
    const fd = openSync(path, 'w+');
    const mem = allocNative(8192);
    const bytes = new Uint8Array(mem.buffer);
    for (let i = 0; i < 4096; i++) bytes[4096 + i] = (i * 7) & 0xff;
    // Two iovecs: [4096, +1000) and [5096, +3096), as a scattered guest buffer would be.
    const iov32 = new Uint32Array(mem.buffer, 0, 8);
    iov32[0] = (mem.addr + 4096) % 2 ** 32; iov32[1] = Math.floor((mem.addr + 4096) / 2 ** 32); iov32[2] = 1000; iov32[3] = 0;
    iov32[4] = (mem.addr + 5096) % 2 ** 32; iov32[5] = Math.floor((mem.addr + 5096) / 2 ** 32); iov32[6] = 3096; iov32[7] = 0;
    ring.prep(IORING_OP_WRITEV, fd, mem.addr, 2, 512, 0, 1);
    ring.prep(IORING_OP_FSYNC, fd, 0, 0, 0, IORING_FSYNC_DATASYNC, 2);
    // The fsync is not linked, so wait for the write first to assert its result on its own.
    const r1 = collect(ring, 2);
    assert.equal(r1.get(1), 4096);
    assert.equal(r1.get(2), 0);
    const onDisk = readFileSync(path);
    assert.equal(onDisk.length, 512 + 4096);
    assert.deepEqual(onDisk.subarray(512), Buffer.from(bytes.subarray(4096, 8192)));
    bytes.fill(0, 4096);
    ring.prep(IORING_OP_READV, fd, mem.addr, 2, 512, 0, 3);
    assert.equal(collect(ring, 1).get(3), 4096);
    assert.deepEqual(Buffer.from(bytes.subarray(4096, 8192)), onDisk.subarray(512));
    closeSync(fd);
  } finally {
    ring.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a READ on an eventfd completes when the eventfd is signalled (the kick path)', () => {
  const ring = new IoUring(4);
  const efd = eventfd(0);
  const mem = allocNative(4096);
  try {
    ring.prep(IORING_OP_READ, efd, mem.addr, 8, 0, 0, 77);
    ring.submit();
    let seen = 0;
    ring.reap(() => seen++);
    assert.equal(seen, 0, 'nothing completes before the signal');
    eventfdSignal(efd);
    eventfdSignal(efd);
    const r = collect(ring, 1);
    assert.equal(r.get(77), 8);
    assert.equal(new BigUint64Array(mem.buffer, 0, 1)[0], 2n);
  } finally {
    ring.close();
    closeFd(efd);
  }
});

test('errors come back as negative errno results, not exceptions', () => {
  const ring = new IoUring(4);
  try {
    ring.prep(IORING_OP_READ, 987654, 0, 8, 0, 0, 5);
    assert.equal(collect(ring, 1).get(5), -9 /* EBADF */);
  } finally {
    ring.close();
  }
});

test('queuing more SQEs than the SQ holds submits as it goes and loses none', () => {
  const ring = new IoUring(4);
  try {
    const total = ring.sqEntries * 3 + 1;
    // NOPs: each completes with 0; every user_data must come back exactly once.
    for (let i = 0; i < total; i++) ring.prep(IORING_OP_NOP, -1, 0, 0, 0, 0, 1000 + i);
    const seen = new Map<number, number>();
    while (seen.size < total) {
      ring.enter(1);
      ring.reap((ud, res) => {
        assert.equal(seen.has(ud), false, `user_data ${ud} completed twice`);
        seen.set(ud, res);
      });
    }
    for (let i = 0; i < total; i++) assert.equal(seen.get(1000 + i), 0, `NOP ${i} completed with 0`);
  } finally {
    ring.close();
  }
});
