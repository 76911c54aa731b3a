// Unix sockets with SCM_RIGHTS over real sockets in a temp dir.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync, readFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { UnixListener, UnixConnection } from '../../src/os/unix-socket.js';
import { eventfd, eventfdSignal, eventfdRead, closeFd } from '../../src/os/libc.js';

function tempDir(): string {
  return mkdtempSync(join(tmpdir(), 'usock-'));
}

test('messages and file descriptors cross the socket in both directions', async () => {
  const dir = tempDir();
  const listener = UnixListener.listen(join(dir, 's'));
  try {
    const accepted = listener.accept();
    const client = UnixConnection.connect(join(dir, 's'));
    const server = (await accepted)!;
    const efd = eventfd(0);
    client.send(Buffer.from('hello world!'), [efd]);
    const msg = await server.recvExact(12);
    assert.ok(msg);
    assert.equal(msg.data.toString(), 'hello world!');
    assert.equal(msg.fds.length, 1);
    assert.notEqual(msg.fds[0], efd, 'a received fd is a new descriptor');
    // Both descriptors name the same eventfd: a signal on one is read on the other.
    eventfdSignal(msg.fds[0]);
    assert.equal(eventfdRead(efd), 1n);
    server.send(Buffer.from('ok'));
    const reply = await client.recvExact(2);
    assert.equal(reply?.data.toString(), 'ok');
    closeFd(msg.fds[0]);
    closeFd(efd);
    client.close();
    assert.equal(await server.recv(16), null, 'end of stream after the peer closes');
    server.close();
  } finally {
    listener.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('close() interrupts a pending accept and a pending recv', async () => {
  const dir = tempDir();
  const listener = UnixListener.listen(join(dir, 's'));
  const pendingAccept = listener.accept();
  const client = UnixConnection.connect(join(dir, 's'));
  const server = (await pendingAccept)!;
  const pendingRecv = server.recv(10);
  server.close();
  assert.equal(await pendingRecv, null);
  const nextAccept = listener.accept();
  listener.close();
  assert.equal(await nextAccept, null);
  assert.equal(existsSync(join(dir, 's')), false, 'the socket node is removed');
  client.close();
  rmSync(dir, { recursive: true, force: true });
});

test('listen refuses a path holding a regular file, and one another listener owns', () => {
  const dir = tempDir();
  try {
    const file = join(dir, 'not-a-socket');
    writeFileSync(file, 'precious');
    assert.throws(() => UnixListener.listen(file), /exists and is not a socket/);
    assert.equal(readFileSync(file, 'utf8'), 'precious', 'the file is left alone');
    const first = UnixListener.listen(join(dir, 's'));
    assert.throws(() => UnixListener.listen(join(dir, 's')), /in use by another process/);
    first.close();
    // A stale node (nobody listening) is replaced.
    const again = UnixListener.listen(join(dir, 's'));
    again.close();
    assert.throws(() => UnixListener.listen(join(dir, 'x'.repeat(120))), /the limit is 107/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('recvExact gathers a message that arrives in pieces and reports a truncated one as end of stream', async () => {
  const dir = tempDir();
  const listener = UnixListener.listen(join(dir, 's'));
  try {
    const accepted = listener.accept();
    const client = UnixConnection.connect(join(dir, 's'));
    const server = (await accepted)!;
    const whole = server.recvExact(8);
    client.send(Buffer.from('abcd'));
    setTimeout(() => client.send(Buffer.from('efgh')), 20);
    assert.equal((await whole)?.data.toString(), 'abcdefgh');
    const cut = server.recvExact(8);
    client.send(Buffer.from('xyz'));
    setTimeout(() => client.close(), 20);
    assert.equal(await cut, null);
    server.close();
  } finally {
    listener.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
