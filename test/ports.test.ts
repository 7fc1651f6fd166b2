// Host ports for forwarding: reserved atomically from the configured range, never handed out twice.
import t from 'tap';
import net from 'node:net';
import { PortAllocator } from '../agent/src/core/ports';

const RANGE = { first: 21600, last: 21609 };

t.test('concurrent reservations get distinct ports from the range', async (t) => {
  const ports = new PortAllocator('127.0.0.1', RANGE);
  const got = await Promise.all(Array.from({ length: 10 }, () => ports.reserve()));
  t.equal(new Set(got).size, 10, 'all distinct');
  t.ok(
    got.every((p) => p >= RANGE.first && p <= RANGE.last),
    'all inside the range',
  );
  await t.rejects(ports.reserve(), { code: 'NO_FREE_PORT', status: 503 }, 'an exhausted range is a clear error');
  ports.release(got[3]!);
  t.equal(await ports.reserve(), got[3], 'a released port can be handed out again');
});

t.test('a port some other program listens on is skipped', async (t) => {
  const squatter = net.createServer();
  await new Promise<void>((resolve) => squatter.listen(RANGE.first, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => squatter.close(() => resolve())));
  const ports = new PortAllocator('127.0.0.1', { first: RANGE.first, last: RANGE.first + 1 });
  t.equal(await ports.reserve(), RANGE.first + 1);
});

t.test('ports of adopted instances are never handed out', async (t) => {
  const ports = new PortAllocator('127.0.0.1', { first: RANGE.first, last: RANGE.first + 1 });
  ports.claim(RANGE.first);
  t.equal(await ports.reserve(), RANGE.first + 1);
  await t.rejects(ports.reserve(), { code: 'NO_FREE_PORT' });
});
