// End-to-end test harness: boots a small Linux guest under QEMU (TCG) with a
// vhost-user-blk-pci disk, drives a busybox shell over the serial console,
// and starts vhost-user-blk backends (qemu-storage-daemon as the reference
// peer, or our own `bin/vhost-blk serve`). See test/e2e/README.md.
//
// Host requirements (Debian package names): qemu-system-x86 (qemu-system-x86_64),
// qemu-system-common (qemu-storage-daemon), busybox-static, cpio, fio,
// linux-image-amd64 (a kernel in /boot plus its modules in /lib/modules).
// requireTools() turns a missing one into a test failure naming the package.
//
// API in brief:
//   ensureGuestAssets()            -> {kernel, initramfs} (built once, cached)
//   Guest.boot({socket, ...})      -> guest; guest.run(cmd) -> {status, output};
//                                     guest.check(cmd); guest.poweroff(); guest.dispose()
//   startQemuStorageDaemon({...}) / startVhostBlk(args) -> DaemonHandle (stop(), output)
//   runPatternScenario(guest, image) + checkImagePattern(image, regions): the
//                                     shared O_DIRECT scenario of peer/serve tests
//   makePattern(bytes, seed), guestPattern(), runFioVerify(), step(), withDiagnostics()
//
// The guest initramfs is built once and cached under <repo>/.cache/guest/,
// keyed by kernel version and a hash of everything that goes into it.
// It contains:
//   /bin/busybox + applet symlinks, /init (see initScript()),
//   /lib/modules/*.ko           virtio modules (decompressed), loaded by /init,
//   /usr/bin/fio + its shared libraries (so tests can run `fio --verify`),
//   /pattern.bin                makePattern(GUEST_PATTERN.bytes, GUEST_PATTERN.seed),
//   plus any `extraFiles` passed to ensureGuestAssets().
// Host data reaches the guest only through the initramfs: tests regenerate
// /pattern.bin on the host with guestPattern(), or pass `extraFiles`.

import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import * as zlib from 'node:zlib';

const execFileP = promisify(execFile);

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

/** Root of the repository (the directory holding package.json "name": "vhost-blk"). */
export const REPO_ROOT: string = findRepoRoot();

function findRepoRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = path.join(dir, 'package.json');
    if (fs.existsSync(pkg)) {
      try {
        if (JSON.parse(fs.readFileSync(pkg, 'utf8')).name === 'vhost-blk') return dir;
      } catch {
        /* keep looking */
      }
    }
    const up = path.dirname(dir);
    if (up === dir) throw new Error('guest.ts: cannot find the vhost-blk repository root');
    dir = up;
  }
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Resolves to `p`'s value, or to undefined after `ms` (the timer is cleared either way). */
async function within<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

// Every QEMU / daemon we start, so that nothing outlives the test process.
const liveChildren = new Set<ChildProcess>();
function track(proc: ChildProcess): ChildProcess {
  liveChildren.add(proc);
  proc.once('exit', () => liveChildren.delete(proc));
  proc.once('error', () => liveChildren.delete(proc));
  return proc;
}
process.once('exit', () => {
  for (const p of liveChildren) {
    try {
      p.kill('SIGKILL');
    } catch {
      /* already gone */
    }
  }
});

/** VHOST_BLK_E2E_VERBOSE=1 streams guest consoles and daemon output to stderr. */
const VERBOSE = !!process.env.VHOST_BLK_E2E_VERBOSE && process.env.VHOST_BLK_E2E_VERBOSE !== '0';
function defaultLog(tag: string): ((line: string) => void) | undefined {
  return VERBOSE ? (line) => process.stderr.write(`[${tag}] ${line}\n`) : undefined;
}

/** Full path of an executable found in PATH, or null. */
export function which(cmd: string): string | null {
  for (const dir of (process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin').split(':')) {
    if (!dir) continue;
    const p = path.join(dir, cmd);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      if (fs.statSync(p).isFile()) return p;
    } catch {
      /* not here */
    }
  }
  return null;
}

const TOOL_PACKAGES: Record<string, string> = {
  'qemu-system-x86_64': 'qemu-system-x86',
  'qemu-storage-daemon': 'qemu-system-common',
  busybox: 'busybox-static',
  cpio: 'cpio',
  fio: 'fio',
  ldd: 'libc-bin',
};

/**
 * Throws (never skips) if a host tool the e2e tests need is missing, naming the
 * apt package to install. Call it at the start of every e2e test.
 */
export function requireTools(tools: string[] = ['qemu-system-x86_64', 'busybox', 'cpio', 'fio', 'ldd']): void {
  const missing = tools.filter((t) => which(t) === null);
  if (missing.length > 0) {
    const pkgs = [...new Set(missing.map((t) => TOOL_PACKAGES[t] ?? t))].join(' ');
    throw new Error(
      `e2e tests need ${missing.join(', ')} which ${missing.length === 1 ? 'is' : 'are'} not installed ` +
        `(not in PATH). Install with: apt-get install -y ${pkgs}`,
    );
  }
}

/** A temporary directory; `cleanup()` removes it recursively. */
export interface TempDir {
  path: string;
  cleanup(): Promise<void>;
}

export async function makeTempDir(prefix = 'vhost-blk-e2e-'): Promise<TempDir> {
  const p = await fsp.mkdtemp(path.join(os.tmpdir(), prefix));
  return { path: p, cleanup: () => fsp.rm(p, { recursive: true, force: true }) };
}

/** Creates (or truncates to) a sparse raw image of `bytes` bytes. */
export async function createSparseImage(file: string, bytes: number): Promise<void> {
  const fh = await fsp.open(file, 'w');
  try {
    await fh.truncate(bytes);
  } finally {
    await fh.close();
  }
}

/**
 * Deterministic pseudo-random bytes (xorshift128, seeded through splitmix32).
 * The same (bytes, seed) always yields the same buffer, on host and (via the
 * initramfs) in the guest.
 */
export function makePattern(bytes: number, seed: number): Buffer {
  let s = seed >>> 0;
  const splitmix = () => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
  let x = splitmix() | 1;
  let y = splitmix();
  let z = splitmix();
  let w = splitmix();
  const words = Math.ceil(bytes / 4);
  const out = Buffer.alloc(words * 4);
  for (let i = 0; i < words; i++) {
    const t = x ^ (x << 11);
    x = y;
    y = z;
    z = w;
    w = (w ^ (w >>> 19) ^ (t ^ (t >>> 8))) >>> 0;
    out.writeUInt32LE(w, i * 4);
  }
  return out.subarray(0, bytes);
}

/** The pattern file baked into every guest initramfs at `path`. */
export const GUEST_PATTERN = { path: '/pattern.bin', bytes: 4 * 1024 * 1024, seed: 0x5eed_b10c } as const;

/** Returns the bytes of the guest's /pattern.bin (regenerated on the host). */
let patternCache: Buffer | undefined;
export function guestPattern(): Buffer {
  patternCache ??= makePattern(GUEST_PATTERN.bytes, GUEST_PATTERN.seed);
  return patternCache;
}

// ---------------------------------------------------------------------------
// Guest assets: kernel + cached initramfs
// ---------------------------------------------------------------------------

export interface GuestAssets {
  /** Host kernel image (e.g. /boot/vmlinuz-6.1.0-xx-amd64). */
  kernel: string;
  /** Cached gzip'd newc cpio initramfs. */
  initramfs: string;
  /** Kernel release the initramfs's modules belong to. */
  kernelVersion: string;
  /** Module files, in the order /init loads them. */
  modules: string[];
}

