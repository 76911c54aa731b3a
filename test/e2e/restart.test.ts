// Restarting the daemon under a guest's verified write load, without the guest noticing (issue 5).
// QEMU's chardev reconnects (reconnect=1) and hands the new daemon the inflight region
// (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) it got from the first one; the new daemon resubmits what its
// predecessor left in flight. Phase 1: SIGKILL at random moments, three times. Phase 2: SIGTERM and start
// again (the live-upgrade path), with the guest-visible pause measured and printed. fio must finish with
// no verify error, the guest kernel must log no I/O error, and the image on the host must hold what the
// guest reads back. See test/e2e/README.md.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import { test } from 'node:test';

import { createSparseImage, guestMd5, runScenario, startVhostBlk, step, type DaemonHandle, type Guest } from './guest.js';

const MiB = 1024 * 1024;
const IMAGE_BYTES = 64 * MiB;
/** The two fio regions: one per phase, so each phase's data is verified on its own. */
const REGIONS = { kill: { offset: 8 * MiB, size: 16 * MiB }, term: { offset: 32 * MiB, size: 16 * MiB } } as const;
type Phase = keyof typeof REGIONS;
const KILLS = 3;
/** The most kills before giving up on finding requests in flight. */
const MAX_KILLS = 8;

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** The fio job of a phase: 4 KiB random writes at iodepth 16 over the region, then a crc32c verify of every block. */
function fioCommand(phase: Phase, extra = ''): string {
  const r = REGIONS[phase];
  return `fio --name=${phase} --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=16 ` +
    `--offset=${r.offset} --size=${r.size} --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=1 --norandommap=0${extra}`;
}

/**
 * Starts the phase's load in the background in the guest: fio runs back to back (write, then verify)
 * until /tmp/stop-<phase> exists; each run's output goes to /tmp/<phase>.<n>.log and "n rc" to /tmp/<phase>.runs.
 */
async function startLoad(guest: Guest, phase: Phase): Promise<void> {
  await guest.check([
    `rm -f /tmp/stop-${phase} /tmp/${phase}.*`,
    `cat > /tmp/${phase}.sh <<'EOF'`,
    'n=0',
    `while [ ! -f /tmp/stop-${phase} ]; do`,
    '  n=$((n+1))',
    `  ${fioCommand(phase)} > /tmp/${phase}.$n.log 2>&1`,
    '  rc=$?',
    `  echo "$n $rc" >> /tmp/${phase}.runs`,
    '  [ $rc -eq 0 ] || break',
    'done',
    `echo done > /tmp/${phase}.done`,
    'EOF',
    `sh /tmp/${phase}.sh </dev/null >/dev/null 2>&1 &`,
  ].join('\n'));
}

/** Stops the load after its current run and returns each run's output (throws if a run failed). */
async function stopLoad(guest: Guest, phase: Phase): Promise<string[]> {
  await guest.check(`touch /tmp/stop-${phase}`);
  const t0 = Date.now();
  while ((await guest.run(`[ -f /tmp/${phase}.done ]`)).status !== 0) {
    if (Date.now() - t0 > 300_000) throw new Error(`the ${phase} load did not finish within 300 s of the stop`);
    await sleep(1000);
  }
  const runs = (await guest.check(`cat /tmp/${phase}.runs`)).trim().split('\n').map((l) => l.trim().split(/\s+/).map(Number));
  const logs: string[] = [];
  for (const [n, rc] of runs) {
    const log = await guest.check(`cat /tmp/${phase}.${n}.log`, 60_000);
    if (rc !== 0) throw new Error(`fio run ${n} of the ${phase} phase failed (exit ${rc}):\n${log}`);
    logs.push(log);
  }
  return logs;
}

/** Waits until the load's first fio run is under way (its log shows the job started). */
async function waitForLoad(guest: Guest, phase: Phase): Promise<void> {
  const t0 = Date.now();
  while ((await guest.run(`grep -q "Starting\\|Jobs:" /tmp/${phase}.1.log 2>/dev/null || [ -f /tmp/${phase}.runs ]`)).status !== 0) {
    if (Date.now() - t0 > 60_000) throw new Error(`fio did not start within 60 s`);
    await sleep(500);
  }
}

