/**
 * Live resize of the served disk: grow the image, give every queue worker the new size, then the
 * config space, then tell the frontend (which interrupts the guest). In that order: by the time the
 * guest reads the new capacity, every request up to it is accepted.
 *
 * Disks only grow while a guest runs: shrinking would cut off data the guest still believes it has.
 */
import { fstatSync } from 'node:fs';
import { blockDeviceSize, ftruncate } from '../os/libc.js';
import type { Logger } from '../logger.js';

/** Where the served bytes live, as far as their size goes. */
export type ImageSource =
  | { kind: 'file'; fd: number; path: string; readOnly: boolean }
  | { kind: 'block-device'; fd: number; path: string }
  | { kind: 'null' };

/** The device side of a resize (BlkDevice). */
export interface ResizableDevice {
  /** The size the guest is told, in bytes. */
  readonly sizeBytes: number;
  /** Gives the workers, then the config space, the new size. */
  resize(sizeBytes: number): Promise<void>;
}

/** Who tells the frontend (Server). */
export interface ConfigChangeNotifier {
  /** True while a frontend is connected. */
  readonly frontendConnected: boolean;
  /** True while that frontend gave us a backend request channel. */
  readonly backendChannel: boolean;
  /** True while that frontend migrates the guest: the daemon logs its writes into guest memory. */
  readonly dirtyLogging: boolean;
  /** Sends CONFIG_CHANGE_MSG; true once the frontend took it. */
  notifyConfigChange(): Promise<boolean>;
}

/** What a resize did. */
export interface ResizeResult {
  /** The disk's size now, in bytes. */
  sizeBytes: number;
  /** Its size before, in bytes. */
  previousSizeBytes: number;
  /** False when the disk already had that size (nothing was done). */
  changed: boolean;
  /** True when the frontend acknowledged the config change (the guest is being told). */
  frontendNotified: boolean;
  /** One line for the operator: what happened and what the guest sees. */
  message: string;
}

/** A resize refused: the message says why and what to do instead. */
export class ResizeError extends Error {}

/** Grows the served disk on request (the control socket) or after the image grew (SIGHUP). */
export class DiskResizer {
  /** Resizes run one at a time, in the order asked. */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly source: ImageSource,
    private readonly device: ResizableDevice,
    private readonly notifier: ConfigChangeNotifier,
    private readonly logicalBlockSize: number,
    private readonly log: Logger,
  ) {}

  /** The disk as the control socket's `info` reports it. */
  info(): Record<string, unknown> {
    return {
      sizeBytes: this.device.sizeBytes,
      logicalBlockSize: this.logicalBlockSize,
      image: this.source.kind === 'null' ? null : this.source.path,
      backend: this.source.kind,
      readOnly: this.source.kind === 'file' ? this.source.readOnly : false,
      frontendConnected: this.notifier.frontendConnected,
      backendChannel: this.notifier.backendChannel,
      dirtyLogging: this.notifier.dirtyLogging,
    };
  }

  /** Grows the image (a file is extended; a block device must already be that big) and the disk to `sizeBytes`. */
  resize(sizeBytes: number): Promise<ResizeResult> {
    return this.serialized(async () => {
      const current = this.device.sizeBytes;
      if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) throw new ResizeError(`size must be a positive whole number of bytes, got ${sizeBytes}`);
      if (sizeBytes % this.logicalBlockSize !== 0) {
        throw new ResizeError(`size ${sizeBytes} is not a multiple of the ${this.logicalBlockSize}-byte logical block size`);
      }
      if (sizeBytes < current) {
        throw new ResizeError(`size ${sizeBytes} is smaller than the disk's ${current} bytes: shrinking is refused, a running guest would lose the data past the new end`);
      }
      if (sizeBytes === current) return this.unchanged(current);
      this.growImage(sizeBytes);
      return await this.apply(current, sizeBytes);
    });
  }

  /**
   * Re-reads the image's size (SIGHUP: an operator grew the file or block device himself) and, if it
   * grew, gives the guest the new size. A shrunk image is logged and the disk keeps its size.
   */
  reload(): Promise<ResizeResult> {
    return this.serialized(async () => {
      const current = this.device.sizeBytes;
      if (this.source.kind === 'null') return this.unchanged(current, 'the null backend has no image to re-read');
      const imageBytes = this.imageSize();
      const sizeBytes = imageBytes - (imageBytes % this.logicalBlockSize);
      if (sizeBytes < current) {
        throw new ResizeError(`${this.source.path} is now ${imageBytes} bytes, smaller than the disk's ${current}: shrinking is refused; the guest keeps its size and I/O past the image's end fails`);
      }
      if (sizeBytes === current) return this.unchanged(current, `${this.source.path} is still ${imageBytes} bytes`);
      return await this.apply(current, sizeBytes);
    });
  }

  private serialized<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private unchanged(sizeBytes: number, why = `the disk is already ${sizeBytes} bytes`): ResizeResult {
    return { sizeBytes, previousSizeBytes: sizeBytes, changed: false, frontendNotified: false, message: `${why}: nothing to do` };
  }

  /** The image's size now: a file's length or a block device's BLKGETSIZE64. */
  private imageSize(): number {
    if (this.source.kind === 'null') throw new Error('the null backend has no image');
    return this.source.kind === 'block-device' ? blockDeviceSize(this.source.fd) : fstatSync(this.source.fd).size;
  }

  /** Makes the image at least `sizeBytes` long; never cuts a file an operator grew further. */
  private growImage(sizeBytes: number): void {
    const s = this.source;
    if (s.kind === 'null') return;
    const imageBytes = this.imageSize();
    if (imageBytes >= sizeBytes) return;
    if (s.kind === 'block-device') {
      throw new ResizeError(`block device ${s.path} is ${imageBytes} bytes: grow it first (lvextend, ...), then resize again or send SIGHUP`);
    }
    if (s.readOnly) throw new ResizeError(`${s.path} is served read-only (--readonly) and is ${imageBytes} bytes: grow it yourself, then send SIGHUP`);
    try {
      ftruncate(s.fd, sizeBytes);
    } catch (err) {
      throw new ResizeError(`cannot grow ${s.path} to ${sizeBytes} bytes: ${(err as Error).message}`);
    }
  }

  /** Workers and config space first, the frontend last. */
  private async apply(previousSizeBytes: number, sizeBytes: number): Promise<ResizeResult> {
    await this.device.resize(sizeBytes);
    const frontendNotified = await this.notifier.notifyConfigChange();
    const told = frontendNotified
      ? 'the frontend was notified'
      : !this.notifier.frontendConnected
        ? 'no frontend is connected; the next one sees the new size'
        : 'the frontend was not notified (it gave no backend request channel, or did not answer): the guest sees the new size after a device reset or reboot';
    const message = `disk grown from ${previousSizeBytes} to ${sizeBytes} bytes; ${told}`;
    this.log.info(message);
    return { sizeBytes, previousSizeBytes, changed: true, frontendNotified, message };
  }
}
