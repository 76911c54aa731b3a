// Test data: deterministic byte patterns, and reading an image file behind the backend's back.
import assert from 'node:assert/strict';
import { closeSync, openSync, readSync } from 'node:fs';

/** Deterministic bytes: a different pattern for every seed. */
export function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

/** Reads `len` bytes of the image file at `offset`, bypassing the backend. */
export function readImage(path: string, offset: number, len: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(len);
    assert.equal(readSync(fd, b, 0, len, offset), len, `image file has ${len} bytes at ${offset}`);
    return b;
  } finally {
    closeSync(fd);
  }
}