export interface GuestAssetOptions {
  /**
   * Additional files for the initramfs: guest absolute path -> content.
   * They are part of the cache key.
   */
  extraFiles?: Record<string, Buffer | string>;
}

// Bump when the build procedure changes in a way the hash does not capture.
const ASSET_FORMAT = 'v1';

function initScript(modules: string[]): string {
  const insmods = modules
    .map((m) => `insmod /lib/modules/${m} || echo "init: insmod ${m} failed"`)
    .join('\n');
  // The shell reads commands from a pipe (dd /dev/ttyS0 | sh), so it is not
  // interactive: no prompt, no line editing, no echo of its own; the tty's
  // echo is turned off too. Guest.run() nonetheless tolerates echoed input.
  // Not `cat /dev/ttyS0 | sh`: with it each line is held back until the next
  // one arrives (busybox cat copies with sendfile(); plain read/write via dd
  // does not show the problem).
  return `#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t tmpfs tmpfs /dev/shm
exec </dev/ttyS0 >/dev/ttyS0 2>&1
${insmods}
stty -F /dev/ttyS0 -echo -ixon
echo "VHOSTBLK_GUEST""_READY modules=${modules.length}"
while :; do
  dd if=/dev/ttyS0 bs=4096 2>/dev/null | sh
  echo "init: shell exited; restarting"
done
`;
}

/** Newest kernel in /boot, by version order of the vmlinuz-* file names. */
function newestKernel(): { kernel: string; version: string } {
  let names: string[];
  try {
    names = fs.readdirSync('/boot').filter((n) => n.startsWith('vmlinuz-'));
  } catch {
    names = [];
  }
  if (names.length === 0) {
    throw new Error('no kernel found in /boot (vmlinuz-*); install one with: apt-get install -y linux-image-amd64');
  }
  const versions = names.map((n) => n.slice('vmlinuz-'.length)).sort(compareVersions);
  const version = versions[versions.length - 1]!;
  const kernel = `/boot/vmlinuz-${version}`;
  try {
    fs.accessSync(kernel, fs.constants.R_OK);
  } catch {
    throw new Error(`kernel ${kernel} is not readable by this user (run the e2e tests as root or chmod it)`);
  }
  if (!fs.existsSync(`/lib/modules/${version}/modules.dep`)) {
    throw new Error(`/lib/modules/${version}/modules.dep missing: the modules of kernel ${version} are not installed`);
  }
  return { kernel, version };
}

function compareVersions(a: string, b: string): number {
  const pa = a.split(/(\d+)/);
  const pb = b.split(/(\d+)/);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const x = pa[i] ?? '';
    const y = pb[i] ?? '';
    if (x === y) continue;
    if (/^\d+$/.test(x) && /^\d+$/.test(y)) return Number(x) - Number(y);
    return x < y ? -1 : 1;
  }
  return 0;
}

/**
 * Modules (paths relative to /lib/modules/<ver>) needed for virtio-blk over
 * PCI, in load order. Options =y in /boot/config-<ver> are built in and skipped.
 */
function resolveModules(version: string): string[] {
  const modDir = `/lib/modules/${version}`;
  const config = fs.existsSync(`/boot/config-${version}`) ? fs.readFileSync(`/boot/config-${version}`, 'utf8') : '';
  const builtin = new Set(
    (fs.existsSync(`${modDir}/modules.builtin`) ? fs.readFileSync(`${modDir}/modules.builtin`, 'utf8') : '')
      .split('\n')
      .filter(Boolean)
      .map(moduleName),
  );
  const deps = new Map<string, { file: string; deps: string[] }>();
  for (const line of fs.readFileSync(`${modDir}/modules.dep`, 'utf8').split('\n')) {
    const m = /^([^:]+):\s*(.*)$/.exec(line);
    if (!m) continue;
    deps.set(moduleName(m[1]!), { file: m[1]!, deps: m[2]!.split(/\s+/).filter(Boolean) });
  }
  const roots: Array<[string, string]> = [
    ['CONFIG_VIRTIO', 'virtio'],
    ['CONFIG_VIRTIO_PCI', 'virtio_pci'],
    ['CONFIG_VIRTIO_BLK', 'virtio_blk'],
  ];
  const order: string[] = [];
  const seen = new Set<string>();
  const visit = (name: string, chain: string[]) => {
    if (seen.has(name)) return;
    seen.add(name);
    const entry = deps.get(name);
    if (!entry) {
      if (builtin.has(name)) return;
      throw new Error(`kernel module ${name} (needed by ${chain.join(' <- ') || 'the guest'}) not found in ${modDir}`);
    }
    for (const d of entry.deps) visit(moduleName(d), [name, ...chain]);
    order.push(entry.file);
  };
  for (const [sym, name] of roots) {
    const v = new RegExp(`^${sym}=(.)`, 'm').exec(config)?.[1];
    if (v === 'y') continue; // built in
    if (config && v !== 'm') throw new Error(`kernel ${version}: ${sym} is neither =y nor =m; the guest cannot see virtio-blk`);
    if (!config && builtin.has(name)) continue;
    visit(name, []);
  }
  return order;
}

function moduleName(file: string): string {
  return path.basename(file).replace(/\.ko(\.(xz|zst|gz))?$/, '').replace(/-/g, '_');
}

/** A kernel module's bytes, decompressed (.ko, .ko.gz, .ko.xz, .ko.zst) so busybox insmod can load it. */
export async function readKernelModule(file: string): Promise<Buffer> {
  if (file.endsWith('.ko')) return fsp.readFile(file);
  if (file.endsWith('.ko.gz')) return zlib.gunzipSync(await fsp.readFile(file));
  const tool = file.endsWith('.ko.xz') ? 'xz' : file.endsWith('.ko.zst') ? 'zstd' : null;
  if (!tool) throw new Error(`unknown module compression: ${file}`);
  if (!which(tool)) throw new Error(`${file} is compressed; install ${tool} (apt-get install -y ${tool === 'xz' ? 'xz-utils' : 'zstd'})`);
  const { stdout } = await execFileP(tool, ['-dc', file], { encoding: 'buffer', maxBuffer: 256 << 20 });
  return stdout;
}

