/**
 * The front-end end of a vhost-user socket: framed requests out, replies in, one request at a time.
 *
 * Built on UnixConnection (fd passing) and the codecs in vhost-user/messages.ts. Besides the checked
 * request() path used by VhostUserBlkClient, it exposes raw sendRaw()/receiveReply() so tests can put
 * arbitrary bytes and any number of fds on the wire and see exactly what comes back.
 */
import { UnixConnection, MAX_RECV_FDS } from '../os/unix-socket.js';
import { allocNative, lastErrno, munmap, native, ptr, SysError, MSG_DONTWAIT, MSG_NOSIGNAL, SCM_RIGHTS, SOL_SOCKET, closeQuietly } from '../os/libc.js';
import {
  FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION_MASK, HEADER_SIZE, MAX_PAYLOAD_SIZE, VHOST_USER_VERSION, encodeRequest, requestName,
} from '../vhost-user/messages.js';

/** A reply as it came off the wire: header fields, payload bytes and any fds (owned by the caller). */
export interface RawReply {
  /** Request number in the reply header. */
  request: number;
  /** Raw flags word of the reply header. */
  flags: number;
  /** Payload bytes (header size field says how many). */
  payload: Buffer;
  /** File descriptors that came with the reply; the caller must close them. */
  fds: number[];
}

/** Options of VhostUserConnection.request. */
export interface RequestOptions {
  /** File descriptors to attach. */
  fds?: readonly number[];
  /** Set NEED_REPLY and wait for the u64 ack; a non-zero ack rejects with VhostUserError. */
  needReply?: boolean;
  /** The request has its own reply body (GET_*): wait for it and return its payload. */
  expectReply?: boolean;
  /** How long to wait for the reply before giving up (and closing the connection); default 5000 ms. */
  timeoutMs?: number;
}

/** A request the back-end refused or answered wrongly, or a connection that failed mid-request. */
export class VhostUserError extends Error {
  /** Request number concerned, when known. */
  readonly request: number | undefined;
  /** The ack value when the back-end answered NEED_REPLY with a failure. */
  readonly ack: bigint | undefined;
  /** Builds the error; `message` should name the request. */
  constructor(message: string, request?: number, ack?: bigint) {
    super(message);
    this.name = 'VhostUserError';
    this.request = request;
    this.ack = ack;
  }
}

const EMPTY = new Uint8Array(0);
const EAGAIN = 11;
const EINTR = 4;
const MSG_PEEK = 2;

/** A vhost-user front-end connection (the QEMU side of the socket). */
export class VhostUserConnection {
  private queue: Promise<unknown> = Promise.resolve();
  private rawArea: { addr: number; buffer: ArrayBuffer } | null = null;
  private static readonly RAW_AREA = 1 << 17;

  private constructor(/** The underlying socket. */ readonly socket: UnixConnection) {}

  /** Connects to the back-end listening at `socketPath`. */
  static connect(socketPath: string): VhostUserConnection {
    return new VhostUserConnection(UnixConnection.connect(socketPath));
  }

  /** True once close() ran. */
  get isClosed(): boolean {
    return this.socket.isClosed;
  }

  /**
   * Puts `data` (header + payload, any bytes) on the wire with `fds` attached to its first byte.
   * Up to 32 fds go through UnixConnection; more (for hostile tests) through a local sendmsg.
   */
  sendRaw(data: Uint8Array, fds: readonly number[] = []): void {
    if (fds.length <= MAX_RECV_FDS) {
      this.socket.send(data, fds);
      return;
    }
    this.sendManyFds(data, fds);
  }

  /** sendmsg with more fds than UnixConnection allows (the kernel takes up to 253). */
  private sendManyFds(data: Uint8Array, fds: readonly number[]): void {
    if (this.socket.isClosed) throw new Error('send on a closed connection');
    const area = this.rawArea ??= allocNative(VhostUserConnection.RAW_AREA);
    const controlLen = 16 + ((fds.length * 4 + 7) & ~7);
    const dataOff = 128 + controlLen;
    if (dataOff + data.length > VhostUserConnection.RAW_AREA) throw new RangeError(`raw send of ${data.length} bytes with ${fds.length} fds is too big`);
    const a = area.addr;
    const dv = new DataView(area.buffer);
    new Uint8Array(area.buffer, dataOff, data.length).set(data);
    // struct msghdr at 0, struct iovec at 64, control at 128, data after it.
    dv.setBigUint64(0, 0n, true);
    dv.setUint32(8, 0, true);
    dv.setBigUint64(16, BigInt(a + 64), true);
    dv.setBigUint64(24, 1n, true);
    dv.setBigUint64(32, BigInt(a + 128), true);
    dv.setBigUint64(40, BigInt(controlLen), true);
    dv.setInt32(48, 0, true);
    dv.setBigUint64(64, BigInt(a + dataOff), true);
    dv.setBigUint64(72, BigInt(data.length), true);
    dv.setBigUint64(128, BigInt(16 + fds.length * 4), true);
    dv.setInt32(136, SOL_SOCKET, true);
    dv.setInt32(140, SCM_RIGHTS, true);
    fds.forEach((fd, i) => dv.setInt32(144 + i * 4, fd, true));
    for (;;) {
      const n = Number(native.sendmsg(this.socket.fd, ptr(a), MSG_NOSIGNAL | MSG_DONTWAIT));
      if (n >= 0) {
        if (n < data.length) throw new Error(`raw sendmsg sent ${n} of ${data.length} bytes`);
        return;
      }
      const errno = lastErrno();
      if (errno === EINTR) continue;
      throw new SysError('sendmsg', errno, errno === EAGAIN ? 'peer is not reading' : `fd ${this.socket.fd}`);
    }
  }

