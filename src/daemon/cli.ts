/**
 * The vhost-blk command line: `vhost-blk serve ...`. Every option is checked before the socket opens.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { chownSync, closeSync, fstatSync, readFileSync, mkdirSync, openSync, constants as fsc, existsSync, realpathSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { blockDeviceSize, ftruncate } from '../os/libc.js';
import type { BackendSpec } from '../backend/types.js';
import { describeFaults, parseFaultSpec, type FaultRule } from '../backend/faults.js';
import { BlkDevice } from '../blk/device.js';
import { LOG_LEVELS, Logger, type LogLevel } from '../logger.js';
import { Server } from './server.js';
import { UnixListener } from '../os/unix-socket.js';
import { ControlServer, controlRequest, type ControlReply } from './control.js';
import { DiskResizer, type ImageSource } from './resize.js';

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
  --socket-mode MODE         Octal file mode of the socket (default 0600: only this user may connect).
  --socket-group GROUP       Give the socket to this group (name or number), e.g. with --socket-mode 0660.
  --inject-faults SPEC       For testing: fail, delay or shorten matching requests. SPEC is rules
                             KIND[=ARG][:OPS][@START-END] joined by commas; KIND eio, enospc, short,
                             delay=5ms; OPS read+write+flush+discard+write-zeroes or any. Example:
                             'eio:read@1M-2M,delay=10ms:write'. Never use on a disk that matters.
  --control-socket PATH      Management socket (default: the --socket path + ".ctl", mode 0600).
                             One JSON request per line, one JSON answer per line:
                               {"op":"info"}                  -> {"ok":true,"sizeBytes":...,...}
                               {"op":"resize","size":BYTES}   -> {"ok":true,"sizeBytes":...,...}
                             errors answer {"ok":false,"error":"..."}. \`vhost-blk resize\` uses it.
  --log-level LEVEL          debug, info, warn or error (default info).
  -h, --help                 Show this help.

Live resize: \`vhost-blk resize --socket PATH --size 2G\` grows the image while the guest runs, and the
guest sees the new size at once (the frontend is told through the vhost-user backend request channel).
SIGHUP re-reads the image's size, for a file or block device grown by other means. Disks only grow:
shrinking under a running guest would lose data.
`;

const RESIZE_HELP = `Usage: vhost-blk resize (--socket PATH | --control-socket PATH) --size SIZE

Grows the disk a running \`vhost-blk serve\` exports, without stopping the guest: the image file is
extended (a block device must already have been grown), and the guest is told the new size.

Options:
  --socket PATH              The daemon's vhost-user socket; its control socket is PATH.ctl.
  --control-socket PATH      The daemon's control socket, if it was started with --control-socket.
  --size SIZE                New size: bytes or with a suffix K, M, G, T (2G, 512M). A multiple of the
                             disk's logical block size, at least the current size (disks only grow).
  -h, --help                 Show this help.
`;

const HELP = `Usage: vhost-blk <command> [options]

Commands:
  serve     Serve a disk image over vhost-user-blk (see: vhost-blk serve --help)
  resize    Grow the disk of a running daemon; the guest sees it at once (see: vhost-blk resize --help)
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
  /** Group id the socket is given to, or -1. */
  socketGroup: number;
  faults: FaultRule[];
  /** Management socket path. */
  controlSocket: string;
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

