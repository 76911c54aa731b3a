// Live migration of a guest whose vhost-user-blk disk two backends serve from one shared image
// (issue 11). runMigrationScenario() is the whole scenario; migrate.test.ts runs it against our daemon
// (split and packed rings) and against qemu-storage-daemon, and a figures script can reuse it.
//
//   backend A ─ source QEMU  ══ migrate (unix socket, bandwidth-limited) ══▶  destination QEMU ─ backend B
//   then back: backend B's QEMU ══▶ a new QEMU on backend A (the first QEMU has quit by then).
//
// The guest works through every migration (see guestScript()): fio's verified random writes, and a loop
// that reads a known region of the disk through the page cache, checks its md5, and, one step later,
// checks it again from the page cache without I/O. A read that completes during the migration writes
// guest RAM through the backend (not the CPU): unless the backend logs those pages dirty, QEMU does not
// send them again, and the destination's page cache holds what those pages held before. The re-check
// that runs on the destination sees exactly that. The guest prints one MIGTEST_VERDICT line on its
// serial console, which by then is the destination QEMU's.
// Before the destination runs (it starts with -S), the test also dumps both VMs' RAM (pmemsave) and
// compares them page by page: any page that differs was written on the source and never sent again,
// whatever the guest would have made of it.

import { createHash } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';

import { QmpClient, QmpError } from './qmp.js';
import {
  createSparseImage,
  guestMd5,
  makePattern,
  startQemuStorageDaemon,
  startVhostBlk,
  step,
  type DaemonHandle,
  type Guest,
  type Scenario,
} from './guest.js';

const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------
// The disk: an MBR with two partitions, so that the guest can tell from vda1's own I/O counters that a
// re-check was served from its page cache while fio keeps vda2 busy.
// ---------------------------------------------------------------------------

export const IMAGE_BYTES = 64 * MiB;
/** vda1: the known data the guest reads (the host writes it before the backends start). */
const P1 = { start: 1 * MiB, size: 32 * MiB } as const;
/** vda2: fio's verified writes, one 8 MiB range per migration leg. */
const P2 = { start: 34 * MiB, size: 28 * MiB } as const;
const FIO_MIB = 8;
/** The two known regions of vda1 the read loop alternates between (so a stale page holds the other one's data). */
const KNOWN_MIB = 8;
const KNOWN = [
  { skipMiB: 0, seed: 0x6b6e_0001 },
  { skipMiB: 16, seed: 0x6b6e_0002 },
] as const;

function knownData(i: number): Buffer {
  return makePattern(KNOWN_MIB * MiB, KNOWN[i]!.seed);
}

function md5(b: Buffer): string {
  return createHash('md5').update(b).digest('hex');
}

function mbr(): Buffer {
  const b = Buffer.alloc(512);
  const entry = (i: number, startByte: number, bytes: number) => {
    const e = 446 + 16 * i;
    b[e] = 0x00; // not bootable
    b.set([0xfe, 0xff, 0xff], e + 1); // CHS: unused (LBA)
    b[e + 4] = 0x83; // Linux
    b.set([0xfe, 0xff, 0xff], e + 5);
    b.writeUInt32LE(startByte / 512, e + 8);
    b.writeUInt32LE(bytes / 512, e + 12);
  };
  entry(0, P1.start, P1.size);
  entry(1, P2.start, P2.size);
  b[510] = 0x55;
  b[511] = 0xaa;
  return b;
}

