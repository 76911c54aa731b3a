/**
 * The control thread's handles on queue worker threads: post a message, signal the worker's control
 * eventfd, await the reply. The control thread never waits on I/O; it only awaits these replies.
 */
import { Worker } from 'node:worker_threads';
import { closeQuietly, eventfd, eventfdSignal } from '../os/libc.js';
import type { Logger } from '../logger.js';
import type { FromWorker, ToWorker, WorkerInit } from './worker-protocol.js';

type Pending = { resolve: (v: FromWorker & { op: 'reply' }) => void; reject: (e: Error) => void };
/** Distributes a message without its id, to be filled in by request(). */
type Request = ToWorker extends infer T ? T extends { id: number } ? Omit<T, 'id'> : never : never;

/** One queue worker thread. */
export class QueueWorker {
  private readonly worker: Worker;
  private readonly controlFd: number;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private exited = false;

  constructor(init: Omit<WorkerInit, 'controlFd'>, private readonly logger: Logger) {
    this.controlFd = eventfd(0);
    this.worker = new Worker(new URL('./queue-worker.js', import.meta.url), { workerData: { ...init, controlFd: this.controlFd } satisfies WorkerInit });
    this.worker.on('message', (msg: FromWorker) => this.onMessage(msg));
    this.worker.on('error', (err) => logger.error(`worker ${init.index} failed: ${err.stack ?? err}`));
    this.worker.on('exit', (code) => {
      this.exited = true;
      closeQuietly(this.controlFd);
      for (const p of this.pending.values()) p.reject(new Error(`worker ${init.index} exited (code ${code})`));
      this.pending.clear();
    });
  }

  private onMessage(msg: FromWorker): void {
    if (msg.op === 'log') {
      this.logger.log(msg.level, msg.msg);
      return;
    }
    const p = this.pending.get(msg.id);
    if (!p) return;
    this.pending.delete(msg.id);
    p.resolve(msg);
  }

  /** Sends one request and resolves with the worker's reply; rejects with the worker's error text. */
  async request(msg: Request): Promise<{ lastAvailIdx?: number }> {
    if (this.exited) throw new Error('worker has exited');
    const id = this.nextId++;
    const reply = await new Promise<FromWorker & { op: 'reply' }>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...msg, id } as ToWorker);
      eventfdSignal(this.controlFd);
    });
    if (reply.error) throw new Error(reply.error);
    return reply;
  }

  /** Asks the worker to finish in-flight requests and exit. */
  async stop(): Promise<void> {
    if (this.exited) return;
    const exited = new Promise<void>((resolve) => this.worker.once('exit', () => resolve()));
    await this.request({ op: 'exit' }).catch(() => undefined);
    await exited;
  }
}