/** Shared libraries of an ELF binary as reported by ldd (absolute paths, incl. the loader). */
async function sharedLibraries(binary: string): Promise<string[]> {
  const { stdout } = await execFileP('ldd', [binary]);
  const libs: string[] = [];
  for (const line of stdout.split('\n')) {
    const arrow = /=>\s*(\/\S+)/.exec(line);
    if (arrow) {
      libs.push(arrow[1]!);
      continue;
    }
    const loader = /^\s*(\/\S+)\s+\(/.exec(line);
    if (loader) libs.push(loader[1]!);
    else if (/not found/.test(line)) throw new Error(`ldd ${binary}: ${line.trim()}`);
  }
  return libs;
}

let assetsPromise: Promise<GuestAssets> | undefined;
let assetsKey: string | undefined;

/**
 * Builds (once; cached in <repo>/.cache/guest/) the guest initramfs for the
 * newest kernel in /boot and returns the kernel and initramfs paths.
 */
export function ensureGuestAssets(opts: GuestAssetOptions = {}): Promise<GuestAssets> {
  const key = JSON.stringify(Object.keys(opts.extraFiles ?? {}).sort()) + hashExtra(opts.extraFiles);
  if (!assetsPromise || assetsKey !== key) {
    assetsKey = key;
    assetsPromise = buildGuestAssets(opts);
    assetsPromise.catch(() => {
      assetsPromise = undefined;
    });
  }
  return assetsPromise;
}

function hashExtra(files: Record<string, Buffer | string> | undefined): string {
  const h = createHash('sha256');
  for (const [k, v] of Object.entries(files ?? {}).sort(([a], [b]) => (a < b ? -1 : 1))) {
    h.update(k).update('\0').update(v).update('\0');
  }
  return h.digest('hex');
}

async function buildGuestAssets(opts: GuestAssetOptions): Promise<GuestAssets> {
  requireTools(['busybox', 'cpio', 'fio', 'ldd']);
  const { kernel, version } = newestKernel();
  const modules = resolveModules(version);
  const guestModules = modules.map((m) => path.basename(m).replace(/\.ko(\.(xz|zst|gz))?$/, '.ko'));
  const init = initScript(guestModules);
  const busybox = which('busybox')!;
  const fio = which('fio')!;

  const h = createHash('sha256');
  h.update(ASSET_FORMAT).update(init).update(hashExtra(opts.extraFiles));
  h.update(JSON.stringify(GUEST_PATTERN)).update(makePattern(64, GUEST_PATTERN.seed));
  for (const f of [busybox, fio, ...modules.map((m) => `/lib/modules/${version}/${m}`)]) {
    const st = fs.statSync(f);
    h.update(`${f}:${st.size}:${st.mtimeMs}`);
  }
  const digest = h.digest('hex').slice(0, 16);
  const cacheDir = path.join(REPO_ROOT, '.cache', 'guest');
  const initramfs = path.join(cacheDir, `initramfs-${version}-${digest}.cpio.gz`);
  const result: GuestAssets = { kernel, initramfs, kernelVersion: version, modules: guestModules };
  if (fs.existsSync(initramfs)) {
    const now = new Date();
    await fsp.utimes(initramfs, now, now).catch(() => undefined); // keeps it out of pruneCache()
    return result;
  }

  await fsp.mkdir(cacheDir, { recursive: true });
  const stage = await fsp.mkdtemp(path.join(os.tmpdir(), 'vhost-blk-initramfs-'));
  try {
    const put = async (guestPath: string, data: Buffer | string, mode = 0o644) => {
      const dst = path.join(stage, guestPath);
      await fsp.mkdir(path.dirname(dst), { recursive: true });
      await fsp.writeFile(dst, data, { mode });
      await fsp.chmod(dst, mode);
    };
    for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'proc', 'sys', 'dev', 'tmp', 'run', 'root', 'etc', 'lib/modules', 'lib64']) {
      await fsp.mkdir(path.join(stage, d), { recursive: true });
    }
    await fsp.chmod(path.join(stage, 'tmp'), 0o1777);

    // busybox and its applets
    await put('bin/busybox', await fsp.readFile(busybox), 0o755);
    const { stdout: applets } = await execFileP(busybox, ['--list-full']);
    for (const a of applets.split('\n').map((s) => s.trim()).filter(Boolean)) {
      const dst = path.join(stage, a);
      if (fs.existsSync(dst)) continue;
      await fsp.mkdir(path.dirname(dst), { recursive: true });
      await fsp.symlink('/bin/busybox', dst);
    }

    // kernel modules, decompressed
    for (let i = 0; i < modules.length; i++) {
      await put(`lib/modules/${guestModules[i]}`, await readKernelModule(`/lib/modules/${version}/${modules[i]}`));
    }

    // fio and its shared libraries at the paths ldd resolved (loader path preserved)
    await put('usr/bin/fio', await fsp.readFile(fio), 0o755);
    for (const lib of await sharedLibraries(fio)) {
      await put(lib, await fsp.readFile(lib), 0o755);
    }

    await put('init', init, 0o755);
    await put('etc/passwd', 'root:x:0:0:root:/root:/bin/sh\n');
    await put('etc/group', 'root:x:0:\n');
    await put(GUEST_PATTERN.path, guestPattern());
    for (const [p, data] of Object.entries(opts.extraFiles ?? {})) {
      await put(p.replace(/^\/+/, ''), data);
    }

    const tmpOut = `${initramfs}.${process.pid}.tmp`;
    await packCpio(stage, tmpOut);
    await fsp.rename(tmpOut, initramfs);
    await pruneCache(cacheDir, initramfs);
  } finally {
    await fsp.rm(stage, { recursive: true, force: true });
  }
  return result;
}

/** Removes cached images (other builds / kernels) not used for a week, and stale temp files. */
async function pruneCache(cacheDir: string, keep: string): Promise<void> {
  const weekAgo = Date.now() - 7 * 24 * 3600 * 1000;
  for (const f of await fsp.readdir(cacheDir)) {
    const p = path.join(cacheDir, f);
    if (p === keep || !/^initramfs-.*\.cpio\.gz(\.\d+\.tmp)?$/.test(f)) continue;
    try {
      if ((await fsp.stat(p)).mtimeMs < weekAgo) await fsp.rm(p, { force: true });
    } catch {
      /* raced with another process */
    }
  }
}

async function listTree(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (rel: string) => {
    const entries = await fsp.readdir(path.join(root, rel), { withFileTypes: true });
    entries.sort((a, b) => (a.name < b.name ? -1 : 1));
    for (const e of entries) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      out.push(r);
      if (e.isDirectory()) await walk(r);
    }
  };
  await walk('');
  return out;
}