/** Creates the shared image: partition table and the known regions; everything else zero. */
async function createImage(file: string): Promise<void> {
  await createSparseImage(file, IMAGE_BYTES);
  const fh = await fsp.open(file, 'r+');
  try {
    await fh.write(mbr(), 0, 512, 0);
    for (let i = 0; i < KNOWN.length; i++) await fh.write(knownData(i), 0, KNOWN_MIB * MiB, P1.start + KNOWN[i]!.skipMiB * MiB);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function hostMd5(file: string, offset: number, size: number): Promise<string> {
  const fh = await fsp.open(file, 'r');
  try {
    const b = Buffer.alloc(size);
    const { bytesRead } = await fh.read(b, 0, size, offset);
    return md5(b.subarray(0, bytesRead));
  } finally {
    await fh.close();
  }
}

// ---------------------------------------------------------------------------
// The guest's workload
// ---------------------------------------------------------------------------

/** Seconds the read loop sleeps between two reads (paces the dirty rate so that the migration converges). */
const READ_PAUSE_S = 0.5;

/**
 * The guest's workload for one leg, as a shell script (busybox ash). Arguments: leg number.
 * - fio, back to back until the stop file exists: 4 KiB random writes at iodepth 16 over the leg's 8 MiB of
 *   vda2, O_DIRECT, then a crc32c verify of every block (fio reads them back into its buffers and checks
 *   them at once: a run that spans the switchover checks, on the destination, data read on the source).
 * - the read loop: re-check the region the previous step read, from the page cache (vda1's read-sector
 *   counter must not move: no I/O); stop if asked; drop the page cache; read the other known region
 *   through the page cache (the backend writes it into freshly allocated page-cache pages, which last held
 *   something else) and check its md5; sleep a little.
 * Then it prints MIGTEST_VERDICT leg=N PASS|FAIL with its counters on the serial console. Mismatches are
 * described in $D/errors.
 */
function guestScript(): string {
  const [k0, k1] = [0, 1].map((i) => ({ skip: KNOWN[i]!.skipMiB, md5: md5(knownData(i)) }));
  return `leg=$1
D=/tmp/mig$leg
rm -rf $D; mkdir -p $D
stop=$D/stop
(
  n=0
  while [ ! -f $stop ]; do
    n=$((n+1))
    fio --name=leg$leg --filename=/dev/vda2 --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=16 \\
      --offset=$(( (leg-1) * ${FIO_MIB} ))M --size=${FIO_MIB}M --verify=crc32c --verify_fatal=1 --do_verify=1 \\
      --randrepeat=0 --verify_state_save=0 > $D/fio.$n.log 2>&1
    rc=$?
    echo "$n $rc" >> $D/fio.runs
    [ $rc -eq 0 ] || break
  done
  echo done > $D/fio.done
) &
# O_DIRECT reads of the known regions into dd's buffer, again and again: pages only the backend writes
# (the CPU never touches them after the first), which the RAM comparison at switchover checks. Through
# /dev/vda, not vda1, whose read counter tells the page-cache re-checks below from real reads.
(
  j=0
  while [ ! -f $stop ]; do
    dd if=/dev/vda of=/dev/null bs=64k skip=$(( (${P1.start / MiB} + (j % 2) * ${KNOWN[1].skipMiB}) * 16 )) count=$(( ${KNOWN_MIB} * 16 )) iflag=direct 2>/dev/null
    j=$((j+1))
  done
) &
exec 3</dev/vda1  # keeps vda1 open: its page cache is dropped at its last close
rsect() { set -- $(cat /sys/block/vda/vda1/stat); echo $3; }
i=0; prev=; pskip=0; reads=0; rbad=0; rechecks=0; cached=0; cbad=0
while :; do
  if [ -n "$prev" ]; then
    s0=$(rsect)
    got=$(dd if=/dev/vda1 bs=1M skip=$pskip count=${KNOWN_MIB} 2>/dev/null | md5sum); got=\${got%% *}
    s1=$(rsect)
    rechecks=$((rechecks+1))
    if [ "$s0" = "$s1" ]; then cached=$((cached+1)); how="from the page cache"; else how="NOT from the page cache: $((s1-s0)) sectors read"; fi
    if [ "$got" != "$prev" ]; then
      cbad=$((cbad+1))
      echo "re-check $rechecks ($how) of vda1+\${pskip}M: md5 $got, expected $prev" >> $D/errors
    fi
  fi
  [ -f $stop ] && break
  echo 1 > /proc/sys/vm/drop_caches
  if [ $((i % 2)) -eq 0 ]; then skip=${k0.skip}; want=${k0.md5}; else skip=${k1.skip}; want=${k1.md5}; fi
  got=$(dd if=/dev/vda1 bs=1M skip=$skip count=${KNOWN_MIB} 2>/dev/null | md5sum); got=\${got%% *}
  reads=$((reads+1))
  if [ "$got" != "$want" ]; then
    rbad=$((rbad+1))
    echo "read $reads of vda1+\${skip}M: md5 $got, expected $want" >> $D/errors
  fi
  prev=$want; pskip=$skip; i=$((i+1))
  echo $reads > $D/reads
  sleep ${READ_PAUSE_S}
done
while [ ! -f $D/fio.done ]; do sleep 0.2; done
fruns=0; fbad=0
while read n rc; do fruns=$((fruns+1)); [ "$rc" = 0 ] || fbad=$((fbad+1)); done < $D/fio.runs
verdict=FAIL
[ $rbad -eq 0 ] && [ $cbad -eq 0 ] && [ $fbad -eq 0 ] && [ $cached -gt 0 ] && [ $fruns -gt 0 ] && verdict=PASS
echo "MIGTEST_VERDICT leg=$leg $verdict reads=$reads read_mismatches=$rbad rechecks=$rechecks rechecks_from_cache=$cached recheck_mismatches=$cbad fio_runs=$fruns fio_failed=$fbad" > /dev/ttyS0
`;
}

/** What the guest's script reported for one leg. */
export interface GuestVerdict {
  pass: boolean;
  /** The MIGTEST_VERDICT line. */
  line: string;
  reads: number;
  readMismatches: number;
  rechecks: number;
  rechecksFromCache: number;
  recheckMismatches: number;
  fioRuns: number;
  fioFailed: number;
  /** The guest's description of every mismatch, and the log of a failed fio run. */
  details: string;
}

function parseVerdict(line: string): Omit<GuestVerdict, 'details'> {
  const num = (k: string) => Number(new RegExp(`\\b${k}=(\\d+)`).exec(line)?.[1] ?? NaN);
  return {
    pass: /\bPASS\b/.test(line),
    line: line.trim(),
    reads: num('reads'),
    readMismatches: num('read_mismatches'),
    rechecks: num('rechecks'),
    rechecksFromCache: num('rechecks_from_cache'),
    recheckMismatches: num('recheck_mismatches'),
    fioRuns: num('fio_runs'),
    fioFailed: num('fio_failed'),
  };
}

// ---------------------------------------------------------------------------
// Migration through QMP
// ---------------------------------------------------------------------------

/** query-migrate's figures for one completed migration, as the source QEMU reports them. */
export interface MigrationFigures {
  totalTimeMs: number;
  downtimeMs: number;
  setupTimeMs: number;
  dirtySyncCount: number;
  transferredBytes: number;
  /** Wall-clock time the test saw, from `migrate` to `completed`. */
  wallMs: number;
  /** Source and destination RAM compared right after the migration, both VMs stopped. */
  ram: RamComparison;
}

/** Pages of guest RAM that differ between the stopped source and the destination before it runs. */
export interface RamComparison {
  pages: number;
  differingPages: number;
  /** The differing pages that hold, on the source, a 4 KiB block of the known data (a read's data, not re-sent). */
  knownDataPages: number;
  /**
   * The differing pages that hold, on the source, a non-zero 4 KiB block of the image: what a backend's
   * read puts in guest RAM, so a page it did not log. The others are CPU-written (kernel data), which
   * QEMU 7.2's TCG itself sometimes fails to send again (see MAX_LEG_ATTEMPTS).
   */
  diskDataPages: number;
  /** Up to 8 differing page ranges (guest physical addresses) with what the source and the destination hold there. */
  summary: string;
}

/**
 * Dumps the RAM of both stopped VMs (QMP pmemsave: guest physical addresses 0..memoryMiB) and compares
 * them page by page. The source has stopped for good and the destination was started with -S and has not
 * run yet, and neither backend writes now (the source's rings were stopped before the last sync, the
 * destination's start when it runs): whatever differs was written on the source and never sent again.
 */
async function compareRam(src: Vm, to: { qmp: QmpClient }, memoryMiB: number, dir: string, image: string): Promise<RamComparison> {
  const size = memoryMiB * MiB;
  const files = [path.join(dir, 'ram-source.bin'), path.join(dir, 'ram-destination.bin')];
  try {
    await src.qmp.execute('pmemsave', { val: 0, size, filename: files[0] }, 120_000);
    await to.qmp.execute('pmemsave', { val: 0, size, filename: files[1] }, 120_000);
    const known = knownBlocks();
    const disk = await imageBlocks(image);
    const classify = (b: Buffer) => (b.every((x) => x === 0) ? 'zeros' : known.has(md5(b)) ? 'known data' : 'other data');
    const [a, b] = await Promise.all(files.map((f) => fsp.readFile(f)));
    if (a!.length !== size || b!.length !== size) throw new Error(`pmemsave wrote ${a!.length} and ${b!.length} bytes, expected ${size}`);
    const PAGE = 4096;
    let differing = 0;
    let knownData = 0;
    let diskData = 0;
    const ranges: string[] = [];
    let runStart = -1;
    let runWhat = '';
    const flush = (end: number) => {
      if (runStart >= 0 && ranges.length < 8) ranges.push(`0x${runStart.toString(16)}-0x${(end - 1).toString(16)} (source: ${runWhat})`);
      runStart = -1;
    };
    for (let off = 0; off < size; off += PAGE) {
      const pa = a!.subarray(off, off + PAGE);
      const pb = b!.subarray(off, off + PAGE);
      if (pa.equals(pb)) {
        flush(off);
        continue;
      }
      differing++;
      const what = `${classify(pa)}, destination: ${classify(pb)}`;
      if (what.startsWith('known data')) knownData++;
      if (!pa.every((x) => x === 0) && disk.has(md5(pa))) diskData++;
      if (runStart >= 0 && !runWhat.startsWith(what)) flush(off);
      if (runStart < 0) {
        runStart = off;
        // Where in the page, and the bytes there: tells a ring index or status byte from a data block.
        let i = 0;
        while (pa[i] === pb[i]) i++;
        const d = i - (i % 16);
        runWhat = `${what}; first difference at +0x${i.toString(16)}: source ${pa.subarray(d, d + 16).toString('hex')}, destination ${pb.subarray(d, d + 16).toString('hex')}`;
      }
    }
    flush(size);
    return { pages: size / PAGE, differingPages: differing, knownDataPages: knownData, diskDataPages: diskData, summary: ranges.join('; ') || 'none' };
  } finally {
    for (const f of files) await fsp.rm(f, { force: true });
  }
}

/** md5 of every 4 KiB block of the image as it is now. */
async function imageBlocks(image: string): Promise<Set<string>> {
  const data = await fsp.readFile(image);
  const set = new Set<string>();
  for (let o = 0; o < data.length; o += 4096) set.add(md5(data.subarray(o, o + 4096)));
  return set;
}

let knownBlockSet: Set<string> | undefined;
/** md5 of every 4 KiB block of the known regions. */
function knownBlocks(): Set<string> {
  if (!knownBlockSet) {
    knownBlockSet = new Set();
    for (let i = 0; i < KNOWN.length; i++) {
      const d = knownData(i);
      for (let o = 0; o < d.length; o += 4096) knownBlockSet.add(md5(d.subarray(o, o + 4096)));
    }
  }
  return knownBlockSet;
}

interface QueryMigrate {
  status?: string;
  'error-desc'?: string;
  'total-time'?: number;
  downtime?: number;
  'setup-time'?: number;
  'expected-downtime'?: number;
  ram?: { transferred?: number; 'dirty-sync-count'?: number; 'dirty-pages-rate'?: number; remaining?: number };
}

/** One running VM: its QEMU, its QMP connection, and which backend serves its disk. */
interface Vm {
  guest: Guest;
  qmp: QmpClient;
  backend: 'A' | 'B';
}

export interface MigrationOptions {
  /** Which backend serves the image (two processes of it: A and B). */
  backend: 'vhost-blk' | 'qemu-storage-daemon';
  /** packed=on on the vhost-user-blk-pci device (our daemon only: QEMU 7.2's qemu-storage-daemon has no packed rings). */
  packed?: boolean;
  /** 2 (default): A to B, then back to A; 1: A to B only. */
  legs?: 1 | 2;
  /** Added to backend A's environment (the negative test's VHOST_BLK_TEST_UNLOGGED_READS=1). */
  sourceEnv?: Record<string, string>;
  /**
   * End the scenario at the first switchover, after the RAM comparison, without running the guest on the
   * destination (the negative test: a guest on stale memory may hang instead of printing a verdict).
   */
  stopAtSwitchover?: boolean;
  /** Guest RAM (default 384 MiB: the initramfs unpacks about 90 MiB into it). */
  memoryMiB?: number;
  /** migrate-set-parameters max-bandwidth, bytes/s (default 32 MiB/s). */
  maxBandwidth?: number;
  /** migrate-set-parameters downtime-limit, ms (default 500). */
  downtimeLimitMs?: number;
  /** QEMU's -accel for both QEMUs (default "tcg"; "tcg,thread=single" loses CPU writes all the same). */
  accel?: string;
  /** Progress lines (default: none). */
  log?: (line: string) => void;
}

export interface LegResult {
  leg: number;
  from: 'A' | 'B';
  to: 'A' | 'B';
  figures: MigrationFigures;
  verdict: GuestVerdict;
  /** Guest kernel log lines about I/O errors on the destination (empty when none). */
  ioErrors: string;
  /** The leg's fio range: md5 the guest reads (O_DIRECT) on the destination, and what the host image holds. */
  written: { guest: string; host: string };
  /** The known regions in the host image are unchanged. */
  knownIntact: boolean;
  /** Attempts before the one that counted, each with the CPU-written pages QEMU's TCG failed to send (see MAX_LEG_ATTEMPTS). */
  lostCpuPages: number[];
}

export interface MigrationResult {
  legs: LegResult[];
}

const MIGRATE_TIMEOUT_MS = 120_000;
/**
 * Guest RAM is memoryMiB plus this many KiB: with a RAM block a multiple of 256 KiB, QEMU 7.2's TCG loses
 * guest CPU writes during migration (see BootOptions.extraMemoryKiB); measured here, a guest that writes
 * kernel data without switching processes lost pages in 9 of 16 migrations at 384 MiB and in 0 of 20 at
 * 384 MiB + 8 KiB, and this scenario lost them in about one leg in three without it. The RAM comparison
 * reads the first memoryMiB MiB.
 */
const TCG_MIGRATION_EXTRA_KIB = 8;
/**
 * Debian's kernel zeroes every page it allocates (init_on_alloc), page-cache pages included: a CPU write
 * that QEMU itself marks dirty, just before the backend fills the page. That would hide a backend that
 * does not log its writes in all but a few pages; without it, what a read puts in a fresh page-cache
 * page is seen by the migration only through the backend's log.
 */
const GUEST_APPEND = 'init_on_alloc=0';
/**
 * QEMU 7.2 under TCG can fail to send pages the guest CPU wrote (kernel data; with qemu-storage-daemon
 * as the backend too, and without any vhost-user device: see TCG_MIGRATION_EXTRA_KIB, which avoids it).
 * Should it happen all the same, a leg whose RAM comparison finds only such pages is tried again, up to
 * this many times, with the source resumed; a page holding disk data (a backend's unlogged write) is
 * never retried.
 */
const MAX_LEG_ATTEMPTS = 6;
/** From the stop request to the guest's verdict: the last fio run and read step finish (a few s normally). */
const VERDICT_TIMEOUT_MS = 90_000;

/**
 * What runMigrationScenario() uses unless told otherwise. The initramfs leaves about 200 MiB of the
 * guest's RAM non-zero, so the first pass over RAM takes about 6 s at 32 MiB/s under the guest's I/O,
 * and the dirty pages take a few more rounds.
 */
export const MIGRATION_DEFAULTS = { memoryMiB: 384, maxBandwidth: 32 * MiB, downtimeLimitMs: 500 } as const;

/**
 * Backend A and backend B serving the same image; the guest boots on A, migrates to B while it works,
 * then (legs=2) back to a new QEMU on A. Throws when the machinery fails (a backend or QEMU does not
 * start, the migration fails or times out: QEMU's error-desc is in the message); returns what the guest
 * and the host found for each leg (the caller asserts: the negative test expects a failure). A leg whose
 * guest verdict is FAIL ends the scenario.
 */
export async function runMigrationScenario(s: Scenario, opts: MigrationOptions): Promise<MigrationResult> {
  const log = opts.log ?? (() => undefined);
  const image = s.path('shared.img');
  await step('create the shared image', () => createImage(image));
  const sockets = { A: s.path('backend-a.sock'), B: s.path('backend-b.sock') };

  const startBackend = (which: 'A' | 'B', env?: Record<string, string>): Promise<DaemonHandle> => {
    if (opts.backend === 'qemu-storage-daemon') {
      if (env) throw new Error('sourceEnv is for our daemon only');
      // locking=off: the other process has the same image open for writing (shared storage). Both
      // processes go through this host's page cache (cache.direct=off), which is coherent between them.
      return s.track(startQemuStorageDaemon({ socket: sockets[which], image, writable: true, extraBlockdevArgs: ',locking=off' }));
    }
    return s.track(startVhostBlk(['--socket', sockets[which], '--image', image, '--log-level', 'debug'], { env }));
  };
  const backends = {
    A: await step('start backend A', () => startBackend('A', opts.sourceEnv)),
    B: await step('start backend B', () => startBackend('B')),
  };

  const memoryMiB = opts.memoryMiB ?? MIGRATION_DEFAULTS.memoryMiB;
  const accel = opts.accel ?? 'tcg';
  const deviceArgs = `,id=disk0${opts.packed ? ',packed=on' : ''}`;
  let qmpSeq = 0;
  const qmpArgs = () => {
    const p = s.path(`qmp-${++qmpSeq}.sock`);
    return { path: p, args: ['-qmp', `unix:${p},server=on,wait=off`] };
  };

  const q0 = qmpArgs();
  const guest = await step('boot the guest on backend A', () =>
    s.boot({ socket: sockets.A, memoryMiB, extraMemoryKiB: TCG_MIGRATION_EXTRA_KIB, accel, extraDeviceArgs: deviceArgs, extraQemuArgs: q0.args, extraAppend: GUEST_APPEND }));
  let vm: Vm = { guest, qmp: await step('QMP of the source', () => QmpClient.connect(q0.path)), backend: 'A' };
  const qmps: QmpClient[] = [vm.qmp];
  try {
    await step('guest sees the partitions', () => vm.guest.check('test -b /dev/vda1 && test -b /dev/vda2 && cat /sys/block/vda/vda1/stat'));
    await vm.guest.check(`cat > /tmp/mig.sh <<'EOF'\n${guestScript()}EOF`);

    const legs: LegResult[] = [];
    for (let leg = 1; leg <= (opts.legs ?? 2); leg++) {
      const to: 'A' | 'B' = vm.backend === 'A' ? 'B' : 'A';
      const name = `leg ${leg} (backend ${vm.backend} -> ${to})`;
      // The guest's workload, under way before the migration starts.
      await step(`${name}: start the guest workload`, () => vm.guest.check(`sh /tmp/mig.sh ${leg} </dev/null >/dev/null 2>&1 &`));
      await step(`${name}: the workload runs`, () => waitGuest(vm.guest, `[ -f /tmp/mig${leg}/reads ] && [ -s /tmp/mig${leg}/fio.1.log ]`, 60_000));

      let figures: MigrationFigures;
      let dest: Guest;
      let destQmp: QmpClient;
      const lostCpuPages: number[] = [];
      for (let attempt = 1; ; attempt++) {
        const tag = attempt === 1 ? name : `${name}, attempt ${attempt}`;
        // The backend we go to must have let go of its previous QEMU (it serves one at a time).
        await step(`${tag}: backend ${to} is free`, () => waitBackendIdle(backends[to], opts.backend));
        // The destination: same machine, its disk on the other backend, waiting for the migration stream.
        const qd = qmpArgs();
        dest = await step(`${tag}: start the destination QEMU`, () =>
          s.incoming({ socket: sockets[to], memoryMiB, extraMemoryKiB: TCG_MIGRATION_EXTRA_KIB, accel, extraDeviceArgs: deviceArgs, extraQemuArgs: [...qd.args, '-S'] }));
        destQmp = await step(`${tag}: QMP of the destination`, () => QmpClient.connect(qd.path));
        qmps.push(destQmp);
        const uri = `unix:${s.path(`migrate-${leg}-${attempt}.sock`)}`;
        await step(`${tag}: migrate-incoming`, () => destQmp.execute('migrate-incoming', { uri }));
        figures = await step(`${tag}: migrate`, () => migrate(vm, { guest: dest, qmp: destQmp }, uri, opts, log, tag, s.tmp.path, image));
        log(`${tag}: completed in ${figures.totalTimeMs} ms, downtime ${figures.downtimeMs} ms, ${figures.dirtySyncCount} dirty syncs, ${(figures.transferredBytes / MiB).toFixed(1)} MiB`);
        const ram = figures.ram;
        // Pages only the guest CPU wrote that QEMU's TCG did not send again (no backend wrote them: they
        // hold no disk data) say nothing about the backend, and the guest would run on corrupt memory:
        // the source resumes and the leg is tried again with a fresh destination.
        if (ram.differingPages === 0 || ram.diskDataPages > 0 || attempt >= MAX_LEG_ATTEMPTS) break;
        lostCpuPages.push(ram.differingPages);
        log(`${tag}: QEMU's TCG lost ${ram.differingPages} CPU-written page(s) (no disk data among them): the source resumes and the leg is tried again`);
        const failed = { guest: dest, qmp: destQmp };
        await step(`${tag}: quit the destination that got stale RAM`, () => quitQemu(failed, 'destination'));
        await step(`${tag}: the source runs on`, () => resume(vm, 'source'));
      }
      if (opts.stopAtSwitchover) {
        const noVerdict = { pass: false, line: 'not run: the scenario stopped at the switchover', reads: 0, readMismatches: 0, rechecks: 0, rechecksFromCache: 0, recheckMismatches: 0, fioRuns: 0, fioFailed: 0, details: '' };
        legs.push({ leg, from: vm.backend, to, figures, verdict: noVerdict, ioErrors: '', written: { guest: '', host: '' }, knownIntact: true, lostCpuPages });
        return { legs };
      }
      await step(`${name}: the destination runs`, () => resume({ guest: dest, qmp: destQmp }, 'destination'));

      // The source has nothing left to do: it quits and lets go of its backend.
      const src = vm;
      await step(`${name}: quit the source QEMU`, () => quitQemu(src, 'source'));
      vm = { guest: dest, qmp: destQmp, backend: to };

      // The guest runs on: its loops go on for a while on the destination, then it is asked to stop.
      await step(`${name}: the guest answers on the destination's console`, () => vm.guest.check('true', 60_000));
      const before = Number((await vm.guest.check(`cat /tmp/mig${leg}/reads`)).trim().split('\n').pop());
      await step(`${name}: the read loop goes on on the destination`, () =>
        waitGuest(vm.guest, `[ $(cat /tmp/mig${leg}/reads) -ge ${before + 2} ]`, 60_000));
      await vm.guest.check(`touch /tmp/mig${leg}/stop`);
      const line = await step(`${name}: the guest's verdict on the destination's console`, () =>
        vm.guest.waitForConsole(new RegExp(`MIGTEST_VERDICT leg=${leg} `), VERDICT_TIMEOUT_MS, `MIGTEST_VERDICT leg=${leg} from the guest`)
          .catch(async (e: Error) => { throw new Error(`${e.message}\n${await guestStateReport(vm.guest, leg)}`); }));
      const verdict: GuestVerdict = { ...parseVerdict(line.slice(line.indexOf('MIGTEST_VERDICT'))), details: '' };
      if (!verdict.pass) verdict.details = await guestFailureDetails(vm.guest, leg);
      log(`${name}: ${verdict.line}`);

      const ioErrors = (await vm.guest.run(
        `dmesg | grep -iE "i/o error|blk_update_request|buffer i/o|hung_task|virtio_blk.*(error|fail)" | sed 's/^/K: /'`,
      )).output.trim();
      const off = P2.start + (leg - 1) * FIO_MIB * MiB;
      const written = {
        guest: await step(`${name}: md5 of the written range in the guest`, () =>
          guestMd5(vm.guest, '/dev/vda2', (leg - 1) * FIO_MIB * MiB, FIO_MIB * MiB, 120_000)),
        host: await hostMd5(image, off, FIO_MIB * MiB),
      };
      let knownIntact = true;
      for (let i = 0; i < KNOWN.length; i++) {
        if ((await hostMd5(image, P1.start + KNOWN[i]!.skipMiB * MiB, KNOWN_MIB * MiB)) !== md5(knownData(i))) knownIntact = false;
      }
      legs.push({ leg, from: src.backend, to, figures, verdict, ioErrors, written, knownIntact, lostCpuPages });
      if (!verdict.pass) break;
    }

    const code = await step('power off', () => vm.guest.poweroff());
    if (code !== 0) throw new Error(`QEMU exit code ${code} after poweroff`);
    return { legs };
  } catch (err) {
    // runScenario() appends the console of the QEMU started last (a destination, maybe still empty): add the
    // console of the one the guest ran on (its [qemu] lines hold QEMU's migration and vhost-user messages).
    if (err instanceof Error) err.message += `\n--- console of the QEMU the guest ran on last (pid ${vm.guest.proc.pid}) ---\n${vm.guest.consoleTail(40)}`;
    throw err;
  } finally {
    for (const q of qmps) q.close();
  }
}

/** Polls `cmd` in the guest until it succeeds. */
async function waitGuest(guest: Guest, cmd: string, timeoutMs: number): Promise<void> {
  const t0 = Date.now();
  while ((await guest.run(cmd)).status !== 0) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`guest condition not met within ${timeoutMs} ms: ${cmd}`);
    await sleep(500);
  }
}

