// Live migration with the disk on two backends that share one image (issue 11): backend A serves the
// source QEMU, backend B the destination, then the guest migrates back to a new QEMU on A. The guest keeps
// writing verified data and reading known data through the page cache all along; it checks on the
// destination what the backend wrote into its RAM during the migration. Runs against qemu-storage-daemon
// (the reference), our daemon with split and with packed rings, and a negative run whose source daemon
// leaves the data of read requests out of the dirty log (VHOST_BLK_TEST_UNLOGGED_READS=1): its guest must
// see stale data. The migration figures of every run are printed side by side at the end.
// The scenario itself is runMigrationScenario() in migration.ts. See test/e2e/README.md.

import assert from 'node:assert/strict';
import { after, test } from 'node:test';

import { runScenario } from './guest.js';
import { figuresTable, MIGRATION_DEFAULTS, MIGRATION_TOOLS, runMigrationScenario, type LegResult, type MigrationOptions, type MigrationResult } from './migration.js';

const runs: Array<{ name: string; result: MigrationResult }> = [];
const log = (line: string) => console.log(line);

function describeLeg(l: LegResult): string {
  return `leg ${l.leg} (backend ${l.from} -> ${l.to}): ${l.verdict.line}${l.verdict.details ? `\n${l.verdict.details}` : ''}`;
}

/** Everything a good migration leg must show. */
function assertLegPassed(l: LegResult): void {
  const what = describeLeg(l);
  assert.equal(l.figures.ram.differingPages, 0, `the destination's RAM is the source's: ${l.figures.ram.summary}\n${what}`);
  assert.ok(l.verdict.pass, `the guest's checks pass on the destination: ${what}`);
  assert.ok(l.verdict.rechecksFromCache > 0 && l.verdict.fioRuns > 0, `the guest re-checked from its page cache and ran fio: ${what}`);
  assert.equal(l.ioErrors, '', `the guest kernel logged no I/O error (${what})`);
  assert.equal(l.written.host, l.written.guest, `the image holds what the guest wrote and reads back (${what})`);
  assert.ok(l.knownIntact, `the known regions of the image are unchanged (${what})`);
  // The strongest check: at switchover the destination's RAM is the source's, page for page.
  assert.equal(l.figures.ram.diskDataPages, 0, `no page a backend wrote is stale on the destination: ${l.figures.ram.summary} (${what})`);
  assert.equal(l.figures.ram.differingPages, 0, `the destination's RAM is the source's at switchover (QEMU TCG lost CPU-written pages in ` +
    `${l.lostCpuPages.length} earlier attempt(s) of this leg, and in this one too: ${l.figures.ram.summary}) (${what})`);
  // The bandwidth limit keeps the migration going while the guest works: the first pass over RAM and at
  // least one more round of dirty pages (dirty-sync-count counts the bitmap syncs, the first one at the start).
  assert.ok(l.figures.dirtySyncCount >= 3, `several dirty-sync rounds during the guest's I/O (${l.figures.dirtySyncCount}): ${what}`);
}

const CASES: Array<{ name: string; opts: MigrationOptions }> = [
  { name: 'qemu-storage-daemon (split)', opts: { backend: 'qemu-storage-daemon' } },
  { name: 'vhost-blk (split)', opts: { backend: 'vhost-blk' } },
  { name: 'vhost-blk (packed=on)', opts: { backend: 'vhost-blk', packed: true } },
];

for (const c of CASES) {
  test(`${c.name}: live migration A -> B -> A under verified writes and page-cache reads`, { timeout: 600_000 }, () =>
    runScenario(`migrate-${c.opts.backend}${c.opts.packed ? '-packed' : ''}`, MIGRATION_TOOLS, async (s) => {
      const result = await runMigrationScenario(s, { ...c.opts, log: (l) => log(`${c.name}: ${l}`) });
      runs.push({ name: c.name, result });
      assert.equal(result.legs.length, 2, `both legs ran:\n${result.legs.map(describeLeg).join('\n')}`);
      for (const l of result.legs) assertLegPassed(l);
    }));
}

test('negative: a source daemon that does not log the pages its reads write (VHOST_BLK_TEST_UNLOGGED_READS=1): the destination gets stale pages of disk data', { timeout: 600_000 }, () =>
  runScenario('migrate-unlogged', MIGRATION_TOOLS, async (s) => {
    const result = await runMigrationScenario(s, {
      backend: 'vhost-blk',
      legs: 1,
      stopAtSwitchover: true,
      sourceEnv: { VHOST_BLK_TEST_UNLOGGED_READS: '1' },
      log: (l) => log(`unlogged reads: ${l}`),
    });
    runs.push({ name: 'vhost-blk, unlogged reads (negative)', result });
    const l = result.legs[0]!;
    // The RAM comparison at switchover is the check that must see it: pages holding disk data that the
    // backend wrote and did not log are stale on the destination.
    assert.ok(l.figures.ram.diskDataPages > 0, `the RAM comparison must find stale pages holding disk data: ${l.figures.ram.summary}; ${describeLeg(l)}`);
    log(`unlogged reads: ${l.figures.ram.diskDataPages} stale page(s) with disk data found, as expected (${l.figures.ram.summary})`);
  }));

after(() => {
  if (runs.length === 0) return;
  const d = MIGRATION_DEFAULTS;
  log(`migration figures (the source QEMU's query-migrate; ${d.memoryMiB} MiB guest under TCG, max-bandwidth ` +
    `${d.maxBandwidth / 1024 / 1024} MiB/s, downtime-limit ${d.downtimeLimitMs} ms):\n${figuresTable(runs)}`);
});
