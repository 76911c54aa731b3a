// Live resize, driven at the protocol level: the daemon process grows its disk through the control socket
// (or SIGHUP), the workers take the new size, and the frontend hears of it on the backend request channel.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlkRequestError, VhostUserConnection, type BlkDeviceConfig, type VhostUserBlkClient } from '../../src/frontend/index.js';
import { Status } from '../../src/blk/constants.js';
import { closeQuietly, eventfd, socketPair } from '../../src/os/libc.js';
import { UnixConnection } from '../../src/os/unix-socket.js';
import { controlRequest, type ControlReply } from '../../src/daemon/control.js';
import { parseResizeArgs, UsageError } from '../../src/daemon/cli.js';
import {
  BackendRequest, FrontendRequest as R, HEADER_SIZE, encodeConfig, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES, encodeU64,
} from '../../src/vhost-user/messages.js';
import { BIN, MiB, connectClient, pattern, readImage, sleep, startDaemon, stopDaemon, type Daemon } from './daemon-process.js';

const SECTOR = 512;

/** Runs `vhost-blk ...args`; resolves with its exit code and output. */
function runCli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const proc = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    proc.stdout.setEncoding('utf8').on('data', (d: string) => { stdout += d; });
    proc.stderr.setEncoding('utf8').on('data', (d: string) => { stderr += d; });
    proc.once('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Resolves with the next config the client's onConfigChange sees, or rejects after `ms`. */
class ConfigChanges {
  readonly seen: Array<{ config: BlkDeviceConfig; previous: BlkDeviceConfig }> = [];
  private waiters: Array<() => void> = [];

  /** The callback to pass as ClientOptions.onConfigChange. */
  readonly onConfigChange = (config: BlkDeviceConfig, previous: BlkDeviceConfig): void => {
    this.seen.push({ config, previous });
    for (const w of this.waiters.splice(0)) w();
  };

  /** Waits until `count` changes have been seen. */
  async waitFor(count: number, ms = 5000): Promise<void> {
    const deadline = Date.now() + ms;
    while (this.seen.length < count) {
      if (Date.now() > deadline) throw new Error(`${this.seen.length} config changes seen within ${ms} ms, expected ${count}`);
      await new Promise<void>((resolve) => { this.waiters.push(resolve); setTimeout(resolve, 50); });
    }
  }
}

/** Asserts a request failed with IOERR (the daemon's answer to I/O outside the disk). */
async function assertIoErr(p: Promise<unknown>, what: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => err instanceof BlkRequestError && err.status === Status.IOERR, what);
}

function makeImage(dir: string, bytes: number): string {
  const image = join(dir, 'disk.raw');
  closeSync(openSync(image, 'w'));
  truncateSync(image, bytes);
  return image;
}

