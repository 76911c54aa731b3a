/**
 * A vhost-user-blk front-end (the driver side, as QEMU's vhost-user-blk-pci): for tests and tools that
 * drive a vhost-user-blk back-end without a VM.
 */
export {
  VhostUserBlkClient, BlkRequestError, decodeBlkConfig, statusName, STATUS_NOT_WRITTEN, BLK_CONFIG_READ_SIZE,
  DRIVER_FEATURES, DRIVER_PROTOCOL_FEATURES, WRITE_ZEROES_FLAG_UNMAP, BLK_RANGE_SIZE, encodeBlkRanges,
  type ClientOptions, type RingAreas, type BlkRange, type GuestRegion, type GuestBuffer, type BlkDeviceConfig, type BlkRequest, type BlkCompletion, type RawDescriptor, type RawCompletion, type DmaBuffer,
} from './client.js';
export { VhostUserConnection, VhostUserError, type RawReply, type RequestOptions } from './connection.js';
export { DriverQueue, needEvent, ringSizes, type DriverRing, type RingLayout } from './driver-queue.js';
export { PackedDriverQueue, packedRingSizes } from './packed-driver-queue.js';
export { SharedMemory, ExtentAllocator, PAGE_SIZE } from './memory.js';
export {
  DirtyLogArea, dirtyLogBytes, logPage, isPageDirty, dirtyPagesOf, changedPages, logBaseReplyAccepted, sendLogBase,
  LOG_PAGE_SIZE, LOG_CHUNK_BYTES, type GuestRange, type MemorySnapshot,
} from './dirty-log.js';
