/**
 * The daemon: listens on the vhost-user socket, serves one frontend at a time, and listens again when
 * it leaves (a VM restart or QEMU's reconnect= must work).
 */
import type { UnixListener } from '../os/unix-socket.js';
import { VhostUserSession, type VhostUserDevice } from '../vhost-user/backend.js';
import type { Logger } from '../logger.js';

/** How long a new frontend waits for the previous one's session to be torn down before it is turned away. */
const TEARDOWN_WAIT_MS = 10_000;

/** A device exported on a socket. */
export class Server {
  private session: VhostUserSession | null = null;
  private sessionDone: Promise<void> = Promise.resolve();
  private acceptLoop: Promise<void> = Promise.resolve();
  private connections = 0;
  private stopping = false;

  /** Serves `device` to frontends that connect to `listener`. */
  constructor(private readonly listener: UnixListener, private readonly device: VhostUserDevice & { close(): Promise<void> }, private readonly log: Logger) {}

  /** Starts accepting frontends. */
  start(): void {
    this.log.info(`listening on ${this.listener.path}`);
    this.acceptLoop = this.accept();
  }

  private async accept(): Promise<void> {
    for (;;) {
      const conn = await this.listener.accept();
      if (!conn) return;
      const id = ++this.connections;
      if (this.session && !(await this.previousSessionEnded(id))) {
        // Another frontend owns the device; letting a second one in would hand it our rings.
        this.log.warn(`frontend #${id} refused: another frontend is connected and owns the device`);
        conn.close();
        continue;
      }
      if (this.stopping) {
        conn.close();
        return;
      }
      this.log.info(`frontend #${id} connected`);
      const session = new VhostUserSession(conn, this.device, this.log, `frontend #${id}`);
      this.session = session;
      this.sessionDone = session.serve().then(() => {
        this.session = null;
        this.log.info(`frontend #${id} disconnected${this.stopping ? '' : '; listening for the next one'}`);
      });
    }
  }

  /**
   * A frontend connects while a session exists. When the previous frontend has already hung up (a VM
   * restarted, a tool reconnecting at once), its teardown (rings stopped, image flushed) is only a
   * moment from done: wait for it, bounded, rather than turn the newcomer away. True once it ended.
   */
  private async previousSessionEnded(id: number): Promise<boolean> {
    if (!this.session!.frontendGone) return false;
    this.log.debug(`frontend #${id} waits for the previous frontend's session to be torn down`);
    let timer: NodeJS.Timeout | undefined;
    const ended = await Promise.race([
      this.sessionDone.then(() => true),
      new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(false), TEARDOWN_WAIT_MS); }),
    ]);
    clearTimeout(timer);
    if (!ended) this.log.warn(`frontend #${id}: the previous session is still being torn down after ${TEARDOWN_WAIT_MS / 1000} s (requests stuck in the disk?)`);
    return ended;
  }

  /** True while a frontend is connected. */
  get frontendConnected(): boolean {
    return this.session !== null;
  }

  /** True while the connected frontend has given us a backend request channel. */
  get backendChannel(): boolean {
    return this.session?.hasBackendChannel ?? false;
  }

  /** True while the connected frontend migrates the guest (dirty logging on). */
  get dirtyLogging(): boolean {
    return this.session?.dirtyLogging ?? false;
  }

  /**
   * Tells the connected frontend, if any, that the config space changed; resolves true once it took the
   * notice (see VhostUserSession.notifyConfigChange), false when there is no one to tell or it failed.
   */
  async notifyConfigChange(): Promise<boolean> {
    return this.session ? await this.session.notifyConfigChange() : false;
  }

  /** Stops taking frontends, lets in-flight requests finish, stops the workers. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.listener.close();
    await this.acceptLoop;
    this.log.debug('stop: no longer accepting; closing the frontend connection');
    this.session?.close();
    await this.sessionDone;
    this.log.debug('stop: frontend session ended; stopping the queue workers');
    await this.device.close();
  }
}
