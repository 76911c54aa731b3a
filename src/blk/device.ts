/**
 * The virtio-blk device behind the vhost-user protocol: features, config space, and the queue workers
 * that serve its rings.
 */
import type { BackendSpec } from '../backend/types.js';
import { QueueWorker } from './worker-pool.js';
import type { Logger } from '../logger.js';
import type { DirtyLogArea, PlaneRegion, RingStart, VhostUserDevice } from '../vhost-user/backend.js';
import { ProtocolFeature } from '../vhost-user/messages.js';
import { readConfig, WRITEBACK_OFFSET, type BlkConfig } from './config.js';
import { Feature, bit, ID_BYTES } from './constants.js';

/** How the device is set up (validated by the CLI). */
export interface BlkDeviceOptions {
  backend: BackendSpec;
  numQueues: number;
  /** Largest ring size accepted. */
  queueSize: number;
  /** Worker threads; queue q runs on worker q % threads. */
  threads: number;
  /** GET_ID answer, at most 20 bytes. */
  serial: string;
  /** Start in writeback mode (the guest may switch through CONFIG_WCE). */
  writeback: boolean;
  logicalBlockSize: number;
  physicalBlockSize: number;
  /** Poll the rings this long after work before sleeping (µs). */
  pollUs: number;
}

/** Largest segment we take in one descriptor: Linux then never builds a bigger bio_vec for us. */
const SIZE_MAX = 1 << 20;
/** Largest discard / write-zeroes range: 1 GiB in 512-byte sectors (Linux splits bigger ones). */
export const MAX_RANGE_SECTORS = 1 << 21;

/** A virtio-blk device served by worker threads. */
export class BlkDevice implements VhostUserDevice {
  readonly features: bigint;
  readonly protocolFeatures: bigint;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  private readonly config: BlkConfig;
  private readonly workers: QueueWorker[];

  constructor(opts: BlkDeviceOptions, private readonly log: Logger) {
    this.numQueues = opts.numQueues;
    this.maxQueueSize = opts.queueSize;
    // seg_max: header and status take two descriptors of a chain no longer than the ring. QEMU's
    // vhost-user-blk rings have 128 entries by default and the driver reads seg_max before the ring
    // size is set, so stay within 126 whatever larger rings we accept.
    const segMax = Math.max(1, Math.min(opts.queueSize - 2, 126));
    let features = bit(Feature.VERSION_1) | bit(Feature.RING_INDIRECT_DESC) | bit(Feature.RING_EVENT_IDX) | bit(Feature.RING_PACKED)
      | bit(Feature.BLK_SIZE_MAX) | bit(Feature.BLK_SEG_MAX) | bit(Feature.BLK_BLK_SIZE) | bit(Feature.BLK_FLUSH)
      | bit(Feature.BLK_TOPOLOGY) | bit(Feature.BLK_CONFIG_WCE) | bit(Feature.BLK_MQ);
    // A read-only disk offers neither discard nor write-zeroes: both change what reads return.
    if (opts.backend.readOnly) features |= bit(Feature.BLK_RO);
    else features |= bit(Feature.BLK_DISCARD) | bit(Feature.BLK_WRITE_ZEROES);
    this.features = features;
    this.protocolFeatures = [ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG, ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.RESET_DEVICE, ProtocolFeature.BACKEND_REQ,
      ProtocolFeature.INFLIGHT_SHMFD]
      .reduce((acc, b) => acc | (1n << BigInt(b)), 0n);
    this.config = {
      capacityBytes: opts.backend.sizeBytes,
      sizeMax: SIZE_MAX,
      segMax,
      blkSize: opts.logicalBlockSize,
      physicalBlockExp: Math.log2(opts.physicalBlockSize / opts.logicalBlockSize),
      minIoSize: 1,
      optIoSize: 0,
      writeback: opts.writeback ? 1 : 0,
      numQueues: opts.numQueues,
      maxDiscardSectors: opts.backend.readOnly ? 0 : MAX_RANGE_SECTORS,
      maxDiscardSeg: opts.backend.readOnly ? 0 : 1,
      discardSectorAlignment: opts.logicalBlockSize / 512,
      maxWriteZeroesSectors: opts.backend.readOnly ? 0 : MAX_RANGE_SECTORS,
      maxWriteZeroesSeg: opts.backend.readOnly ? 0 : 1,
      writeZeroesMayUnmap: opts.backend.readOnly ? 0 : 1,
    };
    const serial = new Uint8Array(ID_BYTES);
    serial.set(Buffer.from(opts.serial, 'utf8').subarray(0, ID_BYTES));
    this.workers = Array.from({ length: opts.threads }, (_, index) => new QueueWorker({
      index, backend: opts.backend, serial, segMax, maxQueueSize: opts.queueSize, writeback: opts.writeback, pollUs: opts.pollUs,
    }, log));
  }