describe('live resize through the control socket', { timeout: 60_000 }, () => {
  const OLD = 16 * MiB;
  const NEW = 24 * MiB;
  let dir: string;
  let image: string;
  let daemon: Daemon;
  let client: VhostUserBlkClient;
  let control: string;
  const changes = new ConfigChanges();

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vblk-resize-'));
    image = makeImage(dir, OLD);
    daemon = await startDaemon(dir, ['--image', image]);
    control = `${daemon.socket}.ctl`;
    client = await connectClient(daemon.socket, { onConfigChange: changes.onConfigChange });
  });

  after(async () => {
    await client?.close();
    if (daemon) assert.equal(await stopDaemon(daemon), 0, `daemon exit code (log:\n${daemon.log.join('')})`);
    rmSync(dir, { recursive: true, force: true });
  });

  test('the control socket is there, mode 0600, and info describes the disk and the frontend', async () => {
    assert.equal(statSync(control).mode & 0o777, 0o600);
    const info = await controlRequest(control, { op: 'info' });
    assert.equal(info.ok, true, JSON.stringify(info));
    assert.equal((info as Record<string, unknown>).sizeBytes, OLD);
    assert.equal((info as Record<string, unknown>).logicalBlockSize, 512);
    assert.equal((info as Record<string, unknown>).frontendConnected, true);
    assert.equal((info as Record<string, unknown>).backendChannel, true, 'the client gave a backend request channel');
    assert.ok((client.protocolFeatures & (1n << BigInt(ProtocolFeature.BACKEND_REQ))) !== 0n, 'BACKEND_REQ negotiated');
  });

  test('before: the last sector works, the old end fails', async () => {
    const last = pattern(SECTOR, 1);
    await client.write(OLD / SECTOR - 1, last);
    assert.deepEqual(await client.read(OLD / SECTOR - 1, SECTOR), last);
    await assertIoErr(client.read(OLD / SECTOR, SECTOR), 'a read at the old end');
  });

  test('refusals: shrinking, not a block multiple, bad sizes, unknown ops, bad JSON', async () => {
    const bad = async (req: object, re: RegExp) => {
      const r = await controlRequest(control, req);
      assert.equal(r.ok, false, `${JSON.stringify(req)} was accepted: ${JSON.stringify(r)}`);
      assert.match((r as { error: string }).error, re);
    };
    await bad({ op: 'resize', size: OLD - MiB }, /shrink/);
    await bad({ op: 'resize', size: OLD + 100 }, /multiple of the 512-byte logical block/);
    await bad({ op: 'resize', size: '24M' }, /positive whole number of bytes/);
    await bad({ op: 'resize', size: -512 }, /positive whole number of bytes/);
    await bad({ op: 'resize' }, /positive whole number of bytes/);
    await bad({ op: 'grow', size: NEW }, /unknown op "grow"/);
    const raw = await rawControlLines(control, ['not json', '[1,2]', '{"op":"info"}']);
    assert.equal(raw.length, 3);
    assert.match(raw[0].ok === false ? raw[0].error : '', /one JSON object per line/);
    assert.match(raw[1].ok === false ? raw[1].error : '', /must be a JSON object/);
    assert.equal(raw[2].ok, true, 'a good request after bad ones on the same connection is answered');
    assert.equal(statSync(image).size, OLD, 'nothing refused touched the image');
    assert.equal(changes.seen.length, 0, 'nothing refused notified the frontend');
  });

  test('resize: the image grows, the frontend is notified and re-reads the new capacity', async () => {
    const r = await controlRequest(control, { op: 'resize', size: NEW });
    assert.equal(r.ok, true, JSON.stringify(r));
    const ok = r as Record<string, unknown>;
    assert.equal(ok.sizeBytes, NEW);
    assert.equal(ok.previousSizeBytes, OLD);
    assert.equal(ok.changed, true);
    assert.equal(ok.frontendNotified, true, 'the frontend acknowledged CONFIG_CHANGE_MSG');
    assert.equal(statSync(image).size, NEW, 'the image file was extended');
    // The ack comes after the callback, and the control answer after the ack: it has run already.
    assert.equal(changes.seen.length, 1);
    assert.equal(changes.seen[0].previous.capacityBytes, OLD);
    assert.equal(changes.seen[0].config.capacityBytes, NEW);
    assert.equal(client.config.capacitySectors, NEW / SECTOR);
    assert.equal((await client.readConfig()).capacityBytes, NEW, 'GET_CONFIG answers the new capacity');
  });

  test('after: reads and writes past the old end work and land in the image; past the new end they fail', async () => {
    const data = pattern(64 * 1024, 2);
    await client.write(OLD / SECTOR, data);
    assert.deepEqual(await client.read(OLD / SECTOR, data.length), data);
    const tail = pattern(4096, 3);
    await client.write(NEW / SECTOR - 8, tail);
    await client.flush();
    assert.deepEqual(readImage(image, OLD, data.length), data);
    assert.deepEqual(readImage(image, NEW - 4096, 4096), tail);
    await assertIoErr(client.read(NEW / SECTOR, SECTOR), 'a read at the new end');
    await assertIoErr(client.read(NEW / SECTOR - 1, 2 * SECTOR), 'a read across the new end');
    await assertIoErr(client.write(NEW / SECTOR, pattern(SECTOR, 4)), 'a write at the new end');
  });

  test('resizing to the current size changes nothing and notifies no one', async () => {
    const r = await controlRequest(control, { op: 'resize', size: NEW });
    assert.equal(r.ok, true, JSON.stringify(r));
    assert.equal((r as Record<string, unknown>).changed, false);
    assert.equal(changes.seen.length, 1);
  });

  test('SIGHUP: a file grown by the operator becomes the disk size', async () => {
    const GROWN = 32 * MiB + 300; // a partial block at the end is not offered
    truncateSync(image, GROWN);
    daemon.proc.kill('SIGHUP');
    await changes.waitFor(2);
    assert.equal(changes.seen[1].config.capacityBytes, 32 * MiB);
    const data = pattern(SECTOR, 5);
    await client.write(32 * MiB / SECTOR - 1, data);
    assert.deepEqual(await client.read(32 * MiB / SECTOR - 1, SECTOR), data);
    await assertIoErr(client.read(32 * MiB / SECTOR, SECTOR), 'a read past the re-read size');
    // A SIGHUP with nothing changed notifies no one.
    daemon.proc.kill('SIGHUP');
    await sleep(300);
    assert.equal(changes.seen.length, 2);
  });

  test('vhost-blk resize: grows with --socket, refuses shrinking and bad sizes with clear messages', async () => {
    const ok = await runCli(['resize', '--socket', daemon.socket, '--size', '40M']);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /disk grown from 33554432 to 41943040 bytes; the frontend was notified/);
    await changes.waitFor(3);
    assert.equal(client.config.capacityBytes, 40 * MiB);
    const shrink = await runCli(['resize', '--control-socket', control, '--size', '8M']);
    assert.equal(shrink.code, 1);
    assert.match(shrink.stderr, /resize refused: .*shrinking is refused/);
    const odd = await runCli(['resize', '--socket', daemon.socket, '--size', '41000000']);
    assert.equal(odd.code, 2);
    assert.match(odd.stderr, /--size must be a positive multiple of 512 bytes/);
    const nobody = await runCli(['resize', '--socket', join(dir, 'nobody'), '--size', '64M']);
    assert.equal(nobody.code, 1);
    assert.match(nobody.stderr, /no daemon answers at .*nobody\.ctl/);
    assert.equal(statSync(image).size, 40 * MiB);
  });
});

