/**
 * vhost-blk as a library: the vhost-user-blk frontend (drive any vhost-user-blk backend from a
 * program), and the pieces the daemon is built from, for embedding or extending it.
 */
export * from './frontend/index.js';
export { BlkDevice, type BlkDeviceOptions } from './blk/device.js';
export { Server } from './daemon/server.js';
export { Logger, type LogLevel } from './logger.js';
export { UnixListener, UnixConnection } from './os/unix-socket.js';
export type { BlockBackend, BackendSpec, IoContext } from './backend/types.js';
export * as messages from './vhost-user/messages.js';
