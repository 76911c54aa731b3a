/**
 * The back-end request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ): the socket the front-end hands over
 * with SET_BACKEND_REQ_FD, on which the back-end sends requests of its own (CONFIG_CHANGE_MSG) and, with
 * REPLY_ACK, waits for their acknowledgement. Requests go out one at a time.
 */
import { fstatSync } from 'node:fs';
import { UnixConnection } from '../os/unix-socket.js';
import { closeQuietly } from '../os/libc.js';
import type { Logger } from '../logger.js';
import { BackendRequest, HEADER_SIZE, backendRequestName, decodeReplyHeader, encodeBackendRequest } from './messages.js';
import { Refusal } from './refusal.js';

/**
 * How long the frontend may take to answer a backend request. QEMU handles CONFIG_CHANGE_MSG by reading
 * the config space back (a GET_CONFIG round trip on the main socket), so a healthy one answers in
 * milliseconds; one that does not answer at all must not leave the caller waiting forever.
 */
export const BACKEND_REPLY_TIMEOUT_MS = 10_000;

/** One session's back-end request channel, if the front-end set one up. */
export class BackendChannel {
  private channel: UnixConnection | null = null;
  /** Backend requests go out one at a time: the next waits for the previous one's reply. */
  private queue: Promise<unknown> = Promise.resolve();

  /** `replyAck` says whether REPLY_ACK is negotiated now; `usable` whether the session still serves. */
  constructor(private readonly log: Logger, private readonly name: string, private readonly replyAck: () => boolean, private readonly usable: () => boolean) {}

  /** True while the frontend has given us a channel. */
  get present(): boolean {
    return this.channel !== null;
  }

  /** Takes `fd` (SET_BACKEND_REQ_FD) as the channel, replacing an earlier one; refuses what is not a socket. The fd is ours from here. */
  set(fd: number): void {
    let isSocket: boolean;
    try {
      isSocket = fstatSync(fd).isSocket();
    } catch (err) {
      closeQuietly(fd);
      throw new Refusal(`the file descriptor cannot be examined: ${(err as Error).message}`);
    }
    if (!isSocket) {
      closeQuietly(fd);
      throw new Refusal('the file descriptor is not a socket');
    }
    this.close();
    this.channel = new UnixConnection(fd);
    this.log.info(`${this.name}: backend request channel set up`);
  }

  /** Drops the channel (RESET_OWNER, disconnect). */
  close(): void {
    this.channel?.close();
    this.channel = null;
  }

  /**
   * Tells the frontend that the config space changed (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG): QEMU then
   * reads it back with GET_CONFIG and, if the capacity changed, interrupts the guest. Resolves true once
   * the frontend took it (acknowledged it, with REPLY_ACK); false without a channel or when it failed,
   * which is logged. Never rejects, and never waits longer than BACKEND_REPLY_TIMEOUT_MS for a reply.
   */
  notifyConfigChange(): Promise<boolean> {
    const run = this.queue.then(() => this.send(BackendRequest.CONFIG_CHANGE_MSG));
    this.queue = run;
    return run;
  }

  private async send(request: number): Promise<boolean> {
    const channel = this.channel;
    const name = backendRequestName(request);
    if (!channel || !this.usable()) {
      this.log.info(`${this.name}: no backend request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ not set up); ${name} not sent`);
      return false;
    }
    // Without REPLY_ACK the frontend never answers: asking for a reply would leave one unread forever.
    const needReply = this.replyAck();
    try {
      channel.send(encodeBackendRequest(request, undefined, needReply));
      if (needReply) {
        const ack = await this.reply(channel, request);
        if (ack !== 0n) {
          this.log.warn(`${this.name}: the frontend answered ${name} with failure (${ack})`);
          return false;
        }
      }
      this.log.debug(`${this.name}: ${name} sent${needReply ? ' and acknowledged' : ''}`);
      return true;
    } catch (err) {
      // A reply late, malformed or missing leaves the stream out of step: the channel is dropped.
      this.log.warn(`${this.name}: ${name} failed: ${(err as Error).message}; backend request channel closed`);
      if (this.channel === channel) this.close();
      else channel.close();
      return false;
    }
  }

  /** Reads the u64 reply to a backend request within BACKEND_REPLY_TIMEOUT_MS. */
  private async reply(channel: UnixConnection, request: number): Promise<bigint> {
    let timedOut = false;
    // Closing the channel ends a receive parked in poll(): the awaits below then see end of stream.
    const timer = setTimeout(() => { timedOut = true; channel.close(); }, BACKEND_REPLY_TIMEOUT_MS);
    const gone = () => new Error(timedOut ? `no reply within ${BACKEND_REPLY_TIMEOUT_MS} ms` : 'the frontend closed the channel');
    try {
      const head = await channel.recvExact(HEADER_SIZE);
      if (!head) throw gone();
      for (const fd of head.fds) closeQuietly(fd);
      const h = decodeReplyHeader(head.data, 'backend');
      if (h.request !== request) throw new Error(`the reply is for ${backendRequestName(h.request)}`);
      const body = await channel.recvExact(h.size);
      if (!body) throw gone();
      for (const fd of body.fds) closeQuietly(fd);
      if (body.data.length !== 8) throw new Error(`the reply payload is ${body.data.length} bytes, expected 8`);
      return body.data.readBigUInt64LE(0);
    } finally {
      clearTimeout(timer);
    }
  }
}