/** `find . | cpio -o -H newc | gzip` done with a cpio child and Node's zlib. */
async function packCpio(stage: string, outFile: string): Promise<void> {
  const files = await listTree(stage);
  const cpio = spawn('cpio', ['-o', '-H', 'newc', '--quiet', '-R', '0:0'], { cwd: stage, stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  cpio.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const out = fs.createWriteStream(outFile);
  const gz = zlib.createGzip({ level: 6 });
  cpio.stdout.pipe(gz).pipe(out);
  cpio.stdin.end(['.', ...files].join('\n') + '\n');
  const [code] = (await once(cpio, 'exit')) as [number | null];
  await once(out, 'close');
  if (code !== 0) throw new Error(`cpio failed (exit ${code}): ${stderr}`);
}

// ---------------------------------------------------------------------------
// Output line collection
// ---------------------------------------------------------------------------

class LineLog {
  readonly lines: string[] = [];
  private partial = '';
  constructor(
    private readonly prefix: string,
    private readonly max = 20000,
    private readonly sink?: (line: string) => void,
  ) {}
  push(chunk: string): void {
    const parts = (this.partial + chunk).split('\n');
    this.partial = parts.pop()!;
    for (const p of parts) this.add(p.replace(/\r/g, ''));
  }
  flush(): void {
    if (this.partial) this.add(this.partial.replace(/\r/g, ''));
    this.partial = '';
  }
  add(line: string) {
    this.lines.push(this.prefix + line);
    if (this.lines.length > this.max) this.lines.splice(0, this.lines.length - this.max);
    this.sink?.(this.prefix + line);
  }
  tail(n: number): string[] {
    const all = this.partial ? [...this.lines, this.prefix + this.partial] : this.lines;
    return all.slice(-n);
  }
}

// ---------------------------------------------------------------------------
// The guest
// ---------------------------------------------------------------------------

export interface BootOptions {
  /** Unix socket of the vhost-user-blk backend (must already be listening). */
  socket: string;
  memoryMiB?: number;
  /**
   * KiB added to memoryMiB. Migration tests add 8: QEMU before 9.0 under TCG loses guest CPU writes when
   * the RAM block is a multiple of 256 KiB (its dirty bitmap sync takes a fast path that leaves the vCPU
   * TLBs writing unmarked: fixed upstream by "physmem: Fix migration dirty bitmap coherency with TCG
   * memory access"); an odd size takes the path that resets them.
   */
  extraMemoryKiB?: number;
  cpus?: number;
  /** num-queues of vhost-user-blk-pci (default 1; the backend must support it). */
  numQueues?: number;
  /** Appended verbatim to the -device vhost-user-blk-pci,... argument, e.g. ",queue-size=256". */
  extraDeviceArgs?: string;
  /** Appended verbatim to the -chardev socket,... argument, e.g. ",reconnect=1" (QEMU reconnects to a restarted backend). */
  extraChardevArgs?: string;
  /** Extra QEMU arguments. */
  extraQemuArgs?: string[];
  /** The -accel option (default "tcg"). */
  accel?: string;
  /** Extra kernel command line. */
  extraAppend?: string;
  /** Called with every console line (QEMU stderr lines are prefixed "[qemu] "). */
  log?: (line: string) => void;
  /** Time allowed for the kernel to boot and the shell to answer (default 120 s). */
  bootTimeoutMs?: number;
  assets?: GuestAssets;
}

export interface RunResult {
  status: number;
  output: string;
}

export class GuestError extends Error {}

const KERNEL_LINE = /^\s*\[\s*\d+\.\d+\]\s/;

export class Guest {
  /** Every console line so far (QEMU's own stderr prefixed "[qemu] "). */
  readonly console: LineLog;
  /** Resolves when QEMU exits. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private exitInfo: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  /** Console output not yet consumed by run(). */
  private buf = '';
  private seq = 0;
  private queue: Promise<unknown> = Promise.resolve();
  private listeners = new Set<() => void>();

  private constructor(
    readonly proc: ChildProcess,
    readonly args: string[],
    log?: (line: string) => void,
  ) {
    this.console = new LineLog('', 20000, log);
    const qemuErr = new LineLog('[qemu] ', 2000, (l) => this.console.add(l));
    proc.stdout!.setEncoding('latin1');
    proc.stderr!.setEncoding('utf8');
    proc.stdout!.on('data', (d: string) => {
      this.console.push(d);
      this.buf += d;
      if (this.buf.length > 8 << 20) this.buf = this.buf.slice(-(4 << 20));
      this.notify();
    });
    proc.stderr!.on('data', (d: string) => qemuErr.push(d));
    this.exited = new Promise((resolve) => {
      proc.on('exit', (code, signal) => {
        this.exitInfo = { code, signal };
        qemuErr.flush();
        this.console.flush();
        this.notify();
        resolve(this.exitInfo);
      });
    });
    proc.stdin!.on('error', () => {
      /* QEMU gone; reported through exitInfo */
    });
  }

  /** QEMU's exit status once it has exited, else undefined. */
  get exit(): { code: number | null; signal: NodeJS.Signals | null } | undefined {
    return this.exitInfo;
  }

  private notify() {
    for (const l of [...this.listeners]) l();
  }

  /** Waits until `pred()` returns a value (checked on every console chunk), QEMU exits, or timeout. */
  private waitFor<T>(pred: () => T | undefined, timeoutMs: number, what: string): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const check = () => {
        let v: T | undefined;
        try {
          v = pred();
        } catch (e) {
          done();
          reject(e);
          return;
        }
        if (v !== undefined) {
          done();
          resolve(v);
        } else if (this.exitInfo) {
          done();
          reject(
            new GuestError(
              `QEMU exited (code ${this.exitInfo.code}, signal ${this.exitInfo.signal}) while waiting for ${what}\n` +
                this.diagnostics(),
            ),
          );
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new GuestError(`timed out after ${timeoutMs} ms waiting for ${what}\n${this.diagnostics()}`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.listeners.delete(check);
      };
      this.listeners.add(check);
      check();
    });
  }

  /**
   * The qemu-system-x86_64 command line boot() uses for `opts` (and incoming() too, plus `-incoming defer`:
   * a migration destination needs the very same machine).
   */
  static qemuArgs(opts: BootOptions, assets: GuestAssets): string[] {
    const memKiB = (opts.memoryMiB ?? 512) * 1024 + (opts.extraMemoryKiB ?? 0);
    const cpus = opts.cpus ?? 1;
    const numQueues = opts.numQueues ?? 1;
    const append = [
      'console=ttyS0',
      'panic=-1',
      'rdinit=/init',
      'loglevel=6',
      'printk.time=1',
      'mitigations=off',
      'tsc=reliable',
      opts.extraAppend ?? '',
    ]
      .filter(Boolean)
      .join(' ');
    return [
      '-nodefaults',
      '-no-user-config',
      '-accel', opts.accel ?? 'tcg',
      '-machine', 'q35',
      '-cpu', 'max',
      '-m', `${memKiB}K`,
      '-object', `memory-backend-memfd,id=mem,size=${memKiB}K,share=on`,
      '-numa', 'node,memdev=mem',
      // maxcpus of at least 2 even for one vCPU: QEMU before 8.1 drops the guest's memory barriers when
      // a TCG machine can only ever have one vCPU (no CF_PARALLEL; fixed upstream by "tcg: Do not elide
      // memory barriers for !CF_PARALLEL in system mode"). Without them the guest's store of used_event
      // can pass its load of used.idx, and a device in another process (us) could lose an interrupt that
      // no real machine loses: a flaky hang that would look like ours. A spare CPU slot costs nothing.
      '-smp', `cpus=${cpus},maxcpus=${Math.max(cpus, 2)}`,
      '-kernel', assets.kernel,
      '-initrd', assets.initramfs,
      '-append', append,
      '-display', 'none',
      '-serial', 'stdio',
      '-monitor', 'none',
      '-no-reboot',
      '-chardev', `socket,id=c0,path=${opts.socket}${opts.extraChardevArgs ?? ''}`,
      '-device', `vhost-user-blk-pci,chardev=c0,num-queues=${numQueues}${opts.extraDeviceArgs ?? ''}`,
      ...(opts.extraQemuArgs ?? []),
    ];
  }

  /** Starts QEMU with `args` and resolves once the process has spawned. */
  private static async spawnQemu(args: string[], log?: (line: string) => void): Promise<Guest> {
    requireTools(['qemu-system-x86_64']);
    const proc = track(spawn('qemu-system-x86_64', args, { stdio: ['pipe', 'pipe', 'pipe'] }));
    const guest = new Guest(proc, args, log ?? defaultLog('guest'));
    await new Promise<void>((resolve, reject) => {
      proc.once('spawn', resolve);
      proc.once('error', (e) => reject(new GuestError(`cannot start qemu-system-x86_64: ${e.message}`)));
    });
    return guest;
  }

  /**
   * Starts a migration destination: QEMU with boot()'s command line for `opts` plus `-incoming defer`
   * (give it a QMP socket in `extraQemuArgs` and send `migrate-incoming` there). It does not wait for
   * anything: the guest's shell answers on this QEMU's console once the migration has completed and the
   * VM runs (the serial console moves along with the guest; run() works then).
   */
  static async incoming(opts: BootOptions): Promise<Guest> {
    const assets = opts.assets ?? (await ensureGuestAssets());
    if (!fs.existsSync(opts.socket)) throw new GuestError(`vhost-user socket ${opts.socket} does not exist`);
    const args = [...Guest.qemuArgs(opts, assets), '-incoming', 'defer'];
    return Guest.spawnQemu(args, opts.log ?? defaultLog('guest-in'));
  }

  /** Boots QEMU with a vhost-user-blk-pci disk on `opts.socket` and waits for the guest shell. */
  static async boot(opts: BootOptions): Promise<Guest> {
    requireTools(['qemu-system-x86_64']);
    const assets = opts.assets ?? (await ensureGuestAssets());
    if (!fs.existsSync(opts.socket)) throw new GuestError(`vhost-user socket ${opts.socket} does not exist`);
    const guest = await Guest.spawnQemu(Guest.qemuArgs(opts, assets), opts.log);
    const timeout = opts.bootTimeoutMs ?? 120_000;
    const t0 = Date.now();
    try {
      await guest.waitFor(
        () => {
          const i = guest.buf.indexOf('VHOSTBLK_GUEST_READY');
          if (i < 0) return undefined;
          guest.buf = guest.buf.slice(i);
          return true;
        },
        timeout,
        'the guest to boot (VHOSTBLK_GUEST_READY from /init)',
      );
      const r = await guest.run('echo alive', Math.max(5_000, timeout - (Date.now() - t0)));
      if (r.status !== 0 || !r.output.includes('alive')) {
        throw new GuestError(`guest shell handshake failed: ${JSON.stringify(r)}\n${guest.diagnostics()}`);
      }
    } catch (e) {
      guest.kill();
      throw e;
    }
    return guest;
  }

  /**
   * Runs one shell command in the guest and returns its exit status and output.
   * The command may span lines (each under 3000 characters) and runs in a
   * subshell (`exit` is fine; cd/variables do not persist) with stdin
   * /dev/null and stderr merged into stdout. Calls are serialized. Lines that
   * look like kernel messages ("[  1.234] ...") are dropped from the output.
   */
  run(cmd: string, timeoutMs = 60_000): Promise<RunResult> {
    const p = this.queue.then(() => this.runNow(cmd, timeoutMs));
    this.queue = p.catch(() => undefined);
    return p;
  }

  private async runNow(cmd: string, timeoutMs: number): Promise<RunResult> {
    if (this.exitInfo) throw new GuestError(`cannot run ${JSON.stringify(cmd)}: QEMU has exited\n${this.diagnostics()}`);
    for (const line of cmd.split('\n')) {
      if (line.length > 3000) throw new GuestError('guest command lines must be shorter than 3000 characters (tty limit)');
    }
    const n = ++this.seq;
    const start = `__S_${n}__`;
    const end = `__E_${n}__`;
    // Split the markers in the command text so echoed input never matches them.
    const wrapped = `echo "__S_""${n}__"; (\n${cmd}\n) </dev/null 2>&1; echo "__E_""${n}__ $?"\n`;
    this.proc.stdin!.write(wrapped);
    // (?=\D): the status is complete once something follows it (normally \r\n).
    const re = new RegExp(`${start}([\\s\\S]*?)${end} (\\d+)(?=\\D)`);
    const m = await this.waitFor(
      () => {
        const mm = re.exec(this.buf);
        if (!mm) return undefined;
        this.buf = this.buf.slice(mm.index + mm[0].length);
        return mm;
      },
      timeoutMs,
      `guest command ${JSON.stringify(cmd.length > 200 ? cmd.slice(0, 200) + '...' : cmd)}`,
    );
    const output = m[1]!
      .replace(/\r/g, '')
      .replace(/^\n/, '')
      .split('\n')
      .filter((l) => !KERNEL_LINE.test(l))
      .join('\n');
    return { status: Number(m[2]), output };
  }

  /**
   * Waits until a console line (this QEMU's: a migration destination starts with an empty console)
   * matches `re`, and returns the first such line. Lines a concurrent run() consumes count too.
   */
  waitForConsole(re: RegExp, timeoutMs: number, what = String(re)): Promise<string> {
    return this.waitFor(() => this.console.lines.find((l) => re.test(l)), timeoutMs, what);
  }

  /** run() that throws (with the command's output and the console tail) unless the status is 0. */
  async check(cmd: string, timeoutMs?: number): Promise<string> {
    const r = await this.run(cmd, timeoutMs);
    if (r.status !== 0) {
      throw new GuestError(`guest command failed (status ${r.status}): ${cmd}\n--- output ---\n${r.output}\n${this.diagnostics(40)}`);
    }
    return r.output;
  }

  /** Syncs, powers the guest off (`poweroff -f`) and waits for QEMU to exit; returns QEMU's exit code. */
  async poweroff(timeoutMs = 60_000): Promise<number | null> {
    if (!this.exitInfo) {
      try {
        await this.run('sync', Math.min(timeoutMs, 30_000));
      } catch {
        /* power off anyway */
      }
      this.proc.stdin!.write('poweroff -f\n');
    }
    const r = await within(this.exited, timeoutMs);
    if (!r) {
      const diag = this.diagnostics();
      this.kill();
      throw new GuestError(`QEMU did not exit within ${timeoutMs} ms of poweroff\n${diag}`);
    }
    return r.code;
  }

  /** Kills QEMU (SIGKILL) if it is still running. Safe to call repeatedly. */
  kill(): void {
    if (!this.exitInfo && this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill('SIGKILL');
    }
  }

  /** kill() and wait until QEMU is gone (for finally blocks). */
  async dispose(): Promise<void> {
    this.kill();
    await within(this.exited, 10_000);
  }

  /** Last `n` console lines, for failure messages. */
  consoleTail(n = 100): string {
    return this.console.tail(n).join('\n');
  }

  diagnostics(n = 100): string {
    return `--- guest console (last ${n} lines) ---\n${this.consoleTail(n)}\n--- end of guest console ---`;
  }
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

export interface DaemonHandle {
  proc: ChildProcess;
  socket: string;
  /** stdout and stderr lines (stderr prefixed "[stderr] "). */
  output: string[];
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /**
   * Sends `signal` and waits for exit (SIGKILL after `timeoutMs`); resolves to
   * the exit code, or null if the process died from a signal.
   */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<number | null>;
  /** Last lines of output, for failure messages. */
  diagnostics(n?: number): string;
}

async function startDaemon(
  name: string,
  command: string,
  args: string[],
  socket: string,
  timeoutMs: number,
  log?: (line: string) => void,
  env?: Record<string, string>,
): Promise<DaemonHandle> {
  const proc = track(spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env: env ? { ...process.env, ...env } : undefined }));
  log ??= defaultLog(name);
  const out = new LineLog('', 5000, log);
  // stderr lines go into the same log, prefixed
  const err = new LineLog('', 5000, (l) => out.add(`[stderr] ${l}`));
  proc.stdout!.setEncoding('utf8').on('data', (d: string) => out.push(d));
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => {
    err.push(d);
  });
  let exitInfo: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    proc.on('exit', (code, signal) => {
      out.flush();
      err.flush();
      exitInfo = { code, signal };
      resolve(exitInfo);
    });
  });
  let spawnError: Error | undefined;
  proc.on('error', (e) => (spawnError = e));
  const diagnostics = (n = 60) => {
    const lines = out.lines.slice(-n);
    return `--- ${name} output (last ${lines.length} lines) ---\n${lines.join('\n')}\n--- end of ${name} output ---`;
  };
  const handle: DaemonHandle = {
    proc,
    socket,
    output: out.lines,
    exited,
    diagnostics,
    async stop(signal: NodeJS.Signals = 'SIGTERM', stopTimeoutMs = 15_000) {
      if (!exitInfo) {
        proc.kill(signal);
        const r = await within(exited, stopTimeoutMs);
        if (!r) {
          proc.kill('SIGKILL');
          await exited;
          throw new Error(`${name} did not exit within ${stopTimeoutMs} ms of ${signal}; killed\n${diagnostics()}`);
        }
      }
      return exitInfo!.code;
    },
  };
  const t0 = Date.now();
  for (;;) {
    if (spawnError) throw new Error(`cannot start ${name} (${command}): ${spawnError.message}`);
    if (fs.existsSync(socket)) {
      try {
        if (fs.statSync(socket).isSocket()) return handle;
      } catch {
        /* raced with removal */
      }
    }
    if (exitInfo) {
      throw new Error(
        `${name} exited (code ${exitInfo.code}, signal ${exitInfo.signal}) before creating its socket ${socket}\n${diagnostics()}`,
      );
    }
    if (Date.now() - t0 > timeoutMs) {
      await handle.stop('SIGKILL').catch(() => undefined);
      throw new Error(`${name} did not create its socket ${socket} within ${timeoutMs} ms\n${diagnostics()}`);
    }
    await sleep(50);
  }
}

