/**
 * The things `vhost-blk bench` measures, and their lifecycle: images, server processes, sockets.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, openSync, rmSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** Target names, in the order they run and are reported. */
export const TARGETS = ['vhost-blk', 'vhost-blk-null', 'qemu-storage-daemon', 'bare'] as const;
/** Diagnostic target (not in the default set): an in-process device that completes requests at once. */
export const EXTRA_TARGETS = ['loopback'] as const;
export type TargetName = (typeof TARGETS)[number] | (typeof EXTRA_TARGETS)[number];

/** One-line description of each target for the report. */
export const TARGET_DESCRIPTIONS: Record<TargetName, string> = {
  'vhost-blk': 'this daemon, file backend (buffered, io_uring)',
  'vhost-blk-null': 'this daemon, null backend (no data moved)',
  'qemu-storage-daemon': 'QEMU 7.2 qemu-storage-daemon, vhost-user-blk export, file driver aio=io_uring cache.direct=off',
  bare: 'the image file read/written with io_uring by the benchmark thread itself (no virtio)',
  loopback: 'in-process device thread that completes each request at once (load generator ceiling)',
};

/** Repository root (dist/src/bench/ → three levels up). */
export const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const BIN = join(REPO_ROOT, 'bin', 'vhost-blk');

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Creates `path` with `size` bytes of non-zero data (a fresh, fully allocated image: reads are real
 * reads of real pages, writes overwrite allocated pages).
 */
export function createImage(path: string, size: number): void {
  const chunk = Buffer.alloc(4 << 20);
  for (let i = 0; i < chunk.length; i++) chunk[i] = ((i * 2654435761) >>> 24) | 1;
  const fd = openSync(path, 'wx');
  try {
    for (let off = 0; off < size; off += chunk.length) {
      const n = Math.min(chunk.length, size - off);
      let done = 0;
      while (done < n) done += writeSync(fd, chunk, done, n - done, off + done);
    }
  } finally {
    closeSync(fd);
  }
}

/** Removes an image, ignoring a missing one. */
export function removeImage(path: string): void {
  rmSync(path, { force: true });
}

/** A server process the benchmark started. */
export interface ServerProcess {
  name: string;
  proc: ChildProcess;
  pid: number;
  socket: string;
  /** What it printed (kept for error reports). */
  output: string[];
  exited: Promise<number | null>;
}

function startProcess(name: string, cmd: string, args: string[], socket: string): ServerProcess {
  rmSync(socket, { force: true });
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const output: string[] = [];
  const keep = (d: string) => { if (output.length < 200) output.push(d); };
  proc.stdout!.setEncoding('utf8').on('data', keep);
  proc.stderr!.setEncoding('utf8').on('data', keep);
  const exited = new Promise<number | null>((resolve) => {
    proc.once('exit', (code, signal) => resolve(code ?? (signal ? -1 : null)));
    proc.once('error', (err) => { output.push(String(err)); resolve(-1); });
  });
  return { name, proc, pid: proc.pid ?? -1, socket, output, exited };
}

/** Starts this daemon (`--backend file` on `image`, or `--backend null` of `size` bytes). */
export function startVhostBlk(socket: string, opts: { image: string | null; size: number; queues: number; queueSize: number }): ServerProcess {
  // VHOST_BLK_BENCH_NODE_OPTIONS: extra node flags for the daemon (e.g. --perf-basic-prof, --cpu-prof).
  const nodeFlags = (process.env.VHOST_BLK_BENCH_NODE_OPTIONS ?? '').split(/\s+/).filter((f) => f.length > 0);
  const args = [...nodeFlags, BIN, 'serve', '--socket', socket, '--num-queues', String(opts.queues), '--log-level', 'warn'];
  if (opts.queueSize > 256) args.push('--queue-size', String(opts.queueSize));
  if (opts.image) args.push('--image', opts.image);
  else args.push('--backend', 'null', '--size', String(opts.size));
  return startProcess(opts.image ? 'vhost-blk' : 'vhost-blk-null', process.execPath, args, socket);
}

/** The qemu-storage-daemon command line that exports `image` as vhost-user-blk on `socket`. */
export function qsdArgs(socket: string, image: string, queues: number): string[] {
  return [
    '--blockdev', `driver=file,node-name=file0,filename=${image},cache.direct=off,aio=io_uring`,
    '--export', `type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=${socket},writable=on,num-queues=${queues}`,
  ];
}

/** Starts qemu-storage-daemon exporting `image`. */
export function startQsd(socket: string, image: string, queues: number): ServerProcess {
  return startProcess('qemu-storage-daemon', 'qemu-storage-daemon', qsdArgs(socket, image, queues), socket);
}

/** Waits for the server's socket to appear; throws with its output if it exits or takes over 15 s. */
export async function waitForSocket(s: ServerProcess): Promise<void> {
  let exited = false;
  void s.exited.then(() => { exited = true; });
  const deadline = Date.now() + 15_000;
  while (!existsSync(s.socket)) {
    if (exited) throw new Error(`${s.name} exited before listening:\n${s.output.join('')}`);
    if (Date.now() > deadline) throw new Error(`${s.name} did not create ${s.socket} within 15 s:\n${s.output.join('')}`);
    await sleep(10);
  }
}

/** SIGTERM, wait up to 5 s, then SIGKILL; resolves with the exit code. */
export async function stopServer(s: ServerProcess): Promise<number | null> {
  if (s.proc.exitCode !== null || s.proc.signalCode !== null) return s.proc.exitCode;
  s.proc.kill('SIGTERM');
  const timer = setTimeout(() => s.proc.kill('SIGKILL'), 5000);
  const code = await s.exited;
  clearTimeout(timer);
  rmSync(s.socket, { force: true });
  return code;
}
