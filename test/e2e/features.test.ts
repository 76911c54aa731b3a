// End-to-end tests of the virtio-blk features `bin/vhost-blk serve` offers, as a Linux guest uses them
// (issue 6). Two boots:
//  1. 2 vCPUs and 2 queues: concurrent fio verify writers pinned to the CPUs of different queues;
//     discard and write-zeroes read back as zeros and give the sparse image's space back; the guest
//     switches the write cache to writethrough and back through /sys/block/vda/cache_type.
//  2. Two disks: a `--readonly` one that refuses every write, and a `--writeback off` one that the guest
//     sees as write through (with 4 KiB logical blocks and a 256-entry ring).
// Durability is observed from the host with cachestat(2): in writethrough every acknowledged write must
// be clean in the host page cache (see test/page-cache.ts).
//
// Note: /sys/block/vda/queue/write_cache is the block layer's own flag: writing it changes only whether
// the guest sends flushes, never the device. virtio_blk's /sys/block/vda/cache_type is what writes the
// config space's writeback field (SET_CONFIG on the vhost-user socket).

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import { test, type TestContext } from 'node:test';

import { pageCacheState, type PageCacheState } from '../page-cache.js';
import {
  guestMd5,
  createSparseImage,
  Guest,
  guestPattern,
  runScenario,
  startVhostBlk,
  step,
  type DaemonHandle,
} from './guest.js';

const MiB = 1024 * 1024;
const IMAGE_BYTES = 64 * MiB;
/** Bytes each pinned fio writer covers (4 KiB blocks, each written once, then verified). */
const FIO_BYTES = 8 * MiB;
const FIO_BS = 4096;

// ---------------------------------------------------------------------------
// Guest- and host-side probes
// ---------------------------------------------------------------------------

/** Last non-empty line of a command's output, trimmed. */
function lastLine(out: string): string {
  return out.trim().split('\n').pop()!.trim();
}

/** Reads a one-line sysfs (or other) file in the guest. */
async function readGuestFile(guest: Guest, file: string): Promise<string> {
  return lastLine(await guest.check(`cat ${file}`));
}

/** The counters of /sys/block/<disk>/stat that these tests look at. */
interface DiskStat {
  writeIos: number;
  writeSectors: number;
  discardIos: number;
  discardSectors: number;
  flushIos: number;
}

/** Parses /sys/block/<disk>/stat in the guest. */
async function diskStat(guest: Guest, disk: string): Promise<DiskStat> {
  const line = await readGuestFile(guest, `/sys/block/${disk}/stat`);
  const f = line.split(/\s+/).map(Number);
  if (f.length < 17 || f.some((n) => !Number.isFinite(n))) throw new Error(`cannot parse /sys/block/${disk}/stat: ${line}`);
  return { writeIos: f[4]!, writeSectors: f[6]!, discardIos: f[11]!, discardSectors: f[13]!, flushIos: f[15]! };
}

/** Hex MD5, to compare with what busybox md5sum prints in the guest. */
function md5(data: Uint8Array): string {
  return createHash('md5').update(data).digest('hex');
}

/** `len` bytes of the image file at `offset`, read on the host. */
async function readImage(image: string, offset: number, len: number): Promise<Buffer> {
  const fh = await fsp.open(image, 'r');
  try {
    const b = Buffer.alloc(len);
    const { bytesRead } = await fh.read(b, 0, len, offset);
    assert.equal(bytesRead, len, `image ${image}: ${len} bytes at ${offset}`);
    return b;
  } finally {
    await fh.close();
  }
}

/** 512-byte blocks the image occupies on the host filesystem (st_blocks). */
async function allocatedBlocks(image: string): Promise<number> {
  return (await fsp.stat(image)).blocks;
}

/** Interrupts per virtqueue of the guest's virtio-blk devices ("virtio0-req.1" -> count over all CPUs). */
async function queueInterrupts(guest: Guest): Promise<Map<string, number>> {
  const counts = new Map<string, number>();
  for (const line of (await guest.check('cat /proc/interrupts')).split('\n')) {
    const name = /\s(virtio\d+-req\.\d+)\s*$/.exec(line)?.[1];
    if (!name) continue;
    const perCpu = line.trim().split(/\s+/).slice(1).filter((w) => /^\d+$/.test(w)).map(Number);
    counts.set(name, perCpu.reduce((a, b) => a + b, 0));
  }
  return counts;
}