export interface StorageDaemonOptions {
  socket: string;
  image: string;
  numQueues?: number;
  writable: boolean;
  /**
   * Appended to the file blockdev's options, e.g. ",locking=off" so that a second process may open the
   * same image (two backends on shared storage during a migration).
   */
  extraBlockdevArgs?: string;
  timeoutMs?: number;
  log?: (line: string) => void;
}

/** Starts qemu-storage-daemon exporting `image` as vhost-user-blk on `socket` (the reference backend). */
export async function startQemuStorageDaemon(opts: StorageDaemonOptions): Promise<DaemonHandle> {
  requireTools(['qemu-storage-daemon']);
  const args = [
    '--blockdev', `driver=file,node-name=file0,filename=${opts.image},cache.direct=off${opts.extraBlockdevArgs ?? ''}`,
    '--export',
    `type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=${opts.socket},` +
      `writable=${opts.writable ? 'on' : 'off'},num-queues=${opts.numQueues ?? 1}`,
  ];
  return startDaemon('qemu-storage-daemon', 'qemu-storage-daemon', args, opts.socket, opts.timeoutMs ?? 20_000, opts.log);
}

export interface VhostBlkOptions {
  timeoutMs?: number;
  log?: (line: string) => void;
  /** Added to the daemon's environment (e.g. test-only switches). */
  env?: Record<string, string>;
}