describe('resize without a notified frontend', { timeout: 60_000 }, () => {
  let dir: string;

  before(() => { dir = mkdtempSync(join(tmpdir(), 'vblk-resize2-')); });
  after(() => rmSync(dir, { recursive: true, force: true }));

  test('without REPLY_ACK the notice goes without NEED_REPLY and the frontend still re-reads', async () => {
    const image = makeImage(dir, 8 * MiB);
    const daemon = await startDaemon(dir, ['--image', image, '--control-socket', join(dir, 'mgmt')]);
    const changes = new ConfigChanges();
    const client = await connectClient(daemon.socket, {
      onConfigChange: changes.onConfigChange,
      protocolFeatures: [ProtocolFeature.MQ, ProtocolFeature.CONFIG, ProtocolFeature.BACKEND_REQ].reduce((a, b) => a | (1n << BigInt(b)), 0n),
    });
    try {
      const r = await controlRequest(join(dir, 'mgmt'), { op: 'resize', size: 12 * MiB });
      assert.equal(r.ok, true, JSON.stringify(r));
      assert.equal((r as Record<string, unknown>).frontendNotified, true);
      await changes.waitFor(1);
      assert.equal(changes.seen[0].config.capacityBytes, 12 * MiB);
      const data = pattern(4096, 6);
      await client.write(8 * MiB / SECTOR, data);
      assert.deepEqual(await client.read(8 * MiB / SECTOR, 4096), data);
    } finally {
      await client.close();
      assert.equal(await stopDaemon(daemon), 0, daemon.log.join(''));
    }
  });

  test('a frontend that never answers: resize returns after the timeout, and the daemon keeps answering meanwhile', { timeout: 30_000 }, async () => {
    const image = makeImage(dir, 8 * MiB);
    const daemon = await startDaemon(dir, ['--image', image]);
    const control = `${daemon.socket}.ctl`;
    const conn = VhostUserConnection.connect(daemon.socket);
    const [ours, theirs] = socketPair();
    const channel = new UnixConnection(ours);
    try {
      const t = { timeoutMs: 5000 };
      await conn.request(R.GET_FEATURES, undefined, { ...t, expectReply: true });
      await conn.request(R.SET_FEATURES, encodeU64(1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES)), t);
      const proto = [ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG, ProtocolFeature.BACKEND_REQ].reduce((a, b) => a | (1n << BigInt(b)), 0n);
      await conn.request(R.SET_PROTOCOL_FEATURES, encodeU64(proto), t);
      await conn.request(R.SET_BACKEND_REQ_FD, undefined, { ...t, needReply: true, fds: [theirs] });
      const started = Date.now();
      const resize = controlRequest(control, { op: 'resize', size: 16 * MiB });
      // While the daemon waits for our ack, its control thread still serves both sockets.
      await sleep(500);
      const info = await controlRequest(control, { op: 'info' }, 2000);
      assert.equal(info.ok, true);
      assert.equal((info as Record<string, unknown>).sizeBytes, 16 * MiB, 'the config space already has the new size');
      const cfg = await conn.request(R.GET_CONFIG, encodeConfig(0, 8, 0), { ...t, expectReply: true });
      assert.equal(cfg.readBigUInt64LE(12), BigInt(16 * MiB / SECTOR), 'GET_CONFIG answers while the notice waits');
      // The notice itself is on our end of the channel, with NEED_REPLY (REPLY_ACK was negotiated).
      const notice = (await channel.recvExact(HEADER_SIZE))?.data;
      assert.ok(notice, 'the daemon sent a backend request');
      assert.equal(notice.readUInt32LE(0), BackendRequest.CONFIG_CHANGE_MSG);
      assert.equal(notice.readUInt32LE(4), 0x1 | 0x8, 'version 1 with NEED_REPLY');
      assert.equal(notice.readUInt32LE(8), 0, 'no payload');
      const r = await resize;
      assert.equal(r.ok, true, JSON.stringify(r));
      assert.equal((r as Record<string, unknown>).frontendNotified, false, 'an unanswered notice is reported');
      const waited = Date.now() - started;
      assert.ok(waited >= 9000 && waited < 20_000, `resize answered after ${waited} ms (the reply timeout is 10 s)`);
      assert.match(daemon.log.join(''), /CONFIG_CHANGE_MSG failed: no reply within 10000 ms; backend request channel closed/);
    } finally {
      channel.close();
      closeQuietly(theirs);
      conn.close();
      assert.equal(await stopDaemon(daemon), 0, daemon.log.join(''));
    }
  });

  test('SET_BACKEND_REQ_FD is refused without BACKEND_REQ, with a non-socket or a payload; RESET_OWNER drops the channel', async () => {
    const image = makeImage(dir, 8 * MiB);
    const daemon = await startDaemon(dir, ['--image', image]);
    const control = `${daemon.socket}.ctl`;
    const conn = VhostUserConnection.connect(daemon.socket);
    const [ours, theirs] = socketPair();
    const notSocket = eventfd(0);
    try {
      const t = { timeoutMs: 5000 };
      const channelUp = async () => ((await controlRequest(control, { op: 'info' })) as Record<string, unknown>).backendChannel;
      const ack = { ...t, needReply: true };
      await conn.request(R.SET_FEATURES, encodeU64(1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES)), t);
      await conn.request(R.SET_PROTOCOL_FEATURES, encodeU64(1n << BigInt(ProtocolFeature.REPLY_ACK)), t);
      await assert.rejects(conn.request(R.SET_BACKEND_REQ_FD, undefined, { ...ack, fds: [theirs] }), /refused/, 'BACKEND_REQ not negotiated');
      const proto = [ProtocolFeature.REPLY_ACK, ProtocolFeature.BACKEND_REQ].reduce((a, b) => a | (1n << BigInt(b)), 0n);
      await conn.request(R.SET_PROTOCOL_FEATURES, encodeU64(proto), t);
      await assert.rejects(conn.request(R.SET_BACKEND_REQ_FD, undefined, { ...ack, fds: [notSocket] }), /refused/, 'an eventfd is no channel');
      await assert.rejects(conn.request(R.SET_BACKEND_REQ_FD, encodeU64(0n), { ...ack, fds: [theirs] }), /refused/, 'SET_BACKEND_REQ_FD has no payload');
      await assert.rejects(conn.request(R.SET_BACKEND_REQ_FD, undefined, ack), /refused/, 'no fd');
      assert.equal(await channelUp(), false);
      await conn.request(R.SET_BACKEND_REQ_FD, undefined, { ...ack, fds: [theirs] });
      assert.equal(await channelUp(), true);
      await conn.request(R.RESET_OWNER, undefined, ack);
      assert.equal(await channelUp(), false, 'RESET_OWNER closes the channel');
      // The daemon closed its end: ours reads end of stream.
      const channel = new UnixConnection(ours);
      try {
        assert.equal(await channel.recv(16), null);
      } finally {
        channel.close();
      }
    } finally {
      closeQuietly(theirs);
      closeQuietly(notSocket);
      conn.close();
      assert.equal(await stopDaemon(daemon), 0, daemon.log.join(''));
    }
    assert.match(daemon.log.join(''), /refused SET_BACKEND_REQ_FD: VHOST_USER_PROTOCOL_F_BACKEND_REQ was not negotiated/);
    assert.match(daemon.log.join(''), /refused SET_BACKEND_REQ_FD: the file descriptor is not a socket/);
  });

  test('the control socket path: a non-socket or one in use is refused', async () => {
    const image = makeImage(dir, 8 * MiB);
    const file = join(dir, 'a-file');
    writeFileSync(file, 'x');
    const notSocket = await runCli(['serve', '--socket', join(dir, 'v1'), '--image', image, '--control-socket', file]);
    assert.equal(notSocket.code, 2);
    assert.match(notSocket.stderr, /--control-socket: socket path .*a-file exists and is not a socket/);
    const daemon = await startDaemon(dir, ['--image', image]);
    try {
      const inUse = await runCli(['serve', '--socket', join(dir, 'v2'), '--image', image, '--control-socket', `${daemon.socket}.ctl`]);
      assert.equal(inUse.code, 2);
      assert.match(inUse.stderr, /--control-socket: socket path .* is in use by another process/);
      const same = await runCli(['serve', '--socket', join(dir, 'v3'), '--control-socket', join(dir, 'v3')]);
      assert.equal(same.code, 2);
      assert.match(same.stderr, /--control-socket must differ from --socket/);
    } finally {
      assert.equal(await stopDaemon(daemon), 0, daemon.log.join(''));
    }
  });

  test('a null-backend disk grows without an image, with no frontend to tell', async () => {
    const daemon = await startDaemon(dir, ['--backend', 'null', '--size', '1G']);
    try {
      const r = await controlRequest(`${daemon.socket}.ctl`, { op: 'resize', size: 2 * 1024 * MiB });
      assert.equal(r.ok, true, JSON.stringify(r));
      assert.equal((r as Record<string, unknown>).frontendNotified, false);
      assert.match(String((r as Record<string, unknown>).message), /no frontend is connected; the next one sees the new size/);
      const client = await connectClient(daemon.socket);
      try {
        assert.equal(client.config.capacityBytes, 2 * 1024 * MiB, 'a frontend connecting later reads the new size');
      } finally {
        await client.close();
      }
    } finally {
      assert.equal(await stopDaemon(daemon), 0, daemon.log.join(''));
    }
  });
});

