/**
 * CPU time from /proc: utime + stime of a process (all its threads) or of one thread, in clock ticks.
 */
import { readFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';

/** Clock ticks per second (USER_HZ), for converting utime/stime. */
export const CLK_TCK = ((): number => {
  try {
    const n = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());
    return Number.isFinite(n) && n > 0 ? n : 100;
  } catch {
    return 100;
  }
})();

/** utime + stime in ticks from a /proc stat file (fields 14 and 15; the command name may hold spaces). */
export function statTicks(path: string): number {
  const s = readFileSync(path, 'utf8');
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
  return Number(f[11]) + Number(f[12]);
}

/** utime + stime of every thread of process `pid`, in ticks. */
export function processTicks(pid: number | 'self'): number {
  return statTicks(`/proc/${pid}/stat`);
}

/** Busy ticks of the whole machine (all CPUs: everything but idle and iowait), from /proc/stat. */
export function systemBusyTicks(): number {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0];
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq steal (guest time is already inside user)
  return f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
}
