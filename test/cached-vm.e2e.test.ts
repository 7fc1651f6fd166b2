// Cached VM, end to end: the real agent process, real libvirtd + QEMU (TCG) guests, real sockets.
// One agent serves the whole file; the subtests run in order and each leaves no instance behind.
import t, { Test } from 'tap';
import { cp, mkdtemp, readdir, rm, writeFile, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { AgentProcess, domainsUnder, fetchText, killQemuOf, testGuestDir } from './support/agent';

const SERVICE = 'org.cloudlet.demo.http';
const GUEST_CONTENT = /hello from the cloudlet demo service/;

let agent: AgentProcess;

t.before(async () => {
  agent = await AgentProcess.start({ portRange: '21000-21099' });
});
t.teardown(async () => {
  await agent.dispose();
});

async function instanceDirs(): Promise<string[]> {
  return readdir(path.join(agent.dataDir, 'instances')).catch(() => []);
}

async function assertNothingLeft(tt: Test, what: string) {
  tt.same(await domainsUnder(agent.dataDir), [], `${what}: no domain left in libvirt`);
  tt.same(await instanceDirs(), [], `${what}: no instance files left`);
  tt.same((await agent.get('/v1/instances')).json.instances, [], `${what}: no instance listed`);
}

t.test('importing a service directory puts it in the catalog', async (tt) => {
  const r = await agent.post('/v1/services', { path: testGuestDir() });
  tt.equal(r.status, 201, r.body);
  tt.equal(r.json.id, SERVICE);
  const list = await agent.get('/api/services');
  tt.same(
    list.json.services.map((s: { service_id: string }) => s.service_id),
    [SERVICE],
  );
});

t.test('a cold-booted instance serves the guest content through its forwarded port, and stop removes it', async (tt) => {
  const start = await agent.get(`/api/servicevm/start?serviceId=${SERVICE}&join=false`);
  tt.equal(start.status, 200, start.body);
  tt.equal(start.json.service_id, SERVICE);
  tt.equal(start.json.ip_address, '127.0.0.1', 'the endpoint is the forward address');
  tt.equal(typeof start.json.port, 'number');
  tt.match(await fetchText(start.json.port), GUEST_CONTENT, 'the guest answers as soon as start returns');

  const shown = await agent.get(`/v1/instances/${start.json._id}`);
  tt.equal(shown.json.state, 'ready');
  tt.equal(shown.json.launch, 'cold-boot');
  const dirs = await instanceDirs();
  tt.same(dirs, [start.json._id], 'the instance has its own directory');

  const stop = await agent.get(`/api/servicevm/stop?instanceId=${start.json._id}`);
  tt.equal(stop.status, 200);
  tt.equal(stop.body, '');
  await assertNothingLeft(tt, 'after stop');
});

t.test('capturing a memory state makes later starts restore it instead of booting', async (tt) => {
  const capture = await agent.post(`/v1/services/${SERVICE}/state`);
  tt.equal(capture.status, 200, capture.body);
  tt.ok(capture.json.manifest.state, 'the service now has a memory state');

  const start = await agent.post('/v1/instances', { service_id: SERVICE });
  tt.equal(start.status, 201, start.body);
  tt.equal(start.json.instance.launch, 'memory-state');
  tt.match(await fetchText(start.json.endpoint.port), GUEST_CONTENT);
  const stop = await agent.delete(`/v1/instances/${start.json.instance.id}`);
  tt.equal(stop.status, 200);
  tt.equal(stop.json.destroyed, true);
  await assertNothingLeft(tt, 'after stop');
});

t.test('two concurrent starts get two instances on distinct ports, both serving', async (tt) => {
  const [a, b] = await Promise.all([
    agent.get(`/api/servicevm/start?serviceId=${SERVICE}&join=false`),
    agent.get(`/api/servicevm/start?serviceId=${SERVICE}&join=false`),
  ]);
  tt.equal(a.status, 200, a.body);
  tt.equal(b.status, 200, b.body);
  tt.not(a.json._id, b.json._id);
  tt.not(a.json.port, b.json.port, 'distinct host ports');
  tt.match(await fetchText(a.json.port), GUEST_CONTENT);
  tt.match(await fetchText(b.json.port), GUEST_CONTENT);
  await agent.get(`/api/servicevm/stop?instanceId=${a.json._id}`);
  tt.match(await fetchText(b.json.port), GUEST_CONTENT, 'stopping one leaves the other serving');
  await agent.get(`/api/servicevm/stop?instanceId=${b.json._id}`);
  await assertNothingLeft(tt, 'after both stops');
});

// The timeout turns the old failure, a hang, into a failed test.
t.test("a burst of restores larger than half the agent's thread pool all become ready", { timeout: 180_000 }, async (tt) => {
  // Each restore's libvirt call holds a pool thread until its memory state is fed, which takes pool threads too: with
  // a pool of 2 and 4 launch slots, 4 restores at once used to wait forever with their domains paused.
  await agent.stop();
  await agent.launch({ UV_THREADPOOL_SIZE: '2', CLOUDLET_MAX_LAUNCHES: '4', CLOUDLET_LAUNCH_QUEUE: '4' });
  try {
    const starts = await Promise.all(Array.from({ length: 4 }, () => agent.post('/v1/instances', { service_id: SERVICE, join: false })));
    for (const start of starts) {
      tt.equal(start.status, 201, start.body);
      tt.equal(start.json.instance.launch, 'memory-state');
      tt.match(await fetchText(start.json.endpoint.port), GUEST_CONTENT);
    }
    for (const start of starts) await agent.delete(`/v1/instances/${start.json.instance.id}`);
    await assertNothingLeft(tt, 'after the burst');
  } finally {
    await agent.stop();
    await agent.launch();
  }
});

t.test('join shares a ready instance of a shareable service until its last user stops it', async (tt) => {
  // Both arrive while no instance exists: one VM is launched and the other request waits for it and joins.
  const [first, second] = await Promise.all([
    agent.get(`/api/servicevm/start?serviceId=${SERVICE}&join=true`),
    agent.get(`/api/servicevm/start?serviceId=${SERVICE}&join=YES`),
  ]);
  tt.equal(first.status, 200, first.body);
  tt.equal(second.json._id, first.json._id, 'the second client joined the first instance');
  tt.equal(second.json.port, first.json.port);
  tt.equal((await agent.get(`/v1/instances/${first.json._id}`)).json.users, 2);

  await agent.get(`/api/servicevm/stop?instanceId=${first.json._id}`);
  tt.equal((await agent.get(`/v1/instances/${first.json._id}`)).json.users, 1, 'one user left');
  tt.match(await fetchText(first.json.port), GUEST_CONTENT, 'still serving the remaining user');
  await agent.get(`/api/servicevm/stop?instanceId=${first.json._id}`);
  await assertNothingLeft(tt, 'after the last user stopped');
});

t.test('an agent killed and restarted keeps its running instance listed, reachable and stoppable', async (tt) => {
  const start = await agent.get(`/api/servicevm/start?serviceId=${SERVICE}`);
  tt.equal(start.status, 200, start.body);
  await agent.kill();
  tt.match(await fetchText(start.json.port), GUEST_CONTENT, 'the VM kept serving while the agent was down');
  await agent.launch();
  const listed = await agent.get('/v1/instances');
  tt.same(
    listed.json.instances.map((i: { id: string }) => i.id),
    [start.json._id],
    'the instance was adopted from libvirt',
  );
  tt.equal(listed.json.instances[0].state, 'ready');
  tt.match(await fetchText(start.json.port), GUEST_CONTENT);
  const stop = await agent.get(`/api/servicevm/stop?instanceId=${start.json._id}`);
  tt.equal(stop.status, 200);
  await assertNothingLeft(tt, 'after stop');
});

t.test('a Service VM killed outside the agent is noticed: its instance, port and clone are released', async (tt) => {
  const start = await agent.get(`/api/servicevm/start?serviceId=${SERVICE}`);
  tt.equal(start.status, 200, start.body);
  await killQemuOf(start.json._id);
  const deadline = Date.now() + 10000;
  while (Date.now() < deadline && (await agent.get('/v1/instances')).json.instances.length > 0) await new Promise((r) => setTimeout(r, 100));
  await assertNothingLeft(tt, 'after the VM died');
});

t.test('a service that never becomes ready fails with READINESS_TIMEOUT and leaves nothing behind', async (tt) => {
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-never-'));
  tt.teardown(() => rm(scratch, { recursive: true, force: true }));
  await cp(testGuestDir(), scratch, { recursive: true });
  const m = JSON.parse(await readFile(path.join(scratch, 'manifest.json'), 'utf8'));
  // busybox httpd answers 404 for this path, so the probe never passes.
  await writeFile(
    path.join(scratch, 'manifest.json'),
    JSON.stringify({ ...m, service_id: 'never.ready', readiness: { type: 'http', path: '/no-such-page', timeout_ms: 6000 } }),
  );
  tt.equal((await agent.post('/v1/services', { path: scratch })).status, 201);
  tt.teardown(() => agent.delete('/v1/services/never.ready'));

  const v1 = await agent.post('/v1/instances', { service_id: 'never.ready' });
  tt.equal(v1.status, 504);
  tt.equal(v1.json.code, 'READINESS_TIMEOUT');
  tt.match(v1.json.message, /did not become ready/);
  await assertNothingLeft(tt, 'after the timeout');
});

t.test('bad requests get the documented errors and leave nothing behind', async (tt) => {
  const unknown = await agent.get('/api/servicevm/start?serviceId=no.such.service');
  tt.equal(unknown.status, 400);
  tt.match(unknown.body, /service vm for no\.such\.service not found/i);
  const missing = await agent.get('/api/servicevm/start');
  tt.equal(missing.status, 400);
  tt.match(missing.body, /must provide service id/i);
  const stopUnknown = await agent.get('/api/servicevm/stop?instanceId=00000000-0000-0000-0000-000000000000');
  tt.equal(stopUnknown.status, 404);
  const v1Unknown = await agent.post('/v1/instances', { service_id: 'no.such.service' });
  tt.equal(v1Unknown.status, 404);
  tt.equal(v1Unknown.json.code, 'SERVICE_NOT_FOUND');
  const v1Malformed = await agent.post('/v1/instances', '{"service_id": ');
  tt.equal(v1Malformed.status, 400);
  tt.equal(v1Malformed.json.code, 'BAD_REQUEST');
  const v1WrongType = await agent.post('/v1/instances', { service_id: 42 });
  tt.equal(v1WrongType.status, 400);
  await assertNothingLeft(tt, 'after bad start requests');
});

t.test('a corrupt manifest or disk is refused at import with a clear error, and nothing is half-imported', async (tt) => {
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-bad-'));
  tt.teardown(() => rm(scratch, { recursive: true, force: true }));
  const cases: Array<[string, (dir: string) => Promise<void>, string]> = [
    ['not JSON', (dir) => writeFile(path.join(dir, 'manifest.json'), '{ "format": 1, '), 'INVALID_MANIFEST'],
    [
      'a bad port',
      async (dir) => {
        const m = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8'));
        await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ ...m, service_id: 'bad.port', port: 70000 }));
      },
      'INVALID_MANIFEST',
    ],
    [
      'a path outside the directory',
      async (dir) => {
        const m = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8'));
        await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ ...m, service_id: 'bad.path', disk: '../../etc/passwd' }));
      },
      'INVALID_MANIFEST',
    ],
    [
      'a corrupt qcow2 disk',
      async (dir) => {
        const m = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8'));
        await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ ...m, service_id: 'bad.disk' }));
        // qcow2 magic and version 3, then garbage where the header's offsets and sizes should be.
        await writeFile(path.join(dir, m.disk), Buffer.concat([Buffer.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]), Buffer.alloc(4096, 0xa5)]));
      },
      'INVALID_IMAGE',
    ],
  ];
  for (const [name, spoil, code] of cases) {
    const dir = path.join(scratch, name.replace(/\W+/g, '-'));
    await cp(testGuestDir(), dir, { recursive: true });
    await spoil(dir);
    const r = await agent.post('/v1/services', { path: dir });
    tt.equal(r.status >= 400 && r.status < 500, true, `${name}: a 4xx (${r.status})`);
    tt.equal(r.json?.code, code, `${name}: ${code}`);
    tt.type(r.json?.message, 'string');
  }
  const services = (await agent.get('/v1/services')).json.services.map((s: { id: string }) => s.id);
  tt.same(services, [SERVICE], 'no refused service appears in the catalog');
  tt.same(await readdir(path.join(agent.dataDir, 'tmp')), [], 'no staging leftovers');
  tt.same((await readdir(path.join(agent.dataDir, 'services'))).sort(), [SERVICE]);
});
