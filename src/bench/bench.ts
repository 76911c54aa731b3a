/**
 * `vhost-blk bench`: this daemon (file and null backends), qemu-storage-daemon and the bare image file
 * side by side, on the same workloads, in one run. See bench/README.md.
 */
import { parseArgs } from 'node:util';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, statSync, writeFileSync } from 'node:fs';
import { availableParallelism, cpus, release } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { RW_MODES, type PollChoice, type RwMode } from './protocol.js';
import { formatRatioTable, formatRatios, formatTable, ratiosOf, renderSvg, workloadLabel, type WorkloadReport } from './report.js';
import { effectivePoll, queueSizeFor, runTarget, type RunSettings, type WorkloadSpec } from './run.js';
import { CLK_TCK, systemBusyTicks } from './procstat.js';
import { EXTRA_TARGETS, REPO_ROOT, TARGET_DESCRIPTIONS, TARGETS, type TargetName } from './targets.js';

/** Cores of CPU used by other processes during a window above which the target is run again (--retries). */
const OTHER_LOAD_LIMIT = 0.1;

/** A bad command line: printed without a stack, exit code 2. */
class BenchUsageError extends Error {}

export const BENCH_HELP = `Usage: vhost-blk bench [options]

Runs the same workloads against this daemon (file and null backends), qemu-storage-daemon exporting the
same image over vhost-user-blk, and the bare image file driven with io_uring from this process; prints
a table per workload and writes JSON and an SVG chart of the ratios. Servers and images are created and
removed by the benchmark itself.

Workload (one workload, unless --preset):
  --rw MODE            randread, randwrite, read, write or randrw (default randread)
  --rwmixread PCT      Percentage of reads for randrw (default 50)
  --bs SIZE            Request size, a multiple of 512 (default 4k)
  --iodepth N          Requests in flight per queue, 1..256 (default 32)
  --queues N           Virtqueues, one load-generator thread each, 1..16 (default 1)
  --preset NAME        issue4: 4k randread qd32; 4k randwrite qd32; 4k randread qd1; 128k read qd8;
                       4k randread qd32 on 2 queues

Run:
  --targets LIST       Comma-separated, from ${TARGETS.join(', ')} (default: all),
                       and ${EXTRA_TARGETS.join(', ')} (a device thread that completes at once: the load generator's ceiling)
  --runtime SEC        Measured seconds per target and workload (default 5)
  --warmup SEC         Unmeasured seconds before that (default 1)
  --size SIZE          Image size (default 1G); the image is filled with non-zero data first
  --image-dir DIR      Where images are created (default /dev/shm)
  --poll MODE          spin: load generators poll the used ring without pause and ask for no call
                       notifications. hybrid: poll --spin-us, then ask for a call and sleep on the call
                       eventfd. auto (default): spin when 2 x queues <= cores (a core for each
                       load-generator thread and each server queue thread), else hybrid.
  --spin-us N          Polling time before sleeping in hybrid mode (default 50)
  --wait-quiet SEC     Before each target, wait up to SEC seconds for the machine to be idle (other
                       processes using less than ${OTHER_LOAD_LIMIT} cores over 1 s); default 0 (don't wait)
  --retries N          Run a target again, up to N times, when other processes used more than
                       ${OTHER_LOAD_LIMIT} cores during its window; the least disturbed run is kept (default 2)

Output:
  --json PATH          Results as JSON (default bench/results/<preset or workload>.json)
  --svg PATH           Bar chart of the ratios (default bench/results/<preset or workload>.svg)
  --no-save            Print only; write no files
  -h, --help           Show this help
`;

const PRESETS: Record<string, Array<Omit<WorkloadSpec, 'name' | 'rwmixread'>>> = {
  issue4: [
    { rw: 'randread', bs: 4096, iodepth: 32, queues: 1 },
    { rw: 'randwrite', bs: 4096, iodepth: 32, queues: 1 },
    { rw: 'randread', bs: 4096, iodepth: 1, queues: 1 },
    { rw: 'read', bs: 128 * 1024, iodepth: 8, queues: 1 },
    { rw: 'randread', bs: 4096, iodepth: 32, queues: 2 },
  ],
};

