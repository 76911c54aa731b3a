/**
 * The management socket: a Unix stream socket where each line is one JSON request and each answer one
 * JSON line. Requests: {"op":"info"} and {"op":"resize","size":BYTES}. Answers: {"ok":true,...} or
 * {"ok":false,"error":"..."}. It runs on the control thread through node:net (it carries no fds, unlike
 * the vhost-user socket). The start of the management API (several exports per daemon come later).
 */
import { chmodSync, unlinkSync } from 'node:fs';
import { createConnection, createServer, type Server as NetServer, type Socket } from 'node:net';
import { claimSocketPath } from '../os/unix-socket.js';
import type { Logger } from '../logger.js';

/** Longest request line accepted; a longer one is answered with an error and the connection closed. */
export const MAX_REQUEST_BYTES = 4096;

/** A control answer. */
export type ControlReply = ({ ok: true } & Record<string, unknown>) | { ok: false; error: string };

/** What the control socket can do; an operation throws to answer with its message as the error. */
export interface ControlHandler {
  /** The `info` answer. */
  info(): Record<string, unknown>;
  /** Grows the disk to `sizeBytes`; the result goes into the answer. */
  resize(sizeBytes: number): Promise<object>;
}

/** Answers one parsed request line; never throws. */
export async function handleControlLine(line: string, handler: ControlHandler): Promise<ControlReply> {
  let req: unknown;
  try {
    req = JSON.parse(line);
  } catch {
    return { ok: false, error: 'a request is one JSON object per line, such as {"op":"info"}' };
  }
  if (typeof req !== 'object' || req === null || Array.isArray(req)) return { ok: false, error: 'a request must be a JSON object' };
  const { op, size } = req as { op?: unknown; size?: unknown };
  try {
    switch (op) {
      case 'info':
        return { ok: true, ...handler.info() };
      case 'resize':
        if (typeof size !== 'number' || !Number.isSafeInteger(size) || size <= 0) {
          return { ok: false, error: `resize needs "size": a positive whole number of bytes, got ${JSON.stringify(size ?? null)}` };
        }
        return { ok: true, ...(await handler.resize(size)) };
      default:
        return { ok: false, error: `unknown op ${JSON.stringify(op ?? null)} (known: info, resize)` };
    }
  } catch (err) {
    return { ok: false, error: (err as Error).message };
  }
}

/** A listening control socket. */
export class ControlServer {
  private readonly sockets = new Set<Socket>();
  /** What answers requests; until it is set (the daemon still starting) requests are refused. */
  handler: ControlHandler | null = null;

  private constructor(private readonly server: NetServer, readonly path: string) {}

  /**
   * Listens at `path` with file mode `mode`. Refuses a path that is in use or is not a socket, as the
   * vhost-user socket does; a stale socket node is replaced.
   */
  static async listen(path: string, log: Logger, mode = 0o600): Promise<ControlServer> {
    claimSocketPath(path);
    const server = createServer((socket) => control.serve(socket, log));
    const control = new ControlServer(server, path);
    // The node is created with the umask applied: nobody else gets a window to connect before chmod.
    const oldMask = process.umask(0o777 & ~mode);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(path, () => { server.off('error', reject); resolve(); });
      });
    } finally {
      process.umask(oldMask);
    }
    chmodSync(path, mode);
    server.on('error', (err) => log.error(`control socket ${path}: ${err.message}`));
    return control;
  }

  private serve(socket: Socket, log: Logger): void {
    this.sockets.add(socket);
    socket.on('close', () => this.sockets.delete(socket));
    socket.on('error', (err) => log.debug(`control connection: ${err.message}`));
    socket.setEncoding('utf8');
    let pending = '';
    let refused = false;
    // Requests of one connection are answered in order.
    let answering: Promise<void> = Promise.resolve();
    const answer = (line: string) => {
      answering = answering.then(async () => {
        const reply: ControlReply = this.handler ? await handleControlLine(line, this.handler) : { ok: false, error: 'the daemon is still starting' };
        if (!socket.destroyed) socket.write(JSON.stringify(reply) + '\n');
      });
    };
    socket.on('data', (chunk: string) => {
      if (refused) return;
      pending += chunk;
      for (let nl = pending.indexOf('\n'); nl >= 0; nl = pending.indexOf('\n')) {
        const line = pending.slice(0, nl).trim();
        pending = pending.slice(nl + 1);
        if (line) answer(line);
      }
      if (Buffer.byteLength(pending) > MAX_REQUEST_BYTES) {
        pending = '';
        refused = true;
        answering = answering.then(() => {
          socket.end(JSON.stringify({ ok: false, error: `request line longer than ${MAX_REQUEST_BYTES} bytes` } satisfies ControlReply) + '\n');
        });
      }
    });
  }

  /** Stops listening, drops open connections and removes the socket node. */
  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    try { unlinkSync(this.path); } catch { /* already gone */ }
  }
}

/** Sends one request to the control socket at `path` and resolves with the answer (for the CLI and tests). */
export function controlRequest(path: string, request: object, timeoutMs = 60_000): Promise<ControlReply> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(path);
    let buffered = '';
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no answer from the control socket ${path} within ${timeoutMs} ms`));
    }, timeoutMs);
    const fail = (err: Error) => {
      clearTimeout(timer);
      socket.destroy();
      reject(err);
    };
    socket.setEncoding('utf8');
    socket.on('connect', () => socket.write(JSON.stringify(request) + '\n'));
    socket.on('error', fail);
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      const nl = buffered.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      socket.end();
      try {
        resolve(JSON.parse(buffered.slice(0, nl)) as ControlReply);
      } catch {
        reject(new Error(`the control socket ${path} answered something that is not JSON: ${buffered.slice(0, nl)}`));
      }
    });
    socket.on('end', () => fail(new Error(`the control socket ${path} closed the connection without answering`)));
  });
}
