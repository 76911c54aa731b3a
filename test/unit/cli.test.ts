// The serve command refuses bad options with a clear message before it opens the socket.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const BIN = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'bin', 'vhost-blk');

function serve(args: string[]): { status: number | null; stderr: string; stdout: string } {
  const r = spawnSync(BIN, ['serve', ...args], { encoding: 'utf8', timeout: 20_000 });
  return { status: r.status, stderr: r.stderr, stdout: r.stdout };
}

const dir = mkdtempSync(join(tmpdir(), 'cli-'));
const sock = join(dir, 's');
const image = join(dir, 'img');
writeFileSync(image, Buffer.alloc(1 << 20));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));

const cases: Array<[string, string[], RegExp]> = [
  ['no socket', ['--image', image], /--socket PATH is required/],
  ['missing image', ['--socket', sock, '--image', join(dir, 'nope')], /image not found: .*nope/],
  ['zero queues', ['--socket', sock, '--image', image, '--num-queues', '0'], /--num-queues must be between 1 and 64, got 0/],
  ['queue size not a power of two', ['--socket', sock, '--image', image, '--queue-size', '100'], /--queue-size must be a power of two, got 100/],
  ['queue size not a number', ['--socket', sock, '--image', image, '--queue-size', 'lots'], /--queue-size must be a whole number, got 'lots'/],
  ['unknown option', ['--socket', sock, '--image', image, '--frobnicate'], /Unknown option '--frobnicate'/],
  ['bad log level', ['--socket', sock, '--image', image, '--log-level', 'loud'], /--log-level must be one of debug, info, warn, error/],
  ['bad writeback', ['--socket', sock, '--image', image, '--writeback', 'maybe'], /--writeback must be 'on' or 'off'/],
  ['serial too long', ['--socket', sock, '--image', image, '--serial', 'x'.repeat(21)], /--serial is at most 20 bytes, got 21/],
  ['bad backend', ['--socket', sock, '--backend', 'tape'], /--backend must be 'file' or 'null', got 'tape'/],
  ['image smaller than a block', ['--socket', sock, '--image', join(dir, 'tiny')], /smaller than one 512-byte block/],
  ['bad socket mode', ['--socket', sock, '--image', image, '--socket-mode', '999'], /--socket-mode must be an octal mode/],
  ['poll time too long', ['--socket', sock, '--image', image, '--poll-us', '5000'], /--poll-us must be between 0 and 1000, got 5000/],
];

for (const [name, args, message] of cases) {
  test(`serve refuses: ${name}`, () => {
    if (name === 'image smaller than a block') writeFileSync(join(dir, 'tiny'), Buffer.alloc(100));
    const r = serve(args);
    assert.equal(r.status, 2, `exit status (stderr: ${r.stderr})`);
    assert.match(r.stderr, message);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace for a usage error');
    assert.equal(existsSync(sock), false, 'the socket was never created');
  });
}

test('serve refuses a socket path that holds a regular file, and leaves the file alone', () => {
  const path = join(dir, 'precious');
  writeFileSync(path, 'keep me');
  const r = serve(['--socket', path, '--image', image]);
  assert.equal(r.status, 2);
  assert.match(r.stderr, /exists and is not a socket; refusing to replace it/);
  assert.equal(readFileSync(path, 'utf8'), 'keep me');
});

test('serve --help documents every option', () => {
  const r = spawnSync(BIN, ['serve', '--help'], { encoding: 'utf8', timeout: 20_000 });
  assert.equal(r.status, 0);
  for (const opt of ['--socket', '--image', '--backend', '--size', '--direct', '--readonly', '--num-queues', '--queue-size',
    '--threads', '--writeback', '--serial', '--logical-block-size', '--physical-block-size', '--socket-mode', '--log-level', '--poll-us']) {
    assert.match(r.stdout, new RegExp(`^\\s+${opt}\\b`, 'm'), `${opt} is documented`);
  }
});
