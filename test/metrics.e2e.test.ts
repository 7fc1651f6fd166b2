// GET /metrics, end to end: the real agent, a real Cached VM start of the test guest (QEMU, TCG), a real MQTT client,
// and the exposition read with a Prometheus text-format parser. Who may scrape: the operator and the holder of the
// metrics credential; no one else, a paired device included.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { AgentProcess, adminHeaders, testGuestDir } from './support/agent';
import { connectMqtt } from './support/listeners';
import { as, expectError, NONE, pairDevice } from './support/pairing';

// eslint-disable-next-line @typescript-eslint/no-require-imports
const parsePrometheus = require('parse-prometheus-text-format') as (text: string) => Array<{ name: string; type: string; help: string; metrics: any[] }>;

const SERVICE = 'org.cloudlet.demo.http';
const METRICS_TOKEN = 'metrics-scraper-credential-0123456789';

let agent: AgentProcess;
let scratch: string;

t.before(async () => {
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-metrics-'));
  const tokenFile = path.join(scratch, 'metrics-token');
  await writeFile(tokenFile, `${METRICS_TOKEN}\n`, { mode: 0o600 });
  agent = await AgentProcess.start({ portRange: '21400-21449', env: { CLOUDLET_METRICS_TOKEN_FILE: tokenFile } });
  const imported = await agent.post('/v1/services', { path: testGuestDir() });
  if (imported.status !== 201) throw new Error(`import failed: ${imported.body}`);
});

t.teardown(async () => {
  await agent.dispose();
  await rm(scratch, { recursive: true, force: true });
});

/** One scrape, parsed: the families by name, and the raw text (for labelled histogram series, which the parser merges). */
async function scrape(headers: Record<string, string> = {}) {
  const r = await agent.get('/metrics', headers);
  if (r.status !== 200) throw new Error(`scrape: ${r.status} ${r.body}`);
  const families = new Map(parsePrometheus(r.body).map((family) => [family.name, family]));
  return { families, text: r.body, contentType: r.headers['content-type'] };
}

/** The value of one sample line `name{labels} value` (labels in any order), or 0 when the series does not exist yet. */
function sample(text: string, name: string, labels: Record<string, string> = {}): number {
  for (const line of text.split('\n')) {
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!match || match[1] !== name) continue;
    const have = Object.fromEntries([...(match[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((m) => [m[1], m[2]]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) return Number(match[3]);
  }
  return 0;
}

t.test('without a credential, /metrics answers 401 in the /v1 JSON error shape; a device 403; a wrong token 401', async (tt) => {
  const none = await agent.get('/metrics', NONE);
  expectError(tt, none, 401, 'UNAUTHENTICATED', 'no credential');
  tt.type(none.json.message, 'string', 'with a message');
  tt.match(none.headers['www-authenticate'], /^Bearer/, 'and how to authenticate');
  const device = await pairDevice(agent, 'phone');
  expectError(tt, await agent.get('/metrics', as(device.token)), 403, 'FORBIDDEN', 'a paired device');
  expectError(tt, await agent.get('/metrics', as('not-the-metrics-credential-at-all')), 401, 'UNAUTHENTICATED', 'a wrong token');
});

t.test('the operator and the metrics credential get the Prometheus text format, which parses', async (tt) => {
  const operator = await scrape();
  tt.match(operator.contentType, /^text\/plain; version=0\.0\.4/, 'Prometheus text format');
  const scraper = await scrape(as(METRICS_TOKEN));
  for (const [name, type] of [
    ['cloudlet_instances', 'GAUGE'],
    ['cloudlet_launches_total', 'COUNTER'],
    ['cloudlet_launch_duration_seconds', 'HISTOGRAM'],
    ['cloudlet_launch_readiness_seconds', 'HISTOGRAM'],
    ['cloudlet_uploaded_bytes_total', 'COUNTER'],
    ['cloudlet_synthesized_bytes_total', 'COUNTER'],
    ['cloudlet_http_requests_total', 'COUNTER'],
    ['cloudlet_mqtt_clients', 'GAUGE'],
    ['cloudlet_libvirt_call_duration_seconds', 'HISTOGRAM'],
    ['nodejs_eventloop_lag_seconds', 'GAUGE'],
  ]) {
    tt.equal(scraper.families.get(name!)?.type, type, `${name} is a ${type}`);
    tt.ok(scraper.families.get(name!)?.help, `${name} has its help`);
  }
  tt.ok(
    sample(operator.text, 'cloudlet_libvirt_call_duration_seconds_count', { call: 'isAlive' }) > 0,
    "libvirt calls are timed by function (the agent's liveness checks)",
  );
});

t.test('HTTP requests are counted by route pattern and status, never by raw path', async (tt) => {
  const unknownId = '0f0f0f0f-1111-2222-3333-444444444444';
  tt.equal((await agent.get(`/v1/instances/${unknownId}`)).status, 404);
  tt.equal((await agent.get('/no/such/path/here')).status, 404);
  const { text } = await scrape();
  tt.ok(sample(text, 'cloudlet_http_requests_total', { route: '/v1/instances/:id', method: 'GET', status: '404' }) >= 1, 'under its route pattern');
  tt.ok(sample(text, 'cloudlet_http_requests_total', { route: 'unmatched', method: 'GET', status: '404' }) >= 1, 'a path no route has: unmatched');
  tt.notOk(text.includes(unknownId), 'no raw id in any label');
  tt.notOk(text.includes('/no/such/path'), 'no raw path in any label');
});

t.test('a Cached VM start moves the launch counters and histograms, the instance gauge and the MQTT client gauge', async (tt) => {
  const before = (await scrape()).text;
  const labels = { mechanism: 'cached-vm' };
  const start = await agent.post('/v1/instances', { service_id: SERVICE });
  tt.equal(start.status, 201, start.body);
  const id = start.json.instance.id;
  const mqtt = await connectMqtt(`mqtt://127.0.0.1:${agent.mqttPort}`, { username: 'admin', password: adminHeaders(agent.apiPort).authorization!.slice(7) });
  tt.teardown(async () => {
    await mqtt.endAsync(true);
    await agent.delete(`/v1/instances/${id}`);
  });
  const after = (await scrape()).text;
  const moved = (name: string, l: Record<string, string>) => sample(after, name, l) - sample(before, name, l);
  tt.equal(moved('cloudlet_launches_total', { ...labels, outcome: 'ready' }), 1, 'one more ready launch');
  tt.equal(moved('cloudlet_launch_duration_seconds_count', labels), 1, 'its duration observed');
  tt.ok(moved('cloudlet_launch_duration_seconds_sum', labels) > 0, 'a positive duration');
  tt.equal(moved('cloudlet_launch_readiness_seconds_count', labels), 1, 'its wait for readiness observed');
  tt.equal(sample(after, 'cloudlet_instances', { ...labels, state: 'ready' }), 1, 'one ready Cached VM instance');
  tt.equal(moved('cloudlet_http_requests_total', { route: '/v1/instances', method: 'POST', status: '201' }), 1, 'the start request');
  tt.ok(moved('cloudlet_libvirt_call_duration_seconds_count', { call: 'createDomain' }) >= 1, 'the domain creation timed');
  tt.equal(sample(after, 'cloudlet_mqtt_clients'), 1, 'the MQTT client counted');
});
