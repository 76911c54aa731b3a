/**
 * virtio-blk numbers from the virtio 1.2 specification, section 5.2 "Block Device".
 */

/** Feature bits (bit numbers) of the block device and of virtio itself. */
export const Feature = {
  BLK_SIZE_MAX: 1,
  BLK_SEG_MAX: 2,
  BLK_GEOMETRY: 4,
  BLK_RO: 5,
  BLK_BLK_SIZE: 6,
  BLK_FLUSH: 9,
  BLK_TOPOLOGY: 10,
  BLK_CONFIG_WCE: 11,
  BLK_MQ: 12,
  BLK_DISCARD: 13,
  BLK_WRITE_ZEROES: 14,
  RING_INDIRECT_DESC: 28,
  RING_EVENT_IDX: 29,
  VERSION_1: 32,
  RING_PACKED: 34,
} as const;

/** Bit mask for a feature bit number. */
export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

/** Request types (virtio_blk_req.type). */
export const RequestType = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  GET_LIFETIME: 10,
  DISCARD: 11,
  WRITE_ZEROES: 13,
  SECURE_ERASE: 14,
} as const;

/** Request status byte values. */
export const Status = {
  OK: 0,
  IOERR: 1,
  UNSUPP: 2,
} as const;

/** virtio-blk sectors are always 512 bytes, whatever the logical block size. */
export const SECTOR_SIZE = 512;
/** Size of struct virtio_blk_outhdr: type, ioprio, sector. */
export const REQUEST_HEADER_SIZE = 16;
/** GET_ID answers with at most this many bytes (VIRTIO_BLK_ID_BYTES). */
export const ID_BYTES = 20;
