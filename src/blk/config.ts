/**
 * The virtio-blk configuration space (struct virtio_blk_config), encoded little-endian.
 */
import { SECTOR_SIZE } from './constants.js';

/** Size of the config space we expose: through secure-erase fields (virtio 1.2). */
export const CONFIG_SPACE_SIZE = 72;

/** What the config space says about the disk. */
export interface BlkConfig {
  /** Capacity in bytes; announced in 512-byte sectors. */
  capacityBytes: number;
  /** Largest single segment, bytes. */
  sizeMax: number;
  /** Largest number of data segments per request. */
  segMax: number;
  /** Logical block size, bytes. */
  blkSize: number;
  /** log2(physical block / logical block). */
  physicalBlockExp: number;
  /** Minimum I/O size in logical blocks. */
  minIoSize: number;
  /** Optimal I/O size in logical blocks. */
  optIoSize: number;
  /** 1 = writeback cache, 0 = writethrough. */
  writeback: number;
  /** Number of request queues. */
  numQueues: number;
  /** Largest discard, in 512-byte sectors (0 when DISCARD is not offered). */
  maxDiscardSectors: number;
  /** Ranges per discard request. */
  maxDiscardSeg: number;
  /** Discard alignment, in 512-byte sectors. */
  discardSectorAlignment: number;
  /** Largest write-zeroes, in 512-byte sectors (0 when WRITE_ZEROES is not offered). */
  maxWriteZeroesSectors: number;
  /** Ranges per write-zeroes request. */
  maxWriteZeroesSeg: number;
  /** 1 if write-zeroes may deallocate when the guest sets UNMAP. */
  writeZeroesMayUnmap: number;
}

/** Byte offset of the `writeback` field: the only one a driver may write. */
export const WRITEBACK_OFFSET = 32;

/** Encodes the config space. */
export function encodeConfig(c: BlkConfig): Uint8Array {
  const buf = new Uint8Array(CONFIG_SPACE_SIZE);
  const dv = new DataView(buf.buffer);
  dv.setBigUint64(0, BigInt(Math.floor(c.capacityBytes / SECTOR_SIZE)), true);
  dv.setUint32(8, c.sizeMax, true);
  dv.setUint32(12, c.segMax, true);
  // geometry (16..19) stays zero: we do not offer VIRTIO_BLK_F_GEOMETRY.
  dv.setUint32(20, c.blkSize, true);
  dv.setUint8(24, c.physicalBlockExp);
  dv.setUint8(25, 0); // alignment_offset
  dv.setUint16(26, c.minIoSize, true);
  dv.setUint32(28, c.optIoSize, true);
  dv.setUint8(WRITEBACK_OFFSET, c.writeback);
  dv.setUint16(34, c.numQueues, true);
  dv.setUint32(36, c.maxDiscardSectors, true);
  dv.setUint32(40, c.maxDiscardSeg, true);
  dv.setUint32(44, c.discardSectorAlignment, true);
  dv.setUint32(48, c.maxWriteZeroesSectors, true);
  dv.setUint32(52, c.maxWriteZeroesSeg, true);
  dv.setUint8(56, c.writeZeroesMayUnmap);
  // Secure-erase limits (60..71) stay zero: SECURE_ERASE is not offered.
  return buf;
}

/** The bytes of [offset, offset+size) of the config space, zero past its end. */
export function readConfig(c: BlkConfig, offset: number, size: number): Uint8Array {
  const all = encodeConfig(c);
  const out = new Uint8Array(size);
  if (offset < all.length) out.set(all.subarray(offset, Math.min(all.length, offset + size)));
  return out;
}
