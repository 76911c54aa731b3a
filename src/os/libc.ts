/**
 * The system calls Node.js lacks, bound through koffi.
 *
 * Pointers are plain numbers on the JS side (x86-64 user addresses fit in 2^47) and BigInt at the FFI
 * boundary, which is what koffi 3 uses. Every wrapper that can fail throws a SysError naming the call.
 */
import koffi from 'koffi';
import { constants as osConstants } from 'node:os';

const libc = koffi.load('libc.so.6');

/** errno number → symbolic name (EINVAL, ...), built from Node's own table. */
const errnoNames = new Map<number, string>(
  Object.entries(osConstants.errno).map(([name, num]) => [num as number, name]),
);

/** A failed system call: `call` names it, `errno`/`code` say why. */
export class SysError extends Error {
  /** Symbolic errno (EINVAL, ...). */
  readonly code: string;
  constructor(readonly call: string, readonly errno: number, detail?: string) {
    const code = errnoNames.get(errno) ?? `errno ${errno}`;
    super(`${call}${detail ? ` (${detail})` : ''} failed: ${code}`);
    this.name = 'SysError';
    this.code = code;
  }
}

/** Current errno of this thread, as saved by koffi after the last call. */
export function lastErrno(): number {
  return koffi.errno();
}

/** Throws SysError(call) when a libc-style call returned a negative value. */
export function check(call: string, ret: number | bigint, detail?: string): number {
  const n = Number(ret);
  if (n < 0) throw new SysError(call, koffi.errno(), detail);
  return n;
}

/** Converts a JS number address to the BigInt koffi expects. */
export function ptr(addr: number): bigint {
  return BigInt(addr);
}

const raw = {
  mmap: libc.func('void *mmap(void *addr, size_t len, int prot, int flags, int fd, int64_t off)'),
  munmap: libc.func('int munmap(void *addr, size_t len)'),
  close: libc.func('int close(int fd)'),
  socket: libc.func('int socket(int domain, int type, int protocol)'),
  bind: libc.func('int bind(int fd, void *addr, uint32_t addrlen)'),
  listen: libc.func('int listen(int fd, int backlog)'),
  accept4: libc.func('int accept4(int fd, void *addr, void *addrlen, int flags)'),
  connect: libc.func('int connect(int fd, void *addr, uint32_t addrlen)'),
  socketpair: libc.func('int socketpair(int domain, int type, int protocol, void *sv)'),
  shutdown: libc.func('int shutdown(int fd, int how)'),
  recvmsg: libc.func('intptr_t recvmsg(int fd, void *msg, int flags)'),
  sendmsg: libc.func('intptr_t sendmsg(int fd, void *msg, int flags)'),
  recv: libc.func('intptr_t recv(int fd, void *buf, size_t len, int flags)'),
  eventfd: libc.func('int eventfd(unsigned int initval, int flags)'),
  memfdCreate: libc.func('int memfd_create(const char *name, unsigned int flags)'),
  fcntl: libc.func('int fcntl(int fd, int cmd, ...)'),
  ftruncate: libc.func('int ftruncate(int fd, int64_t len)'),
  fallocate: libc.func('int fallocate(int fd, int mode, int64_t off, int64_t len)'),
  ioctlPtr: libc.func('int ioctl(int fd, unsigned long req, void *arg)'),
  read: libc.func('intptr_t read(int fd, void *buf, size_t n)'),
  write: libc.func('intptr_t write(int fd, void *buf, size_t n)'),
  poll: libc.func('int poll(void *fds, unsigned long nfds, int timeout)'),
  // glibc's syscall() is assembly that ignores the variadic register count, so fixed prototypes are safe.
  ioUringSetup: libc.func('long syscall(long nr, uint32_t entries, void *params)'),
  ioUringEnter: libc.func('long syscall(long nr, int fd, uint32_t toSubmit, uint32_t minComplete, uint32_t flags, void *sig, size_t sigsz)'),
  ioUringRegister: libc.func('long syscall(long nr, int fd, uint32_t op, void *arg, uint32_t nrArgs)'),
};

/** Native functions for callers that check results themselves (hot paths, async calls). */
export const native = raw;