function parseSizeArg(name: string, raw: string): number {
  const m = /^(\d+)([kmgt]?)(i?b)?$/i.exec(raw.trim());
  if (!m) throw new BenchUsageError(`--${name} must be a size such as 4k or 1G, got '${raw}'`);
  const mult = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[m[2].toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  const n = Number(m[1]) * mult;
  if (n <= 0 || n % 512 !== 0) throw new BenchUsageError(`--${name} must be a positive multiple of 512 bytes, got '${raw}'`);
  return n;
}

function intArg(name: string, raw: string | undefined, def: number, min: number, max: number): number {
  if (raw === undefined) return def;
  if (!/^\d+$/.test(raw)) throw new BenchUsageError(`--${name} must be a whole number, got '${raw}'`);
  const n = Number(raw);
  if (n < min || n > max) throw new BenchUsageError(`--${name} must be between ${min} and ${max}, got ${n}`);
  return n;
}

function numArg(name: string, raw: string | undefined, def: number, min: number, max: number): number {
  if (raw === undefined) return def;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < min || n > max) throw new BenchUsageError(`--${name} must be a number between ${min} and ${max}, got '${raw}'`);
  return n;
}

interface BenchOptions {
  name: string;
  workloads: WorkloadSpec[];
  targets: TargetName[];
  settings: RunSettings;
  json: string | null;
  svg: string | null;
  retries: number;
  waitQuietSec: number;
}

