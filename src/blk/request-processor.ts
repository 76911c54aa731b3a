/**
 * virtio-blk request processing for one virtqueue: descriptor chains in, backend I/O out, status and
 * used-ring entries back.
 *
 * All per-request state lives in preallocated slot arrays (one slot per ring entry), and data moves
 * through iovecs that point into mapped guest memory: no allocation and no copy per request. The
 * header and data may be framed across descriptors in any way (virtio 1.2, 2.7.4 "Message Framing").
 */
import type { BlockBackend } from '../backend/types.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import { DescriptorChain, POP_BAD_CHAIN, POP_EMPTY, POP_RING_BROKEN, type VirtQueue } from '../virtqueue/queue.js';
import { ID_BYTES, REQUEST_HEADER_SIZE, RequestType, SECTOR_SIZE, Status } from './constants.js';

/** Device settings the processor obeys; `writeback` may change while running (SET_CONFIG). */
export interface BlkSettings {
  /** Serial number returned by GET_ID (at most 20 bytes; shorter is NUL padded). */
  serial: Uint8Array;
  /** Largest number of data segments per request (config seg_max). */
  segMax: number;
  /** Writeback cache on; off means every write is made durable before it is acknowledged. */
  writeback: boolean;
  /** DISCARD negotiated. */
  discard: boolean;
  /** WRITE_ZEROES negotiated. */
  writeZeroes: boolean;
  /** Largest discard / write-zeroes range, in 512-byte sectors. */
  maxRangeSectors: number;
  /**
   * Read data is marked in the migration dirty log (when one is active). False only in tests that prove a
   * migration check can see stale pages (VHOST_BLK_TEST_UNLOGGED_READS=1); never in production.
   */
  logReadData?: boolean;
}

/** A sink for one-line log messages. */
export type LogFn = (level: 'debug' | 'info' | 'warn' | 'error', msg: string) => void;

const enum SlotState { Free = 0, Reading, Writing, SyncAfterWrite, Flushing, Discarding, Zeroing, ZeroingByPunch }
const STATE_NAMES = ['free', 'read', 'write', 'sync after write', 'flush', 'discard', 'write-zeroes', 'write-zeroes'];
const EOPNOTSUPP = 95;
/** struct virtio_blk_discard_write_zeroes: sector u64, num_sectors u32, flags u32. */
const RANGE_SIZE = 16;
const RANGE_FLAG_UNMAP = 1;

const TWO_32 = 2 ** 32;

/** Turns chains from one virtqueue (split or packed) into backend requests and completes them. */
export class BlkRequestProcessor {
  /** Requests submitted to the backend and not yet completed. */
  inFlight = 0;
  /** Set when used entries were added since the last notification check. */
  hasNewUsed = false;
  private readonly chain: DescriptorChain;
  private readonly freeSlots: Int32Array;
  private freeCount: number;
  private readonly slotHead: Int32Array;
  private readonly slotState: Uint8Array;
  private readonly slotStatusGpa: Float64Array;
  private readonly slotUsedLen: Uint32Array;
  private readonly slotOffset: Float64Array;
  private readonly slotRemaining: Float64Array;
  private readonly slotIovFirst: Uint16Array;
  private readonly slotIovEnd: Uint16Array;
  private readonly iov32: Uint32Array;
  /** Guest address and length of each data iovec as first built: what a read's completion marks dirty while migrating. */
  private readonly iovGpa: Float64Array;
  private readonly iovLen: Uint32Array;
  private readonly header = new Uint8Array(REQUEST_HEADER_SIZE);
  private readonly range = new Uint8Array(RANGE_SIZE);
  private readonly rangeView = new DataView(this.range.buffer);
  /** Each fallback is logged once per queue, not per request. */
  private loggedZeroRangeFallback = false;
  private loggedDiscardIgnored = false;
  private readonly headerView = new DataView(this.header.buffer);
  /** The disk's size now: read per request, as a live resize raises it while the queue runs. */
  private get capacitySectors(): number {
    return Math.floor(this.backend.sizeBytes / SECTOR_SIZE);
  }
  private readonly iovPerSlot: number;
  /** Errors logged so far: a misbehaving guest must not flood the log. */
  private errorsLogged = 0;