/** Largest completion latency fio reports in `logs`, in ms. */
function maxClatMs(logs: string[]): number {
  const unit: Record<string, number> = { nsec: 1e-6, usec: 1e-3, msec: 1 };
  const suffix: Record<string, number> = { '': 1, k: 1e3, K: 1e3, m: 1e6, M: 1e6 };
  let max = 0;
  for (const log of logs) {
    for (const m of log.matchAll(/\bclat \((nsec|usec|msec)\): min=[^,]*, max=([\d.]+)([kKmM]?)/g)) {
      max = Math.max(max, Number(m[2]) * suffix[m[3]!]! * unit[m[1]!]!);
    }
  }
  return max;
}

/** Resolves when the daemon logs `re` (checked every 20 ms); returns the time it was seen. */
async function waitForLog(daemon: DaemonHandle, re: RegExp, timeoutMs: number, from = 0): Promise<number> {
  const t0 = Date.now();
  for (;;) {
    if (daemon.output.slice(from).some((l) => re.test(l))) return Date.now();
    if (daemon.proc.exitCode !== null || daemon.proc.signalCode !== null) throw new Error(`vhost-blk exited while waiting for ${re}\n${daemon.diagnostics()}`);
    if (Date.now() - t0 > timeoutMs) throw new Error(`vhost-blk did not log ${re} within ${timeoutMs} ms\n${daemon.diagnostics()}`);
    await sleep(20);
  }
}

async function hostMd5(image: string, offset: number, size: number): Promise<string> {
  const fh = await fsp.open(image, 'r');
  try {
    const buf = Buffer.alloc(size);
    await fh.read(buf, 0, size, offset);
    return createHash('md5').update(buf).digest('hex');
  } finally {
    await fh.close();
  }
}

/** The ring layouts the restart runs with: QEMU's default split ring, and packed=on. */
const LAYOUTS = [
  { name: 'split', deviceArgs: '', startedLog: /queue 0 started: split/ },
  { name: 'packed', deviceArgs: ',packed=on', startedLog: /queue 0 started: packed/ },
] as const;

