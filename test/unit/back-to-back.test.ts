// A frontend that reconnects right after closing is served (the daemon waits for the old session's
// teardown); only one that connects while another is really still connected is turned away.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VhostUserBlkClient } from '../../src/frontend/index.js';
import { MiB, pattern, sleep, startDaemon, stopDaemon } from './daemon-process.js';

const SESSIONS = 100;

test(`${SESSIONS} back-to-back sessions, each one I/O then close, are all served`, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'b2b-'));
  const image = join(dir, 'img');
  writeFileSync(image, Buffer.alloc(4 * MiB));
  const daemon = await startDaemon(dir, ['--image', image]);
  try {
    let served = 0;
    const failures: string[] = [];
    for (let i = 0; i < SESSIONS; i++) {
      try {
        // No retry: the first connect of each round must be served.
        const client = await VhostUserBlkClient.connect(daemon.socket, { requestTimeoutMs: 5000 });
        const data = pattern(4096, i);
        await client.write((i % 64) * 8, data);
        assert.deepEqual(await client.read((i % 64) * 8, 4096), data);
        // Half of them leave without stopping the rings first, as a killed VM does.
        await client.close({ graceful: i % 2 === 0 });
        served++;
      } catch (err) {
        failures.push(`session ${i}: ${(err as Error).message}`);
      }
    }
    assert.equal(served, SESSIONS, `served ${served} of ${SESSIONS}; first failures: ${failures.slice(0, 3).join(' | ')}`);
    assert.doesNotMatch(daemon.log.join(''), /refused/);
  } finally {
    assert.equal(await stopDaemon(daemon), 0);
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a frontend that connects while another one is connected is turned away, and the first keeps its disk', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'b2b-'));
  const daemon = await startDaemon(dir, ['--backend', 'null']);
  try {
    const first = await VhostUserBlkClient.connect(daemon.socket, { requestTimeoutMs: 5000 });
    await assert.rejects(VhostUserBlkClient.connect(daemon.socket, { requestTimeoutMs: 2000 }));
    const refusal = /frontend #2 refused: another frontend is connected and owns the device/;
    for (let i = 0; i < 100 && !refusal.test(daemon.log.join('')); i++) await sleep(20);
    assert.match(daemon.log.join(''), refusal);
    assert.equal((await first.read(0, 4096)).length, 4096);
    await first.close();
  } finally {
    assert.equal(await stopDaemon(daemon), 0);
    rmSync(dir, { recursive: true, force: true });
  }
});