/**
 * Starts our daemon: `node <repo>/bin/vhost-blk serve ...args`, and waits until
 * the socket given with `--socket` exists.
 */
export async function startVhostBlk(args: string[], opts: VhostBlkOptions = {}): Promise<DaemonHandle> {
  let socket: string | undefined;
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--socket') socket = args[i + 1];
    else if (args[i]!.startsWith('--socket=')) socket = args[i]!.slice('--socket='.length);
  }
  if (!socket) throw new Error('startVhostBlk: args must include --socket <path>');
  const bin = path.join(REPO_ROOT, 'bin', 'vhost-blk');
  return startDaemon('vhost-blk', process.execPath, [bin, 'serve', ...args], socket, opts.timeoutMs ?? 20_000, opts.log, opts.env);
}

// ---------------------------------------------------------------------------
// The pattern scenario (shared by peer.test.ts and serve.test.ts)
// ---------------------------------------------------------------------------

/**
 * One region: `count` blocks of `bs` bytes, taken from /pattern.bin at
 * patternOffset and written to the disk at diskOffset, one I/O per block.
 */
export interface PatternRegion {
  bs: number;
  count: number;
  diskOffset: number;
  patternOffset: number;
}

const KiB = 1024;
const MiB = 1024 * KiB;

/**
 * The regions the scenario writes: 512 B, 4 KiB, 64 KiB and 1 MiB blocks at
 * distinct offsets, plus the last 4 KiB block of the disk. Each uses a
 * distinct slice of /pattern.bin so misdirected writes are detected.
 * Requires an image of at least 48 MiB.
 */
export function patternRegions(imageBytes: number): PatternRegion[] {
  if (imageBytes < 48 * MiB || imageBytes % (4 * KiB) !== 0) {
    throw new Error(`pattern scenario needs an image of >= 48 MiB, a multiple of 4 KiB (got ${imageBytes})`);
  }
  return [
    { bs: 512, count: 7, diskOffset: 3 * 512, patternOffset: 0 },
    { bs: 4 * KiB, count: 5, diskOffset: 1 * MiB + 12 * KiB, patternOffset: 4 * KiB },
    { bs: 64 * KiB, count: 3, diskOffset: 8 * MiB + 192 * KiB, patternOffset: 64 * KiB },
    { bs: 1 * MiB, count: 2, diskOffset: 40 * MiB, patternOffset: 2 * MiB },
    { bs: 4 * KiB, count: 1, diskOffset: imageBytes - 4 * KiB, patternOffset: 400 * KiB },
  ];
}

function describeRegion(r: PatternRegion): string {
  return `${r.count} x ${r.bs} B at disk offset ${r.diskOffset}`;
}

// How the guest does O_DIRECT I/O:
//  * bs >= 4 KiB: busybox dd iflag=direct / oflag=direct. busybox dd mmap()s
//    buffers of >= one page (page aligned), so the I/O really is O_DIRECT.
//  * bs < 4 KiB: busybox dd malloc()s the buffer (16-byte aligned, but
//    virtio-blk needs 512) and on EINVAL silently drops O_DIRECT and goes
//    through the page cache. So these blocks are written and verified with
//    fio (aligned buffers, direct=1): one job per block, whose
//    buffer_pattern / verify_pattern is that block's slice of /pattern.bin
//    (fio patterns are at most 512 bytes, hence bs must be 512).
// Either way the guest's /sys/block/<disk>/stat sector counters are checked
// afterwards: exactly count*bs/512 sectors must have been written or read,
// which fails on any fallback to buffered I/O (read-modify-write, readahead).

function sliceCommands(r: PatternRegion): string {
  return (
    `i=0; while [ $i -lt ${r.count} ]; do ` +
    `dd if=${GUEST_PATTERN.path} of=/tmp/blk$i bs=${r.bs} count=1 skip=$((${r.patternOffset / r.bs}+i)) 2>/dev/null || exit 1; ` +
    `i=$((i+1)); done`
  );
}

function fioJobFile(r: PatternRegion, dev: string, mode: 'write' | 'verify'): string {
  const lines = ['[global]', `filename=${dev}`, 'direct=1', 'ioengine=psync', 'thread', `bs=${r.bs}`, `size=${r.bs}`];
  lines.push(...(mode === 'write' ? ['rw=write'] : ['rw=read', 'verify=pattern', 'verify_fatal=1']));
  for (let i = 0; i < r.count; i++) {
    lines.push(`[blk${i}]`, `offset=${r.diskOffset + i * r.bs}`);
    lines.push(mode === 'write' ? `buffer_pattern='/tmp/blk${i}'` : `verify_pattern='/tmp/blk${i}'`);
  }
  return `printf '%s\\n' ${lines.map((l) => `"${l}"`).join(' ')} > /tmp/job.fio`;
}

function writeCommand(r: PatternRegion, dev: string): string {
  if (r.bs >= 4 * KiB) {
    return (
      `dd if=${GUEST_PATTERN.path} of=${dev} bs=${r.bs} count=${r.count} ` +
      `skip=${r.patternOffset / r.bs} seek=${r.diskOffset / r.bs} oflag=direct conv=notrunc,fsync`
    );
  }
  if (r.bs !== 512) throw new Error(`unsupported block size ${r.bs} (512 or a multiple of 4 KiB)`);
  return [sliceCommands(r), fioJobFile(r, dev, 'write'), 'fio --output-format=terse /tmp/job.fio >/dev/null'].join('\n');
}

