/**
 * CI run of the live-daemon fuzzer (test/fuzz/daemon-fuzz.ts): one `vhost-blk serve --backend null`, a
 * bounded number of random connections; `npm run fuzz -- --target daemon` runs many more.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { checkDaemon, daemonStats } from './daemon-fuzz.js';

test('live daemon: random message sequences are answered, refused or closed; the daemon keeps serving', { timeout: 120_000 }, async () => {
  const before = { ...daemonStats };
  const details = await checkDaemon({ numRuns: 80 });
  assert.ok(!details.failed, fc.defaultReportMessage(details) ?? 'failed');
  assert.equal(details.numRuns, 80);
  assert.ok(daemonStats.probeAnswered - before.probeAnswered > 5 && daemonStats.closed - before.closed > 5, `outcomes: ${JSON.stringify(daemonStats)}`);
});