  /**
   * `iovArea` is native memory for slots × (segMax + 1) iovecs; `iovAddr` its address for the kernel.
   * `tagBase` + slot is the completion tag given to the backend.
   */
  constructor(
    private readonly queue: VirtQueue,
    private readonly mem: GuestMemory,
    private readonly backend: BlockBackend,
    private readonly settings: BlkSettings,
    iovArea: ArrayBuffer,
    private readonly iovAddr: number,
    private readonly tagBase: number,
    private readonly log: LogFn,
    private readonly name: string,
  ) {
    const slots = queue.size;
    this.iovPerSlot = settings.segMax + 1;
    if (iovArea.byteLength < slots * this.iovPerSlot * 16) throw new RangeError(`iovec area too small for ${slots} slots`);
    this.chain = new DescriptorChain(Math.max(queue.size, settings.segMax + 2));
    this.freeSlots = new Int32Array(slots);
    for (let i = 0; i < slots; i++) this.freeSlots[i] = slots - 1 - i;
    this.freeCount = slots;
    this.slotHead = new Int32Array(slots);
    this.slotState = new Uint8Array(slots);
    this.slotStatusGpa = new Float64Array(slots);
    this.slotUsedLen = new Uint32Array(slots);
    this.slotOffset = new Float64Array(slots);
    this.slotRemaining = new Float64Array(slots);
    this.slotIovFirst = new Uint16Array(slots);
    this.slotIovEnd = new Uint16Array(slots);
    this.iov32 = new Uint32Array(iovArea);
    this.iovGpa = new Float64Array(slots * this.iovPerSlot);
    this.iovLen = new Uint32Array(slots * this.iovPerSlot);
  }

  /** Bytes of native iovec memory needed for a queue of `size` entries. */
  static iovBytes(size: number, segMax: number): number {
    return size * (segMax + 1) * 16;
  }

  /** Pops and starts available requests (while slots last, at most one ring's worth); returns how many chains were taken. */
  pump(): number {
    if (this.queue.broken) return 0;
    let taken = 0;
    // Bounded: a guest whose used ring overlaps its avail ring makes every used entry a new avail one,
    // and chains answered at once take no slot, so an unbounded loop would never return to the worker.
    while (this.freeCount > 0 && taken < this.queue.size) {
      const head = this.queue.popChain(this.chain);
      if (head === POP_EMPTY) break;
      if (head === POP_RING_BROKEN) {
        // Logged once: the queue stays broken (and pump() idle) until the frontend resets it.
        this.log('error', `${this.name}: ring is broken, queue stopped until the frontend resets it: ${this.queue.lastError}`);
        break;
      }
      taken++;
      if (head === POP_BAD_CHAIN) {
        // The chain cannot be trusted enough to find a status byte: give the head back with nothing written.
        this.logError(`${this.name}: bad descriptor chain: ${this.queue.lastError}`);
        this.queue.pushUsed(this.chain.head, 0);
        this.hasNewUsed = true;
        continue;
      }
      this.start(head);
    }
    return taken;
  }