/** A group name or number as a gid (-1 when not given), checked against /etc/group. */
function parseGroup(raw: string | undefined): number {
  if (raw === undefined) return -1;
  if (/^\d+$/.test(raw)) return Number(raw);
  let groups = '';
  try {
    groups = readFileSync('/etc/group', 'utf8');
  } catch { /* no group database: only numbers work */ }
  for (const line of groups.split('\n')) {
    const [name, , gid] = line.split(':');
    if (name === raw && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  throw new UsageError(`--socket-group: no group named '${raw}' (give a name from /etc/group or a number)`);
}

function parseFaults(raw: string | undefined): FaultRule[] {
  if (raw === undefined) return [];
  try {
    return parseFaultSpec(raw);
  } catch (err) {
    throw new UsageError(`--inject-faults: ${(err as Error).message}`);
  }
}

/** Options only, strictly: an unknown option or a stray argument is a UsageError. */
function parseFlags<const O extends NonNullable<ParseArgsConfig['options']>>(argv: string[], options: O) {
  try {
    return parseArgs({ args: argv, strict: true, allowPositionals: false, options }).values;
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
}

/** Parses `serve` arguments; throws UsageError with a clear message on any bad value. */
export function parseServeArgs(argv: string[]): ServeOptions | 'help' {
  const values = parseFlags(argv, {
    socket: { type: 'string' }, image: { type: 'string' }, backend: { type: 'string' }, size: { type: 'string' },
    direct: { type: 'boolean' }, readonly: { type: 'boolean' }, 'num-queues': { type: 'string' },
    'queue-size': { type: 'string' }, threads: { type: 'string' }, writeback: { type: 'string' },
    serial: { type: 'string' }, 'logical-block-size': { type: 'string' }, 'physical-block-size': { type: 'string' },
    'socket-mode': { type: 'string' }, 'socket-group': { type: 'string' }, 'control-socket': { type: 'string' }, 'inject-faults': { type: 'string' }, 'log-level': { type: 'string' }, 'poll-us': { type: 'string' }, help: { type: 'boolean', short: 'h' },
  });
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
  const controlSocket = values['control-socket'] ?? defaultControlSocket(values.socket);
  if (controlSocket === values.socket) throw new UsageError('--control-socket must differ from --socket');
  return {
    socket: values.socket, image: values.image ?? null, backend, size: values.size ? parseSize('size', values.size) : 2 ** 30,
    direct: values.direct ?? false, readonly: values.readonly ?? false, numQueues, queueSize, threads,
    writeback: writebackRaw === 'on', serial: values.serial ?? null, logicalBlockSize, physicalBlockSize,
    socketMode: parseInt(modeRaw, 8), socketGroup: parseGroup(values['socket-group']), faults: parseFaults(values['inject-faults']), controlSocket, logLevel, pollUs: intOption('poll-us', values['poll-us'], 32, 0, 1000),
  };
}

/** The control socket of a daemon serving on vhost-user socket `socket`, unless told otherwise. */
export function defaultControlSocket(socket: string): string {
  return `${socket}.ctl`;
}

/** Parsed `resize` options. */
export interface ResizeOptions {
  controlSocket: string;
  sizeBytes: number;
}

/** Parses `resize` arguments; throws UsageError with a clear message on any bad value. */
export function parseResizeArgs(argv: string[]): ResizeOptions | 'help' {
  const values = parseFlags(argv, { socket: { type: 'string' }, 'control-socket': { type: 'string' }, size: { type: 'string' }, help: { type: 'boolean', short: 'h' } });
  if (values.help) return 'help';
  if (values.socket !== undefined && values['control-socket'] !== undefined) {
    throw new UsageError('give --socket or --control-socket, not both');
  }
  const controlSocket = values['control-socket'] ?? (values.socket !== undefined ? defaultControlSocket(values.socket) : undefined);
  if (!controlSocket) throw new UsageError("--socket PATH (the daemon's vhost-user socket) or --control-socket PATH is required");
  if (values.size === undefined) throw new UsageError('--size SIZE is required (the new size, such as 2G)');
  return { controlSocket, sizeBytes: parseSize('size', values.size) };
}

/** `vhost-blk resize`: asks the daemon to grow the disk; prints what it did. */
async function resize(argv: string[]): Promise<number> {
  const parsed = parseResizeArgs(argv);
  if (parsed === 'help') {
    process.stdout.write(RESIZE_HELP);
    return 0;
  }
  let reply: ControlReply;
  try {
    reply = await controlRequest(parsed.controlSocket, { op: 'resize', size: parsed.sizeBytes });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' || code === 'ECONNREFUSED'
      ? `no daemon answers at ${parsed.controlSocket} (${code}): is \`vhost-blk serve\` running, with this --socket or --control-socket?`
      : (err as Error).message;
    process.stderr.write(`vhost-blk: ${why}\n`);
    return 1;
  }
  if (!reply.ok) {
    process.stderr.write(`vhost-blk: resize refused: ${reply.error}\n`);
    return 1;
  }
  process.stdout.write(`${typeof reply.message === 'string' ? reply.message : JSON.stringify(reply)}\n`);
  return 0;
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
function openImage(path: string, o: ServeOptions): { spec: BackendSpec; fd: number; blockDevice: boolean } {
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
  return { spec: { kind: 'file', fd, sizeBytes, readOnly: o.readonly }, fd, blockDevice: st.isBlockDevice() };
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
  let source: ImageSource = { kind: 'null' };
  let imagePath = '(null backend)';
  if (o.backend === 'null') {
    spec = { kind: 'null', sizeBytes: o.size, readOnly: o.readonly };
  } else {
    imagePath = o.image ?? defaultImage(log);
    const image = openImage(imagePath, o);
    spec = image.spec;
    source = image.blockDevice ? { kind: 'block-device', fd: image.fd, path: imagePath } : { kind: 'file', fd: image.fd, path: imagePath, readOnly: o.readonly };
  }
  if (o.faults.length > 0) {
    spec.faults = o.faults;
    log.warn(`fault injection on (--inject-faults): ${describeFaults(o.faults)}`);
  }
  const serial = o.serial ?? (o.backend === 'null' ? 'vhost-blk-null' : `vblk-${createHash('sha256').update(realpathSync(imagePath)).digest('hex').slice(0, 15)}`);
  // Signal handlers go in before any socket appears: whoever sees the socket may signal at once, and
  // without a handler SIGTERM would kill us outright instead of a clean stop.
  let handleSignal: ((sig: NodeJS.Signals) => void) | null = null;
  let earlySignal: NodeJS.Signals | null = null;
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(sig, () => {
      if (handleSignal) handleSignal(sig);
      else if (sig !== 'SIGHUP') earlySignal = sig;
    });
  }
  // The sockets are bound before the workers start: a path in use fails fast and cleanly. The control
  // socket first, so that it answers once the vhost-user socket appears.
  let control: ControlServer;
  try {
    control = await ControlServer.listen(o.controlSocket, log);
  } catch (err) {
    throw new UsageError(`--control-socket: ${(err as Error).message}`);
  }
  let listener: UnixListener;
  try {
    listener = UnixListener.listen(o.socket, { mode: o.socketMode });
  } catch (err) {
    await control.close();
    throw new UsageError((err as Error).message);
  }
  if (o.socketGroup >= 0) {
    try {
      chownSync(o.socket, -1, o.socketGroup);
    } catch (err) {
      listener.close();
      await control.close();
      throw new UsageError(`--socket-group: cannot give ${o.socket} to group ${o.socketGroup}: ${(err as NodeJS.ErrnoException).code ?? err}`);
    }
  }
  const device = new BlkDevice({
    backend: spec, numQueues: o.numQueues, queueSize: o.queueSize, threads: o.threads, serial,
    writeback: o.writeback, logicalBlockSize: o.logicalBlockSize, physicalBlockSize: o.physicalBlockSize, pollUs: o.pollUs,
  }, log);
  const server = new Server(listener, device, log);
  const resizer = new DiskResizer(source, device, server, o.logicalBlockSize, log);
  control.handler = { info: () => resizer.info(), resize: (size) => resizer.resize(size) };
  log.info(`control socket at ${control.path} (vhost-blk resize --control-socket ${control.path} --size SIZE grows the disk live)`);
  log.info(`serving ${imagePath} (${spec.sizeBytes} bytes${o.readonly ? ', read-only' : ''}${o.direct ? ', O_DIRECT' : ''}) with ${o.numQueues} queue(s) on ${o.threads} thread(s)`);
  server.start();
  process.stdout.write(qemuHint(o) + '\n');
  return await new Promise<number>((resolve) => {
    let stopping = false;
    handleSignal = (sig) => {
      if (sig === 'SIGHUP') {
        log.info('SIGHUP: re-reading the image size');
        resizer.reload().then((r) => { if (!r.changed) log.info(r.message); }, (err) => log.error(`SIGHUP: ${(err as Error).message}`));
        return;
      }
      if (stopping) {
        log.warn(`${sig} again: exiting without waiting for in-flight requests`);
        process.exit(1);
      }
      stopping = true;
      log.info(`${sig}: no new requests; finishing in-flight ones`);
      control.close().then(() => { log.debug('stop: control socket closed'); return server.stop(); }).then(() => { log.info('stopped'); resolve(0); }, (err) => { log.error(`stop failed: ${err}`); resolve(1); });
    };
    if (earlySignal) handleSignal(earlySignal);
  });
}

/** Runs the command line; exits the process with its status. */
export async function main(argv: string[]): Promise<void> {
  const [cmd, ...rest] = argv;
  try {
    let code: number;
    if (cmd === 'serve') code = await serve(rest);
    else if (cmd === 'resize') code = await resize(rest);
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
