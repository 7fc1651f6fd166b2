// The warm pool, end to end (docs/warm-pool.md): the real agent, real libvirtd + QEMU (TCG), the test guest. One agent
// serves the file, with a pool of 2 for the demo service and a memory budget for 2 of its VMs (128 MiB each); at most
// 5 VMs run at once (three starts while the pool refills). The subtests run in order.
import t, { type Test } from 'tap';
import { readdir, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Connection, DomainState } from '../native/libvirt';
import { AgentProcess, domainsUnder, fetchText, killQemuOf, testGuestDir } from './support/agent';
import { cli } from './support/cli';
import { MqttWatcher } from './support/listeners';
import { until } from './support/poll';

const SERVICE = 'org.cloudlet.demo.http';
const GUEST_CONTENT = /hello from the cloudlet demo service/;
/** Generous: a restore under TCG on a loaded 2-core machine takes seconds. */
const FILL_MS = 120_000;
const MQTT_ROOT = `cloudlet/warm-pool-test-${process.pid}`;

let agent: AgentProcess;
let configFile: string;
let conn: Connection;

interface Pool {
  size: number;
  target: number;
  ready: number;
  filling: number;
}

t.before(async () => {
  agent = await AgentProcess.start({ portRange: '21700-21799', env: { CLOUDLET_POOL_BUDGET_MIB: '256' } });
  // The pool's size for the demo service comes from the config file (the manifest has none).
  configFile = path.join(agent.dataDir, 'agent.json');
  await writeFile(
    configFile,
    JSON.stringify({ pool: { sizes: { [SERVICE]: 2 } }, mqtt: { topicRoot: MQTT_ROOT, access: 'anonymous-read', metricsIntervalMs: 500 } }),
  );
  await agent.stop();
  await agent.launch({ CLOUDLET_CONFIG: configFile });
  conn = await Connection.open('qemu:///system');
});
t.teardown(async () => {
  await conn?.close();
  await agent.dispose();
});

const poolOf = async (): Promise<Pool> => (await agent.get(`/v1/services/${SERVICE}`)).json.pool;
const listedIds = async (): Promise<string[]> => (await agent.get('/v1/instances')).json.instances.map((i: { id: string }) => i.id);
/** The domains of the agent that are not listed instances: its pooled VMs. */
async function pooledDomains(): Promise<string[]> {
  const listed = new Set(await listedIds());
  return (await domainsUnder(agent.dataDir)).filter((uuid) => !listed.has(uuid)).sort();
}
const poolFull = (size: number) => until(poolOf, (p) => p.ready === size && p.filling === 0, FILL_MS);

async function stopAll(tt: Test): Promise<void> {
  for (const id of await listedIds()) tt.equal((await agent.delete(`/v1/instances/${id}`)).status, 200);
}