  /** Starts one request whose chain is in this.chain. */
  private start(head: number): void {
    const c = this.chain;
    const n = c.count;
    const last = n - 1;
    if (n === 0 || c.writable[last] === 0 || c.len[last] === 0) {
      this.logError(`${this.name}: request ${head} has no device-writable status byte; returned unprocessed`);
      this.queue.pushUsed(head, 0);
      this.hasNewUsed = true;
      return;
    }
    const statusGpa = c.addr[last] + c.len[last] - 1;
    // Device-readable descriptors come first (the queue enforces the order): they carry the header.
    let readable = 0;
    while (readable < n && c.writable[readable] === 0) readable++;
    if (!this.readHeader(readable)) {
      this.logError(`${this.name}: request ${head} has less than ${REQUEST_HEADER_SIZE} device-readable header bytes`);
      return this.finishNow(head, statusGpa, Status.IOERR, 1);
    }
    const type = this.headerView.getUint32(0, true);
    const sector = this.headerView.getUint32(8, true) + this.headerView.getUint32(12, true) * TWO_32;
    switch (type) {
      case RequestType.IN:
        // Data of a read is device-writable only; readable bytes past the header mean a malformed request.
        if (this.sumLen(0, readable) !== REQUEST_HEADER_SIZE) return this.malformed(head, statusGpa, 'read request with device-readable data buffers');
        return this.startData(head, statusGpa, sector, readable, last, true);
      case RequestType.OUT:
        // Only the status descriptor may be device-writable (it may be longer than the status byte).
        if (n - readable !== 1) return this.malformed(head, statusGpa, 'write request with device-writable data buffers');
        if (this.backend.readOnly) return this.finishNow(head, statusGpa, Status.IOERR, 1);
        return this.startData(head, statusGpa, sector, 0, readable, false);
      case RequestType.FLUSH:
        return this.startFlush(head, statusGpa);
      case RequestType.GET_ID:
        return this.getId(head, statusGpa, readable, last);
      case RequestType.DISCARD:
      case RequestType.WRITE_ZEROES:
        return this.startRange(head, statusGpa, readable, type === RequestType.DISCARD);
      default:
        return this.finishNow(head, statusGpa, Status.UNSUPP, 1);
    }
  }

  /** Total length of chain descriptors [from, to). */
  private sumLen(from: number, to: number): number {
    let total = 0;
    for (let i = from; i < to; i++) total += this.chain.len[i];
    return total;
  }

  private malformed(head: number, statusGpa: number, why: string): void {
    this.logError(`${this.name}: request ${head}: ${why}`);
    this.finishNow(head, statusGpa, Status.IOERR, 1);
  }

  /** Gathers the 16 header bytes from the first readable descriptors; false if there are fewer. */
  private readHeader(readable: number): boolean {
    const c = this.chain;
    // Fast path (every Linux request): the header is the start of the first descriptor, in one region.
    if (readable > 0 && c.len[0] >= REQUEST_HEADER_SIZE) {
      const i = this.mem.findRegion(c.addr[0], REQUEST_HEADER_SIZE);
      if (i >= 0) {
        const r = this.mem.regions[i];
        const off = c.addr[0] - r.guestAddr;
        for (let k = 0; k < REQUEST_HEADER_SIZE; k++) this.header[k] = r.bytes[off + k];
        return true;
      }
    }
    return this.gatherReadable(readable, 0, this.header);
  }

  /** Copies bytes [skip, skip + out.length) of the device-readable part into `out`; false if it is shorter. */
  private gatherReadable(readable: number, skip: number, out: Uint8Array): boolean {
    const c = this.chain;
    let have = 0;
    for (let i = 0; i < readable && have < out.length; i++) {
      let addr = c.addr[i];
      let len = c.len[i];
      if (skip > 0) {
        const s = Math.min(skip, len);
        addr += s;
        len -= s;
        skip -= s;
      }
      const take = Math.min(len, out.length - have);
      if (take > 0 && !this.mem.read(addr, out.subarray(have, have + take))) return false;
      have += take;
    }
    return have === out.length;
  }