export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_ANONYMOUS = 0x20;
export const MAP_POPULATE = 0x8000;
export const AF_UNIX = 1;
export const SOCK_STREAM = 1;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const SOL_SOCKET = 1;
export const SCM_RIGHTS = 1;
export const MSG_DONTWAIT = 0x40;
export const MSG_WAITALL = 0x100;
export const MSG_NOSIGNAL = 0x4000;
export const MSG_CMSG_CLOEXEC = 0x40000000;
export const MSG_CTRUNC = 0x8;
export const SHUT_RDWR = 2;
export const EFD_CLOEXEC = 0o2000000;
export const EFD_NONBLOCK = 0o4000;
export const MFD_CLOEXEC = 1;
export const MFD_ALLOW_SEALING = 2;
const F_ADD_SEALS = 1033;
const F_GET_SEALS = 1034;
/** File seals (fcntl(2)): no more seals, no shrinking, no growing. */
export const F_SEAL_SEAL = 1;
export const F_SEAL_SHRINK = 2;
export const F_SEAL_GROW = 4;
export const FALLOC_FL_KEEP_SIZE = 1;
export const FALLOC_FL_PUNCH_HOLE = 2;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const SYS_io_uring_setup = 425;
export const SYS_io_uring_enter = 426;
export const SYS_io_uring_register = 427;

/** Maps `len` bytes; returns the address. */
export function mmap(len: number, prot: number, flags: number, fd: number, offset: number): number {
  const p = raw.mmap(null, len, prot, flags, fd, offset) as bigint;
  // MAP_FAILED is (void *)-1, which koffi hands back as 2^64-1.
  if (p === 0xffffffffffffffffn || p === -1n) throw new SysError('mmap', koffi.errno(), `${len} bytes of fd ${fd} at ${offset}`);
  return Number(p);
}

/** Unmaps a range made by mmap(). */
export function munmap(addr: number, len: number): void {
  check('munmap', raw.munmap(ptr(addr), len));
}

/** A zero-copy ArrayBuffer over native memory at `addr`. */
export function view(addr: number, len: number): ArrayBuffer {
  return koffi.view(ptr(addr), len);
}

/** Anonymous private memory, page aligned, with its view: for iovec tables, msghdrs and ring scratch space. */
export function allocNative(len: number): { addr: number; buffer: ArrayBuffer } {
  const addr = mmap(len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return { addr, buffer: view(addr, len) };
}

/** close(2), ignoring EBADF on purpose only where callers say so. */
export function closeFd(fd: number): void {
  check('close', raw.close(fd), `fd ${fd}`);
}

/** close(2) that never throws: for cleanup paths. */
export function closeQuietly(fd: number): void {
  if (fd >= 0) raw.close(fd);
}

/** eventfd(2), close-on-exec. */
export function eventfd(initval = 0, flags = EFD_CLOEXEC): number {
  return check('eventfd', raw.eventfd(initval, flags));
}

/** memfd_create(2), close-on-exec; `flags` may add MFD_ALLOW_SEALING. */
export function memfdCreate(name: string, flags = 0): number {
  return check('memfd_create', raw.memfdCreate(name, MFD_CLOEXEC | flags));
}

/** The seals on `fd` (F_GET_SEALS); throws SysError (EINVAL) for a file that cannot carry seals. */
export function getSeals(fd: number): number {
  return check('fcntl(F_GET_SEALS)', raw.fcntl(fd, F_GET_SEALS, 'int', 0), `fd ${fd}`);
}

/** Adds `seals` to `fd` (F_ADD_SEALS); throws SysError (EPERM once F_SEAL_SEAL is set, EINVAL if not sealable). */
export function addSeals(fd: number, seals: number): void {
  check('fcntl(F_ADD_SEALS)', raw.fcntl(fd, F_ADD_SEALS, 'int', seals), `fd ${fd}`);
}

/** ftruncate(2). */
export function ftruncate(fd: number, len: number): void {
  check('ftruncate', raw.ftruncate(fd, len), `fd ${fd} to ${len}`);
}

/** fallocate(2). */
export function fallocate(fd: number, mode: number, offset: number, len: number): void {
  check('fallocate', raw.fallocate(fd, mode, offset, len), `mode ${mode} ${offset}+${len}`);
}

const BLKGETSIZE64 = 0x80081272;

/** Size in bytes of a block device (ioctl BLKGETSIZE64). */
export function blockDeviceSize(fd: number): number {
  const out = new BigUint64Array(1);
  check('ioctl(BLKGETSIZE64)', raw.ioctlPtr(fd, BLKGETSIZE64, out));
  return Number(out[0]);
}

/** A connected pair of close-on-exec Unix stream sockets (socketpair(2)). */
export function socketPair(): [number, number] {
  const sv = new Int32Array(2);
  check('socketpair', raw.socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  return [sv[0], sv[1]];
}

/** Adds 1 to an eventfd counter (a kick or a call). */
export function eventfdSignal(fd: number): void {
  const one = new BigUint64Array([1n]);
  check('write(eventfd)', raw.write(fd, one, 8), `fd ${fd}`);
}

/** Reads and resets an eventfd counter; blocks unless the fd is non-blocking. */
export function eventfdRead(fd: number): bigint {
  const out = new BigUint64Array(1);
  check('read(eventfd)', raw.read(fd, out, 8), `fd ${fd}`);
  return out[0];
}
