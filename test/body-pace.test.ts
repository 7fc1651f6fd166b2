// The pace a request body must keep (api/body-pace.ts), on its own: a byte at least every idleMs and at least
// minBytesPerSecond over each window; time the server holds the client back is not counted.
import t from 'tap';
import { setTimeout as sleep } from 'node:timers/promises';
import { BodyPace } from '../agent/src/api/body-pace';
import type { CloudletError } from '../agent/src/errors';

const LIMITS = { idleMs: 5000, minBytesPerSecond: 1000, windowMs: 300 };

/** Feeds `bytes` every 20 ms for `forMs`; resolves with what the pace said (null: nothing). */
async function feed(pace: BodyPace, said: { error: CloudletError | null }, bytes: number, forMs: number) {
  for (const end = Date.now() + forMs; Date.now() < end && !said.error;) {
    pace.touch(bytes);
    await sleep(20);
  }
  return said.error;
}

t.test('a body that keeps the pace is never cut; one that drips is cut with REQUEST_TIMEOUT saying why', async (t) => {
  const fast = { error: null as CloudletError | null };
  const steady = new BodyPace(LIMITS, (error) => {
    fast.error = error;
  });
  steady.start();
  t.equal(await feed(steady, fast, 100, 1000), null, '5000 bytes/s against a minimum of 1000');
  steady.end();

  const slow = { error: null as CloudletError | null };
  const dripping = new BodyPace(LIMITS, (error) => {
    slow.error = error;
  });
  dripping.start();
  t.match(
    await feed(dripping, slow, 1, 3000),
    { code: 'REQUEST_TIMEOUT', message: /too slowly/, details: { min_bytes_per_s: 1000, window_ms: 300 } },
    'a byte every 20 ms is never idle, but far too slow',
  );
});

t.test('while the server holds the client back the pace is not counted, and a body stalled entirely is cut as idle', async (t) => {
  const said = { error: null as CloudletError | null };
  const pace = new BodyPace({ ...LIMITS, idleMs: 200 }, (error) => {
    said.error = error;
  });
  pace.start();
  pace.pause();
  await sleep(600);
  t.equal(said.error, null, 'paused: neither the window nor the idle timer runs');
  pace.start();
  await sleep(400);
  t.match(said.error, { code: 'REQUEST_TIMEOUT', message: /stalled/, details: { idle_ms: 200 } });
});
