/**
 * The vhost-blk command line: `vhost-blk serve ...`. Every option is checked before the socket opens.
 */
import { parseArgs } from 'node:util';
import { closeSync, fstatSync, mkdirSync, openSync, constants as fsc, existsSync, realpathSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { blockDeviceSize, ftruncate } from '../os/libc.js';
import type { BackendSpec } from '../backend/types.js';
import { BlkDevice } from '../blk/device.js';
import { LOG_LEVELS, Logger, type LogLevel } from './logger.js';
import { Server } from './server.js';
import { UnixListener } from '../os/unix-socket.js';

/** A command-line mistake: printed without a stack trace, exit code 2. */
export class UsageError extends Error {}

const SERVE_HELP = `Usage: vhost-blk serve --socket PATH [options]

Serves a disk image to a virtual machine over vhost-user-blk (QEMU: -device vhost-user-blk-pci).

Options:
  --socket PATH              Unix socket the frontend (QEMU) connects to. Required.
  --image PATH               Raw image file or block device. Default: a sparse 1 GiB image
                             at ${join(tmpdir(), 'vhost-blk', 'default.raw')}, created if missing.
  --backend file|null        file: serve --image (default). null: reads complete without data,
                             writes are dropped (for measuring the protocol path alone).
  --size BYTES               Disk size for --backend null (default 1G). Suffixes K, M, G, T.
  --direct                   Open the image with O_DIRECT (bypass the host page cache).
  --readonly                 Offer a read-only disk (VIRTIO_BLK_F_RO); writes fail with IOERR.
  --num-queues N             Request queues, 1..64 (default 1).
  --queue-size N             Largest ring size accepted, a power of two 2..32768 (default 256).
  --threads N                Queue worker threads (default: one per queue, at most the core count).
  --writeback on|off         Start with the write cache on (default) or in writethrough mode.
  --serial TEXT              What GET_ID returns, at most 20 bytes (default: derived from the image path).
  --logical-block-size N     512..65536, a power of two (default 512).
  --physical-block-size N    A power-of-two multiple of the logical size (default 4096).
  --poll-us N                After serving requests, poll the rings this long for the next one before
                             sleeping, sparing the guest a kick (0..1000 µs, default 32; 0 = never).
  --socket-mode MODE         Octal file mode of the socket (default 0600).
  --log-level LEVEL          debug, info, warn or error (default info).
  -h, --help                 Show this help.
`;

const HELP = `Usage: vhost-blk <command> [options]

Commands:
  serve     Serve a disk image over vhost-user-blk (see: vhost-blk serve --help)
  bench     Compare this daemon, qemu-storage-daemon and the bare image (see: vhost-blk bench --help)
`;

/** Parsed and checked `serve` options. */
export interface ServeOptions {
  socket: string;
  image: string | null;
  backend: 'file' | 'null';
  size: number;
  direct: boolean;
  readonly: boolean;
  numQueues: number;
  queueSize: number;
  threads: number;
  writeback: boolean;
  serial: string | null;
  logicalBlockSize: number;
  physicalBlockSize: number;
  socketMode: number;
  logLevel: LogLevel;
  pollUs: number;
}

function intOption(name: string, raw: string | undefined, def: number, min: number, max: number): number {
  if (raw === undefined) return def;
  if (!/^\d+$/.test(raw)) throw new UsageError(`--${name} must be a whole number, got '${raw}'`);
  const n = Number(raw);
  if (n < min || n > max) throw new UsageError(`--${name} must be between ${min} and ${max}, got ${n}`);
  return n;
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** Parses a size such as 1G, 512M, 4096. */
export function parseSize(name: string, raw: string): number {
  const m = /^(\d+)([KMGT]?)(i?B)?$/i.exec(raw.trim());
  if (!m) throw new UsageError(`--${name} must be a size such as 1G or 4096, got '${raw}'`);
  const mult = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[m[2].toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  const n = Number(m[1]) * mult;
  if (n <= 0 || n % 512 !== 0) throw new UsageError(`--${name} must be a positive multiple of 512 bytes, got '${raw}'`);
  return n;
}

/** Parses `serve` arguments; throws UsageError with a clear message on any bad value. */
export function parseServeArgs(argv: string[]): ServeOptions | 'help' {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        socket: { type: 'string' }, image: { type: 'string' }, backend: { type: 'string' }, size: { type: 'string' },
        direct: { type: 'boolean' }, readonly: { type: 'boolean' }, 'num-queues': { type: 'string' },
        'queue-size': { type: 'string' }, threads: { type: 'string' }, writeback: { type: 'string' },
        serial: { type: 'string' }, 'logical-block-size': { type: 'string' }, 'physical-block-size': { type: 'string' },
        'socket-mode': { type: 'string' }, 'log-level': { type: 'string' }, 'poll-us': { type: 'string' }, help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  if (values.help) return 'help';
  if (!values.socket) throw new UsageError('--socket PATH is required (the Unix socket QEMU connects to)');
  const backend = values.backend ?? 'file';
  if (backend !== 'file' && backend !== 'null') throw new UsageError(`--backend must be 'file' or 'null', got '${backend}'`);
  if (backend === 'null' && values.image) throw new UsageError('--image cannot be used with --backend null');
  if (backend === 'file' && values.size) throw new UsageError('--size is for --backend null; the file backend takes the image size');
  const numQueues = intOption('num-queues', values['num-queues'], 1, 1, 64);
  const queueSize = intOption('queue-size', values['queue-size'], 256, 2, 32768);
  if (!isPowerOfTwo(queueSize)) throw new UsageError(`--queue-size must be a power of two, got ${queueSize}`);
  const threads = intOption('threads', values.threads, Math.min(numQueues, availableParallelism()), 1, numQueues);
  const writebackRaw = values.writeback ?? 'on';
  if (writebackRaw !== 'on' && writebackRaw !== 'off') throw new UsageError(`--writeback must be 'on' or 'off', got '${writebackRaw}'`);
  const logicalBlockSize = intOption('logical-block-size', values['logical-block-size'], 512, 512, 65536);
  if (!isPowerOfTwo(logicalBlockSize)) throw new UsageError(`--logical-block-size must be a power of two, got ${logicalBlockSize}`);
  const physicalBlockSize = intOption('physical-block-size', values['physical-block-size'], Math.max(4096, logicalBlockSize), logicalBlockSize, 1 << 24);
  if (!isPowerOfTwo(physicalBlockSize)) throw new UsageError(`--physical-block-size must be a power of two, got ${physicalBlockSize}`);
  if (values.serial !== undefined && Buffer.byteLength(values.serial) > 20) throw new UsageError(`--serial is at most 20 bytes, got ${Buffer.byteLength(values.serial)}`);
  const modeRaw = values['socket-mode'] ?? '0600';
  if (!/^0?[0-7]{3}$/.test(modeRaw)) throw new UsageError(`--socket-mode must be an octal mode such as 0600, got '${modeRaw}'`);
  const logLevel = (values['log-level'] ?? 'info') as LogLevel;
  if (!LOG_LEVELS.includes(logLevel)) throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(', ')}, got '${values['log-level']}'`);
  if (values.direct && backend === 'null') throw new UsageError('--direct applies to the file backend only');
  return {
    socket: values.socket, image: values.image ?? null, backend, size: values.size ? parseSize('size', values.size) : 2 ** 30,
    direct: values.direct ?? false, readonly: values.readonly ?? false, numQueues, queueSize, threads,
    writeback: writebackRaw === 'on', serial: values.serial ?? null, logicalBlockSize, physicalBlockSize,
    socketMode: parseInt(modeRaw, 8), logLevel, pollUs: intOption('poll-us', values['poll-us'], 32, 0, 1000),
  };
}

/** Creates the default sparse 1 GiB image if it is missing; returns its path. */
function defaultImage(log: Logger): string {
  const dir = join(tmpdir(), 'vhost-blk');
  const path = join(dir, 'default.raw');
  if (!existsSync(path)) {
    mkdirSync(dir, { recursive: true });
    const fd = openSync(path, 'wx');
    try { ftruncate(fd, 2 ** 30); } finally { closeSync(fd); }
    log.info(`no --image given: created a sparse 1 GiB image at ${path}`);
  } else {
    log.info(`no --image given: using the default image at ${path}`);
  }
  return path;
}

/** Opens the image as the options say and describes it for the workers. */
function openImage(path: string, o: ServeOptions): { spec: BackendSpec; fd: number } {
  let fd: number;
  const flags = (o.readonly ? fsc.O_RDONLY : fsc.O_RDWR) | (o.direct ? fsc.O_DIRECT : 0);
  try {
    fd = openSync(path, flags);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'ENOENT') throw new UsageError(`image not found: ${path}`);
    if (e.code === 'EINVAL' && o.direct) throw new UsageError(`cannot open ${path} with O_DIRECT (--direct): the filesystem does not support it (tmpfs does not)`);
    throw new UsageError(`cannot open image ${path}: ${e.code ?? e.message}`);
  }
  const st = fstatSync(fd);
  let size: number;
  if (st.isBlockDevice()) size = blockDeviceSize(fd);
  else if (st.isFile()) size = st.size;
  else {
    closeSync(fd);
    throw new UsageError(`image ${path} is neither a regular file nor a block device`);
  }
  const sizeBytes = Math.floor(size / o.logicalBlockSize) * o.logicalBlockSize;
  if (sizeBytes === 0) {
    closeSync(fd);
    throw new UsageError(`image ${path} is ${size} bytes: smaller than one ${o.logicalBlockSize}-byte block`);
  }
  return { spec: { kind: 'file', fd, sizeBytes, readOnly: o.readonly }, fd };
}

function qemuHint(o: ServeOptions): string {
  return [
    'Attach a QEMU VM with (guest RAM must be shared with this daemon):',
    `  -object memory-backend-memfd,id=mem,size=<RAM size>,share=on -numa node,memdev=mem \\`,
    `  -chardev socket,id=vblk0,path=${o.socket} \\`,
    `  -device vhost-user-blk-pci,chardev=vblk0,num-queues=${o.numQueues}`,
  ].join('\n');
}

async function serve(argv: string[]): Promise<number> {
  const parsed = parseServeArgs(argv);
  if (parsed === 'help') {
    process.stdout.write(SERVE_HELP);
    return 0;
  }
  const o = parsed;
  const log = new Logger(o.logLevel);
  let spec: BackendSpec;
  let imagePath = '(null backend)';
  if (o.backend === 'null') {
    spec = { kind: 'null', sizeBytes: o.size, readOnly: o.readonly };
  } else {
    imagePath = o.image ?? defaultImage(log);
    spec = openImage(imagePath, o).spec;
  }
  const serial = o.serial ?? (o.backend === 'null' ? 'vhost-blk-null' : `vblk-${createHash('sha256').update(realpathSync(imagePath)).digest('hex').slice(0, 15)}`);
  // The socket is bound before the workers start: a path in use fails fast and cleanly.
  let listener: UnixListener;
  try {
    listener = UnixListener.listen(o.socket, { mode: o.socketMode });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const device = new BlkDevice({
    backend: spec, numQueues: o.numQueues, queueSize: o.queueSize, threads: o.threads, serial,
    writeback: o.writeback, logicalBlockSize: o.logicalBlockSize, physicalBlockSize: o.physicalBlockSize, pollUs: o.pollUs,
  }, log);
  const server = new Server(listener, device, log);
  log.info(`serving ${imagePath} (${spec.sizeBytes} bytes${o.readonly ? ', read-only' : ''}${o.direct ? ', O_DIRECT' : ''}) with ${o.numQueues} queue(s) on ${o.threads} thread(s)`);
  server.start();
  process.stdout.write(qemuHint(o) + '\n');
  return await new Promise<number>((resolve) => {
    let stopping = false;
    const onSignal = (sig: string) => {
      if (stopping) {
        log.warn(`${sig} again: exiting without waiting for in-flight requests`);
        process.exit(1);
      }
      stopping = true;
      log.info(`${sig}: no new requests; finishing in-flight ones`);
      server.stop().then(() => { log.info('stopped'); resolve(0); }, (err) => { log.error(`stop failed: ${err}`); resolve(1); });
    };
    process.on('SIGINT', () => onSignal('SIGINT'));
    process.on('SIGTERM', () => onSignal('SIGTERM'));
  });
}

/** Runs the command line; exits the process with its status. */
export async function main(argv: string[]): Promise<void> {
  const [cmd, ...rest] = argv;
  try {
    let code: number;
    if (cmd === 'serve') code = await serve(rest);
    else if (cmd === 'bench') code = await (await import('../bench/bench.js')).benchMain(rest);
    else if (cmd === undefined || cmd === '-h' || cmd === '--help' || cmd === 'help') {
      process.stdout.write(HELP);
      code = cmd === undefined ? 2 : 0;
    } else throw new UsageError(`unknown command '${cmd}' (try: vhost-blk --help)`);
    process.exit(code);
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`vhost-blk: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
}