  /**
   * DISCARD / WRITE_ZEROES with one range (max_*_seg is 1, as QEMU's own export announces).
   * Status per virtio 1.2, 5.2.6.2: unknown flags, or UNMAP on a discard, are UNSUPP; a range outside the
   * disk or too long is IOERR.
   */
  private startRange(head: number, statusGpa: number, readable: number, isDiscard: boolean): void {
    if (!(isDiscard ? this.settings.discard : this.settings.writeZeroes)) return this.finishNow(head, statusGpa, Status.UNSUPP, 1);
    const what = isDiscard ? 'discard' : 'write-zeroes';
    const payload = this.sumLen(0, readable) - REQUEST_HEADER_SIZE;
    if (payload !== RANGE_SIZE) {
      return this.malformed(head, statusGpa, `${what} with ${payload} bytes of ranges (exactly one ${RANGE_SIZE}-byte range is accepted)`);
    }
    if (!this.gatherReadable(readable, REQUEST_HEADER_SIZE, this.range)) return this.malformed(head, statusGpa, `${what} range is unreadable`);
    const sector = this.rangeView.getUint32(0, true) + this.rangeView.getUint32(4, true) * TWO_32;
    const sectors = this.rangeView.getUint32(8, true);
    const flags = this.rangeView.getUint32(12, true);
    if ((flags & ~RANGE_FLAG_UNMAP) !== 0 || (isDiscard && flags !== 0)) {
      this.logError(`${this.name}: request ${head}: ${what} with flags 0x${flags.toString(16)} is not supported`);
      return this.finishNow(head, statusGpa, Status.UNSUPP, 1);
    }
    if (sectors > this.settings.maxRangeSectors || sector + sectors > this.capacitySectors) {
      return this.malformed(head, statusGpa, `${what} of ${sectors} sectors at sector ${sector} is past the end of the disk or longer than ${this.settings.maxRangeSectors} sectors`);
    }
    if (this.backend.readOnly) return this.finishNow(head, statusGpa, Status.IOERR, 1);
    if (sectors === 0) return this.finishNow(head, statusGpa, Status.OK, 1);
    const slot = this.freeSlots[--this.freeCount];
    this.slotHead[slot] = head;
    this.slotStatusGpa[slot] = statusGpa;
    this.slotUsedLen[slot] = 1;
    this.slotOffset[slot] = sector * SECTOR_SIZE;
    this.slotRemaining[slot] = sectors * SECTOR_SIZE;
    this.slotState[slot] = isDiscard ? SlotState.Discarding : SlotState.Zeroing;
    this.inFlight++;
    if (isDiscard) this.backend.discard(this.tagBase + slot, this.slotOffset[slot], this.slotRemaining[slot]);
    else this.backend.writeZeroes(this.tagBase + slot, this.slotOffset[slot], this.slotRemaining[slot], (flags & RANGE_FLAG_UNMAP) !== 0);
  }

  /**
   * Builds iovecs for descriptors [from, to) (skipping the header bytes of an OUT), checks bounds and
   * submits. For IN, `to` is the status descriptor, whose last byte is excluded.
   */
  private startData(head: number, statusGpa: number, sector: number, from: number, to: number, isRead: boolean): void {
    const slot = this.freeSlots[--this.freeCount];
    const c = this.chain;
    const iovFirst = slot * this.iovPerSlot;
    let iov = iovFirst;
    const iovLimit = iovFirst + this.settings.segMax;
    let skip = isRead ? 0 : REQUEST_HEADER_SIZE;
    let total = 0;
    const end = isRead ? to + 1 : to;
    for (let i = from; i < end; i++) {
      let gpa = c.addr[i];
      let len = c.len[i];
      if (isRead && i === to) len -= 1; // the status byte
      if (skip > 0) {
        const s = Math.min(skip, len);
        gpa += s;
        len -= s;
        skip -= s;
      }
      while (len > 0) {
        if (iov === iovLimit) {
          this.freeSlots[this.freeCount++] = slot;
          this.logError(`${this.name}: request ${head} has more than seg_max=${this.settings.segMax} data segments`);
          return this.finishNow(head, statusGpa, Status.IOERR, 1);
        }
        // A buffer across adjacent regions (checked by the queue) becomes one iovec per region.
        const r = this.mem.regions[this.mem.findRegion(gpa, 1)];
        const take = Math.min(len, r.guestAddr + r.size - gpa);
        const host = r.hostAddr + (gpa - r.guestAddr);
        const w = iov * 4;
        this.iov32[w] = host % TWO_32;
        this.iov32[w + 1] = Math.floor(host / TWO_32);
        this.iov32[w + 2] = take;
        this.iov32[w + 3] = 0;
        this.iovGpa[iov] = gpa;
        this.iovLen[iov] = take;
        iov++;
        total += take;
        gpa += take;
        len -= take;
      }
    }
    if (total % SECTOR_SIZE !== 0 || sector + total / SECTOR_SIZE > this.capacitySectors) {
      this.freeSlots[this.freeCount++] = slot;
      this.logError(`${this.name}: request ${head} ${isRead ? 'read' : 'write'} of ${total} bytes at sector ${sector} is ${total % SECTOR_SIZE ? 'not a multiple of 512 bytes' : `past the end of the disk (${this.capacitySectors} sectors)`}`);
      return this.finishNow(head, statusGpa, Status.IOERR, 1);
    }
    if (total === 0) {
      this.freeSlots[this.freeCount++] = slot;
      return this.finishNow(head, statusGpa, Status.OK, 1);
    }
    this.slotHead[slot] = head;
    this.slotStatusGpa[slot] = statusGpa;
    this.slotUsedLen[slot] = isRead ? total + 1 : 1;
    this.slotOffset[slot] = sector * SECTOR_SIZE;
    this.slotRemaining[slot] = total;
    this.slotIovFirst[slot] = iovFirst - slot * this.iovPerSlot;
    this.slotIovEnd[slot] = iov - slot * this.iovPerSlot;
    this.slotState[slot] = isRead ? SlotState.Reading : SlotState.Writing;
    this.inFlight++;
    this.submitData(slot);
  }

