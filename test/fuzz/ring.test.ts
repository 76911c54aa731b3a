/**
 * CI run of the ring / request-processor fuzzer (test/fuzz/ring-fuzz.ts): a bounded number of random
 * cases per run; `npm run fuzz` runs many more. A failure prints fast-check's seed and path to replay it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ringProperty, ringStats } from './ring-fuzz.js';

test('ring + request processor: random guest rings and requests never break the invariants', () => {
  const before = { ...ringStats };
  fc.assert(ringProperty(), { numRuns: 2500 });
  // The cases must reach the paths that matter, or the generators drifted into rejecting everything early.
  for (const k of ['backendOps', 'ok', 'ioerr', 'unsupp', 'badChains', 'broken'] as const) {
    assert.ok(ringStats[k] - before[k] > 20, `only ${ringStats[k] - before[k]} ${k} in 2500 cases`);
  }
});
