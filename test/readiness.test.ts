// Readiness probes against small servers on loopback: every wait ends by its deadline, however the service paces its
// bytes (an endless dripped body, a check of the VM that never returns), and a readiness timeout asked for by a
// manifest never outlasts the agent's own bound.
import http from 'node:http';
import net from 'node:net';
import t, { type Test } from 'tap';
import { boundedProbe, waitUntilReady } from '../agent/src/core/readiness';

/** A loopback HTTP server answering every request with `answer`; closed at the test's end. */
async function serve(t: Test, answer: (res: http.ServerResponse) => void): Promise<number> {
  const sockets = new Set<net.Socket>();
  const server = http.createServer((_req, res) => answer(res));
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => {
    for (const socket of sockets) socket.destroy();
    return new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return (server.address() as net.AddressInfo).port;
}

/** Resolves with what `wait` settled with, or with 'still waiting' if it had not after `guardMs` (a hang, made a failure). */
function outcome(wait: Promise<void>, guardMs: number): Promise<unknown> {
  let guard: NodeJS.Timeout | undefined;
  return Promise.race([
    wait.then(
      () => 'ready',
      (err: unknown) => err,
    ),
    new Promise((resolve) => {
      guard = setTimeout(() => resolve('still waiting'), guardMs);
    }),
  ]).finally(() => clearTimeout(guard));
}

t.test('a service whose readiness answer drips an endless body fails the wait by its deadline with READINESS_TIMEOUT', async (t) => {
  const drips: NodeJS.Timeout[] = [];
  t.teardown(() => drips.forEach(clearInterval));
  const port = await serve(t, (res) => {
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    drips.push(setInterval(() => res.write('.'), 100));
  });
  const wait = waitUntilReady({ type: 'http', path: '/', timeout_ms: 1500 }, '127.0.0.1', port, { timeoutMs: 1500 });
  t.match(await outcome(wait, 15000), { code: 'READINESS_TIMEOUT' }, 'the attempt in progress is ended by the deadline, not only checked between attempts');
});

t.test('a long answer counts once its first MiB is read; a short one once it ends; an error status never', async (t) => {
  const long = await serve(t, (res) => {
    res.writeHead(200);
    const chunk = Buffer.alloc(64 * 1024, 0x61);
    const pump = () => {
      while (res.write(chunk));
    };
    res.on('drain', pump);
    res.on('close', () => res.off('drain', pump));
    pump();
  });
  t.equal(
    await outcome(waitUntilReady({ type: 'http', path: '/', timeout_ms: 5000 }, '127.0.0.1', long, { timeoutMs: 5000 }), 15000),
    'ready',
    'an endless but fast body: ready after a bounded prefix',
  );
  const short = await serve(t, (res) => res.end('ok\n'));
  t.equal(await outcome(waitUntilReady({ type: 'http', path: '/', timeout_ms: 5000 }, '127.0.0.1', short, { timeoutMs: 5000 }), 15000), 'ready');
  const failing = await serve(t, (res) => {
    res.statusCode = 503;
    res.end('not yet\n');
  });
  t.match(await outcome(waitUntilReady({ type: 'http', path: '/', timeout_ms: 1000 }, '127.0.0.1', failing, { timeoutMs: 1000 }), 15000), {
    code: 'READINESS_TIMEOUT',
  });
});

t.test('the deadline also holds while the caller checks whether the VM is still alive', async (t) => {
  // Nothing listens on the port: each attempt fails at once, and the 20th asks stillAlive, which never answers.
  const closed = await new Promise<number>((resolve) => {
    const probe = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as net.AddressInfo;
      probe.close(() => resolve(port));
    });
  });
  const wait = waitUntilReady({ type: 'tcp', timeout_ms: 1500 }, '127.0.0.1', closed, {
    timeoutMs: 1500,
    intervalMs: 5,
    stillAlive: () => new Promise(() => {}),
  });
  t.match(await outcome(wait, 15000), { code: 'READINESS_TIMEOUT' });
});

t.test('a wait whose first attempt is bounded tighter gets past a first connection that is never answered', async (t) => {
  let connections = 0;
  // The first request is held unanswered (a connection lost while a VM's network settles); later ones are answered.
  const port = await serve(t, (res) => {
    if (++connections > 1) res.end('ok');
  });
  const probe = { type: 'http', path: '/', timeout_ms: 1900 } as const;
  t.equal(await outcome(waitUntilReady(probe, '127.0.0.1', port, { timeoutMs: 1900, firstAttemptMs: 100 }), 15000), 'ready');
  t.ok(connections >= 2, 'it answered a later attempt');
});

t.test("a probe's timeout is bounded by the agent's limit, never raised by it", async (t) => {
  t.same(boundedProbe({ type: 'http', path: '/', timeout_ms: 600000 }, 120000), { type: 'http', path: '/', timeout_ms: 120000 });
  t.same(boundedProbe({ type: 'tcp', timeout_ms: 5000 }, 120000), { type: 'tcp', timeout_ms: 5000 });
});