function compareCommand(r: PatternRegion, dev: string): string {
  if (r.bs >= 4 * KiB) {
    return [
      `rm -f /tmp/got /tmp/want`,
      `dd if=${dev} of=/tmp/got bs=${r.bs} count=${r.count} skip=${r.diskOffset / r.bs} iflag=direct 2>/dev/null || exit 1`,
      `dd if=${GUEST_PATTERN.path} of=/tmp/want bs=${r.bs} count=${r.count} skip=${r.patternOffset / r.bs} 2>/dev/null || exit 1`,
      `cmp /tmp/want /tmp/got && echo MATCH`,
    ].join('\n');
  }
  if (r.bs !== 512) throw new Error(`unsupported block size ${r.bs} (512 or a multiple of 4 KiB)`);
  return [sliceCommands(r), fioJobFile(r, dev, 'verify'), 'fio --output-format=terse /tmp/job.fio >/dev/null && echo MATCH'].join('\n');
}

/** Sectors read and written so far according to /sys/block/<disk>/stat. */
export async function diskSectors(guest: Guest, disk = 'vda'): Promise<{ read: number; written: number }> {
  const out = await guest.check(`cat /sys/block/${disk}/stat`);
  const f = out.trim().split('\n').pop()!.trim().split(/\s+/).map(Number);
  if (f.length < 7 || f.some((n) => !Number.isFinite(n))) throw new GuestError(`cannot parse /sys/block/${disk}/stat: ${out}`);
  return { read: f[2]!, written: f[6]! };
}

function diskName(dev: string): string {
  return dev.replace(/^\/dev\//, '');
}

/** Writes one region with O_DIRECT and checks that exactly its sectors were written. */
export async function writeRegion(guest: Guest, r: PatternRegion, dev = '/dev/vda'): Promise<void> {
  const before = await diskSectors(guest, diskName(dev));
  const res = await guest.run(writeCommand(r, dev), 120_000);
  if (res.status !== 0) {
    throw new GuestError(`O_DIRECT write of ${describeRegion(r)} failed (status ${res.status}):\n${res.output}\n${guest.diagnostics(40)}`);
  }
  const after = await diskSectors(guest, diskName(dev));
  const want = (r.bs * r.count) / 512;
  if (after.written - before.written !== want) {
    throw new GuestError(
      `write of ${describeRegion(r)} wrote ${after.written - before.written} sectors to the disk, expected ${want} ` +
        `(not O_DIRECT?)\n${res.output}`,
    );
  }
}

/** Reads one region back with O_DIRECT and compares it with /pattern.bin; checks the sectors read. */
export async function compareRegion(guest: Guest, r: PatternRegion, dev = '/dev/vda'): Promise<void> {
  const before = await diskSectors(guest, diskName(dev));
  const res = await guest.run(compareCommand(r, dev), 120_000);
  if (res.status !== 0 || !res.output.includes('MATCH')) {
    throw new GuestError(
      `read-back of ${describeRegion(r)} does not match the pattern (status ${res.status}):\n${res.output}\n${guest.diagnostics(40)}`,
    );
  }
  const after = await diskSectors(guest, diskName(dev));
  const want = (r.bs * r.count) / 512;
  if (after.read - before.read !== want) {
    throw new GuestError(
      `read-back of ${describeRegion(r)} read ${after.read - before.read} sectors from the disk, expected ${want} (not O_DIRECT?)`,
    );
  }
}

/** Reads every region back with O_DIRECT in the guest and compares it with /pattern.bin. */
export async function verifyPatternInGuest(guest: Guest, regions: PatternRegion[], dev = '/dev/vda'): Promise<void> {
  await guest.check('sync; echo 3 > /proc/sys/vm/drop_caches');
  for (const r of regions) await compareRegion(guest, r, dev);
}

/** Name of the virtio device behind `disk` (e.g. "virtio0" for vda). */
export async function virtioDeviceOf(guest: Guest, disk = 'vda'): Promise<string> {
  const out = await guest.check(`basename "$(readlink /sys/block/${disk}/device)"`);
  const name = out.trim().split('\n').pop()!.trim();
  if (!/^virtio\d+$/.test(name)) throw new GuestError(`unexpected virtio device name for ${disk}: ${JSON.stringify(out)}`);
  return name;
}

/**
 * Unbinds and rebinds the virtio_blk driver from `disk`'s device (the driver
 * resets the device on remove and re-negotiates features and virtqueues on
 * probe) and waits for the disk to come back under the same name.
 */
export async function rebindVirtioBlk(guest: Guest, disk = 'vda'): Promise<void> {
  const dev = await virtioDeviceOf(guest, disk);
  const drv = '/sys/bus/virtio/drivers/virtio_blk';
  await guest.check(`echo ${dev} > ${drv}/unbind`, 60_000);
  await guest.check(`test ! -e /sys/block/${disk} && test ! -e ${drv}/${dev}`);
  await guest.check(`echo ${dev} > ${drv}/bind`, 60_000);
  await guest.check(
    `i=0; while [ ! -b /dev/${disk} ] || [ ! -e /sys/block/${disk}/size ]; do i=$((i+1)); [ $i -gt 300 ] && exit 1; sleep 0.1; done; ` +
      `test -e ${drv}/${dev}`,
    60_000,
  );
  const back = await virtioDeviceOf(guest, disk);
  if (back !== dev) throw new GuestError(`after rebind ${disk} belongs to ${back}, expected ${dev}`);
}

async function checkDiskSize(guest: Guest, imageBytes: number, when: string): Promise<void> {
  const sectors = (await guest.check('cat /sys/block/vda/size')).trim().split('\n').pop()!.trim();
  if (Number(sectors) !== imageBytes / 512) {
    throw new GuestError(
      `${when}: /sys/block/vda/size is ${sectors} sectors, expected ${imageBytes / 512} (image of ${imageBytes} bytes)`,
    );
  }
}

/**
 * The reference scenario, run in a booted guest whose /dev/vda is backed by
 * `imagePath` (initially all zero): checks the disk size; writes the pattern
 * regions with O_DIRECT (512 B, 4 KiB, 64 KiB, 1 MiB blocks; fsync'd); reads
 * them back with O_DIRECT and compares; resets the device by unbinding and
 * rebinding virtio_blk; checks the size and compares again.
 * Returns the regions: after guest.poweroff(), call
 * checkImagePattern(imagePath, regions) on the host.
 */
export async function runPatternScenario(guest: Guest, imagePath: string): Promise<PatternRegion[]> {
  const imageBytes = (await fsp.stat(imagePath)).size;
  const regions = patternRegions(imageBytes);
  await checkDiskSize(guest, imageBytes, 'after boot');
  for (const r of regions) await writeRegion(guest, r);
  await verifyPatternInGuest(guest, regions);
  await rebindVirtioBlk(guest, 'vda');
  await checkDiskSize(guest, imageBytes, 'after unbind/bind of virtio_blk');
  await verifyPatternInGuest(guest, regions);
  return regions;
}

/**
 * Host-side check: the image holds the pattern at exactly the scenario's
 * regions, and the 4 KiB guard bands around each region are still zero
 * (catches off-by-some-sectors writes). Assumes the image started all-zero.
 */
export async function checkImagePattern(imagePath: string, regions?: PatternRegion[]): Promise<void> {
  const fh = await fsp.open(imagePath, 'r');
  try {
    const size = (await fh.stat()).size;
    regions ??= patternRegions(size);
    const pattern = guestPattern();
    const read = async (off: number, len: number) => {
      const b = Buffer.alloc(len);
      const { bytesRead } = await fh.read(b, 0, len, off);
      return b.subarray(0, bytesRead);
    };
    const inRegion = (off: number) => regions!.some((r) => off >= r.diskOffset && off < r.diskOffset + r.bs * r.count);
    for (const r of regions) {
      const len = r.bs * r.count;
      const got = await read(r.diskOffset, len);
      const want = pattern.subarray(r.patternOffset, r.patternOffset + len);
      if (!got.equals(want)) {
        let i = 0;
        while (i < got.length && got[i] === want[i]) i++;
        throw new Error(`image ${imagePath}: ${describeRegion(r)} differs from the pattern at byte ${r.diskOffset + i}`);
      }
      for (const [start, end] of [
        [Math.max(0, r.diskOffset - 4 * KiB), r.diskOffset],
        [r.diskOffset + len, Math.min(size, r.diskOffset + len + 4 * KiB)],
      ] as const) {
        const guard = await read(start, end - start);
        for (let i = 0; i < guard.length; i++) {
          if (guard[i] !== 0 && !inRegion(start + i)) {
            throw new Error(`image ${imagePath}: unexpected non-zero byte at ${start + i}, next to ${describeRegion(r)}`);
          }
        }
      }
    }
  } finally {
    await fh.close();
  }
}

/**
 * Runs fio with verification in the guest on [offset, offset+size) of `dev`
 * (O_DIRECT, libaio, several requests in flight). Throws on failure.
 */
export async function runFioVerify(
  guest: Guest,
  opts: { dev?: string; offset: number; size: number; bs?: string; iodepth?: number; rw?: string; timeoutMs?: number },
): Promise<string> {
  const cmd = [
    'fio --name=verify',
    `--filename=${opts.dev ?? '/dev/vda'}`,
    '--direct=1 --ioengine=libaio',
    `--rw=${opts.rw ?? 'randwrite'}`,
    `--${(opts.bs ?? '4k').includes('-') ? 'bsrange' : 'bs'}=${opts.bs ?? '4k'}`,
    `--iodepth=${opts.iodepth ?? 8}`,
    `--offset=${opts.offset} --size=${opts.size}`,
    '--verify=crc32c --verify_fatal=1 --do_verify=1',
    '--randrepeat=1 --norandommap=0',
  ].join(' ');
  return guest.check(cmd, opts.timeoutMs ?? 180_000);
}

/**
 * Runs `fn`; if it throws, prefixes the error message with the step name so a
 * failure says where the scenario stopped ("boot guest: timed out ...").
 */
export async function step<T>(name: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof Error) {
      if (!err.message.startsWith(`${name}: `)) err.message = `${name}: ${err.message}`;
      throw err;
    }
    throw new Error(`${name}: ${String(err)}`);
  }
}