/**
 * Requests the daemon took from each vring in the last session, from its "vring N started (..., base B)"
 * and "vring N stopped at avail index I" lines (QEMU stops every vring when the guest powers off).
 */
function requestsPerVring(daemon: DaemonHandle): Map<number, number> {
  const base = new Map<number, number>();
  const taken = new Map<number, number>();
  for (const line of daemon.output) {
    const started = /vring (\d+) started \(size \d+, base (\d+)\)/.exec(line);
    if (started) base.set(Number(started[1]), Number(started[2]));
    const stopped = /vring (\d+) stopped at avail index (\d+)/.exec(line);
    if (stopped) {
      const q = Number(stopped[1]);
      taken.set(q, (Number(stopped[2]) - (base.get(q) ?? 0) + 65536) % 65536);
    }
  }
  return taken;
}

/** Waits until the daemon has printed a line matching `re` after line `from` (its output is a pipe). */
async function daemonLogged(daemon: DaemonHandle, re: RegExp, from: number, what: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!daemon.output.slice(from).some((l) => re.test(l))) {
    if (Date.now() > deadline) throw new Error(`the daemon did not log ${what} (${re})\n${daemon.diagnostics(30)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Page-cache state of an image range; null (with a test diagnostic) when the host kernel lacks
 * cachestat(2), in which case the durability checks cannot run.
 */
function hostCache(t: TestContext, image: string, offset: number, len: number): PageCacheState | null {
  const s = pageCacheState(image, offset, len);
  if (!s) t.diagnostic('host kernel has no cachestat(2) (Linux < 6.5): durability of writethrough writes NOT checked');
  return s;
}

/** Writes whole MiBs of /pattern.bin (from `patternOffset`) to `dev` at `offset` with O_DIRECT. */
async function writePattern(guest: Guest, dev: string, offset: number, len: number, patternOffset: number, fsync: boolean): Promise<void> {
  await guest.check(
    `dd if=/pattern.bin of=${dev} bs=1M count=${len / MiB} skip=${patternOffset / MiB} seek=${offset / MiB} ` +
      `oflag=direct conv=notrunc${fsync ? ',fsync' : ''}`,
  );
}

/** The guest reads `expected` at `offset` of `dev` (O_DIRECT) and the host image holds it too. */
async function expectContent(guest: Guest, dev: string, image: string, offset: number, expected: Buffer, what: string): Promise<void> {
  assert.equal(await guestMd5(guest, dev, offset, expected.length), md5(expected), `${what}: what the guest reads`);
  assert.ok((await readImage(image, offset, expected.length)).equals(expected), `${what}: the image on the host`);
}

// ---------------------------------------------------------------------------
// Boot 1: multi-queue, discard / write-zeroes, writethrough switched by the guest
// ---------------------------------------------------------------------------

test('features: 2 queues on 2 vCPUs with pinned fio writers; discard and write-zeroes; writethrough set by the guest', { timeout: 400_000 }, (t) =>
  runScenario('features', ['qemu-system-x86_64', 'busybox', 'cpio', 'fio', 'ldd'], async (sc) => {
    const image = sc.path('disk.img');
    const socket = sc.path('vhost-user-blk.sock');
    await createSparseImage(image, IMAGE_BYTES);
    const d = await step('start vhost-blk serve', () =>
      sc.track(startVhostBlk(['--socket', socket, '--image', image, '--num-queues', '2', '--threads', '2', '--writeback', 'on', '--log-level', 'debug'])),
    );
    const g = await step('boot', () => sc.boot({ socket, cpus: 2, numQueues: 2 }));
    const pattern = guestPattern();

    // --- Two queues, each served by its own worker, each fed by a writer pinned to one of its CPUs.
    const cpuOfQueue = await step('guest sees 2 hardware queues', async () => {
      assert.equal(lastLine(await g.check('ls /sys/block/vda/mq | tr "\\n" " "')), '0 1', 'hardware queues in /sys/block/vda/mq');
      const cpus = [];
      for (const q of [0, 1]) cpus.push(Number((await readGuestFile(g, `/sys/block/vda/mq/${q}/cpu_list`)).split(/[,-]/)[0]));
      assert.notEqual(cpus[0], cpus[1], `queues 0 and 1 serve different CPUs (${cpus})`);
      const workers = new Map<number, number>();
      for (const l of d.output) {
        const m = /worker (\d+): queue (\d+) started/.exec(l);
        if (m) workers.set(Number(m[2]), Number(m[1]));
      }
      assert.notEqual(workers.get(0), workers.get(1), `queues 0 and 1 run on different worker threads (${[...workers]})`);
      return cpus;
    });
    const irqBefore = await queueInterrupts(g);
    await step('concurrent pinned fio verify writers on disjoint regions', () =>
      g.check(
        [
          'fio --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite',
          `--bs=${FIO_BS} --iodepth=8 --size=${FIO_BYTES}`,
          '--verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=1 --norandommap=0 --output-format=terse',
          ...cpuOfQueue.map((cpu, q) => `--name=q${q} --cpus_allowed=${cpu} --offset=${q * FIO_BYTES}`),
          '>/tmp/fio.out || { cat /tmp/fio.out; exit 1; }',
        ].join(' '),
        240_000,
      ),
    );
    await step('both queues completed requests (guest interrupts per queue)', async () => {
      const irqAfter = await queueInterrupts(g);
      const dev = [...irqAfter.keys()].find((k) => k.endsWith('-req.0'))?.replace(/-req\.0$/, '');
      assert.ok(dev, `virtio-blk queue interrupts in /proc/interrupts: ${[...irqAfter.keys()]}`);
      for (const q of [0, 1]) {
        const name = `${dev}-req.${q}`;
        assert.ok((irqAfter.get(name) ?? 0) > (irqBefore.get(name) ?? 0), `${name} interrupts: ${irqBefore.get(name)} -> ${irqAfter.get(name)}`);
      }
    });
    await step('fio regions: every block written on the host, and the guest reads the host bytes', async () => {
      const host = await readImage(image, 0, 2 * FIO_BYTES);
      for (let off = 0; off < host.length; off += FIO_BS) {
        const block = host.subarray(off, off + FIO_BS);
        assert.ok(block.some((b) => b !== 0), `4 KiB block at ${off} of the image is still zero after fio wrote it`);
      }
      assert.equal(await guestMd5(g, '/dev/vda', 0, 2 * FIO_BYTES), md5(host), 'guest and host see the same bytes');
    });

    // --- Discard and write-zeroes (24..28 MiB).
    await step('discard and write-zeroes limits', async () => {
      for (const attr of ['discard_max_bytes', 'write_zeroes_max_bytes']) {
        assert.ok(Number(await readGuestFile(g, `/sys/block/vda/queue/${attr}`)) > 0, `${attr} > 0`);
      }
    });
    const base = 24 * MiB;
    await step('write 4 MiB of pattern', () => writePattern(g, '/dev/vda', base, 4 * MiB, 0, true));
    await step('discard 2 MiB: reads zeros, space given back', async () => {
      const blocks = await allocatedBlocks(image);
      const before = await diskStat(g, 'vda');
      await g.check(`blkdiscard -o ${base} -l ${2 * MiB} /dev/vda`);
      const after = await diskStat(g, 'vda');
      assert.ok(after.discardIos > before.discardIos, 'the guest sent DISCARD requests');
      assert.equal(after.discardSectors - before.discardSectors, (2 * MiB) / 512, 'discarded sectors');
      const freed = blocks - (await allocatedBlocks(image));
      assert.ok(freed >= (2 * MiB) / 512, `image st_blocks dropped by ${freed} (512-byte blocks), expected >= ${(2 * MiB) / 512}`);
      await expectContent(g, '/dev/vda', image, base, Buffer.alloc(2 * MiB), 'discarded range');
      await expectContent(g, '/dev/vda', image, base + 2 * MiB, pattern.subarray(2 * MiB, 4 * MiB), 'range after the discard');
    });
    await step('write-zeroes 1 MiB: reads zeros, space given back', async () => {
      const blocks = await allocatedBlocks(image);
      // fallocate(PUNCH_HOLE | KEEP_SIZE) on a block device is blkdev_issue_zeroout(NOFALLBACK): a
      // WRITE_ZEROES (unmap allowed) or EOPNOTSUPP, never a fallback to writing zero pages.
      await g.check(`fio --name=zero --filename=/dev/vda --ioengine=falloc --rw=trim --bs=1M --offset=${base + 2 * MiB} --size=1M --output-format=terse >/dev/null`);
      const freed = blocks - (await allocatedBlocks(image));
      assert.ok(freed >= MiB / 512, `image st_blocks dropped by ${freed}, expected >= ${MiB / 512}`);
      await expectContent(g, '/dev/vda', image, base + 2 * MiB, Buffer.alloc(MiB), 'zeroed range');
      await expectContent(g, '/dev/vda', image, base + 3 * MiB, pattern.subarray(3 * MiB, 4 * MiB), 'range after the zeroed one');
    });

    // --- The write cache, switched by the guest (32..38 MiB).
    const wb1 = 32 * MiB;
    const wt = 34 * MiB;
    const wb2 = 36 * MiB;
    await step('starts in writeback', async () => {
      assert.equal(await readGuestFile(g, '/sys/block/vda/cache_type'), 'write back');
      assert.equal(await readGuestFile(g, '/sys/block/vda/queue/write_cache'), 'write back');
    });
    await step('writeback: an acknowledged write may stay dirty on the host until the guest flushes', async () => {
      await writePattern(g, '/dev/vda', wb1, MiB, 0, false);
      const dirty = hostCache(t, image, wb1, MiB);
      // Also proves the probe: un-flushed data in the daemon's image is seen as dirty.
      if (dirty) assert.ok(dirty.dirty > 0, `dirty pages after a write in writeback mode: ${JSON.stringify(dirty)}`);
      const flushes = (await diskStat(g, 'vda')).flushIos;
      await writePattern(g, '/dev/vda', wb1, MiB, 0, true);
      assert.ok((await diskStat(g, 'vda')).flushIos > flushes, 'fsync in the guest sent a FLUSH');
      const flushed = hostCache(t, image, wb1, MiB);
      if (flushed) assert.equal(flushed.dirty + flushed.writeback, 0, `dirty pages after the guest's flush: ${JSON.stringify(flushed)}`);
    });
    await step('the guest switches to write through (SET_CONFIG)', async () => {
      const from = d.output.length;
      await g.check('echo "write through" > /sys/block/vda/cache_type');
      await daemonLogged(d, /SET_CONFIG/, from, 'the SET_CONFIG message');
      await daemonLogged(d, /write cache to writethrough/, from, 'the switch to writethrough');
      assert.equal(await readGuestFile(g, '/sys/block/vda/cache_type'), 'write through');
      assert.equal(await readGuestFile(g, '/sys/block/vda/queue/write_cache'), 'write through');
    });
    await step('writethrough: every acknowledged write is durable, and the guest sends no flush', async () => {
      const flushes = (await diskStat(g, 'vda')).flushIos;
      await writePattern(g, '/dev/vda', wt, 2 * MiB, MiB, true);
      const s = hostCache(t, image, wt, 2 * MiB);
      if (s) assert.equal(s.dirty + s.writeback, 0, `dirty pages right after writes acknowledged in writethrough: ${JSON.stringify(s)}`);
      assert.equal((await diskStat(g, 'vda')).flushIos, flushes, 'flushes sent by the guest in write-through mode');
      await expectContent(g, '/dev/vda', image, wt, pattern.subarray(MiB, 3 * MiB), 'writethrough range');
    });
    await step('the guest switches back to write back', async () => {
      const from = d.output.length;
      await g.check('echo "write back" > /sys/block/vda/cache_type');
      await daemonLogged(d, /write cache to writeback/, from, 'the switch back to writeback');
      assert.equal(await readGuestFile(g, '/sys/block/vda/cache_type'), 'write back');
      await writePattern(g, '/dev/vda', wb2, MiB, 3 * MiB, false);
      const s = hostCache(t, image, wb2, MiB);
      if (s) assert.ok(s.dirty > 0, `dirty pages after a write in writeback mode again: ${JSON.stringify(s)}`);
    });

    assert.equal(await step('power off', () => g.poweroff()), 0, 'QEMU exit code after poweroff');
    await step('the daemon took the fio requests from both vrings', async () => {
      const taken = requestsPerVring(d);
      for (const q of [0, 1]) {
        // Each writer issued FIO_BYTES / FIO_BS writes and as many verify reads; allow for merges.
        const min = FIO_BYTES / FIO_BS;
        assert.ok((taken.get(q) ?? 0) >= min, `vring ${q}: ${taken.get(q)} requests, expected >= ${min}`);
      }
      t.diagnostic(`requests per vring: ${JSON.stringify([...taken])}`);
    });
    await step('check the image on the host after shutdown', async () => {
      assert.ok((await readImage(image, wt, 2 * MiB)).equals(pattern.subarray(MiB, 3 * MiB)), 'writethrough range');
      assert.ok((await readImage(image, wb2, MiB)).equals(pattern.subarray(3 * MiB, 4 * MiB)), 'last writeback range');
      assert.ok((await readImage(image, base, 3 * MiB)).equals(Buffer.alloc(3 * MiB)), 'discarded and zeroed ranges');
    });
    assert.equal(await step('SIGTERM vhost-blk', () => d.stop('SIGTERM', 15_000)), 0, 'vhost-blk exit code');
  }));

