/**
 * A tiny guest-side split-virtqueue driver for unit tests: writes descriptors (direct or indirect) and
 * avail entries into a GuestMemory, reads back the used ring. It keeps a free list of descriptor
 * indices so tests can submit chains without hand-picking indices.
 */

import assert from "node:assert/strict";
import { GuestAccess } from "./ring-memory.js";
import type { GuestMemory } from "../../src/memory/guest-memory.js";
import {
  VIRTQ_DESC_F_INDIRECT as INDIRECT,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as WRITE,
  type RingAddresses,
} from "../../src/virtqueue/split.js";

/** One buffer of a chain as the guest describes it. */
export interface GuestBuf {
  addr: number;
  len: number;
  /** Device-writable (default: device-readable). */
  write?: boolean;
}

/** One used-ring element. */
export interface UsedElem {
  id: number;
  len: number;
}

/** Plays the guest driver of one split virtqueue. */
export class GuestDriver extends GuestAccess {
  availIdx: number;
  usedSeen: number;
  /** Free descriptor indices, lowest first. */
  private readonly freeDescs: number[] = [];
  /** Descriptor indices held by each published head, freed when the head comes back used. */
  private readonly chainDescs = new Map<number, number[]>();

  constructor(
    mem: GuestMemory,
    readonly size: number,
    readonly addrs: RingAddresses,
    startIdx = 0,
  ) {
    super(mem);
    this.availIdx = startIdx;
    this.usedSeen = startIdx;
    for (let i = 0; i < size; i++) this.freeDescs.push(i);
    this.w16(addrs.availAddr, 0);
    this.w16(addrs.availAddr + 2, startIdx);
    this.w16(addrs.usedAddr, 0);
    this.w16(addrs.usedAddr + 2, startIdx);
  }

  /** Writes entry i of a descriptor table at `table`. */
  setDesc(table: number, i: number, addr: number, len: number, flags: number, next = 0): void {
    this.setDescWords(table, i, addr, len, flags, next);
  }

  /** Writes entry i of the queue's own descriptor table. */
  desc(i: number, addr: number, len: number, flags: number, next = 0): void {
    this.setDesc(this.addrs.descAddr, i, addr, len, flags, next);
  }

  /** Puts `head` in the next avail slot and publishes the new avail idx. */
  publish(head: number): void {
    this.w16(this.addrs.availAddr + 4 + 2 * (this.availIdx % this.size), head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.w16(this.addrs.availAddr + 2, this.availIdx);
  }

  /** Sets avail.idx directly (to simulate a corrupt ring). */
  setAvailIdx(v: number): void {
    this.availIdx = v & 0xffff;
    this.w16(this.addrs.availAddr + 2, this.availIdx);
  }

  /** Number of descriptors not held by a published chain. */
  get freeCount(): number {
    return this.freeDescs.length;
  }

  private takeDescs(n: number): number[] {
    assert.ok(n > 0 && n <= this.freeDescs.length, `test bug: ${n} descriptors wanted, ${this.freeDescs.length} free`);
    return this.freeDescs.splice(0, n);
  }

  /** Writes `bufs` as a chain of direct descriptors, publishes it and returns its head. */
  submit(bufs: GuestBuf[]): number {
    const idx = this.takeDescs(bufs.length);
    bufs.forEach((b, k) => {
      const more = k < bufs.length - 1;
      this.desc(idx[k], b.addr, b.len, (b.write ? WRITE : 0) | (more ? NEXT : 0), more ? idx[k + 1] : 0);
    });
    this.chainDescs.set(idx[0], idx);
    this.publish(idx[0]);
    return idx[0];
  }

  /** Writes `bufs` into an indirect table at `table`, publishes one direct descriptor pointing at it and returns its head. */
  submitIndirect(table: number, bufs: GuestBuf[]): number {
    bufs.forEach((b, k) => {
      const more = k < bufs.length - 1;
      this.setDesc(table, k, b.addr, b.len, (b.write ? WRITE : 0) | (more ? NEXT : 0), more ? k + 1 : 0);
    });
    const [head] = this.takeDescs(1);
    this.desc(head, table, 16 * bufs.length, INDIRECT);
    this.chainDescs.set(head, [head]);
    this.publish(head);
    return head;
  }

  usedIdx(): number {
    return this.r16(this.addrs.usedAddr + 2);
  }

  /** Used elements published since the last call, in ring order; their descriptors become free again. */
  takeUsed(): UsedElem[] {
    const out: UsedElem[] = [];
    const idx = this.usedIdx();
    while (this.usedSeen !== idx) {
      const e = this.addrs.usedAddr + 4 + 8 * (this.usedSeen % this.size);
      const el = { id: this.r32(e), len: this.r32(e + 4) };
      out.push(el);
      const descs = this.chainDescs.get(el.id);
      if (descs !== undefined) {
        this.chainDescs.delete(el.id);
        this.freeDescs.push(...descs);
        this.freeDescs.sort((a, b) => a - b);
      }
      this.usedSeen = (this.usedSeen + 1) & 0xffff;
    }
    return out;
  }
}
