/**
 * The inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) as the session keeps it: GET_INFLIGHT_FD
 * creates it, SET_INFLIGHT_FD maps the one the front-end kept (from this process or an earlier one), and
 * each ring that starts is given its queue's part to record requests in.
 */
import { addSeals, closeQuietly, ftruncate, getSeals, memfdCreate, F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, MFD_ALLOW_SEALING } from '../os/libc.js';
import { inflightQueueBytes, inflightRegionBytes } from '../virtqueue/inflight.js';
import { MAX_QUEUE_SIZE } from '../virtqueue/queue.js';
import { mapRegion, unmapRegion, type RegionMapping } from '../memory/mapping.js';
import type { Logger } from '../logger.js';
import type { InflightDescription } from './messages.js';
import { Refusal } from './refusal.js';

/** One queue's part of the inflight region, mapped in this process. */
export interface InflightArea {
  /** Address of the queue's region here. */
  hostAddr: number;
  /** Its length in bytes (inflightQueueBytes(queueSize, packed): the layout follows the ring type). */
  bytes: number;
  /** The queue size the frontend described the region with (desc_num). */
  queueSize: number;
}

/** The inflight region of one session, while the front-end has set one. */
export class InflightRegion {
  /** The region from SET_INFLIGHT_FD, mapped here, and the queue shape it was described with. */
  private current: { mapping: RegionMapping; numQueues: number; queueSize: number } | null = null;

  /** `numQueues` is the device's queue count: no region may describe more. */
  constructor(private readonly log: Logger, private readonly name: string, private readonly numQueues: number) {}

  /**
   * GET_INFLIGHT_FD: a new zero-filled memfd sized for the queues the frontend describes, laid out as
   * QueueRegionPacked when `packed` (VIRTIO_F_RING_PACKED negotiated: QEMU sends SET_FEATURES first, for
   * that reason), else QueueRegionSplit. The fd is the caller's to send and close.
   */
  create(d: InflightDescription, packed: boolean): { size: number; fd: number } {
    this.checkShape(d.numQueues, d.queueSize);
    const size = inflightRegionBytes(d.numQueues, d.queueSize, packed);
    const fd = memfdCreate('vhost-blk-inflight', MFD_ALLOW_SEALING);
    try {
      ftruncate(fd, size);
      // Sealed at its size for good: whoever holds the fd (the frontend, any later backend) can never
      // shrink it under a process that has it mapped, which would die of SIGBUS on its next store.
      addSeals(fd, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
    } catch (err) {
      closeQuietly(fd);
      throw err;
    }
    this.log.info(`${this.name}: inflight region of ${size} bytes created for ${d.numQueues} ${packed ? 'packed' : 'split'} queues of ${d.queueSize}`);
    return { size, fd };
  }

  /**
   * SET_INFLIGHT_FD: maps the region the frontend kept (sent before the rings start; the caller checks
   * that none runs). Rings started from now on record their requests there, and the first start of each
   * recovers what a previous backend left. Takes `fd` in every case.
   */
  set(d: InflightDescription, fd: number, packed: boolean): void {
    try {
      this.checkShape(d.numQueues, d.queueSize);
      const need = inflightRegionBytes(d.numQueues, d.queueSize, packed);
      if (d.mmapSize < need) throw new Refusal(`inflight region of ${d.mmapSize} bytes, ${d.numQueues} queues of ${d.queueSize} need ${need}`);
      // The per-queue views are typed arrays over u64/u32/u16 fields.
      if (d.mmapOffset % 8 !== 0) throw new Refusal(`inflight region offset ${d.mmapOffset} is not 8-byte aligned`);
    } catch (err) {
      closeQuietly(fd);
      throw err;
    }
    this.seal(fd);
    let mapping: RegionMapping;
    try {
      mapping = mapRegion({ guestAddr: 0, size: d.mmapSize, userAddr: 0, mmapOffset: d.mmapOffset }, fd);
    } catch (err) {
      throw new Refusal(`mapping the inflight region failed: ${(err as Error).message}`);
    }
    this.drop();
    this.current = { mapping, numQueues: d.numQueues, queueSize: d.queueSize };
    this.log.info(`${this.name}: inflight region set: ${d.mmapSize} bytes for ${d.numQueues} queues of ${d.queueSize}`);
  }

  private checkShape(numQueues: number, queueSize: number): void {
    if (numQueues < 1 || numQueues > this.numQueues) throw new Refusal(`inflight region for ${numQueues} queues (this device has ${this.numQueues})`);
    if (queueSize < 1 || queueSize > MAX_QUEUE_SIZE) throw new Refusal(`inflight queue size ${queueSize} is not in 1..${MAX_QUEUE_SIZE}`);
  }

  /**
   * The region we map must not shrink under us (a store past its end is a SIGBUS that kills the daemon).
   * Our own GET_INFLIGHT_FD fds come sealed; one from elsewhere (an older vhost-blk, another backend) is
   * sealed here if it allows it, and otherwise taken with a warning: refusing it would fail QEMU's device
   * start and lose the requests a restart is meant to save. Guest memory fds carry the same exposure.
   */
  private seal(fd: number): void {
    let seals: number;
    try {
      seals = getSeals(fd);
    } catch {
      seals = 0; // not a memfd or shmem file: it cannot carry seals
    }
    if ((seals & F_SEAL_SHRINK) !== 0) return;
    try {
      addSeals(fd, F_SEAL_SHRINK);
    } catch (err) {
      this.log.warn(`${this.name}: the inflight region's fd cannot be sealed against shrinking (${(err as Error).message}); ` +
        'a frontend that truncates it would crash this daemon');
    }
  }

  /** Queue `index`'s part of the region, laid out for the ring type, or null when a ring of `ringSize` there is not tracked. */
  area(index: number, ringSize: number, packed: boolean): InflightArea | null {
    const f = this.current;
    if (!f) return null;
    const bytes = inflightQueueBytes(f.queueSize, packed);
    // The size was checked at SET_INFLIGHT_FD for the ring type then; features may have changed since.
    const mapped = f.mapping.region.size;
    if (index >= f.numQueues || ringSize > f.queueSize || (index + 1) * bytes > mapped) {
      this.log.warn(`${this.name}: vring ${index} (size ${ringSize}) is outside the inflight region (${f.numQueues} queues of ${f.queueSize}, ` +
        `${mapped} bytes); its requests are not tracked`);
      return null;
    }
    return { hostAddr: f.mapping.hostAddr + index * bytes, bytes, queueSize: f.queueSize };
  }

  /** Unmaps the region; only once no ring runs (workers write to it). */
  drop(): void {
    if (!this.current) return;
    unmapRegion(this.current.mapping);
    this.current = null;
  }
}
