// A real daemon process for protocol-level tests: start it, connect a front-end, stop it, check the image.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { VhostUserBlkClient, type ClientOptions } from '../../src/frontend/index.js';

const REPO = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
/** The daemon's command. */
export const BIN = join(REPO, 'bin', 'vhost-blk');
/** Bytes in a MiB. */
export const MiB = 1024 * 1024;
/** Resolves after `ms` milliseconds. */
export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** A daemon process and where it listens. */
export interface Daemon {
  proc: ChildProcess;
  socket: string;
  dir: string;
  log: string[];
  exit: Promise<number | null>;
}

/** Starts `bin/vhost-blk serve` with `args` and waits for its socket to appear. */
export async function startDaemon(dir: string, args: string[]): Promise<Daemon> {
  const socket = join(dir, 's');
  const proc = spawn(process.execPath, [BIN, 'serve', '--socket', socket, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  const log: string[] = [];
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => log.push(d));
  const exit = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  let exited = false;
  void exit.then(() => { exited = true; });
  const deadline = Date.now() + 10_000;
  while (!existsSync(socket)) {
    if (exited) throw new Error(`daemon exited before listening:\n${log.join('')}`);
    if (Date.now() > deadline) throw new Error(`daemon did not create ${socket}:\n${log.join('')}`);
    await sleep(20);
  }
  return { proc, socket, dir, log, exit };
}

/** SIGTERM, then the exit code (null if it had to be killed after 5 s). */
export async function stopDaemon(d: Daemon): Promise<number | null> {
  if (d.proc.exitCode !== null) return d.proc.exitCode;
  d.proc.kill('SIGTERM');
  const timer = setTimeout(() => d.proc.kill('SIGKILL'), 5000);
  const code = await d.exit;
  clearTimeout(timer);
  return code;
}

/**
 * Connects a client; retries while the daemon still tears down the previous frontend (it turns a second
 * frontend away until then).
 */
export async function connectClient(socket: string, opts: ClientOptions = {}): Promise<VhostUserBlkClient> {
  const deadline = Date.now() + 5000;
  for (;;) {
    try {
      return await VhostUserBlkClient.connect(socket, { requestTimeoutMs: 5000, ...opts });
    } catch (err) {
      if (Date.now() > deadline || !/closed the connection|ECONNRESET|EPIPE/.test((err as Error).message)) throw err;
      await sleep(20);
    }
  }
}

export { pattern, readImage } from '../image-data.js';