for (const layout of LAYOUTS) test(`${layout.name} ring: restart under a verified write load: SIGKILL at random moments, then a clean SIGTERM restart`, {
  timeout: 420_000,
}, () =>
  runScenario(`restart-${layout.name}`, ['qemu-system-x86_64', 'busybox', 'cpio', 'fio', 'ldd'], async (s) => {
    const image = s.path('disk.img');
    const socket = s.path('vhost-user-blk.sock');
    await createSparseImage(image, IMAGE_BYTES);
    // The same command line every time, as a service manager would restart it. The guest under TCG is
    // far slower than the daemon, which would hold its requests for microseconds only: a 3 ms delay on
    // every request keeps the ring's requests in the daemon's hands, so a kill finds them in flight.
    const args = ['--socket', socket, '--image', image, '--inject-faults', 'delay=3ms', '--log-level', 'debug'];
    const start = () => s.track(startVhostBlk(args));
    let daemon: DaemonHandle;

    daemon = await step('start vhost-blk', start);
    const g = await step('boot', () => s.boot({ socket, extraChardevArgs: ',reconnect=1', extraDeviceArgs: layout.deviceArgs }));
    await step('daemon serves the ring', () => waitForLog(daemon, /vring 0 started/, 10_000));
    assert.ok(daemon.output.some((l) => layout.startedLog.test(l)), `the daemon serves a ${layout.name} ring`);

    // Phase 1: SIGKILL at random moments under load.
    await step('start the SIGKILL-phase load', () => startLoad(g, 'kill'));
    await step('load running', () => waitForLoad(g, 'kill'));
    let resubmitted = 0;
    // A kill can land while the guest holds every request (TCG guests are slow): keep killing, up to
    // MAX_KILLS, until one has found requests in flight, so the tracking is really exercised.
    for (let k = 1; k <= KILLS || (resubmitted === 0 && k <= MAX_KILLS); k++) {
      await sleep(1000 + Math.floor(Math.random() * 3000));
      const d = daemon;
      const t0 = Date.now();
      d.proc.kill('SIGKILL');
      await d.exited;
      // The socket file stays behind: the new daemon must replace it.
      daemon = await step(`restart after SIGKILL #${k}`, start);
      const t1 = await step(`ring served again after SIGKILL #${k}`, () => waitForLog(daemon, /vring 0 started/, 30_000));
      const found = daemon.output.map((l) => /(\d+) requests left in flight to resubmit/.exec(l)).find((m) => m);
      const n = found ? Number(found[1]) : 0;
      resubmitted += n;
      console.log(`# ${layout.name}: SIGKILL #${k}: ring served again ${t1 - t0} ms later; ${n} requests resubmitted from the inflight region`);
      assert.doesNotMatch(daemon.output.join('\n'), /refused SET_INFLIGHT_FD|cannot start/, 'the new daemon took the inflight region');
    }
    const killLogs = await step('finish the SIGKILL-phase load', () => stopLoad(g, 'kill'));
    console.log(`# ${layout.name}: SIGKILL phase: ${killLogs.length} verified fio runs, ${resubmitted} requests resubmitted in all, max completion latency ${maxClatMs(killLogs).toFixed(1)} ms`);
    // With 16 requests always in flight a kill that finds none means the tracking did not work.
    assert.ok(resubmitted > 0, 'at least one kill left requests in flight that the next daemon resubmitted');
    await step('verify-only pass (SIGKILL phase)', () => g.check(fioCommand('kill', ' --verify_only'), 300_000));

    // Phase 2: clean restart (SIGTERM, start again): the live-upgrade path.
    await step('start the SIGTERM-phase load', () => startLoad(g, 'term'));
    await step('load running', () => waitForLoad(g, 'term'));
    await sleep(2000);
    const d = daemon;
    const t0 = Date.now();
    const code = await step('SIGTERM the daemon', () => d.stop('SIGTERM', 20_000));
    const tExit = Date.now();
    assert.equal(code, 0, `vhost-blk exit code after SIGTERM\n${d.diagnostics()}`);
    daemon = await step('restart after SIGTERM', start);
    const tListen = Date.now();
    const tServed = await step('ring served again after SIGTERM', () => waitForLog(daemon, /vring 0 started/, 30_000));
    await sleep(3000);
    const termLogs = await step('finish the SIGTERM-phase load', () => stopLoad(g, 'term'));
    const pauseMs = maxClatMs(termLogs);
    console.log(`# ${layout.name}: SIGTERM restart: old daemon exited ${tExit - t0} ms after SIGTERM, new one listening at ${tListen - t0} ms, ` +
      `ring served again at ${tServed - t0} ms (QEMU reconnects once a second); guest-visible pause (max fio completion latency) ${pauseMs.toFixed(1)} ms`);
    assert.ok(pauseMs > 0, 'fio reported completion latencies');
    await step('verify-only pass (SIGTERM phase)', () => g.check(fioCommand('term', ' --verify_only'), 300_000));

    // The guest kernel saw no I/O error through any of it.
    const errors = await g.run(`dmesg | grep -iE "i/o error|blk_update_request|buffer i/o|hung_task|virtio_blk.*(error|fail)" | sed 's/^/K: /'`);
    assert.equal(errors.output.trim(), '', 'guest kernel log has no I/O error');

    // What the guest reads back (verified by fio just now) is what the image on the host holds.
    for (const phase of ['kill', 'term'] as const) {
      const r = REGIONS[phase];
      const inGuest = await step(`md5 in the guest (${phase})`, () => guestMd5(g, '/dev/vda', r.offset, r.size, 120_000));
      assert.equal(await hostMd5(image, r.offset, r.size), inGuest, `${phase} region: host image matches what the guest reads`);
    }
    assert.equal(await step('power off', () => g.poweroff()), 0, 'QEMU exit code after poweroff');
    assert.equal(await step('SIGTERM vhost-blk', () => daemon.stop('SIGTERM', 15_000)), 0);
  }));
