/**
 * Unix stream sockets with file-descriptor passing (SCM_RIGHTS), which Node's net module cannot do.
 *
 * The event loop never blocks: waiting for readability is a poll() run as an async FFI call on a
 * koffi helper thread, watching the socket and a wake eventfd (so close() can interrupt it); the
 * actual recvmsg/accept then runs non-blocking on the calling thread so errno is reliable. Sends use
 * MSG_DONTWAIT: a peer that stops reading gets its connection failed, it cannot stall us.
 */
import { chmodSync, lstatSync, unlinkSync } from 'node:fs';
import {
  SysError, allocNative, check, closeQuietly, eventfd, eventfdSignal, lastErrno, munmap, native, ptr,
  AF_UNIX, EFD_NONBLOCK, EFD_CLOEXEC, MSG_CMSG_CLOEXEC, MSG_CTRUNC, MSG_DONTWAIT, MSG_NOSIGNAL,
  SCM_RIGHTS, SOCK_CLOEXEC, SOCK_NONBLOCK, SOCK_STREAM, SOL_SOCKET, SHUT_RDWR,
} from './libc.js';

const POLLIN = 0x1;
const POLLHUP = 0x10;
const POLLRDHUP = 0x2000;
const EAGAIN = 11;
const EINTR = 4;
/** sun_path is 108 bytes including the terminating NUL. */
const MAX_PATH_BYTES = 107;

/** Where the two struct pollfd live inside a native area (msghdr, iovec and cmsg come before). */
const POLL_OFF = 512;

/** Largest number of fds accepted with one message. */
export const MAX_RECV_FDS = 32;
/** Control buffer bytes for MAX_RECV_FDS: CMSG_SPACE(32 * 4). */
const CMSG_SPACE = 16 + MAX_RECV_FDS * 4;

/** Builds a struct sockaddr_un for `path`, throwing a clear error when the path is too long. */
function sockaddr(path: string): Buffer {
  const bytes = Buffer.from(path, 'utf8');
  if (bytes.length > MAX_PATH_BYTES) throw new Error(`socket path is ${bytes.length} bytes, the limit is ${MAX_PATH_BYTES}: ${path}`);
  const addr = Buffer.alloc(110);
  addr.writeUInt16LE(AF_UNIX, 0);
  bytes.copy(addr, 2);
  return addr;
}

/** Waits until `fd` is readable or `wakeFd` is signalled; resolves true for readable. */
function pollReadable(area: { addr: number; buffer: ArrayBuffer }, fd: number, wakeFd: number): Promise<boolean> {
  const pfd = new DataView(area.buffer, POLL_OFF, 16);
  pfd.setInt32(0, fd, true);
  pfd.setInt16(4, POLLIN, true);
  pfd.setInt16(6, 0, true);
  pfd.setInt32(8, wakeFd, true);
  pfd.setInt16(12, POLLIN, true);
  pfd.setInt16(14, 0, true);
  return new Promise((resolve, reject) => {
    native.poll.async(ptr(area.addr + POLL_OFF), 2, -1, (err: unknown, res: number) => {
      if (err) return reject(err);
      if (res < 0) return resolve(pollReadable(area, fd, wakeFd)); // EINTR: poll again
      // Readable, hung up or in error: all mean "call recv and look". A wake wins: we are closing.
      resolve(pfd.getInt16(14, true) === 0);
    });
  });
}

/** A connected stream socket able to send and receive file descriptors. */
export class UnixConnection {
  /** The socket fd (owned). */
  readonly fd: number;
  private readonly wakeFd: number;
  private readonly area: { addr: number; buffer: ArrayBuffer };
  private closed = false;
  private waiting = false;
  /** Size of the native receive/send area; a message must fit in it. */
  static readonly AREA_SIZE = 1 << 17;
  private static readonly DATA_OFF = 1024;
  /** Largest payload one send or receive call can carry. */
  static readonly MAX_IO = UnixConnection.AREA_SIZE - UnixConnection.DATA_OFF;