function parseBenchArgs(argv: string[]): BenchOptions | 'help' {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv, strict: true, allowPositionals: false,
      options: {
        rw: { type: 'string' }, rwmixread: { type: 'string' }, bs: { type: 'string' }, iodepth: { type: 'string' },
        queues: { type: 'string' }, preset: { type: 'string' }, targets: { type: 'string' }, runtime: { type: 'string' },
        warmup: { type: 'string' }, size: { type: 'string' }, 'image-dir': { type: 'string' }, poll: { type: 'string' },
        'spin-us': { type: 'string' }, json: { type: 'string' }, svg: { type: 'string' }, 'no-save': { type: 'boolean' }, retries: { type: 'string' }, 'wait-quiet': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (err) {
    throw new BenchUsageError((err as Error).message);
  }
  if (values.help) return 'help';
  const rwmixread = intArg('rwmixread', values.rwmixread, 50, 0, 100);
  let workloads: WorkloadSpec[];
  let name: string;
  if (values.preset !== undefined) {
    const p = PRESETS[values.preset];
    if (!p) throw new BenchUsageError(`unknown --preset '${values.preset}' (known: ${Object.keys(PRESETS).join(', ')})`);
    for (const opt of ['rw', 'bs', 'iodepth', 'queues'] as const) {
      if (values[opt] !== undefined) throw new BenchUsageError(`--${opt} cannot be combined with --preset (the preset sets it)`);
    }
    workloads = p.map((w) => ({ ...w, rwmixread, name: '' }));
    name = values.preset;
  } else {
    const rw = (values.rw ?? 'randread') as RwMode;
    if (!RW_MODES.includes(rw)) throw new BenchUsageError(`--rw must be one of ${RW_MODES.join(', ')}, got '${values.rw}'`);
    const bs = parseSizeArg('bs', values.bs ?? '4k');
    const iodepth = intArg('iodepth', values.iodepth, 32, 1, 256);
    const queues = intArg('queues', values.queues, 1, 1, 16);
    workloads = [{ name: '', rw, bs, iodepth, queues, rwmixread }];
    name = `${rw}-${bs % 1024 === 0 ? `${bs / 1024}k` : bs}-qd${iodepth}-q${queues}`;
  }
  for (const w of workloads) w.name = workloadLabel(w);
  const known = [...TARGETS, ...EXTRA_TARGETS] as readonly string[];
  const targets = (values.targets ?? TARGETS.join(',')).split(',').map((t) => t.trim()).filter((t) => t.length > 0);
  for (const t of targets) if (!known.includes(t)) throw new BenchUsageError(`unknown target '${t}' (known: ${known.join(', ')})`);
  if (targets.length === 0) throw new BenchUsageError('--targets is empty');
  const size = parseSizeArg('size', values.size ?? '1G');
  for (const w of workloads) {
    if (w.bs > size / w.queues) throw new BenchUsageError(`--bs ${w.bs} does not fit ${w.queues} queue region(s) of a ${size}-byte image`);
    if (queueSizeFor(w.iodepth) > 32768) throw new BenchUsageError('--iodepth too large');
  }
  const imageDir = resolve(values['image-dir'] ?? '/dev/shm');
  if (!existsSync(imageDir) || !statSync(imageDir).isDirectory()) throw new BenchUsageError(`--image-dir ${imageDir} is not a directory`);
  const poll = (values.poll ?? 'auto') as PollChoice;
  if (poll !== 'spin' && poll !== 'hybrid' && poll !== 'auto') throw new BenchUsageError(`--poll must be 'auto', 'spin' or 'hybrid', got '${values.poll}'`);
  const settings: RunSettings = {
    runtimeSec: numArg('runtime', values.runtime, 5, 0.1, 3600), warmupSec: numArg('warmup', values.warmup, 1, 0, 600),
    size, imageDir, poll, spinUs: numArg('spin-us', values['spin-us'], 50, 0, 1e6),
  };
  const resultsDir = join(REPO_ROOT, 'bench', 'results');
  const save = !values['no-save'];
  return {
    name, workloads, targets: targets as TargetName[], settings, retries: intArg('retries', values.retries, 2, 0, 20),
    waitQuietSec: numArg('wait-quiet', values['wait-quiet'], 0, 0, 86400),
    json: save ? resolve(values.json ?? join(resultsDir, `${name}.json`)) : null,
    svg: save ? resolve(values.svg ?? join(resultsDir, `${name}.svg`)) : null,
  };
}

function toolVersion(cmd: string): string {
  try {
    return execFileSync(cmd, ['--version'], { encoding: 'utf8' }).split('\n')[0].trim();
  } catch {
    return 'not installed';
  }
}

function jsonReplacer(_k: string, v: unknown): unknown {
  return typeof v === 'number' && !Number.isFinite(v) ? null : v;
}

/** Waits (at most `maxSec`) until the whole machine used less than OTHER_LOAD_LIMIT cores over one second. */
async function waitQuiet(maxSec: number): Promise<void> {
  const deadline = Date.now() + maxSec * 1000;
  while (Date.now() < deadline) {
    const a = systemBusyTicks();
    await new Promise((r) => setTimeout(r, 1000));
    if ((systemBusyTicks() - a) / CLK_TCK < OTHER_LOAD_LIMIT) return;
  }
}

/** Runs `vhost-blk bench`; resolves with the exit status (1 if any target failed). */
export async function benchMain(argv: string[]): Promise<number> {
  let o: BenchOptions | 'help';
  try {
    o = parseBenchArgs(argv);
  } catch (err) {
    if (err instanceof BenchUsageError) {
      process.stderr.write(`vhost-blk bench: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
  if (o === 'help') {
    process.stdout.write(BENCH_HELP);
    return 0;
  }
  const s = o.settings;
  const command = `./bin/vhost-blk bench ${argv.join(' ')}`.trim();
  const host = {
    cpu: cpus()[0]?.model ?? 'unknown', cores: availableParallelism(), kernel: release(), node: process.version,
    qemuStorageDaemon: toolVersion('qemu-storage-daemon'),
  };
  const log = (line = '') => process.stdout.write(line + '\n');
  log(`vhost-blk bench: ${o.workloads.length} workload(s) x ${o.targets.length} target(s), ${s.warmupSec} s warm-up + ${s.runtimeSec} s each`);
  log(`host: ${host.cpu}, ${host.cores} cores, Linux ${host.kernel}, Node ${host.node}, ${host.qemuStorageDaemon}`);
  log(`images: ${s.size} bytes of non-zero data in ${s.imageDir}; load generator polling: ${s.poll}${s.poll !== 'spin' ? ` (hybrid spins ${s.spinUs} µs)` : ''}`);
  const reports: WorkloadReport[] = [];
  let failures = 0;
  for (const w of o.workloads) {
    log('');
    log(`== ${w.name} (${w.rw}, bs ${w.bs}, iodepth ${w.iodepth} per queue, ${w.queues} queue(s), queue size ${queueSizeFor(w.iodepth)}, polling ${effectivePoll(s.poll, w.queues)})`);
    const results = [];
    for (const t of o.targets) {
      process.stdout.write(`   ${t} ... `);
      // Another process using the CPU during the window skews everything on a small machine: run again.
      await waitQuiet(o.waitQuietSec);
      let r = await runTarget(t, w, s);
      r.attempts = 1;
      for (let a = 1; a <= o.retries && r.ok && r.otherCores > OTHER_LOAD_LIMIT; a++) {
        process.stdout.write(`(other load ${r.otherCores.toFixed(2)} cores, again) `);
        await waitQuiet(o.waitQuietSec);
        const again = await runTarget(t, w, s);
        again.attempts = a + 1;
        if (again.ok && again.otherCores < r.otherCores) r = again;
      }
      if (!r.ok) failures++;
      process.stdout.write(r.ok ? `${Math.round(r.iops)} IOPS\n` : `FAILED: ${r.error}\n`);
      results.push(r);
    }
    const rep: WorkloadReport = { workload: w, results, ratios: ratiosOf(results) };
    reports.push(rep);
    log('');
    log(formatTable(rep));
    log(formatRatios(rep.ratios));
    const busy = results.filter((r) => r.otherCores > 0.1).map((r) => `${r.target} (${r.otherCores.toFixed(2)} cores)`);
    if (busy.length) log(`WARNING: other processes used CPU during: ${busy.join(', ')}; those numbers are disturbed`);
  }
  if (reports.length > 1) {
    log('');
    log('Ratios (this daemon, file backend):');
    log(formatRatioTable(reports));
  }
  const doc = {
    tool: 'vhost-blk bench', command, date: new Date().toISOString(), host, settings: s, targets: o.targets.map((t) => ({ name: t, description: TARGET_DESCRIPTIONS[t] })),
    units: {
      iops: 'requests completed per second in the measured window', mibps: 'MiB/s', latency: 'µs, from avail ring publish to used ring poll (bare: prep to reap)',
      backendCpuUsPerIo: 'server process utime+stime (/proc/PID/stat) over the window / I/Os; bare: this whole process; loopback: this process minus load generators',
      backendCores: 'server CPU seconds per second', loadgenCpuUsPerIo: 'load-generator threads utime+stime (/proc/thread-self/stat) / I/Os',
    },
    workloads: reports,
  };
  if (o.json) {
    mkdirSync(dirname(o.json), { recursive: true });
    writeFileSync(o.json, JSON.stringify(doc, jsonReplacer, 2) + '\n');
    log('');
    log(`JSON: ${o.json}`);
  }
  if (o.svg) {
    mkdirSync(dirname(o.svg), { recursive: true });
    const sub = `${host.cpu}, ${host.cores} cores, Linux ${host.kernel}; images in ${s.imageDir}; ${s.runtimeSec} s per target`;
    writeFileSync(o.svg, renderSvg(reports, `vhost-blk vs qemu-storage-daemon and bare io_uring (${o.name})`, sub));
    log(`SVG:  ${o.svg}`);
  }
  return failures > 0 ? 1 : 0;
}
