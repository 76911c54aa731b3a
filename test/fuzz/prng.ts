/**
 * A small seeded PRNG for the fuzzers: fast-check chooses the structure of a case (and shrinks it), this
 * fills the bulk bytes and placements of that structure from one seed, so a case replays exactly.
 */

/** xorshift32: fast, deterministic, good enough to scatter buffers and fill memory. */
export class Prng {
  private state: number;

  /** Any integer seed; 0 is remapped (xorshift must not start at 0). */
  constructor(seed: number) {
    this.state = (seed ^ 0x9e3779b9) >>> 0 || 1;
  }

  /** Next 32-bit unsigned value. */
  u32(): number {
    let x = this.state;
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    this.state = x;
    return x;
  }

  /** Integer in [0, n) (0 when n <= 0). */
  below(n: number): number {
    return n <= 0 ? 0 : this.u32() % n;
  }

  /** True with probability `p`. */
  chance(p: number): boolean {
    return this.u32() / 4294967296 < p;
  }

  /** Fills `bytes` with pseudo-random values. */
  fill(bytes: Uint8Array): void {
    for (let i = 0; i < bytes.length; i++) bytes[i] = this.u32() & 0xff;
  }
}
