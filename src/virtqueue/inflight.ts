/**
 * Inflight I/O tracking for split virtqueues (vhost-user.rst, "Inflight I/O tracking";
 * VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): a shared region, kept by the frontend across backend restarts,
 * where the backend records which descriptor heads it has taken and not yet returned. A backend that
 * starts after a crash reads it back, finds the requests its predecessor started and never completed, and
 * resubmits them in the order the guest submitted them.
 *
 * Layout (one region per queue, each INFLIGHT_ALIGNMENT aligned, queue q at q * inflightQueueBytes):
 *   u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx |
 *   desc[desc_num] of { u8 inflight; u8 padding[5]; u16 next; u64 counter }
 *
 * Update order, chosen so a kill at any instruction leaves a region recovery can read right:
 *   head taken:      counter, then inflight = 1
 *   head returned:   last_batch_head = head; (the used element and used.idx go out); inflight = 0; used_idx
 * Every used.idx step is a batch of one here, so recovery only ever has last_batch_head to settle.
 *
 * The stores are plain typed-array stores except the region's used_idx, an Atomics.store like used.idx:
 * V8 keeps typed-array stores in program order (they sit on its effect chain), x86 retires stores in
 * order, and a killed process loses no store it executed (the region is a shared mapping). Nothing on
 * the hot path reads the region, so a frontend scribbling on it cannot mislead the data path; recovery
 * reads every field once and checks it.
 *
 * Packed rings have their own layout and algorithm (packed-inflight.ts); the region sizes, the checks on
 * a queue's region and the counter that orders requests are shared from here.
 */

/** QueueRegionSplit/QueueRegionPacked.version of a region in use; 0 means never initialized. */
export const INFLIGHT_VERSION = 1;
/** Each queue's region starts on this boundary (as libvhost-user and DPDK lay it out). */
export const INFLIGHT_ALIGNMENT = 64;
/** Bytes before desc[0]: features, version, desc_num, last_batch_head, used_idx. */
const HEADER_BYTES = 16;
/** sizeof(DescStateSplit). */
const DESC_STATE_BYTES = 16;
/** u16 indices of the header fields (version and desc_num sit there in the packed layout too). */
export const VERSION_U16 = 4;
export const DESC_NUM_U16 = 5;
const LAST_BATCH_HEAD_U16 = 6;
const USED_IDX_U16 = 7;
const TWO_32 = 2 ** 32;

/** sizeof(QueueRegionPacked) before desc[0]: 29 bytes of fields, padded to the u64 alignment of DescStatePacked. */
export const PACKED_HEADER_BYTES = 32;
/** sizeof(DescStatePacked). */
export const PACKED_DESC_STATE_BYTES = 32;

