/**
 * Fault injection for testing (`serve --inject-faults SPEC`): a backend wrapper that fails, delays or
 * shortens the requests that match its rules, so tests can show the guest gets IOERR for exactly those
 * requests and the daemon stays up.
 *
 * SPEC is a comma-separated list of rules, each `KIND[=ARG][:OPS][@RANGE]`:
 *   KIND   eio | enospc (fail with that errno) | short (report half the bytes done; the rest is then
 *          resubmitted) | delay=DURATION (e.g. delay=5ms, delay=200us: hold the request, then do it)
 *   OPS    read, write, flush, discard, write-zeroes or any, joined with '+'; default: every operation
 *          for eio and delay, write+write-zeroes for enospc, read+write for short
 *   RANGE  START-END in bytes of the disk (K/M/G suffixes; END exclusive, empty = the end of the disk);
 *          a request matches when its bytes overlap the range; flush has no bytes and always matches
 * The first matching rule applies. Example: `eio:read@1M-2M,delay=10ms:write`.
 */
import { allocNative } from '../os/libc.js';
import { IORING_OP_TIMEOUT } from '../os/uring.js';
import type { BlockBackend, IoContext } from './types.js';

/** What a rule does. */
export type FaultKind = 'eio' | 'enospc' | 'short' | 'delay';

/** Operation bits a rule applies to. */
export const FaultOp = { read: 1, write: 2, flush: 4, discard: 8, 'write-zeroes': 16 } as const;
const ANY_OP = 31;

/** One parsed rule (plain data: it crosses to the worker threads). */
export interface FaultRule {
  kind: FaultKind;
  /** FaultOp bits. */
  ops: number;
  /** Byte range [start, end); end -1 = the end of the disk. */
  start: number;
  end: number;
  /** For delay: microseconds. */
  delayUs: number;
}

/** A SPEC mistake, with the offending rule in the message. */
export class FaultSpecError extends Error {}

const DEFAULT_OPS: Record<FaultKind, number> = {
  eio: ANY_OP,
  enospc: FaultOp.write | FaultOp['write-zeroes'],
  short: FaultOp.read | FaultOp.write,
  delay: ANY_OP,
};

