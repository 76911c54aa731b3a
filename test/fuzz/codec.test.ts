/**
 * CI run of the vhost-user codec fuzzer (test/fuzz/codec-fuzz.ts): a bounded number of random cases per
 * run; `npm run fuzz` runs many more. A failure prints fast-check's seed and path to replay it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { codecProperty, codecStats } from './codec-fuzz.js';

test('vhost-user codec: every decoder returns the raw fields or throws ProtocolError, as its rules say', () => {
  const before = { ...codecStats };
  fc.assert(codecProperty(), { numRuns: 20_000 });
  // Both outcomes must have been reached, or the generators drifted away from the interesting inputs.
  assert.ok(codecStats.accepted - before.accepted > 1000, `only ${codecStats.accepted - before.accepted} inputs were accepted`);
  assert.ok(codecStats.refused - before.refused > 1000, `only ${codecStats.refused - before.refused} inputs were refused`);
});