describe('vhost-blk resize arguments', () => {
  test('--socket derives the control socket; sizes take suffixes', () => {
    assert.deepEqual(parseResizeArgs(['--socket', '/run/v.sock', '--size', '2G']), { controlSocket: '/run/v.sock.ctl', sizeBytes: 2 * 1024 * MiB });
    assert.deepEqual(parseResizeArgs(['--control-socket', '/run/m', '--size', '512M']), { controlSocket: '/run/m', sizeBytes: 512 * MiB });
    assert.equal(parseResizeArgs(['--help']), 'help');
  });

  test('bad arguments are usage errors naming the problem', () => {
    const bad = (args: string[], re: RegExp) => assert.throws(() => parseResizeArgs(args), (e: unknown) => e instanceof UsageError && re.test(e.message));
    bad(['--size', '1G'], /--socket PATH .* or --control-socket PATH is required/);
    bad(['--socket', 's'], /--size SIZE is required/);
    bad(['--socket', 's', '--control-socket', 'c', '--size', '1G'], /not both/);
    bad(['--socket', 's', '--size', 'big'], /--size must be a size such as 1G/);
    bad(['--socket', 's', '--size', '0'], /positive multiple of 512/);
    bad(['--socket', 's', '--size', '1G', 'extra'], /positional|Unexpected argument/);
  });
});

/** Sends each line on one control connection; resolves with the answers. */
function rawControlLines(path: string, lines: string[]): Promise<ControlReply[]> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(path);
    let got = '';
    socket.setEncoding('utf8');
    socket.on('error', reject);
    socket.on('connect', () => socket.write(lines.map((l) => l + '\n').join('')));
    socket.on('data', (d: string) => {
      got += d;
      const answers = got.split('\n').filter(Boolean);
      if (answers.length === lines.length) {
        socket.end();
        resolve(answers.map((a) => JSON.parse(a) as ControlReply));
      }
    });
  });
}