function parseBytes(rule: string, raw: string): number {
  const m = /^(\d+)([KMGT]?)$/i.exec(raw);
  if (!m) throw new FaultSpecError(`fault rule '${rule}': '${raw}' is not a byte offset such as 4096 or 1M`);
  return Number(m[1]) * { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[m[2].toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
}

function parseDuration(rule: string, raw: string | undefined): number {
  const m = raw === undefined ? null : /^(\d+)(us|ms|s)$/.exec(raw);
  if (!m) throw new FaultSpecError(`fault rule '${rule}': delay needs a duration such as delay=5ms or delay=200us`);
  const us = Number(m[1]) * { us: 1, ms: 1000, s: 1_000_000 }[m[2] as 'us' | 'ms' | 's'];
  if (us < 1 || us > 60_000_000) throw new FaultSpecError(`fault rule '${rule}': delay must be between 1us and 60s`);
  return us;
}

function parseOps(rule: string, raw: string): number {
  let ops = 0;
  for (const name of raw.split('+')) {
    if (name === 'any') ops |= ANY_OP;
    else if (Object.hasOwn(FaultOp, name)) ops |= FaultOp[name as keyof typeof FaultOp];
    else throw new FaultSpecError(`fault rule '${rule}': unknown operation '${name}' (read, write, flush, discard, write-zeroes, any)`);
  }
  return ops;
}

/** Parses one rule `KIND[=ARG][:OPS][@RANGE]`. */
function parseRule(rule: string): FaultRule {
  const m = /^([a-z]+)(?:=([^:@]*))?(?::([^@]*))?(?:@(.*))?$/.exec(rule);
  if (!m) throw new FaultSpecError(`fault rule '${rule}' is not KIND[=ARG][:OPS][@START-END]`);
  const kind = m[1] as FaultKind;
  if (!Object.hasOwn(DEFAULT_OPS, kind)) throw new FaultSpecError(`fault rule '${rule}': unknown kind '${m[1]}' (eio, enospc, short, delay=DURATION)`);
  if (kind !== 'delay' && m[2] !== undefined) throw new FaultSpecError(`fault rule '${rule}': ${kind} takes no '=' argument`);
  const delayUs = kind === 'delay' ? parseDuration(rule, m[2]) : 0;
  const ops = m[3] === undefined ? DEFAULT_OPS[kind] : parseOps(rule, m[3]);
  let start = 0;
  let end = -1;
  if (m[4] !== undefined) {
    const r = /^([^-]+)-([^-]*)$/.exec(m[4]);
    if (!r) throw new FaultSpecError(`fault rule '${rule}': range must be START-END or START- (bytes, K/M/G suffixes)`);
    start = parseBytes(rule, r[1]);
    if (r[2] !== '') {
      end = parseBytes(rule, r[2]);
      if (end <= start) throw new FaultSpecError(`fault rule '${rule}': the range is empty (END must be above START)`);
    }
  }
  return { kind, ops, start, end, delayUs };
}

/** Parses a whole SPEC; throws FaultSpecError naming the bad rule. */
export function parseFaultSpec(spec: string): FaultRule[] {
  const rules = spec.split(',').map((s) => s.trim());
  if (rules.some((r) => r === '')) throw new FaultSpecError(`fault spec '${spec}' has an empty rule`);
  return rules.map(parseRule);
}

/** Describes rules for a log line. */
export function describeFaults(rules: FaultRule[]): string {
  const opNames = (ops: number) => ops === ANY_OP ? 'any' : Object.entries(FaultOp).filter(([, b]) => ops & b).map(([n]) => n).join('+');
  return rules.map((r) => `${r.kind}${r.kind === 'delay' ? `=${r.delayUs}us` : ''} on ${opNames(r.ops)} in bytes ${r.start}-${r.end < 0 ? 'end' : r.end}`).join(', ');
}

/** Added to a request tag for the timer of a delayed request: above request tags, below the worker's own. */
export const DELAY_TAG_OFFSET = 2 ** 27;
const EIO = 5;
const ENOSPC = 28;
const ETIME = 62;

/** A backend whose matching requests fail, wait or come back short, as the rules say. */
export class FaultInjectingBackend implements BlockBackend {
  /** Requests held by a delay rule, by tag: what to do when the timer fires. */
  private readonly delayed = new Map<number, () => void>();
  /** Tags whose current submission will be reported short. */
  private readonly shortened = new Set<number>();
  /** For a shortened request: the end offset its resubmitted remainder will have (done normally). */
  private readonly shortEnds = new Map<number, number>();
  /** One __kernel_timespec per rule (the kernel reads it when the timer SQE is submitted). */
  private readonly timespecs: number[];

  constructor(private readonly ctx: IoContext, private readonly inner: BlockBackend, private readonly rules: FaultRule[]) {
    const mem = allocNative(16 * Math.max(1, rules.length));
    const words = new BigInt64Array(mem.buffer);
    rules.forEach((r, i) => {
      words[2 * i] = BigInt(Math.floor(r.delayUs / 1e6));
      words[2 * i + 1] = BigInt((r.delayUs % 1e6) * 1000);
    });
    this.timespecs = rules.map((_, i) => mem.addr + 16 * i);
  }

  /** The inner backend's size (a live resize changes it). */
  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }

  set sizeBytes(bytes: number) {
    this.inner.sizeBytes = bytes;
  }

  /** Whether the inner backend refuses writes. */
  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  /** Reads, unless a rule says otherwise. */
  readv(tag: number, offset: number, iovAddr: number, iovCnt: number, len: number): void {
    this.apply(tag, FaultOp.read, offset, len, () => this.inner.readv(tag, offset, iovAddr, iovCnt, len));
  }

  /** Writes, unless a rule says otherwise. */
  writev(tag: number, offset: number, iovAddr: number, iovCnt: number, len: number): void {
    this.apply(tag, FaultOp.write, offset, len, () => this.inner.writev(tag, offset, iovAddr, iovCnt, len));
  }

  /** Flushes, unless a rule says otherwise. */
  flush(tag: number): void {
    this.apply(tag, FaultOp.flush, -1, 0, () => this.inner.flush(tag));
  }

  /** Discards, unless a rule says otherwise. */
  discard(tag: number, offset: number, len: number): void {
    this.apply(tag, FaultOp.discard, offset, len, () => this.inner.discard(tag, offset, len));
  }

  /** Zeroes, unless a rule says otherwise. */
  writeZeroes(tag: number, offset: number, len: number, unmap: boolean): void {
    this.apply(tag, FaultOp['write-zeroes'], offset, len, () => this.inner.writeZeroes(tag, offset, len, unmap));
  }

  /**
   * Sees every completion before the request layer: fires delayed requests and shortens marked ones.
   * True when it took the completion over.
   */
  interceptCompletion(tag: number, res: number): boolean {
    if (tag >= DELAY_TAG_OFFSET) {
      const run = this.delayed.get(tag - DELAY_TAG_OFFSET);
      if (!run) return false;
      this.delayed.delete(tag - DELAY_TAG_OFFSET);
      if (res !== -ETIME && res < 0) return this.ctx.completeInline(tag - DELAY_TAG_OFFSET, res), true;
      run();
      return true;
    }
    if (res <= 1 || !this.shortened.delete(tag)) return false;
    // The I/O was done whole; the request layer is told half, and must finish the rest itself.
    this.ctx.completeInline(tag, Math.floor(res / 2));
    return true;
  }

  /** What the wrapper holds right now: requests waiting on a delay rule, by tag. */
  describeHeld(): string {
    return this.delayed.size === 0 ? 'none held by delay rules' : `held by delay rules: tags ${[...this.delayed.keys()].join(', ')}`;
  }

  private match(op: number, offset: number, len: number): FaultRule | undefined {
    for (const r of this.rules) {
      if ((r.ops & op) === 0) continue;
      if (offset < 0) return r; // flush: no bytes
      if (offset + len > r.start && (r.end < 0 || offset < r.end)) return r;
    }
    return undefined;
  }

  private apply(tag: number, op: number, offset: number, len: number, run: () => void): void {
    const rule = this.match(op, offset, len);
    if (!rule) return run();
    switch (rule.kind) {
      case 'eio': return this.ctx.completeInline(tag, -EIO);
      case 'enospc': return this.ctx.completeInline(tag, -ENOSPC);
      case 'short':
        // Only a request's first submission: its resubmitted remainder (same tag, same end) goes through.
        if (this.shortEnds.get(tag) === offset + len) this.shortEnds.delete(tag);
        else if (len > 1) {
          this.shortened.add(tag);
          this.shortEnds.set(tag, offset + len);
        }
        return run();
      case 'delay':
        this.delayed.set(tag, run);
        this.ctx.ring.prep(IORING_OP_TIMEOUT, -1, this.timespecs[this.rules.indexOf(rule)], 1, 0, 0, tag + DELAY_TAG_OFFSET);
        return;
    }
  }
}