/**
 * Appends the guest console / daemon output tails to an error's message (so
 * the test report shows them) and returns the error. Sources whose output the
 * message already contains (GuestError includes the console) are skipped.
 */
export function withDiagnostics(err: unknown, sources: Array<{ diagnostics(n?: number): string } | undefined>): unknown {
  const message = err instanceof Error ? err.message : String(err);
  const extra = sources
    .filter((s): s is { diagnostics(n?: number): string } => s !== undefined)
    .map((s) => s.diagnostics())
    .filter((d) => !message.includes(d.slice(0, d.indexOf('('))))
    .join('\n');
  if (!extra) return err;
  if (err instanceof Error) {
    err.message += `\n${extra}`;
    return err;
  }
  return new Error(`${message}\n${extra}`);
}

/**
 * fio's verified workloads in the guest, in a range the pattern scenario leaves alone (48..64 MiB minus
 * the disk's last 4 KiB + guard band): 4 KiB random writes at iodepth 16, then mixed 512 B..128 KiB
 * random reads and writes. fio fails (and check() throws) on any verify error or I/O error.
 */
export async function runFioWorkloads(guest: Guest): Promise<void> {
  const MiB = 1024 * 1024;
  await runFioVerify(guest, { offset: 48 * MiB, size: 8 * MiB, bs: '4k', iodepth: 16, rw: 'randwrite' });
  await runFioVerify(guest, { offset: 56 * MiB, size: 7 * MiB, bs: '512-128k', iodepth: 8, rw: 'randrw' });
}

/** MD5 of `len` bytes of `dev` at `offset` (both whole MiBs), read in the guest with O_DIRECT (not its cache). */
export async function guestMd5(guest: Guest, dev: string, offset: number, len: number, timeoutMs?: number): Promise<string> {
  const out = await guest.check(`dd if=${dev} bs=1M skip=${offset / MiB} count=${len / MiB} iflag=direct 2>/dev/null | md5sum`, timeoutMs);
  const m = /\b([0-9a-f]{32})\b/.exec(out);
  if (!m) throw new Error(`no md5 in ${JSON.stringify(out)}`);
  return m[1]!;
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/** What an end-to-end scenario works with: a temp dir, the guest assets, and the processes it started. */
export class Scenario {
  private readonly guests: Guest[] = [];
  private readonly daemons: DaemonHandle[] = [];

  constructor(readonly tmp: TempDir, readonly assets: GuestAssets) {}

  /** A path inside the scenario's temp dir. */
  path(name: string): string {
    return path.join(this.tmp.path, name);
  }

  /** Tracks a started daemon: its output goes into failure messages, and it is killed at the end. */
  async track(started: Promise<DaemonHandle>): Promise<DaemonHandle> {
    const d = await started;
    this.daemons.push(d);
    return d;
  }

  /** Boots a guest with the scenario's assets; tracked like daemons. */
  async boot(opts: Omit<BootOptions, 'assets'>): Promise<Guest> {
    const g = await Guest.boot({ ...opts, assets: this.assets });
    this.guests.push(g);
    return g;
  }

  /** Starts a migration destination QEMU (Guest.incoming()) with the scenario's assets; tracked like daemons. */
  async incoming(opts: Omit<BootOptions, 'assets'>): Promise<Guest> {
    const g = await Guest.incoming({ ...opts, assets: this.assets });
    this.guests.push(g);
    return g;
  }

  /** The latest guest's console and every daemon's output, appended to `err`. */
  diagnose(err: unknown): unknown {
    return withDiagnostics(err, [this.guests.at(-1), ...this.daemons]);
  }

  /** Kills whatever is still running and removes the temp dir. */
  async dispose(): Promise<void> {
    for (const g of this.guests) await g.dispose();
    for (const d of this.daemons) await d.stop('SIGKILL').catch(() => undefined);
    await this.tmp.cleanup();
  }
}

/**
 * Runs one end-to-end scenario: checks the tools (a missing one fails, naming its package), builds the
 * guest assets, and whatever happens kills the guests and daemons it started and removes its temp dir.
 */
export async function runScenario(name: string, tools: string[], fn: (s: Scenario) => Promise<void>): Promise<void> {
  requireTools(tools);
  const assets = await step('build guest initramfs', () => ensureGuestAssets());
  const s = new Scenario(await makeTempDir(`vhost-blk-e2e-${name}-`), assets);
  try {
    await fn(s);
  } catch (err) {
    throw s.diagnose(err);
  } finally {
    await s.dispose();
  }
}