  /** Wraps an already connected socket fd (made non-blocking here). */
  constructor(fd: number) {
    this.fd = fd;
    this.wakeFd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    this.area = allocNative(UnixConnection.AREA_SIZE);
  }

  /** Connects to a listening socket at `path` (blocking connect: local sockets answer at once). */
  static connect(path: string): UnixConnection {
    const fd = check('socket', native.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    const addr = sockaddr(path);
    if (Number(native.connect(fd, addr, addr.length)) < 0) {
      const errno = lastErrno();
      closeQuietly(fd);
      throw new SysError('connect', errno, path);
    }
    return new UnixConnection(fd);
  }

  /** True once close() ran. */
  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * True when the peer has closed its end (or this end is closed), whether or not we have read up to the
   * end of the stream yet: a poll with no wait for POLLRDHUP.
   */
  peerHungUp(): boolean {
    if (this.closed) return true;
    const pfd = new DataView(this.area.buffer, POLL_OFF + 16, 8);
    pfd.setInt32(0, this.fd, true);
    pfd.setInt16(4, POLLRDHUP, true);
    pfd.setInt16(6, 0, true);
    const n = Number(native.poll(ptr(this.area.addr + POLL_OFF + 16), 1, 0));
    return n > 0 && (pfd.getInt16(6, true) & (POLLRDHUP | POLLHUP)) !== 0;
  }

  /**
   * Receives up to `len` bytes and any fds sent with them. Resolves null at end of stream.
   * Fds received are close-on-exec and owned by the caller.
   */
  async recv(len: number): Promise<{ data: Buffer; fds: number[] } | null> {
    if (len > UnixConnection.MAX_IO) throw new RangeError(`receive of ${len} bytes exceeds ${UnixConnection.MAX_IO}`);
    for (;;) {
      if (this.closed) return null;
      const got = this.tryRecv(len);
      if (got !== undefined) return got;
      this.waiting = true;
      const readable = await pollReadable(this.area, this.fd, this.wakeFd).finally(() => { this.waiting = false; });
      if (!readable) return null;
    }
  }

  /**
   * Receives exactly `len` bytes (fds may arrive with any part). Resolves null if the stream ends first,
   * so a message cut short is never taken for a whole one.
   */
  async recvExact(len: number): Promise<{ data: Buffer; fds: number[] } | null> {
    const parts: Buffer[] = [];
    const fds: number[] = [];
    let have = 0;
    while (have < len) {
      let got;
      try {
        got = await this.recv(len - have);
      } catch (err) {
        // Fds that came with the earlier parts would otherwise leak with the exception.
        for (const fd of fds) closeQuietly(fd);
        throw err;
      }
      if (got === null) {
        for (const fd of fds) closeQuietly(fd);
        return null;
      }
      parts.push(got.data);
      fds.push(...got.fds);
      have += got.data.length;
    }
    return { data: parts.length === 1 ? parts[0] : Buffer.concat(parts), fds };
  }

  /** One non-blocking recvmsg; undefined when nothing is there yet. */
  private tryRecv(len: number): { data: Buffer; fds: number[] } | null | undefined {
    const a = this.area.addr;
    const dv = new DataView(this.area.buffer);
    // struct msghdr at 0, struct iovec at 64, control buffer at 128, data at DATA_OFF.
    dv.setBigUint64(0, 0n, true);
    dv.setUint32(8, 0, true);
    dv.setBigUint64(16, BigInt(a + 64), true);
    dv.setBigUint64(24, 1n, true);
    dv.setBigUint64(32, BigInt(a + 128), true);
    dv.setBigUint64(40, BigInt(CMSG_SPACE), true);
    dv.setInt32(48, 0, true);
    dv.setBigUint64(64, BigInt(a + UnixConnection.DATA_OFF), true);
    dv.setBigUint64(72, BigInt(len), true);
    const n = Number(native.recvmsg(this.fd, ptr(a), MSG_CMSG_CLOEXEC | MSG_DONTWAIT));
    if (n < 0) {
      const errno = lastErrno();
      if (errno === EAGAIN || errno === EINTR) return undefined;
      throw new SysError('recvmsg', errno, `fd ${this.fd}`);
    }
    const fds = this.parseFds(dv);
    if ((dv.getInt32(48, true) & MSG_CTRUNC) !== 0) {
      for (const fd of fds) closeQuietly(fd);
      throw new Error(`recvmsg: more than ${MAX_RECV_FDS} file descriptors sent with one message; dropped`);
    }
    if (n === 0) {
      for (const fd of fds) closeQuietly(fd);
      return null;
    }
    const data = Buffer.from(new Uint8Array(this.area.buffer, UnixConnection.DATA_OFF, n));
    return { data, fds };
  }

  private parseFds(dv: DataView): number[] {
    const fds: number[] = [];
    const controlLen = Number(dv.getBigUint64(40, true));
    let off = 0;
    while (off + 16 <= controlLen) {
      const cmsgLen = Number(dv.getBigUint64(128 + off, true));
      if (cmsgLen < 16 || off + cmsgLen > controlLen) break;
      const level = dv.getInt32(128 + off + 8, true);
      const type = dv.getInt32(128 + off + 12, true);
      if (level === SOL_SOCKET && type === SCM_RIGHTS) {
        for (let p = 16; p + 4 <= cmsgLen; p += 4) fds.push(dv.getInt32(128 + off + p, true));
      }
      off += (cmsgLen + 7) & ~7;
    }
    return fds;
  }

  /**
   * Sends `data` with `fds` attached to its first byte, without ever blocking. Throws if the peer's
   * buffer is full (it stopped reading) or the connection is gone.
   */
  send(data: Uint8Array, fds: readonly number[] = []): void {
    if (this.closed) throw new Error('send on a closed connection');
    if (data.length > UnixConnection.MAX_IO) throw new RangeError(`send of ${data.length} bytes exceeds ${UnixConnection.MAX_IO}`);
    if (fds.length > MAX_RECV_FDS) throw new RangeError(`cannot send ${fds.length} fds at once (max ${MAX_RECV_FDS})`);
    // A separate area from recv's: a recv may be parked in poll() while we send.
    const sendArea = this.sendArea ??= allocNative(UnixConnection.AREA_SIZE);
    const a = sendArea.addr;
    const dv = new DataView(sendArea.buffer);
    new Uint8Array(sendArea.buffer, UnixConnection.DATA_OFF, data.length).set(data);
    const controlLen = fds.length > 0 ? 16 + ((fds.length * 4 + 7) & ~7) : 0;
    dv.setBigUint64(0, 0n, true);
    dv.setUint32(8, 0, true);
    dv.setBigUint64(16, BigInt(a + 64), true);
    dv.setBigUint64(24, 1n, true);
    dv.setBigUint64(32, controlLen ? BigInt(a + 128) : 0n, true);
    dv.setBigUint64(40, BigInt(controlLen), true);
    dv.setInt32(48, 0, true);
    dv.setBigUint64(64, BigInt(a + UnixConnection.DATA_OFF), true);
    dv.setBigUint64(72, BigInt(data.length), true);
    if (controlLen) {
      dv.setBigUint64(128, BigInt(16 + fds.length * 4), true);
      dv.setInt32(136, SOL_SOCKET, true);
      dv.setInt32(140, SCM_RIGHTS, true);
      fds.forEach((fd, i) => dv.setInt32(144 + i * 4, fd, true));
    }
    let sent = 0;
    for (;;) {
      const n = Number(native.sendmsg(this.fd, ptr(a), MSG_NOSIGNAL | MSG_DONTWAIT));
      if (n < 0) {
        const errno = lastErrno();
        if (errno === EINTR) continue;
        throw new SysError('sendmsg', errno, errno === EAGAIN ? 'peer is not reading' : `fd ${this.fd}`);
      }
      sent += n;
      if (sent >= data.length) return;
      // A partial send: the fds went with the first part; send the rest without them.
      dv.setBigUint64(32, 0n, true);
      dv.setBigUint64(40, 0n, true);
      dv.setBigUint64(64, BigInt(a + UnixConnection.DATA_OFF + sent), true);
      dv.setBigUint64(72, BigInt(data.length - sent), true);
    }
  }

  private sendArea: { addr: number; buffer: ArrayBuffer } | undefined;

  /** Shuts the socket down; a pending recv resolves null. Safe to call twice. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    native.shutdown(this.fd, SHUT_RDWR);
    eventfdSignal(this.wakeFd);
    const release = () => {
      closeQuietly(this.fd);
      closeQuietly(this.wakeFd);
      munmap(this.area.addr, UnixConnection.AREA_SIZE);
      if (this.sendArea) munmap(this.sendArea.addr, UnixConnection.AREA_SIZE);
    };
    // The poll thread may still hold the fds and the area: release them once it has returned.
    if (this.waiting) setTimeout(release, 50);
    else release();
  }
}

/** Options for UnixListener.listen. */
export interface ListenOptions {
  /** File mode of the socket node (default 0o600: only the owner may connect). */
  mode?: number;
  /** Remove a stale socket node left at the path (never a regular file or anything else). */
  replaceStale?: boolean;
}

/** A listening Unix socket. */
export class UnixListener {
  private readonly wakeFd: number;
  private readonly area: { addr: number; buffer: ArrayBuffer };
  private closed = false;
  private waiting = false;

  private constructor(readonly fd: number, readonly path: string) {
    this.wakeFd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    this.area = allocNative(4096);
  }

  /**
   * Binds and listens at `path`. Refuses a path where something other than a stale socket exists,
   * and a socket another process still listens on.
   */
  static listen(path: string, options: ListenOptions = {}): UnixListener {
    const addr = sockaddr(path);
    claimSocketPath(path, options.replaceStale !== false);
    const fd = check('socket', native.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    try {
      check('bind', native.bind(fd, addr, addr.length), path);
      chmodSync(path, options.mode ?? 0o600);
      check('listen', native.listen(fd, 16), path);
    } catch (err) {
      closeQuietly(fd);
      throw err;
    }
    return new UnixListener(fd, path);
  }

  /** Waits for the next connection; resolves null once the listener is closed. */
  async accept(): Promise<UnixConnection | null> {
    for (;;) {
      if (this.closed) return null;
      const fd = Number(native.accept4(this.fd, null, null, SOCK_CLOEXEC | SOCK_NONBLOCK));
      if (fd >= 0) return new UnixConnection(fd);
      const errno = lastErrno();
      if (errno !== EAGAIN && errno !== EINTR) throw new SysError('accept4', errno, this.path);
      this.waiting = true;
      const readable = await pollReadable(this.area, this.fd, this.wakeFd).finally(() => { this.waiting = false; });
      if (!readable) return null;
    }
  }

  /** Stops listening and removes the socket node. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    eventfdSignal(this.wakeFd);
    try { unlinkSync(this.path); } catch { /* already gone */ }
    const release = () => {
      closeQuietly(this.fd);
      closeQuietly(this.wakeFd);
      munmap(this.area.addr, 4096);
    };
    if (this.waiting) setTimeout(release, 50);
    else release();
  }
}

/**
 * Makes `path` free for a new listening socket: refuses a path where something other than a socket
 * exists, or a socket another process still listens on; removes a stale socket node (when allowed).
 */
export function claimSocketPath(path: string, replaceStale = true): void {
  sockaddr(path); // a path too long for sun_path fails here, with the limit in the message
  let existing: ReturnType<typeof lstatSync> | undefined;
  try { existing = lstatSync(path); } catch { existing = undefined; }
  if (!existing) return;
  if (!existing.isSocket()) throw new Error(`socket path ${path} exists and is not a socket; refusing to replace it`);
  if (isListening(path)) throw new Error(`socket path ${path} is in use by another process`);
  if (!replaceStale) throw new Error(`socket path ${path} exists`);
  unlinkSync(path);
}

/** True when some process accepts connections at `path`. */
function isListening(path: string): boolean {
  try {
    const probe = UnixConnection.connect(path);
    probe.close();
    return true;
  } catch (err) {
    // EAGAIN: a listener whose backlog is full is still a listener.
    return err instanceof SysError && err.code === 'EAGAIN';
  }
}