  private worker(queue: number): QueueWorker {
    return this.workers[queue % this.workers.length];
  }

  /** The disk's size in bytes, as the config space announces it. */
  get sizeBytes(): number {
    return this.config.capacityBytes;
  }

  /**
   * Grows the disk to `sizeBytes` (the image must already be that big). Every worker takes the new size
   * before the config space shows it, so a guest that reads the new capacity can use all of it at once.
   */
  async resize(sizeBytes: number): Promise<void> {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes % this.config.blkSize !== 0) throw new RangeError(`size ${sizeBytes} is not a multiple of the ${this.config.blkSize}-byte logical block`);
    if (sizeBytes < this.config.capacityBytes) throw new RangeError(`size ${sizeBytes} is smaller than the current ${this.config.capacityBytes} bytes; disks only grow`);
    await Promise.all(this.workers.map((w) => w.request({ op: 'resize', sizeBytes })));
    this.config.capacityBytes = sizeBytes;
  }

  /** Config space bytes. */
  getConfig(offset: number, size: number): Uint8Array {
    return readConfig(this.config, offset, size);
  }

  /** Only `writeback` is writable, and only when CONFIG_WCE was negotiated (virtio 1.2, 5.2.5). */
  async setConfig(offset: number, data: Uint8Array, features: bigint): Promise<string | null> {
    if (offset !== WRITEBACK_OFFSET || data.length !== 1) return `config bytes ${offset}+${data.length} are read-only`;
    if ((features & bit(Feature.BLK_CONFIG_WCE)) === 0n) return 'writeback is read-only without VIRTIO_BLK_F_CONFIG_WCE';
    if (data[0] > 1) return `writeback value ${data[0]} is neither 0 nor 1`;
    this.config.writeback = data[0];
    this.log.info(`guest switched the write cache to ${data[0] ? 'writeback' : 'writethrough'}`);
    await this.broadcastWriteback(features);
    return null;
  }

  /**
   * Writeback holds only when the driver can flush; without FLUSH every write must be durable on
   * completion (virtio 1.2, 5.2.6.2).
   */
  private async broadcastWriteback(features: bigint): Promise<void> {
    const enabled = (features & bit(Feature.BLK_FLUSH)) !== 0n && this.config.writeback === 1;
    await Promise.all(this.workers.map((w) => w.request({ op: 'writeback', enabled })));
  }

  /** Hands the memory table to every worker. */
  async setMemory(regions: PlaneRegion[]): Promise<void> {
    await Promise.all(this.workers.map((w) => w.request({ op: 'memory', regions })));
  }

  /** Starts a ring on its worker. */
  async startRing(r: RingStart): Promise<void> {
    await this.broadcastWriteback(r.features);
    await this.worker(r.queue).request({
      op: 'start',
      params: {
        queue: r.queue, size: r.size, descUserAddr: r.descUserAddr, availUserAddr: r.availUserAddr, usedUserAddr: r.usedUserAddr,
        lastAvailIdx: r.lastAvailIdx, kickFd: r.kickFd, callFd: r.callFd, packed: r.packed, inflight: r.inflight ?? null, logUsedAddr: r.logUsedAddr,
        eventIdx: (r.features & bit(Feature.RING_EVENT_IDX)) !== 0n,
        indirect: (r.features & bit(Feature.RING_INDIRECT_DESC)) !== 0n,
        discard: (r.features & bit(Feature.BLK_DISCARD)) !== 0n,
        writeZeroes: (r.features & bit(Feature.BLK_WRITE_ZEROES)) !== 0n,
      },
    });
  }

  /** Stops a ring once its in-flight requests are done. */
  async stopRing(queue: number): Promise<number> {
    const reply = await this.worker(queue).request({ op: 'stop', queue });
    return reply.lastAvailIdx ?? 0;
  }

  /** Replaces a running ring's call fd. */
  async setCallFd(queue: number, fd: number): Promise<void> {
    await this.worker(queue).request({ op: 'call-fd', queue, fd });
  }

  /** Migration: every worker logs its writes into guest memory in `log` (null: stops); resolves when none uses the previous one. */
  async setDirtyLog(log: DirtyLogArea | null): Promise<void> {
    await Promise.all(this.workers.map((w) => w.request({ op: 'dirty-log', log })));
  }

  /** Migration: a running ring's VHOST_VRING_F_LOG changed. */
  async setRingLog(queue: number, usedLogAddr: number | null): Promise<void> {
    await this.worker(queue).request({ op: 'ring-log', queue, usedLogAddr });
  }

  /** Stops every worker (in-flight requests finish first). */
  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.stop()));
  }
}