  /**
   * Reads one reply: resolves null at end of stream (the back-end closed or reset the connection). A header
   * announcing more than MAX_PAYLOAD_SIZE bytes throws and closes the connection. With `timeoutMs`, a
   * reply that does not arrive in time closes the connection and rejects.
   */
  async receiveReply(timeoutMs?: number): Promise<RawReply | null> {
    let timer: NodeJS.Timeout | undefined;
    let timedOut = false;
    if (timeoutMs !== undefined && timeoutMs > 0) {
      timer = setTimeout(() => { timedOut = true; this.close(); }, timeoutMs);
    }
    try {
      const head = await this.recvOrEnd(HEADER_SIZE);
      if (!head) {
        if (timedOut) throw new VhostUserError(`no reply within ${timeoutMs} ms; connection closed`);
        return null;
      }
      const request = head.data.readUInt32LE(0);
      const flags = head.data.readUInt32LE(4);
      const size = head.data.readUInt32LE(8);
      if (size > MAX_PAYLOAD_SIZE) {
        for (const fd of head.fds) closeQuietly(fd);
        this.close();
        throw new VhostUserError(`${requestName(request)} reply announces ${size} payload bytes (more than ${MAX_PAYLOAD_SIZE}); connection closed`, request);
      }
      const body = size > 0 ? await this.recvOrEnd(size) : { data: Buffer.alloc(0), fds: [] };
      if (!body) {
        for (const fd of head.fds) closeQuietly(fd);
        if (timedOut) throw new VhostUserError(`no reply within ${timeoutMs} ms; connection closed`, request);
        return null;
      }
      return { request, flags, payload: body.data, fds: [...head.fds, ...body.fds] };
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  /** recvExact, with a connection reset (the peer closed with our data unread) taken as end of stream. */
  private async recvOrEnd(len: number): Promise<{ data: Buffer; fds: number[] } | null> {
    try {
      return await this.socket.recvExact(len);
    } catch (err) {
      if (err instanceof SysError && err.code === 'ECONNRESET') return null;
      throw err;
    }
  }

  /**
   * Resolves true if the back-end closes the connection within `timeoutMs`, false if it is still open
   * then or sends something (which stays unread). Polls with a non-consuming peek every few ms.
   */
  async waitForClose(timeoutMs: number): Promise<boolean> {
    return this.exclusive(async () => {
      const deadline = Date.now() + timeoutMs;
      const probe = Buffer.alloc(1);
      for (;;) {
        if (this.socket.isClosed) return true;
        const n = Number(native.recv(this.socket.fd, probe, 1, MSG_PEEK | MSG_DONTWAIT));
        if (n === 0) return true;
        if (n > 0) return false;
        const errno = lastErrno();
        if (errno !== EAGAIN && errno !== EINTR) return true; // ECONNRESET and the like: gone
        if (Date.now() >= deadline) return false;
        await new Promise((resolve) => setTimeout(resolve, 5));
      }
    });
  }

  /** Runs `fn` after every earlier request on this connection has finished (requests never interleave). */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  /**
   * Sends request `req` and, as the options say, waits for its reply body or its ack. Resolves with the
   * reply payload (empty when there is none). Refusals, malformed replies and a closed connection reject
   * with VhostUserError naming the request.
   */
  request(req: number, payload: Uint8Array = EMPTY, opts: RequestOptions = {}): Promise<Buffer> {
    return this.exclusive(async () => {
      const name = requestName(req);
      const needReply = opts.needReply === true && opts.expectReply !== true;
      try {
        this.sendRaw(encodeRequest(req, payload, needReply), opts.fds ?? []);
      } catch (err) {
        throw new VhostUserError(`${name}: send failed: ${(err as Error).message}`, req);
      }
      if (!needReply && !opts.expectReply) return Buffer.alloc(0);
      const r = await this.receiveReply(opts.timeoutMs ?? 5000);
      if (!r) throw new VhostUserError(`${name}: the back-end closed the connection instead of answering`, req);
      for (const fd of r.fds) closeQuietly(fd);
      if ((r.flags & FLAG_VERSION_MASK) !== VHOST_USER_VERSION || (r.flags & FLAG_REPLY) === 0 || (r.flags & FLAG_NEED_REPLY) !== 0) {
        throw new VhostUserError(`${name}: reply has flags 0x${r.flags.toString(16)}, expected 0x5`, req);
      }
      if (r.request !== req) throw new VhostUserError(`${name}: reply is for ${requestName(r.request)}`, req);
      if (opts.expectReply) return r.payload;
      if (r.payload.length !== 8) throw new VhostUserError(`${name}: ack payload is ${r.payload.length} bytes, expected 8`, req);
      const ack = r.payload.readBigUInt64LE(0);
      if (ack !== 0n) throw new VhostUserError(`${name} refused by the back-end (ack ${ack})`, req, ack);
      return Buffer.alloc(0);
    });
  }

  /** Closes the socket (a pending receive resolves null). Safe to call twice. */
  close(): void {
    this.socket.close();
    if (this.rawArea) {
      munmap(this.rawArea.addr, VhostUserConnection.RAW_AREA);
      this.rawArea = null;
    }
  }
}
