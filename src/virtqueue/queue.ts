/**
 * What the request processor and the queue worker need from a virtqueue, whatever its layout (split,
 * virtio 1.2 section 2.7, or packed, section 2.8), and the pieces both layouts share: the preallocated
 * descriptor chain popChain fills, the popChain result codes, and the checked placement of ring parts in
 * guest memory.
 */

import type { DirtyLog } from "../memory/dirty-log.js";
import type { GuestMemory } from "../memory/guest-memory.js";

/** Largest queue size either layout allows (virtio 1.2, 2.7 and 2.8). */
export const MAX_QUEUE_SIZE = 32768;
/** Largest indirect table we accept, in descriptors: the spec bounds chains by the maximum queue size. */
export const MAX_INDIRECT_ENTRIES = 32768;

/** Descriptor flag (both layouts): the chain continues (split: at `next`; packed: in the following ring slot). */
export const VIRTQ_DESC_F_NEXT = 1;
/** Descriptor flag (both layouts): the buffer is device-writable (otherwise device-readable). */
export const VIRTQ_DESC_F_WRITE = 2;
/** Descriptor flag (both layouts): the buffer is a table of further descriptors. */
export const VIRTQ_DESC_F_INDIRECT = 4;

/** popChain result: nothing is available. */
export const POP_EMPTY = -1;
/** popChain result: the chain was consumed but is malformed; complete chain.head with used len 0. Reason in lastError. */
export const POP_BAD_CHAIN = -2;
/** popChain result: the ring itself is corrupt; the queue is now broken and serves nothing more. Reason in lastError. */
export const POP_RING_BROKEN = -3;

/** Guest physical addresses of the three ring parts, as SET_VRING_ADDR names them. */
export interface RingAddresses {
  /** Descriptor table (split) or descriptor ring (packed), 16-byte aligned. */
  descAddr: number;
  /** Avail ring (split, 2-byte aligned) or driver event suppression area (packed, 4-byte aligned). */
  availAddr: number;
  /** Used ring (split) or device event suppression area (packed), 4-byte aligned. */
  usedAddr: number;
}

/** Negotiated features that change how a queue is read. */
export interface QueueOptions {
  /** VIRTIO_F_EVENT_IDX: split rings use used_event/avail_event, packed rings may use descriptor event offsets. */
  eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC: the driver may use indirect descriptor tables. */
  indirect: boolean;
}

/** A preallocated, reusable descriptor chain, filled by popChain. */
export class DescriptorChain {
  /** What pushUsed takes back (split: head descriptor index, packed: buffer id), or -1 before the first pop. */
  head = -1;
  /** Number of buffers filled in the arrays below (0 after a failed pop). */
  count = 0;
  /** Most buffers this chain can hold; popChain rejects longer chains rather than allocating. */
  readonly capacity: number;
  /** Guest physical address of each buffer (Float64 so 53-bit addresses stay exact). */
  readonly addr: Float64Array;
  /** Length in bytes of each buffer. */
  readonly len: Uint32Array;
  /** 1 if the buffer is device-writable, 0 if device-readable. */
  readonly writable: Uint8Array;

  /** Allocates room for `capacity` buffers once, so popChain never allocates. */
  constructor(capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1 || capacity > MAX_QUEUE_SIZE) {
      throw new RangeError(`DescriptorChain capacity must be an integer in 1..${MAX_QUEUE_SIZE}, got ${capacity}`);
    }
    this.capacity = capacity;
    this.addr = new Float64Array(capacity);
    this.len = new Uint32Array(capacity);
    this.writable = new Uint8Array(capacity);
  }
}

/** The device side of one virtqueue, as the request processor and the queue worker drive it. */
export interface VirtQueue {
  /** Number of descriptors in the ring. */
  readonly size: number;
  /** Set once the ring is found corrupt (or by the worker after an internal error); popChain then returns POP_RING_BROKEN. */
  broken: boolean;
  /** Reason for the last POP_BAD_CHAIN / POP_RING_BROKEN, for logging. */
  lastError: string;
  /** Next avail position we will read (split: free-running u16 index; packed: ring slot), for logs and tests. */
  readonly lastAvailIdx: number;
  /** The ring state as GET_VRING_BASE reports it and SET_VRING_BASE (the constructor's `base`) takes it back. */
  readonly vringBase: number;
  /** True if the driver has made buffers available that we have not consumed yet (false once broken). */
  hasAvailable(): boolean;
  /** Takes the next available chain into `chain`: >= 0 (the id pushUsed takes back) on success, else a POP_* code. */
  popChain(chain: DescriptorChain): number;
  /** Returns chain `head` (what popChain gave) to the driver with `writtenLen` bytes written. */
  pushUsed(head: number, writtenLen: number): void;
  /** After a batch of pushUsed: true if the driver wants an interrupt now. */
  shouldNotify(): boolean;
  /** Asks the driver to stop kicking while we are busy polling the queue anyway. */
  disableNotifications(): void;
  /** Re-arms driver kicks; returns true if buffers are already available (a kick may have been suppressed). */
  enableNotifications(): boolean;
  /**
   * Marks the ring's own writes (used ring, event fields; packed: used descriptors) in `log` from now on,
   * or stops (null): VHOST_VRING_F_LOG during migration. `usedLogAddr` is the guest address the used ring
   * (split) or device event area (packed) is logged at, SET_VRING_ADDR's log_guest_addr.
   */
  setRingLog(log: DirtyLog | null, usedLogAddr: number): void;
}

/** True when typed arrays use little-endian order, which the ring views rely on. */
export const HOST_IS_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Hex formatting for error messages: guest addresses are easier to match against guest logs in hex. */
export function hex(n: number): string {
  return "0x" + n.toString(16);
}

/** Where a ring part lives: its region and its byte offset in that region's buffer. */
export interface RingPlacement {
  region: number;
  byteOffset: number;
}

/** Checks one ring part (aligned, wholly inside ONE guest memory region) and says where it is, or throws RangeError. */
export function locateRingPart(mem: GuestMemory, what: string, gpa: number, len: number, align: number): RingPlacement {
  if (!Number.isSafeInteger(gpa) || gpa < 0) throw new RangeError(`${what} address ${gpa} is not a valid guest physical address`);
  if (gpa % align !== 0) throw new RangeError(`${what} at guest ${hex(gpa)} is not ${align}-byte aligned`);
  const region = mem.findRegion(gpa, len);
  if (region < 0) {
    throw new RangeError(`${what} [${hex(gpa)}, ${hex(gpa + len)}) is not wholly inside one guest memory region`);
  }
  const r = mem.regions[region];
  const byteOffset = r.bytes.byteOffset + (gpa - r.guestAddr);
  // Typed views need natural alignment in the host buffer too; real mappings are page aligned, so this only trips on odd test setups.
  if (byteOffset % align !== 0) throw new RangeError(`${what} at guest ${hex(gpa)} is mapped at a host offset not ${align}-byte aligned`);
  return { region, byteOffset };
}