t.test('a service with a memory state gets a warm pool of paused VMs that nothing can reach', async (tt) => {
  tt.equal((await agent.post('/v1/services', { path: testGuestDir() })).status, 201);
  tt.same(await poolOf(), { size: 0, target: 0, ready: 0, filling: 0 }, 'no pool without a memory state');
  const capture = await agent.post(`/v1/services/${SERVICE}/state`);
  tt.equal(capture.status, 200, capture.body);
  tt.same(capture.json.pool.size, 2, 'the size from the config file');

  tt.same(await poolFull(2), { size: 2, target: 2, ready: 2, filling: 0 }, 'the pool filled by itself');
  tt.same(await listedIds(), [], 'pooled VMs are not instances');
  const pooled = await pooledDomains();
  tt.equal(pooled.length, 2);
  for (const uuid of pooled) {
    tt.equal((await conn.domainState(uuid)).state, DomainState.Paused, 'restored paused');
    const xml = await conn.domainXml(uuid);
    tt.match(xml, /user,id=cl0,restrict=on'/, 'its user-mode netdev has no forward');
    tt.notMatch(xml, /hostfwd/, 'no port is forwarded to it');
  }
  const services = await agent.get('/v1/services');
  tt.same(services.json.services[0].pool, { size: 2, target: 2, ready: 2, filling: 0 }, 'listed with the services');
  const watcher = await MqttWatcher.connect(`mqtt://127.0.0.1:${agent.mqttPort}`, `${MQTT_ROOT}/services/${SERVICE}`);
  tt.teardown(() => watcher.close());
  const published = await watcher.next((m) => m.json?.pool?.ready === 2);
  tt.same(published.value.json.pool, { size: 2, target: 2, ready: 2, filling: 0 }, "on the service's MQTT topic");
  const listed = await cli(['services', '--cloudlet', `127.0.0.1:${agent.apiPort}`]);
  tt.match(listed.stdout, /^org\.cloudlet\.demo\.http\s+1\s+yes\s+2\/2\s/m, 'in the CLI: 2 of 2 warm');
});

t.test('a start takes a pooled VM, answers through its forward, and the pool refills', async (tt) => {
  const before = await pooledDomains();
  const start = await agent.post('/v1/instances', { service_id: SERVICE });
  tt.equal(start.status, 201, start.body);
  tt.equal(start.json.instance.launch, 'warm-pool');
  tt.ok(before.includes(start.json.instance.id), 'the instance is one of the pooled VMs');
  tt.match(await fetchText(start.json.endpoint.port), GUEST_CONTENT);
  tt.equal((await conn.domainState(start.json.instance.id)).state, DomainState.Running);

  await poolFull(2);
  const after = await pooledDomains();
  tt.equal(after.length, 2, 'refilled to its size');
  tt.notOk(after.includes(start.json.instance.id));
  await stopAll(tt);
});

t.test('two concurrent starts take two pooled VMs; a third falls back to a restore; the budget caps the growth', async (tt) => {
  await poolFull(2);
  const pooled = await pooledDomains();
  const starts = await Promise.all([1, 2, 3].map(() => agent.post('/v1/instances', { service_id: SERVICE })));
  for (const s of starts) tt.equal(s.status, 201, s.body);
  const warm = starts.filter((s) => s.json.instance.launch === 'warm-pool');
  tt.equal(warm.length, 2, 'two starts were handed pooled VMs');
  tt.same(warm.map((s) => s.json.instance.id as string).sort(), pooled, 'the two pooled VMs');
  tt.same(
    starts.filter((s) => s.json.instance.launch !== 'warm-pool').map((s) => s.json.instance.launch),
    ['memory-state'],
    'the third was restored',
  );
  const ports = new Set(starts.map((s) => s.json.endpoint.port));
  tt.equal(ports.size, 3, 'each on its own port');
  for (const s of starts) tt.match(await fetchText(s.json.endpoint.port), GUEST_CONTENT);
  await stopAll(tt);

  // Three starts (four, with the last subtest's) in a minute raise the target above 2; a budget of 256 MiB holds two
  // 128 MiB VMs, and the pool stops there: full at 2, filling nothing.
  const pool = await poolFull(2);
  tt.ok(pool.target >= 3, `the pool wants more than its size (target ${pool.target})`);
  tt.same({ ready: pool.ready, filling: pool.filling }, { ready: 2, filling: 0 }, 'and stops at the budget');
  tt.equal((await pooledDomains()).length, 2);
});

t.test('an agent SIGKILLed with a full pool adopts the pool after its restart instead of filling another', async (tt) => {
  await poolFull(2);
  const pooled = await pooledDomains();
  await agent.kill();
  await agent.launch({ CLOUDLET_CONFIG: configFile });
  const pool = await poolOf();
  tt.equal(pool.ready, 2, 'adopted');
  tt.equal(pool.filling, 0, 'nothing filling: the pool is full');
  tt.same(await pooledDomains(), pooled, 'the same VMs, no others');
  for (const uuid of pooled) tt.equal((await conn.domainState(uuid)).state, DomainState.Paused, 'still paused');

  const start = await agent.post('/v1/instances', { service_id: SERVICE });
  tt.equal(start.status, 201, start.body);
  tt.equal(start.json.instance.launch, 'warm-pool');
  tt.ok(pooled.includes(start.json.instance.id), 'an adopted pooled VM');
  tt.match(await fetchText(start.json.endpoint.port), GUEST_CONTENT);
  await stopAll(tt);
});

t.test('a pooled VM that dies is replaced', async (tt) => {
  await poolFull(2);
  const [victim] = await pooledDomains();
  await killQemuOf(victim!);
  const replaced = await until(pooledDomains, (ids) => ids.length === 2 && !ids.includes(victim!), FILL_MS);
  tt.equal(replaced.length, 2);
  tt.notOk(replaced.includes(victim!), 'the dead VM is gone and another took its place');
  tt.same(await poolFull(2), { size: 2, target: 2, ready: 2, filling: 0 }, 'the replacement is ready');
  tt.notOk((await pooledDomains()).includes(victim!));
  tt.notOk((await readdir(path.join(agent.dataDir, 'instances'))).includes(victim!), 'its files are gone');
});

t.test('a SIGKILL between a pooled VM becoming an instance and getting its forward ends that VM, never pools it again', async (tt) => {
  await poolFull(2);
  const pooled = await pooledDomains();
  // A short readiness bound, so the instance the restart adopts, which never serves, is given up on soon.
  const env = { CLOUDLET_CONFIG: configFile, CLOUDLET_READINESS_TIMEOUT_MS: '3000' };
  await agent.stop();
  await agent.launch({ ...env, CLOUDLET_FAULT_POINT: 'pool:after-assigned-record' });
  await tt.rejects(agent.post('/v1/instances', { service_id: SERVICE }), 'the agent died in the middle of the start');
  await agent.launch(env);
  const adopted = (await agent.get('/v1/instances')).json.instances as Array<{ id: string; state: string; launch: string }>;
  tt.equal(adopted.length, 1, 'the VM is adopted as the instance being started that its record says it is');
  const victim = adopted[0]!.id;
  tt.ok(pooled.includes(victim), 'one of the pooled VMs');
  tt.notMatch(await conn.domainXml(victim), /hostfwd/, 'it never got a forward');
  tt.equal((await poolOf()).ready, 1, 'the other stays pooled');

  tt.same(await until(listedIds, (ids) => ids.length === 0, FILL_MS), [], 'it never serves, so it is ended');
  const refilled = await until(pooledDomains, (ids) => ids.length === 2 && !ids.includes(victim), FILL_MS);
  tt.notOk(refilled.includes(victim), 'and it is not in the pool');
  tt.notOk((await domainsUnder(agent.dataDir)).includes(victim), 'its domain is gone');
  await agent.stop();
  await agent.launch({ CLOUDLET_CONFIG: configFile });
});

t.test('removing a service with a full pool leaves nothing behind', async (tt) => {
  await poolFull(2);
  const removed = await agent.delete(`/v1/services/${SERVICE}`);
  tt.equal(removed.status, 204, removed.body);
  tt.same(await domainsUnder(agent.dataDir), [], 'no domain left');
  tt.same(await readdir(path.join(agent.dataDir, 'instances')), [], 'no instance files left');
  await rm(configFile, { force: true });
});