// ---------------------------------------------------------------------------
// Boot 2: a read-only disk and a disk started in writethrough
// ---------------------------------------------------------------------------

/** Guest disk name (vda, vdb, ...) whose virtio-blk serial is `serial`. */
async function diskWithSerial(guest: Guest, serial: string): Promise<string> {
  const out = await guest.check('for d in /sys/block/vd*; do echo "$(basename $d) $(cat $d/serial)"; done');
  for (const line of out.split('\n')) {
    const [disk, s] = line.trim().split(/\s+/);
    if (s === serial) return disk!;
  }
  throw new Error(`no guest disk has serial ${serial}:\n${out}`);
}

/** SHA-256 of a whole file on the host. */
async function sha256File(file: string): Promise<string> {
  return createHash('sha256').update(await fsp.readFile(file)).digest('hex');
}

test('features: a --readonly disk refuses every write; a --writeback off disk (4 KiB blocks, 256-entry ring) is write through and durable', { timeout: 300_000 }, (t) =>
  runScenario('features-ro', ['qemu-system-x86_64', 'busybox', 'cpio', 'fio', 'ldd'], async (sc) => {
    const pattern = guestPattern();
    const roImage = sc.path('ro.img');
    const wtImage = sc.path('wt.img');
    const roSocket = sc.path('ro.sock');
    const wtSocket = sc.path('wt.sock');
    await createSparseImage(roImage, IMAGE_BYTES);
    await fsp.writeFile(roImage, pattern, { flag: 'r+' });
    const roHash = await sha256File(roImage);
    await createSparseImage(wtImage, IMAGE_BYTES);
    const roDaemon = await step('start vhost-blk serve --readonly', () =>
      sc.track(startVhostBlk(['--socket', roSocket, '--image', roImage, '--readonly', '--serial', 'e2e-readonly'])),
    );
    const wtDaemon = await step('start vhost-blk serve --writeback off', () =>
      sc.track(startVhostBlk([
        '--socket', wtSocket, '--image', wtImage, '--writeback', 'off', '--serial', 'e2e-writethrough',
        '--logical-block-size', '4096', '--physical-block-size', '16384', '--queue-size', '256',
      ])),
    );
    const g = await step('boot with both disks', () =>
      sc.boot({
        socket: roSocket,
        extraQemuArgs: ['-chardev', `socket,id=c1,path=${wtSocket}`, '-device', 'vhost-user-blk-pci,chardev=c1,num-queues=1,queue-size=256'],
      }),
    );
    const ro = await step('find the read-only disk', () => diskWithSerial(g, 'e2e-readonly'));
    const wt = await step('find the writethrough disk', () => diskWithSerial(g, 'e2e-writethrough'));

    await step('read-only disk: ro = 1, no discard / write-zeroes, data readable', async () => {
      assert.equal(await readGuestFile(g, `/sys/block/${ro}/ro`), '1', `/sys/block/${ro}/ro`);
      assert.equal(await readGuestFile(g, `/sys/block/${ro}/queue/discard_max_bytes`), '0');
      assert.equal(await readGuestFile(g, `/sys/block/${ro}/queue/write_zeroes_max_bytes`), '0');
      assert.equal(await guestMd5(g, `/dev/${ro}`, 0, pattern.length), md5(pattern), 'what the guest reads');
    });
    await step('read-only disk: every write attempt fails', async () => {
      const dev = `/dev/${ro}`;
      const attempts: Array<[string, string]> = [
        ['O_DIRECT write', `dd if=/pattern.bin of=${dev} bs=4k count=1 oflag=direct conv=notrunc`],
        ['buffered write + fsync', `dd if=/pattern.bin of=${dev} bs=4k count=1 conv=notrunc,fsync`],
        // BLKROSET clears only the block device's own flag; the disk stays read-only (set_disk_ro).
        ['write after blockdev --setrw', `blockdev --setrw ${dev} && dd if=/pattern.bin of=${dev} bs=4k count=1 oflag=direct conv=notrunc`],
        ['discard', `blkdiscard -o 0 -l 65536 ${dev}`],
        ['write-zeroes', `fio --name=z --filename=${dev} --ioengine=falloc --rw=trim --bs=64k --size=64k --output-format=terse`],
      ];
      for (const [what, cmd] of attempts) {
        const r = await g.run(cmd);
        assert.notEqual(r.status, 0, `${what} on the read-only disk succeeded:\n${r.output}`);
      }
      const s = await diskStat(g, ro);
      // Linux refuses all of these itself (EPERM / EOPNOTSUPP); none reaches the device. The daemon's
      // own refusal (IOERR) is covered at the protocol level by the conformance suite.
      t.diagnostic(`read-only disk after the write attempts: ${JSON.stringify(s)}`);
      assert.equal(s.writeSectors + s.discardSectors, 0, 'sectors written or discarded on the read-only disk');
      assert.equal(await guestMd5(g, dev, 0, pattern.length), md5(pattern), 'the read-only disk still reads the pattern');
    });

    await step('--writeback off disk: the guest sees write through, the block sizes and the 256-entry ring', async () => {
      assert.equal(await readGuestFile(g, `/sys/block/${wt}/cache_type`), 'write through');
      assert.equal(await readGuestFile(g, `/sys/block/${wt}/queue/write_cache`), 'write through');
      assert.equal(await readGuestFile(g, `/sys/block/${wt}/queue/logical_block_size`), '4096');
      assert.equal(await readGuestFile(g, `/sys/block/${wt}/queue/physical_block_size`), '16384');
      // virtio_blk sizes its tag set to fill the ring (indirect descriptors: one entry per request).
      assert.equal(await readGuestFile(g, `/sys/block/${wt}/mq/0/nr_tags`), '256');
    });
    await step('--writeback off disk: acknowledged writes are durable, without a flush', async () => {
      const flushes = (await diskStat(g, wt)).flushIos;
      await writePattern(g, `/dev/${wt}`, 8 * MiB, 4 * MiB, 0, true);
      const s = hostCache(t, wtImage, 8 * MiB, 4 * MiB);
      if (s) assert.equal(s.dirty + s.writeback, 0, `dirty pages right after writes acknowledged in writethrough: ${JSON.stringify(s)}`);
      assert.equal((await diskStat(g, wt)).flushIos, flushes, 'flushes sent by the guest');
      await expectContent(g, `/dev/${wt}`, wtImage, 8 * MiB, pattern, 'data written to the writethrough disk');
    });

    assert.equal(await step('power off', () => g.poweroff()), 0, 'QEMU exit code after poweroff');
    assert.equal(await step('SIGTERM the read-only daemon', () => roDaemon.stop('SIGTERM', 15_000)), 0, 'exit code');
    assert.equal(await step('SIGTERM the writethrough daemon', () => wtDaemon.stop('SIGTERM', 15_000)), 0, 'exit code');
    assert.equal(await sha256File(roImage), roHash, 'the read-only image changed on the host');
    assert.ok((await readImage(wtImage, 8 * MiB, pattern.length)).equals(pattern), 'writethrough image on the host');
  }));
