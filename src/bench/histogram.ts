/**
 * A fixed-size log-linear latency histogram (HdrHistogram-like): values in nanoseconds, 64 sub-buckets
 * per power of two, so every recorded value is known to within 1/64 (1.6 %). Recording is a few integer
 * operations on a preallocated Uint32Array: nothing is allocated in the hot path.
 */

/** Sub-buckets per power of two (2^SUB_BITS). */
const SUB_BITS = 6;
const SUB = 1 << SUB_BITS;
/** Values below 2*SUB ns get one bucket each. */
const LINEAR = 2 * SUB;
/** Largest value kept (about 2.1 s); larger ones land in the last bucket. */
const MAX_VALUE = 0x7fffffff;
/** Number of buckets: the linear part plus SUB per octave from 2^(SUB_BITS+1) to 2^31. */
export const HISTOGRAM_BUCKETS = LINEAR + (31 - (SUB_BITS + 1)) * SUB;

/** Bucket index of a latency of `ns` nanoseconds. */
export function bucketOf(ns: number): number {
  let v = ns | 0;
  if (ns >= MAX_VALUE) v = MAX_VALUE;
  if (v < LINEAR) return v < 0 ? 0 : v;
  const e = 31 - Math.clz32(v); // >= SUB_BITS + 1
  const m = (v >>> (e - SUB_BITS)) & (SUB - 1);
  return LINEAR + (e - SUB_BITS - 1) * SUB + m;
}

/** Lowest value (ns) that falls into bucket `b`. */
export function bucketLow(b: number): number {
  if (b < LINEAR) return b;
  const k = b - LINEAR;
  const e = Math.floor(k / SUB) + SUB_BITS + 1;
  const m = k % SUB;
  return (SUB + m) * 2 ** (e - SUB_BITS);
}

/** Middle of bucket `b` in ns: what a percentile falling into it reports. */
export function bucketMid(b: number): number {
  if (b < LINEAR) return b;
  return (bucketLow(b) + bucketLow(b + 1)) / 2;
}

/** Adds `src` into `dst` bucket by bucket. */
export function mergeInto(dst: Uint32Array | Float64Array, src: ArrayLike<number>): void {
  for (let i = 0; i < dst.length; i++) dst[i] += src[i];
}

/** Latency summary in microseconds. */
export interface LatencySummary {
  count: number;
  meanUs: number;
  p50Us: number;
  p99Us: number;
  p999Us: number;
  maxUs: number;
}

/** Percentiles of histogram `h` (counts per bucket), in µs; `sumNs` gives the exact mean. */
export function summarize(h: ArrayLike<number>, sumNs: number): LatencySummary {
  let count = 0;
  for (let i = 0; i < h.length; i++) count += h[i];
  const at = (q: number): number => {
    if (count === 0) return NaN;
    const rank = Math.max(1, Math.ceil(q * count));
    let seen = 0;
    for (let i = 0; i < h.length; i++) {
      seen += h[i];
      if (seen >= rank) return bucketMid(i) / 1000;
    }
    return bucketMid(h.length - 1) / 1000;
  };
  let max = NaN;
  for (let i = h.length - 1; i >= 0; i--) if (h[i] > 0) { max = bucketLow(i + 1) / 1000; break; }
  return { count, meanUs: count ? sumNs / count / 1000 : NaN, p50Us: at(0.5), p99Us: at(0.99), p999Us: at(0.999), maxUs: max };
}