  private submitData(slot: number): void {
    const base = slot * this.iovPerSlot;
    const first = this.slotIovFirst[slot];
    const addr = this.iovAddr + (base + first) * 16;
    const cnt = this.slotIovEnd[slot] - first;
    if (this.slotState[slot] === SlotState.Reading) this.backend.readv(this.tagBase + slot, this.slotOffset[slot], addr, cnt, this.slotRemaining[slot]);
    else this.backend.writev(this.tagBase + slot, this.slotOffset[slot], addr, cnt, this.slotRemaining[slot]);
  }

  private startFlush(head: number, statusGpa: number): void {
    const slot = this.freeSlots[--this.freeCount];
    this.slotHead[slot] = head;
    this.slotStatusGpa[slot] = statusGpa;
    this.slotUsedLen[slot] = 1;
    this.slotOffset[slot] = 0;
    this.slotState[slot] = SlotState.Flushing;
    this.inFlight++;
    this.backend.flush(this.tagBase + slot);
  }

  /** GET_ID: copies the serial into the device-writable data bytes before the status byte. */
  private getId(head: number, statusGpa: number, from: number, statusDesc: number): void {
    const c = this.chain;
    let written = 0;
    for (let i = from; i <= statusDesc && written < ID_BYTES; i++) {
      let len = c.len[i];
      if (i === statusDesc) len -= 1;
      const take = Math.min(len, ID_BYTES - written);
      if (take <= 0) continue;
      const chunk = new Uint8Array(take);
      chunk.set(this.settings.serial.subarray(written, Math.min(this.settings.serial.length, written + take)));
      this.mem.write(c.addr[i], chunk);
      written += take;
    }
    this.finishNow(head, statusGpa, Status.OK, written + 1);
  }

  /** Completes a request that needed no backend I/O. */
  private finishNow(head: number, statusGpa: number, status: number, usedLen: number): void {
    this.mem.writeU8(statusGpa, status);
    this.queue.pushUsed(head, usedLen);
    this.hasNewUsed = true;
  }