/** Waits until the backend serves no frontend (our daemon logs each connect and disconnect). */
async function waitBackendIdle(d: DaemonHandle, kind: MigrationOptions['backend']): Promise<void> {
  if (kind === 'qemu-storage-daemon') {
    // No log to go by: qemu-storage-daemon takes the next client once it has seen the previous one's
    // socket close, right after that QEMU exits.
    await sleep(500);
    return;
  }
  const t0 = Date.now();
  for (;;) {
    const connected = d.output.filter((l) => /frontend #\d+ connected/.test(l)).length;
    const disconnected = d.output.filter((l) => /frontend #\d+ disconnected/.test(l)).length;
    if (connected === disconnected) return;
    if (Date.now() - t0 > 30_000) throw new Error(`vhost-blk still serves a frontend 30 s after it quit\n${d.diagnostics()}`);
    await sleep(100);
  }
}

/** What the guest's workload was doing, for a timeout message (the shell answers even if the disk hangs). */
async function guestStateReport(guest: Guest, leg: number): Promise<string> {
  const r = await guest.run(
    `D=/tmp/mig${leg}; echo "reads: $(cat $D/reads 2>/dev/null)"; echo "fio runs: $(cat $D/fio.runs 2>/dev/null | tr '\\n' ' ')"; ` +
      `n=$(ls $D | grep -c '^fio\\..*\\.log$'); echo "--- last fio log ($n) ---"; tail -5 $D/fio.$n.log; ` +
      `echo "--- vda stat / inflight ---"; cat /sys/block/vda/stat /sys/block/vda/inflight; ps | grep -E "fio|dd|md5" | grep -v grep`,
    20_000,
  ).catch((e: Error) => ({ status: -1, output: `(the guest shell does not answer: ${e.message.split('\n')[0]})` }));
  return `--- state of the guest's workload ---\n${r.output}`;
}

/** The guest's mismatch descriptions and the log of a failed fio run, for the report. */
async function guestFailureDetails(guest: Guest, leg: number): Promise<string> {
  const r = await guest.run(
    `D=/tmp/mig${leg}; cat $D/errors 2>/dev/null; ` +
      `while read n rc; do [ "$rc" = 0 ] || { echo "--- fio run $n (exit $rc) ---"; grep -iE "verify|error|bad|crc|fail" $D/fio.$n.log | head -20; }; done < $D/fio.runs`,
    60_000,
  );
  return r.output.trim();
}

/**
 * Sets the bandwidth and downtime limits on the source, starts the migration and polls query-migrate
 * until it completes (throws with QEMU's error-desc if it fails, cancels it on timeout); waits until the
 * destination runs the guest.
 */
async function migrate(
  src: Vm, to: { guest: Guest; qmp: QmpClient }, uri: string, opts: MigrationOptions, log: (l: string) => void, name: string, dumpDir: string, image: string,
): Promise<MigrationFigures> {
  const maxBandwidth = opts.maxBandwidth ?? MIGRATION_DEFAULTS.maxBandwidth;
  await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': maxBandwidth, 'downtime-limit': opts.downtimeLimitMs ?? MIGRATION_DEFAULTS.downtimeLimitMs });
  const dest = to.guest;
  const t0 = Date.now();
  await src.qmp.execute('migrate', { uri });
  let last: QueryMigrate = {};
  let lastSync = -1;
  for (;;) {
    if (src.guest.exit) throw new Error(`the source QEMU exited during the migration (${JSON.stringify(src.guest.exit)})`);
    if (dest.exit) throw new Error(`the destination QEMU exited during the migration (${JSON.stringify(dest.exit)})\n${qemuStderr(dest)}`);
    last = await src.qmp.execute<QueryMigrate>('query-migrate');
    const st = last.status;
    const sync = last.ram?.['dirty-sync-count'] ?? 0;
    if (sync !== lastSync) {
      lastSync = sync;
      log(`${name}: ${st}, dirty-sync-count ${sync} at ${Date.now() - t0} ms, ${((last.ram?.transferred ?? 0) / MiB).toFixed(1)} MiB sent, ${((last.ram?.remaining ?? 0) / MiB).toFixed(1)} MiB remaining`);
    }
    if (st === 'completed') break;
    if (st === 'failed' || st === 'cancelled') {
      throw new Error(`migration ${st}: ${last['error-desc'] ?? '(no error-desc)'}\nquery-migrate: ${JSON.stringify(last)}\n` +
        `--- source QEMU stderr ---\n${qemuStderr(src.guest)}\n--- destination QEMU stderr ---\n${qemuStderr(dest)}`);
    }
    if (Date.now() - t0 > MIGRATE_TIMEOUT_MS) {
      await src.qmp.execute('migrate_cancel').catch(() => undefined);
      throw new Error(`migration did not complete within ${MIGRATE_TIMEOUT_MS} ms (cancelled); last query-migrate: ${JSON.stringify(last)}`);
    }
    await sleep(250);
  }
  const wallMs = Date.now() - t0;
  // Both VMs are stopped now (the destination was started with -S): the destination's RAM must be the
  // source's, page for page. A page a backend wrote without logging it differs.
  const ram = await compareRam(src, to, opts.memoryMiB ?? MIGRATION_DEFAULTS.memoryMiB, dumpDir, image);
  if (ram.differingPages > 0) {
    // Where the rings are, to tell a ring page from a data page.
    const rings = await src.qmp.execute('x-query-virtio-queue-status', { path: '/machine/peripheral/disk0/virtio-backend', queue: 0 })
      .then((r) => JSON.stringify(r)).catch((e: Error) => `(x-query-virtio-queue-status: ${e.message})`);
    ram.summary += `; queue 0 on the source: ${rings}`;
    log(`${name}: ${ram.differingPages} page(s) of guest RAM differ between source and destination: ${ram.summary}`);
  }
  return {
    ram,
    totalTimeMs: last['total-time'] ?? NaN,
    downtimeMs: last.downtime ?? NaN,
    setupTimeMs: last['setup-time'] ?? NaN,
    dirtySyncCount: last.ram?.['dirty-sync-count'] ?? NaN,
    transferredBytes: last.ram?.transferred ?? NaN,
    wallMs,
  };
}

/** Lets a stopped VM (a destination started with -S, or a source after its migration) run, and waits until it does. */
async function resume(vm: { guest: Guest; qmp: QmpClient }, what: string): Promise<void> {
  await vm.qmp.execute('cont');
  const deadline = Date.now() + 30_000;
  for (;;) {
    const st = await vm.qmp.execute<{ status: string; running: boolean }>('query-status');
    if (st.running) return;
    if (Date.now() > deadline) throw new Error(`the ${what} does not run the guest 30 s after cont: ${JSON.stringify(st)}\n${qemuStderr(vm.guest)}`);
    await sleep(200);
  }
}

/** Quits a QEMU through QMP and waits for it to exit. */
async function quitQemu(vm: { guest: Guest; qmp: QmpClient }, what: string): Promise<void> {
  await vm.qmp.execute('quit').catch((e: Error) => {
    if (!vm.qmp.closed) throw e; // the connection may close before the answer arrives
  });
  const exit = await Promise.race([vm.guest.exited, sleep(30_000).then(() => undefined)]);
  if (!exit) throw new Error(`the ${what} QEMU did not exit within 30 s of quit`);
}

function qemuStderr(g: Guest, n = 30): string {
  return g.console.lines.filter((l) => l.startsWith('[qemu] ')).slice(-n).join('\n') || '(nothing)';
}

export { QmpError };

/** The host tools a migration scenario needs (runScenario() fails naming the package of a missing one). */
export const MIGRATION_TOOLS = ['qemu-system-x86_64', 'qemu-storage-daemon', 'busybox', 'cpio', 'fio', 'ldd'];

/** A Markdown table of the figures of several runs (one row per leg), for the test log and the README. */
export function figuresTable(runs: Array<{ name: string; result: MigrationResult }>): string {
  const rows = [
    '| backend | leg | total time (ms) | downtime (ms) | setup (ms) | dirty-sync rounds | transferred (MiB) | RAM pages differing (with disk data) | guest verdict | attempts retried for QEMU TCG (CPU pages lost) |',
    '|---|---|---:|---:|---:|---:|---:|---:|---|---|',
  ];
  for (const { name, result } of runs) {
    for (const l of result.legs) {
      const f = l.figures;
      rows.push(`| ${name} | ${l.from} -> ${l.to} | ${f.totalTimeMs} | ${f.downtimeMs} | ${f.setupTimeMs} | ${f.dirtySyncCount} | ${(f.transferredBytes / MiB).toFixed(1)} | ${f.ram.differingPages} (${f.ram.diskDataPages}) | ${l.verdict.pass ? 'PASS' : 'FAIL'} | ${l.lostCpuPages.length === 0 ? 'none' : `${l.lostCpuPages.length} (${l.lostCpuPages.join(', ')})`} |`);
    }
  }
  return rows.join('\n');
}
