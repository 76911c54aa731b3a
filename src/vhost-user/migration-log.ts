/**
 * Dirty page logging for live migration, as the session keeps it (vhost-user "Migration"): the log
 * region the front-end gives with SET_LOG_BASE and whether it asked for logging (VHOST_F_LOG_ALL in
 * SET_FEATURES). The data plane logs exactly while both are there.
 *
 * QEMU sends them in either order: SET_LOG_BASE then LOG_ALL when a migration starts, but LOG_ALL with
 * the device's features first and SET_LOG_BASE after its rings start when a device (re)starts during a
 * migration. So LOG_ALL alone is taken and waits for a region. A new region replaces the old one in the
 * data plane first and is unmapped only after: no write is ever logged into an unmapped region.
 */
import { closeQuietly } from '../os/libc.js';
import { mapRegion, unmapRegion, type RegionMapping } from '../memory/mapping.js';
import { dirtyLogBytes, dirtyLogCoverage } from '../memory/dirty-log.js';
import type { Logger } from '../logger.js';
import type { LogDescription } from './messages.js';
import { Refusal } from './refusal.js';

/** A log region mapped in this process, as the data plane is given it. */
export interface DirtyLogArea {
  hostAddr: number;
  bytes: number;
}

/** What the log needs from the device: the data plane's switch. */
export interface DirtyLogSink {
  /** Logs every write into guest memory in `log` from now on (null: stop); resolves once the previous log is no longer used. */
  setDirtyLog(log: DirtyLogArea | null): Promise<void>;
}

/** Largest log region accepted: covers 2^47 bytes (128 TiB) of guest physical memory. */
const MAX_LOG_BYTES = 2 ** 32;

/** One session's migration log. */
export class MigrationLog {
  private region: RegionMapping | null = null;
  private logAll = false;

  constructor(private readonly log: Logger, private readonly name: string, private readonly sink: DirtyLogSink) {}

  /** True while the data plane logs (LOG_ALL negotiated and a region given). */
  get active(): boolean {
    return this.logAll && this.region !== null;
  }

  /**
   * SET_LOG_BASE: maps the region in `fd` (taken in every case). It must cover guest memory up to
   * `guestEnd` (the end of the highest region now), as the spec asks of the front-end.
   */
  async setBase(d: LogDescription, fd: number, guestEnd: number): Promise<void> {
    try {
      if (d.mmapSize === 0 || d.mmapSize > MAX_LOG_BYTES) throw new Refusal(`log region of ${d.mmapSize} bytes is not in 1..${MAX_LOG_BYTES}`);
      const need = dirtyLogBytes(guestEnd);
      if (d.mmapSize < need) {
        throw new Refusal(`log region of ${d.mmapSize} bytes covers ${dirtyLogCoverage(d.mmapSize)} bytes of guest memory; ` +
          `the memory table reaches 0x${guestEnd.toString(16)} and needs ${need}`);
      }
    } catch (err) {
      closeQuietly(fd);
      throw err;
    }
    let next: RegionMapping;
    try {
      next = mapRegion({ guestAddr: 0, size: d.mmapSize, userAddr: 0, mmapOffset: d.mmapOffset }, fd);
    } catch (err) {
      throw new Refusal(`mapping the log region failed: ${(err as Error).message}`);
    }
    const old = this.region;
    if (this.logAll) {
      try {
        await this.sink.setDirtyLog(areaOf(next));
      } catch (err) {
        unmapRegion(next);
        throw new Refusal(`the data plane refused the log region: ${(err as Error).message}`);
      }
    }
    this.region = next;
    if (old) unmapRegion(old);
    this.log.info(`${this.name}: dirty log region set: ${d.mmapSize} bytes (guest memory up to 0x${dirtyLogCoverage(d.mmapSize).toString(16)})` +
      `${this.logAll ? '; logging' : '; logging starts with VHOST_F_LOG_ALL'}`);
  }

  /**
   * VHOST_F_LOG_ALL in SET_FEATURES: logging on or off, rings running or not. Off drops the region (the
   * front-end sends a new one when it logs again).
   */
  async setLogAll(on: boolean): Promise<void> {
    if (on === this.logAll) return;
    if (on) {
      if (this.region) await this.sink.setDirtyLog(areaOf(this.region));
      this.logAll = true;
      this.log.info(`${this.name}: dirty logging on${this.region ? '' : ' (waiting for SET_LOG_BASE)'}`);
      return;
    }
    this.logAll = false;
    await this.drop();
    this.log.info(`${this.name}: dirty logging off`);
  }

  /** After a memory table change: a log that no longer covers guest memory misses writes until the front-end sends a bigger one. */
  checkCovers(guestEnd: number): void {
    if (!this.active || this.region!.region.size >= dirtyLogBytes(guestEnd)) return;
    this.log.warn(`${this.name}: the dirty log covers guest memory up to 0x${dirtyLogCoverage(this.region!.region.size).toString(16)} ` +
      `but the memory table reaches 0x${guestEnd.toString(16)}: writes above are not logged until the front-end sends a larger log`);
  }

  /** Stops logging in the data plane and unmaps the region (reset, disconnect, LOG_ALL off). */
  async drop(): Promise<void> {
    if (!this.region) return;
    await this.sink.setDirtyLog(null);
    unmapRegion(this.region);
    this.region = null;
  }

  /** Forgets LOG_ALL too (reset). */
  async reset(): Promise<void> {
    this.logAll = false;
    await this.drop();
  }
}

function areaOf(m: RegionMapping): DirtyLogArea {
  return { hostAddr: m.hostAddr, bytes: m.region.size };
}
