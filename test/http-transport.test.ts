/**
 * The HTTP server's connections over a real uWS server, against an in-test CloudletApi (test/support/http-fixture.ts):
 * the /v1/events WebSocket, listening and closing, clients that abort mid-request, and lookups that must stay 404.
 */
import http from 'node:http';
import t from 'tap';
import { startHttpServer } from '../agent/src/api/http-server';
import type { Instance } from '../agent/src/core/types';
import { CloudletError } from '../agent/src/errors';
import { ECHO, FakeServer, OPERATOR, expectStatus, json, until, type FakeCloudlet } from './support/http-fixture';
import { EventsSocket } from './support/listeners';

const fake = new FakeServer();
const { cloudlet, logLines } = fake;
t.before(() => fake.start());
t.teardown(() => fake.server.close());
const send = fake.send.bind(fake);

t.test('/v1/events WebSocket', async (t) => {
  const instance: Instance = {
    id: '3f0c1c52-8a0e-4a59-9a57-0c7e52f3f1a4',
    serviceId: ECHO,
    mechanism: 'cached-vm',
    state: 'starting',
    bindAddress: '0.0.0.0',
    hostPort: 20001,
    guestPort: 10000,
    shareable: false,
    users: 1,
    owners: [],
    launch: 'cold-boot',
    createdAt: '2026-01-02T03:04:05.000Z',
    readyAt: null,
  };

  t.test('opens with a snapshot of the instances, then sends each event as one JSON message', async (t) => {
    const events = await EventsSocket.connect(fake.server.port);
    t.teardown(() => events.close());
    t.same((await events.next(() => true)).value, { type: 'snapshot', instances: [] });
    cloudlet.events.emit({
      type: 'progress',
      instanceId: instance.id,
      serviceId: ECHO,
      phase: 'restoring',
      percent: 40,
      bytes: { done: 5, total: 10 },
      at: 'T1',
    });
    cloudlet.events.emit({ type: 'instance', state: 'crashed', reason: 'failed', instance: { ...instance, state: 'ready' }, at: 'T2' });
    t.same((await events.next((e) => e.type === 'progress')).value, {
      type: 'progress',
      instance_id: instance.id,
      service_id: ECHO,
      phase: 'restoring',
      percent: 40,
      bytes_done: 5,
      bytes_total: 10,
      at: 'T1',
    });
    const crashed = (await events.next((e) => e.type === 'instance')).value;
    t.match(crashed, {
      type: 'instance',
      state: 'crashed',
      reason: 'failed',
      at: 'T2',
      instance: { id: instance.id, service_id: ECHO, host_port: 20001, state: 'crashed' },
    });
  });

  t.test('a client that stops reading is closed (1013) instead of having events queued for it without bound', async (t) => {
    const events = await EventsSocket.connect(fake.server.port);
    const closed = new Promise<number>((resolve) => events.socket.once('close', (code) => resolve(code)));
    const socket = (events.socket as unknown as { _socket: import('node:net').Socket })._socket;
    socket.pause();
    const big = { ...instance, serviceId: 'x'.repeat(4000) };
    let sentBytes = 0;
    // Far more than the kernel's socket buffers and the 256 KiB limit together.
    while (sentBytes < 64 * 1024 * 1024 && !logLines.some((line) => line.includes('does not keep up'))) {
      for (let i = 0; i < 200; i++) cloudlet.events.emit({ type: 'instance', state: 'ready', instance: big, at: 'T' });
      sentBytes += 200 * 4200;
      await new Promise((resolve) => setImmediate(resolve));
    }
    socket.resume();
    t.equal(await closed, 1013, 'closed with "try again later"');
    t.ok(sentBytes < 64 * 1024 * 1024, 'the server gave up on the client before the test did');
  });
});

t.test('a port already in use rejects the start and close() is idempotent', async (t) => {
  await t.rejects(startHttpServer({ api: cloudlet, gate: OPERATOR, host: '127.0.0.1', port: fake.server.port }), {
    code: 'INTERNAL',
    message: /Cannot listen/,
  });
  const other = await startHttpServer({ api: cloudlet, gate: OPERATOR, host: '127.0.0.1', port: 0 });
  t.not(other.port, fake.server.port);
  await other.close();
  await other.close();
});

t.test('a client that aborts never crashes the server', async (t) => {
  t.test('during a slow start: the start completes, nothing is written, the next request works', async (t) => {
    for (const [method, path, body] of [
      ['GET', `/api/servicevm/start?serviceId=${ECHO}`, undefined],
      ['POST', '/v1/instances', JSON.stringify({ service_id: ECHO })],
    ] as const) {
      let releaseStart!: () => void;
      cloudlet.startGate = new Promise((resolve) => (releaseStart = resolve));
      const startsBefore = cloudlet.startsCompleted;
      const requestsBefore = cloudlet.startRequests.length;

      const req = http.request({ host: '127.0.0.1', port: fake.server.port, method, path, agent: false });
      const closed = new Promise((resolve) => req.on('close', resolve));
      req.on('error', () => {});
      req.end(body);
      await until(() => cloudlet.startRequests.length > requestsBefore);
      req.destroy();
      await closed;
      // Client and server share this event loop: give the server a moment to see the disconnect before the VM is up.
      await new Promise((resolve) => setTimeout(resolve, 50));

      cloudlet.startGate = undefined;
      releaseStart();
      await until(() => cloudlet.startsCompleted > startsBefore);
      await until(() => logLines.some((line) => line.startsWith(`${method} ${path} aborted`)));
      t.pass(`${method} ${path}: the start completed and its reply was dropped`);
      json(t, await send('GET', '/api/services'), 200);
    }
  });

  t.test('while sending a body', async (t) => {
    const headers = { 'Content-Length': '100' };
    const req = http.request({ host: '127.0.0.1', port: fake.server.port, method: 'POST', path: '/v1/services', agent: false, headers });
    req.on('error', () => {});
    req.write('{"path": "/srv/');
    await new Promise((resolve) => setTimeout(resolve, 50));
    req.destroy();
    await until(() => logLines.some((line) => line.startsWith('POST /v1/services aborted')));
    json(t, await send('GET', '/v1/health'), 200);
  });

  t.test('while its upload waits for a route that has not started reading the body', async (t) => {
    let release!: () => void;
    const busy = new Promise<void>((resolve) => (release = resolve));
    let called = false;
    cloudlet.importPackage = async () => {
      called = true;
      await busy;
      throw new CloudletError('INVALID_PACKAGE', 'refused after a while');
    };
    t.teardown(() => {
      delete (cloudlet as Partial<FakeCloudlet>).importPackage;
    });
    const headers = { 'Content-Length': '1000', 'Content-Type': 'application/gzip' };
    const req = http.request({ host: '127.0.0.1', port: fake.server.port, method: 'POST', path: '/v1/packages', agent: false, headers });
    req.on('error', () => {});
    req.write('x'.repeat(10));
    await until(() => called);
    req.destroy();
    // The abort reaches the server while nothing listens on the body stream yet: it must not be an unhandled 'error'.
    await new Promise((resolve) => setTimeout(resolve, 50));
    release();
    await until(() => logLines.some((line) => line.startsWith('POST /v1/packages aborted')));
    json(t, await send('GET', '/v1/health'), 200);
  });
});

t.test('page assets are looked up by their own names: /ui/toString is 404, not a 500 for a missing file', async (t) => {
  for (const name of ['toString', 'constructor', '__proto__', 'hasOwnProperty']) expectStatus(t, await send('GET', `/ui/${name}`), 404);
});