  /** Handles a backend completion for `slot`: `res` is bytes done or -errno. */
  complete(slot: number, res: number): void {
    // `res` may be rewritten below (an ignored discard counts as done).
    const state = this.slotState[slot];
    if (state === SlotState.Free) {
      this.logError(`${this.name}: completion for idle slot ${slot} ignored`);
      return;
    }
    let status: number = Status.OK;
    if (res === -EOPNOTSUPP && state === SlotState.Zeroing) {
      // The filesystem refuses zero-range (tmpfs does): a punched hole reads back as zeros too.
      if (!this.loggedZeroRangeFallback) this.log('info', `${this.name}: the image's filesystem refuses zero-range; write-zeroes punch holes instead`);
      this.loggedZeroRangeFallback = true;
      this.slotState[slot] = SlotState.ZeroingByPunch;
      this.backend.writeZeroes(this.tagBase + slot, this.slotOffset[slot], this.slotRemaining[slot], true);
      return;
    }
    if (res === -EOPNOTSUPP && state === SlotState.Discarding) {
      // Discard is a hint: a filesystem that cannot deallocate leaves the data, which the spec allows.
      if (!this.loggedDiscardIgnored) this.log('info', `${this.name}: the image's filesystem cannot punch holes; discards are acknowledged and ignored`);
      this.loggedDiscardIgnored = true;
      res = 0;
    }
    if (res < 0) {
      const where = state === SlotState.Flushing ? '' : ` at byte ${this.slotOffset[slot]}`;
      this.logError(`${this.name}: ${STATE_NAMES[state]}${where} failed: errno ${-res}`);
      status = Status.IOERR;
    } else if ((state === SlotState.Zeroing || state === SlotState.ZeroingByPunch || state === SlotState.Discarding) && !this.settings.writeback) {
      // Writethrough covers every command that changes the disk.
      this.slotState[slot] = SlotState.SyncAfterWrite;
      this.backend.flush(this.tagBase + slot);
      return;
    } else if (state === SlotState.Reading || state === SlotState.Writing) {
      if (res < this.slotRemaining[slot]) {
        if (res > 0) return this.resubmitShort(slot, res);
        this.logError(`${this.name}: ${state === SlotState.Reading ? 'read' : 'write'} at byte ${this.slotOffset[slot]} made no progress`);
        status = Status.IOERR;
      } else if (state === SlotState.Writing && !this.settings.writeback) {
        // Writethrough: acknowledge only once the data is durable.
        this.slotState[slot] = SlotState.SyncAfterWrite;
        this.backend.flush(this.tagBase + slot);
        return;
      }
    }
    // Migration: the data a read put in guest memory (failed reads too: part of it may have landed).
    if (state === SlotState.Reading && this.mem.dirtyLog !== null) this.markReadData(slot);
    this.mem.writeU8(this.slotStatusGpa[slot], status);
    this.queue.pushUsed(this.slotHead[slot], status === Status.OK ? this.slotUsedLen[slot] : 1);
    this.hasNewUsed = true;
    this.slotState[slot] = SlotState.Free;
    this.freeSlots[this.freeCount++] = slot;
    this.inFlight--;
  }

  /** Marks every data buffer of the read in `slot` dirty (its iovecs as first built: a short read's resubmission trims them). */
  private markReadData(slot: number): void {
    if (this.settings.logReadData === false) return;
    const first = slot * this.iovPerSlot;
    const end = first + this.slotIovEnd[slot];
    for (let i = first; i < end; i++) this.mem.markDirty(this.iovGpa[i], this.iovLen[i]);
  }

  /** For diagnostics: the requests in flight, one phrase each (slot, head, operation, tag). */
  describeInFlight(): string {
    const parts: string[] = [];
    for (let slot = 0; slot < this.slotState.length; slot++) {
      const state = this.slotState[slot];
      if (state === SlotState.Free) continue;
      const where = state === SlotState.Flushing ? '' : ` at byte ${this.slotOffset[slot]}, ${this.slotRemaining[slot]} bytes left`;
      parts.push(`slot ${slot} (head ${this.slotHead[slot]}, ${STATE_NAMES[state]}${where}, tag ${this.tagBase + slot})`);
    }
    return parts.length === 0 ? 'none' : parts.join('; ');
  }

  /** A short read or write: advance the iovecs past what was done and submit the rest. */
  private resubmitShort(slot: number, done: number): void {
    this.slotOffset[slot] += done;
    this.slotRemaining[slot] -= done;
    const base = slot * this.iovPerSlot;
    let i = this.slotIovFirst[slot];
    let left = done;
    while (left > 0) {
      const w = (base + i) * 4;
      const len = this.iov32[w + 2];
      if (left >= len) {
        left -= len;
        i++;
        continue;
      }
      const addr = this.iov32[w] + this.iov32[w + 1] * TWO_32 + left;
      this.iov32[w] = addr % TWO_32;
      this.iov32[w + 1] = Math.floor(addr / TWO_32);
      this.iov32[w + 2] = len - left;
      left = 0;
    }
    this.slotIovFirst[slot] = i;
    this.submitData(slot);
  }

  private logError(msg: string): void {
    if (this.errorsLogged < 100) this.log('warn', msg);
    else if (this.errorsLogged === 100) this.log('warn', `${this.name}: more errors follow; no longer logged`);
    this.errorsLogged++;
  }
}