/** Bytes of one queue's region for queues of `queueSize` descriptors, split (QueueRegionSplit) or packed (QueueRegionPacked). */
export function inflightQueueBytes(queueSize: number, packed = false): number {
  const raw = packed ? PACKED_HEADER_BYTES + PACKED_DESC_STATE_BYTES * queueSize : HEADER_BYTES + DESC_STATE_BYTES * queueSize;
  return Math.ceil(raw / INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT;
}

/** Bytes of the whole region for `numQueues` queues of `queueSize` descriptors, split or packed. */
export function inflightRegionBytes(numQueues: number, queueSize: number, packed = false): number {
  return numQueues * inflightQueueBytes(queueSize, packed);
}

/** Typed views over one queue's part of the region, each exactly `bytes` long. */
export interface QueueRegionViews {
  u8: Uint8Array;
  u16: Uint16Array;
  u32: Uint32Array;
}

/**
 * Checks that a ring of `ringSize` fits a region described with `descNum` descriptor states and that
 * `region` holds the `bytes` such a queue region takes (8-byte aligned for the u64 fields), and returns
 * views over it. Throws RangeError when not. Shared by the split and packed trackers.
 */
export function queueRegionViews(region: Uint8Array, ringSize: number, descNum: number, bytes: number): QueueRegionViews {
  if (!Number.isInteger(descNum) || descNum < 1 || descNum > 0xffff) throw new RangeError(`inflight queue size ${descNum} is not in 1..65535`);
  if (!Number.isInteger(ringSize) || ringSize < 1 || ringSize > descNum) {
    throw new RangeError(`ring size ${ringSize} does not fit an inflight region of ${descNum} descriptors`);
  }
  if (region.byteLength < bytes) throw new RangeError(`inflight queue region is ${region.byteLength} bytes, ${descNum} descriptors need ${bytes}`);
  if (region.byteOffset % 8 !== 0) throw new RangeError('inflight queue region is not 8-byte aligned');
  return {
    u8: new Uint8Array(region.buffer, region.byteOffset, bytes),
    u16: new Uint16Array(region.buffer, region.byteOffset, bytes >>> 1),
    u32: new Uint32Array(region.buffer, region.byteOffset, bytes >>> 2),
  };
}

/**
 * Reads the version and desc_num every queue region starts with (the same u16 fields in the split and
 * packed layouts): false for a fresh region (version 0), true for one in use by `descNum` descriptor
 * states; throws RangeError for anything else.
 */
export function regionInUse(u16: Uint16Array, descNum: number): boolean {
  const version = u16[VERSION_U16];
  if (version === 0) return false;
  if (version !== INFLIGHT_VERSION) throw new RangeError(`inflight region version ${version} is not ${INFLIGHT_VERSION}`);
  const num = u16[DESC_NUM_U16];
  if (num !== descNum) throw new RangeError(`inflight region holds ${num} descriptor states, the frontend says ${descNum}`);
  return true;
}

/**
 * The global counter that orders taken heads: a u64 in the region, kept here as two u32 halves so no
 * BigInt is made per request. Shared by the split and packed trackers.
 */
export class InflightCounter {
  /** Low and high halves of the value the next taken head gets. */
  lo = 0;
  hi = 0;

  /** Moves to the next value. */
  bump(): void {
    if (++this.lo === TWO_32) {
      this.lo = 0;
      this.hi = (this.hi + 1) >>> 0;
    }
  }

  /** Starts again from 0 (a fresh region). */
  reset(): void {
    this.lo = this.hi = 0;
  }

  /**
   * Sorts `entries` oldest first by the u64 counter each holds at `u32[counterU32(entry)]` (compared as
   * (hi, lo): exact for any u64 a frontend could leave there; ties by entry index), and continues above
   * the newest so heads taken from now on sort after them. Returns the sorted entries.
   */
  resumeAfter(entries: number[], u32: Uint32Array, counterU32: (entry: number) => number): number[] {
    const lo = entries.map((e) => u32[counterU32(e)]);
    const hi = entries.map((e) => u32[counterU32(e) + 1]);
    const order = entries.map((_, k) => k).sort((a, b) => (hi[a] - hi[b]) || (lo[a] - lo[b]) || (entries[a] - entries[b]));
    if (order.length > 0) {
      const last = order[order.length - 1];
      this.lo = lo[last];
      this.hi = hi[last];
      this.bump();
    }
    return order.map((k) => entries[k]);
  }
}

/** What recovery found in a queue's region. */
export interface InflightRecovery {
  /** False for a fresh region (now initialized): the frontend's SET_VRING_BASE index stands. */
  recovered: boolean;
  /** Next avail index to read: used.idx + requests in flight (meaningful when recovered). */
  lastAvailIdx: number;
  /** Heads taken and not completed by a previous backend, oldest (lowest counter) first. */
  resubmit: number[];
  /** 1 if the last completion reached the used ring but not the region (settled now), else 0. */
  settledCompletions: number;
}

/** One queue's part of the inflight region, over a view of shared memory. */
export class InflightQueue {
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  /** Next counter to give a taken head. */
  private readonly counter = new InflightCounter();

  /**
   * `region` is this queue's INFLIGHT_ALIGNMENT-aligned part of the region (at least
   * inflightQueueBytes(descNum) bytes, 8-byte aligned in memory), `ringSize` the ring's SET_VRING_NUM and
   * `descNum` the queue size the frontend described the region with. Throws RangeError if they do not fit.
   */
  constructor(region: Uint8Array, readonly ringSize: number, readonly descNum: number) {
    ({ u8: this.u8, u16: this.u16, u32: this.u32 } = queueRegionViews(region, ringSize, descNum, inflightQueueBytes(descNum)));
  }

  /**
   * Reads the region back when a ring starts, with `ringUsedIdx` the used.idx now in guest memory:
   * initializes a fresh region, or settles a half-recorded completion and lists the heads to resubmit
   * (vhost-user.rst, "When reconnecting"). Throws RangeError on a region it cannot trust.
   */
  recover(ringUsedIdx: number): InflightRecovery {
    if (!regionInUse(this.u16, this.descNum)) {
      this.initialize(ringUsedIdx);
      return { recovered: false, lastAvailIdx: ringUsedIdx, resubmit: [], settledCompletions: 0 };
    }
    let settled = 0;
    const recorded = this.u16[USED_IDX_U16];
    if (recorded !== ringUsedIdx) {
      // The used ring moved past what the region recorded: the last batch completed, its heads are no longer in flight.
      const batch = (ringUsedIdx - recorded) & 0xffff;
      if (batch > this.ringSize) throw new RangeError(`used.idx ${ringUsedIdx} is ${batch} entries past the inflight region's ${recorded}`);
      let head = this.u16[LAST_BATCH_HEAD_U16];
      for (let k = 0; k < batch; k++) {
        if (head >= this.ringSize) throw new RangeError(`inflight last batch names head ${head}, not below ring size ${this.ringSize}`);
        this.u8[this.inflightByte(head)] = 0;
        head = this.u16[this.nextU16(head)];
      }
      settled = batch;
      Atomics.store(this.u16, USED_IDX_U16, ringUsedIdx);
    }
    const heads: number[] = [];
    for (let i = 0; i < this.ringSize; i++) {
      if (this.u8[this.inflightByte(i)] !== 0) heads.push(i);
    }
    const resubmit = this.counter.resumeAfter(heads, this.u32, (h) => this.counterU32(h));
    return { recovered: true, lastAvailIdx: (ringUsedIdx + heads.length) & 0xffff, resubmit, settledCompletions: settled };
  }

  /** A fresh region: every descriptor idle, used_idx in step with the ring; the version goes in last. */
  private initialize(ringUsedIdx: number): void {
    this.u8.fill(0);
    this.u16[DESC_NUM_U16] = this.descNum;
    this.u16[USED_IDX_U16] = ringUsedIdx;
    Atomics.store(this.u16, VERSION_U16, INFLIGHT_VERSION);
    this.counter.reset();
  }

  /** Records that `head` was taken from the avail ring: its counter, then its inflight flag. */
  started(head: number): void {
    const c = this.counterU32(head);
    this.u32[c] = this.counter.lo;
    this.u32[c + 1] = this.counter.hi;
    this.u8[this.inflightByte(head)] = 1;
    this.counter.bump();
  }

  /** Before `head`'s used element goes out: it is the last batch, should the process die midway. */
  beforeUsed(head: number): void {
    this.u16[LAST_BATCH_HEAD_U16] = head;
  }

  /** After used.idx became `usedIdx` with `head`'s element: `head` is idle, and the region is in step again. */
  afterUsed(head: number, usedIdx: number): void {
    this.u8[this.inflightByte(head)] = 0;
    Atomics.store(this.u16, USED_IDX_U16, usedIdx);
  }

  private inflightByte(head: number): number {
    return HEADER_BYTES + DESC_STATE_BYTES * head;
  }

  private nextU16(head: number): number {
    return (HEADER_BYTES + DESC_STATE_BYTES * head + 6) >>> 1;
  }

  private counterU32(head: number): number {
    return (HEADER_BYTES + DESC_STATE_BYTES * head + 8) >>> 2;
  }
}
