// A small QMP client for the e2e tests: JSON objects, one a line, over QEMU's unix socket
// (`-qmp unix:PATH,server=on,wait=off`). connect() reads the greeting and sends qmp_capabilities;
// execute() sends one command with an id and resolves with its "return" (or rejects with its "error");
// asynchronous events are kept in `events` and otherwise skipped.

import * as fs from 'node:fs';
import * as net from 'node:net';

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export class QmpError extends Error {
  constructor(readonly command: string, readonly errorClass: string, readonly desc: string) {
    super(`QMP ${command} failed: ${errorClass}: ${desc}`);
  }
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export class QmpClient {
  /** Every event received so far ({event, data, timestamp}). */
  readonly events: Array<{ event: string; data?: unknown }> = [];
  private buf = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private greeting: ((v: unknown) => void) | undefined;
  private closedError: Error | undefined;

  private constructor(private readonly sock: net.Socket, readonly path: string) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => this.onData(d));
    const closed = (why: string) => {
      this.closedError ??= new Error(`QMP connection ${path} ${why}`);
      for (const [id, p] of this.pending) {
        clearTimeout(p.timer);
        this.pending.delete(id);
        p.reject(new Error(`${this.closedError.message} while waiting for the answer to ${p.command}`));
      }
    };
    sock.on('error', (e) => closed(`failed: ${e.message}`));
    sock.on('close', () => closed('closed'));
  }

  /**
   * Connects to the QMP socket at `path` (retrying until QEMU has created it, up to `timeoutMs`),
   * checks the greeting and leaves capabilities negotiation mode.
   */
  static async connect(path: string, timeoutMs = 20_000): Promise<QmpClient> {
    const t0 = Date.now();
    let lastError = 'the socket does not exist';
    for (;;) {
      if (fs.existsSync(path)) {
        try {
          const sock = await new Promise<net.Socket>((resolve, reject) => {
            const s = net.createConnection(path);
            s.once('connect', () => {
              s.removeAllListeners('error');
              resolve(s);
            });
            s.once('error', reject);
          });
          const client = new QmpClient(sock, path);
          const greeting = await client.waitGreeting(Math.max(1000, timeoutMs - (Date.now() - t0)));
          if (!greeting || typeof greeting !== 'object' || !('QMP' in greeting)) {
            sock.destroy();
            throw new Error(`unexpected QMP greeting ${JSON.stringify(greeting)}`);
          }
          await client.execute('qmp_capabilities');
          return client;
        } catch (e) {
          lastError = (e as Error).message;
        }
      }
      if (Date.now() - t0 > timeoutMs) throw new Error(`cannot connect to QMP at ${path} within ${timeoutMs} ms: ${lastError}`);
      await sleep(100);
    }
  }

  private waitGreeting(timeoutMs: number): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no QMP greeting on ${this.path} within ${timeoutMs} ms`)), timeoutMs);
      this.greeting = (v) => {
        clearTimeout(timer);
        resolve(v);
      };
    });
  }

  private onData(d: string): void {
    this.buf += d;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (!line) continue;
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue; // not JSON: ignore
      }
      if ('QMP' in msg) {
        const g = this.greeting;
        this.greeting = undefined;
        g?.(msg);
      } else if ('event' in msg) {
        this.events.push({ event: String(msg.event), data: msg.data });
        if (this.events.length > 1000) this.events.splice(0, this.events.length - 1000);
      } else if ('id' in msg) {
        const id = String(msg.id);
        const p = this.pending.get(id);
        if (!p) continue;
        this.pending.delete(id);
        clearTimeout(p.timer);
        if ('error' in msg) {
          const err = msg.error as { class?: string; desc?: string };
          p.reject(new QmpError(p.command, err.class ?? '?', err.desc ?? JSON.stringify(err)));
        } else {
          p.resolve(msg.return);
        }
      }
    }
  }

  /** Runs one QMP command; resolves with its "return" value, rejects with a QmpError on "error". */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = 30_000): Promise<T> {
    if (this.closedError) return Promise.reject(new Error(`${this.closedError.message}: cannot send ${command}`));
    const id = `t${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP ${command}: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.sock.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + '\n');
    });
  }

  /** Whether the connection is gone (QEMU exited or closed it). */
  get closed(): boolean {
    return this.closedError !== undefined;
  }

  close(): void {
    this.sock.destroy();
  }
}
