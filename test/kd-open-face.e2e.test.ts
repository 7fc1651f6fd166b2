// The open (plain) KD-Cloudlet face, end to end: the real agent and a real QEMU (TCG) guest, anonymous clients on
// distinct loopback addresses (127.0.0.2, 127.0.0.3, ...: one address each, as phones on the Wi-Fi). What anyone on the
// network may start is bounded per address and in all; what the operator started is never stopped from the open face;
// a full launch queue is KD's 503 with Retry-After; the service list, kept serialized, follows every change at once.
// Forward ports 23370-23389.
import { cp, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { AgentProcess, domainsUnder, testGuestDir, type HttpResult } from './support/agent';
import { until } from './support/poll';

const SERVICE = 'org.cloudlet.demo.http';
/** KD's (WebOb's) text/plain error body for a 503. */
const KD_503 = /^503 Service Unavailable\n\nThe server is currently unavailable\. Please try again at a later time\.\n\n 503 Service Unavailable - .+ {2}$/;

let agent: AgentProcess;

t.before(async () => {
  agent = await AgentProcess.start({
    portRange: '23370-23389',
    env: { CLOUDLET_KD_INSTANCES_PER_ADDRESS: '1', CLOUDLET_KD_INSTANCES: '2', CLOUDLET_MAX_LAUNCHES: '1', CLOUDLET_LAUNCH_QUEUE: '0' },
  });
  const imported = await agent.post('/v1/services', { path: testGuestDir() });
  if (imported.status !== 201) throw new Error(`import failed: ${imported.body}`);
});
t.teardown(() => agent?.dispose());

/** A GET from an anonymous client at loopback address `from` (no credential). */
function kd(from: string, urlPath: string): Promise<HttpResult> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port: agent.apiPort, path: urlPath, localAddress: from, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const body = Buffer.concat(chunks).toString();
        let json: unknown;
        try {
          json = JSON.parse(body);
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body, json });
      });
    });
    req.on('error', reject);
  });
}

const start = (from: string, join: boolean) => kd(from, `/api/servicevm/start?serviceId=${SERVICE}&join=${join}`);
const stop = (from: string, id: string) => kd(from, `/api/servicevm/stop?instanceId=${id}`);
const uses = async (id: string) => (await agent.get(`/v1/instances/${id}`)).json?.users as number | undefined;

t.test("anonymous starts are bounded per address and in all; over either bound, KD's text with status 503", async (tt) => {
  const first = await start('127.0.0.2', false);
  tt.equal(first.status, 200, first.body);
  const id = first.json._id as string;

  const again = await start('127.0.0.2', true);
  tt.equal(again.status, 503, 'a second use from the same address (limits.anonymousInstancesPerAddress = 1)');
  tt.match(again.body, KD_503, "in KD's own form");
  tt.match(again.body, /this address already holds 1 instance/);

  const other = await start('127.0.0.3', true);
  tt.equal(other.status, 200, 'another address may (it joins the shareable instance)');
  tt.equal(other.json._id, id);

  const third = await start('127.0.0.4', true);
  tt.equal(third.status, 503, 'a third anonymous use in all (limits.anonymousInstances = 2)');
  tt.match(third.body, KD_503);
  tt.equal(await uses(id), 2, 'refused starts added no use');

  tt.equal((await stop('127.0.0.2', id)).status, 200);
  tt.equal((await start('127.0.0.4', true)).status, 200, 'a released use makes room');
  tt.equal((await stop('127.0.0.3', id)).status, 200);
  tt.equal((await stop('127.0.0.4', id)).status, 200);
  await until(
    () => domainsUnder(agent.dataDir),
    (d) => d.length === 0,
  );
  tt.same(await domainsUnder(agent.dataDir), [], 'the last anonymous stop ended the VM');
});

t.test('an instance the operator started is never stopped nor released from the open face', async (tt) => {
  const started = await agent.post('/v1/instances', { service_id: SERVICE, join: false });
  tt.equal(started.status, 201, started.body);
  const id = started.json.instance.id as string;
  const unknown = `404 Not Found - service vm for ${id} not found`;

  const direct = await stop('127.0.0.2', id);
  tt.equal(direct.status, 404, "an anonymous stop of the operator's instance");
  tt.match(direct.body, unknown, "to it the instance does not exist (KD's usual text)");
  tt.equal(await uses(id), 1, "the VM still runs with the operator's use");

  const joined = await start('127.0.0.2', true);
  tt.equal(joined.json._id, id, 'an anonymous client joins it');
  tt.equal((await stop('127.0.0.2', id)).status, 200, 'and releases its own use');
  const twice = await stop('127.0.0.2', id);
  tt.equal(twice.status, 404, 'a second stop finds no use an anonymous client may release');
  tt.match(twice.body, unknown);
  tt.equal(await uses(id), 1, "the operator's use is kept");
  tt.equal((await agent.delete(`/v1/instances/${id}`)).json.destroyed, true, 'the operator stops it');
  tt.same(await domainsUnder(agent.dataDir), []);
});

t.test('a start refused by a full launch queue (BUSY) reaches a KD client as 503 with Retry-After, not 500', async (tt) => {
  // One launch at a time and no queue: while the operator's launch runs, any other start is refused at once.
  const running = agent.post('/v1/instances', { service_id: SERVICE, join: false });
  await until(
    () => agent.get('/v1/instances'),
    (r) => r.json.instances.some((i: { state: string }) => i.state === 'starting'),
  );
  const busy = await start('127.0.0.2', false);
  tt.equal(busy.status, 503, busy.body);
  tt.match(busy.body, KD_503);
  tt.match(busy.headers['retry-after'], /^\d+$/, 'Retry-After says when to come back');
  const operators = await running;
  tt.equal(operators.status, 201, 'the running launch was not disturbed');
  tt.equal((await agent.get('/v1/instances')).json.instances.length, 1, 'the refused start left nothing behind');
  await agent.delete(`/v1/instances/${operators.json.instance.id}`);
  tt.same(await domainsUnder(agent.dataDir), []);
});

t.test('the service list every client polls shows an import and a removal at once (its kept bytes are never stale)', async (tt) => {
  const listed = async () => ((await kd('127.0.0.2', '/api/services')).json.services as { _id: string }[]).map((s) => s._id);
  tt.same(await listed(), [SERVICE]);
  tt.same(await listed(), [SERVICE], 'the same list asked again');
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-kd-list-'));
  tt.teardown(() => rm(scratch, { recursive: true, force: true }));
  const copy = path.join(scratch, 'copy');
  await cp(testGuestDir(), copy, { recursive: true });
  const manifest = JSON.parse(await readFile(path.join(copy, 'manifest.json'), 'utf8'));
  await writeFile(path.join(copy, 'manifest.json'), JSON.stringify({ ...manifest, service_id: 'org.cloudlet.demo.copy' }));
  tt.equal((await agent.post('/v1/services', { path: copy })).status, 201);
  tt.same(await listed(), ['org.cloudlet.demo.copy', SERVICE], 'the import, in the very next answer');
  tt.equal((await agent.delete('/v1/services/org.cloudlet.demo.copy')).status, 204);
  tt.same(await listed(), [SERVICE], 'the removal, in the very next answer');
});
