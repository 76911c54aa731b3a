/**
 * The fuzz script: runs the fuzzers of test/fuzz/ for as long as asked, and prints what it ran and any
 * counterexample with what replays it.
 *
 *   npm run fuzz                                    all targets, default case counts
 *   npm run fuzz -- --cases 500000                  that many cases per pure target (ring, codec)
 *   npm run fuzz -- --target daemon --cases 5000    live daemon cases
 *   npm run fuzz -- --target ring --seed 42 --path "17:3:0"   replay a counterexample
 *   npm run fuzz -- --minutes 30                    stop each target after this long (not a failure)
 *
 * Exit status 1 if a target found a counterexample, 2 on a usage error.
 */
import fc from 'fast-check';
import { parseArgs } from 'node:util';
import { codecProperty, codecStats } from './codec-fuzz.js';
import { checkDaemon, daemonStats } from './daemon-fuzz.js';
import { ringProperty, ringStats } from './ring-fuzz.js';

const TARGETS = ['ring', 'codec', 'daemon'] as const;
type Target = (typeof TARGETS)[number];
/** Default cases per target: a few hundred thousand for the pure fuzzers, fewer for the live daemon (~20 ms each). */
const DEFAULT_CASES: Record<Target, number> = { ring: 200_000, codec: 300_000, daemon: 2_000 };
const STATS: Record<Target, object> = { ring: ringStats, codec: codecStats, daemon: daemonStats };

const USAGE = `Usage: npm run fuzz -- [--target ring|codec|daemon|all] [--cases N] [--seed S] [--path P] [--minutes M]
  --target   which fuzzer (default all)
  --cases    cases per target (default ring ${DEFAULT_CASES.ring}, codec ${DEFAULT_CASES.codec}, daemon ${DEFAULT_CASES.daemon})
  --seed     fast-check seed (default: random); with --path, replays one counterexample
  --path     fast-check path printed with a counterexample (needs --seed and one --target)
  --minutes  stop each target after this many minutes, counting it as a pass for the cases run`;

/** The parts of fast-check's run details the report uses. */
interface Outcome {
  failed: boolean;
  interrupted: boolean;
  numRuns: number;
  numShrinks: number;
  seed: number;
  counterexample: unknown;
  counterexamplePath: string | null;
  errorInstance: unknown;
}

/** Runs one target and prints a report; true when no counterexample was found. */
async function runTarget(target: Target, cases: number, seed: number, path: string | undefined, minutes: number | undefined): Promise<boolean> {
  const params = { numRuns: cases, seed, path, interruptAfterTimeLimit: minutes === undefined ? undefined : minutes * 60_000 };
  const start = Date.now();
  console.log(`${target}: running up to ${cases} cases, seed ${seed}${path ? `, path ${path}` : ''}`);
  let details: Outcome;
  if (target === 'daemon') details = await checkDaemon(params);
  else if (target === 'ring') details = fc.check(ringProperty(), params);
  else details = fc.check(codecProperty(), params);
  const secs = ((Date.now() - start) / 1000).toFixed(1);
  console.log(`${target}: ${details.numRuns} cases in ${secs} s (seed ${seed})${details.interrupted ? ', stopped by --minutes' : ''}`);
  console.log(`${target}: exercised ${JSON.stringify(STATS[target])}`);
  if (!details.failed) return true;
  const err = details.errorInstance as Error | undefined;
  console.log(`\n${target}: COUNTEREXAMPLE after ${details.numRuns} cases and ${details.numShrinks} shrinks:`);
  console.log(fc.stringify(details.counterexample));
  console.log(`\n${target}: ${err?.stack ?? err?.message ?? String(err)}`);
  console.log(`\nreplay: npm run fuzz -- --target ${target} --seed ${details.seed} --path "${details.counterexamplePath}"\n`);
  return false;
}

async function main(): Promise<number> {
  let args;
  try {
    args = parseArgs({
      options: {
        target: { type: 'string', default: 'all' },
        cases: { type: 'string' },
        seed: { type: 'string' },
        path: { type: 'string' },
        minutes: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    }).values;
  } catch (err) {
    console.error(`${(err as Error).message}\n${USAGE}`);
    return 2;
  }
  if (args.help) {
    console.log(USAGE);
    return 0;
  }
  const targets: Target[] = args.target === 'all' ? [...TARGETS] : TARGETS.filter((t) => t === args.target);
  const cases = args.cases === undefined ? undefined : Number(args.cases);
  const seed = args.seed === undefined ? Date.now() ^ (Math.random() * 0x7fffffff) : Number(args.seed);
  const minutes = args.minutes === undefined ? undefined : Number(args.minutes);
  if (targets.length === 0 || (cases !== undefined && !(Number.isInteger(cases) && cases > 0)) || !Number.isInteger(seed)
    || (minutes !== undefined && !(minutes > 0)) || (args.path !== undefined && (targets.length !== 1 || args.seed === undefined))) {
    console.error(USAGE);
    return 2;
  }
  let ok = true;
  for (const t of targets) ok = (await runTarget(t, cases ?? DEFAULT_CASES[t], seed, args.path, minutes)) && ok;
  console.log(ok ? 'fuzz: no counterexample found' : 'fuzz: COUNTEREXAMPLES FOUND (see above)');
  return ok ? 0 : 1;
}

process.exitCode = await main();
