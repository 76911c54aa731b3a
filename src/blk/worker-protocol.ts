/**
 * Messages between the control thread and queue worker threads. Plain data, structured-cloned.
 */
import type { BackendSpec } from '../backend/types.js';
import type { RegionDescriptor } from '../memory/guest-memory.js';
import type { DirtyLogArea, RingStart } from '../vhost-user/backend.js';

/** A guest memory region as mapped by the control thread (the mapping is process-wide). */
export interface WorkerRegion extends RegionDescriptor {
  /** Address of the mapping in this process. */
  hostAddr: number;
}

/** What a worker is told at creation. */
export interface WorkerInit {
  /** Worker number, for logs. */
  index: number;
  /** eventfd the control thread signals after posting a message. */
  controlFd: number;
  /** The backend each worker instantiates for itself. */
  backend: BackendSpec;
  /** GET_ID serial, NUL padded to 20 bytes. */
  serial: Uint8Array;
  /** seg_max announced in the config space. */
  segMax: number;
  /** Largest queue size the frontend may set. */
  maxQueueSize: number;
  /** Initial write-cache mode. */
  writeback: boolean;
  /** How long to poll the rings for new requests after work, before sleeping (µs; 0 = never). */
  pollUs: number;
}

/** Parameters to start serving one virtqueue: the ring as the protocol set it up, features resolved. */
export interface StartQueue extends Omit<RingStart, 'features'> {
  eventIdx: boolean;
  indirect: boolean;
  discard: boolean;
  writeZeroes: boolean;
}

/** Control thread → worker. `id` pairs the reply. */
export type ToWorker =
  | { op: 'memory'; id: number; regions: WorkerRegion[] }
  | { op: 'start'; id: number; params: StartQueue }
  | { op: 'stop'; id: number; queue: number }
  | { op: 'call-fd'; id: number; queue: number; fd: number }
  | { op: 'writeback'; id: number; enabled: boolean }
  /**
   * Migration: mark every write into guest memory in the dirty log mapped at hostAddr (bytes long), or
   * stop (null). Replied once no later write can use the previous log, which may then be unmapped.
   */
  | { op: 'dirty-log'; id: number; log: DirtyLogArea | null }
  /** VHOST_VRING_F_LOG of a running ring changed: its ring writes are logged at usedLogAddr, or not (null). */
  | { op: 'ring-log'; id: number; queue: number; usedLogAddr: number | null }
  /** The disk grew: later requests are checked against the new size (replied once applied). */
  | { op: 'resize'; id: number; sizeBytes: number }
  | { op: 'exit'; id: number };

/** Worker → control thread. */
export type FromWorker =
  /** lastAvailIdx answers a stop: the vring base GET_VRING_BASE reports (packed rings: both indices and wrap counters). */
  | { op: 'reply'; id: number; error?: string; lastAvailIdx?: number }
  | { op: 'log'; level: 'debug' | 'info' | 'warn' | 'error'; msg: string };
