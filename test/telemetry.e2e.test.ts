// Telemetry and live events, end to end: the real agent with its embedded aedes broker, real QEMU (TCG) guests,
// real MQTT clients (TCP and WebSocket), a real WebSocket client on /v1/events, and an external aedes broker on
// loopback standing in for a fleet dashboard's. The subtests run in order and each leaves no instance behind.
//
// The reconcile poll is set to a minute here, so a VM killed from outside can only be noticed through libvirt's
// lifecycle events. How fast that is gets measured by `./build.sh bench telemetry`, not asserted here.
import { Aedes } from 'aedes';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { AgentProcess, domainsUnder, freePort, killQemuOf, testGuestDir } from './support/agent';
import { connectMqtt, EventsSocket, MqttWatcher } from './support/listeners';

const SERVICE = 'org.cloudlet.demo.http';
const ROOT_TOPIC = `cloudlet/test-${process.pid}`;

let agent: AgentProcess;
let scratch: string;
let external: { broker: Aedes; server: net.Server; port: number };

async function startExternalBroker(): Promise<typeof external> {
  const broker = await Aedes.createBroker();
  const server = net.createServer((socket) => broker.handle(socket));
  const port = await freePort();
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  return { broker, server, port };
}

t.before(async () => {
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-telemetry-'));
  external = await startExternalBroker();
  const config = path.join(scratch, 'agent.json');
  // Anonymous subscribers: logging in as a paired device is test/mqtt-access.e2e.test.ts's subject.
  await writeFile(config, JSON.stringify({ reconcileIntervalMs: 60000, mqtt: { topicRoot: ROOT_TOPIC, metricsIntervalMs: 500, access: 'anonymous-read' } }));
  agent = await AgentProcess.start({
    portRange: '21200-21299',
    env: { CLOUDLET_CONFIG: config, CLOUDLET_MQTT_URL: `mqtt://127.0.0.1:${external.port}` },
  });
  const imported = await agent.post('/v1/services', { path: testGuestDir() });
  if (imported.status !== 201) throw new Error(`import failed: ${imported.body}`);
});

t.teardown(async () => {
  await agent.dispose();
  await new Promise<void>((resolve) => external.broker.close(() => resolve()));
  await new Promise<void>((resolve) => external.server.close(() => resolve()));
  await rm(scratch, { recursive: true, force: true });
});

const mqttUrl = () => `mqtt://127.0.0.1:${agent.mqttPort}`;
const instanceTopic = (id: string) => `${ROOT_TOPIC}/instances/${id}`;

async function assertReleased(tt: Test, id: string) {
  tt.same(await domainsUnder(agent.dataDir), [], 'no domain left in libvirt');
  tt.same(await readdir(path.join(agent.dataDir, 'instances')), [], 'its clone is deleted');
  tt.same((await agent.get('/v1/instances')).json.instances, [], `instance ${id} is no longer listed`);
}

t.test('a new MQTT subscriber gets the retained status, service and host metrics at once', async (tt) => {
  const watcher = await MqttWatcher.connect(mqttUrl(), `${ROOT_TOPIC}/#`);
  tt.teardown(() => watcher.close());
  const status = await watcher.next((m) => m.topic === `${ROOT_TOPIC}/status`);
  tt.equal(status.value.json.state, 'online');
  tt.equal(status.value.retain, true, 'retained');
  const service = await watcher.next((m) => m.topic === `${ROOT_TOPIC}/services/${SERVICE}`);
  tt.match(service.value.json, { id: SERVICE, instances: 0 });
  const metrics = await watcher.next((m) => m.topic === `${ROOT_TOPIC}/metrics`);
  tt.type(metrics.value.json.memory_free_bytes, 'number');
  tt.type(metrics.value.json.cpu_usage_percent, 'number');
});

t.test('a start is seen on MQTT and on /v1/events; a later subscriber gets the ready state retained', async (tt) => {
  const watcher = await MqttWatcher.connect(mqttUrl(), `${ROOT_TOPIC}/instances/#`);
  const events = await EventsSocket.connect(agent.apiPort);
  tt.teardown(async () => {
    await watcher.close();
    await events.close();
  });
  tt.same((await events.next((e) => e.type === 'snapshot')).value.instances, [], 'the stream opens with a snapshot');

  const start = await agent.post('/v1/instances', { service_id: SERVICE });
  tt.equal(start.status, 201, start.body);
  const id = start.json.instance.id;

  const states = ['starting', 'ready'];
  for (const state of states) {
    tt.match(
      (await watcher.next((m) => m.topic === instanceTopic(id) && m.json?.state === state)).value.json,
      { id, service_id: SERVICE, state, mechanism: 'cached-vm' },
      `MQTT: ${state}`,
    );
    tt.ok(await events.next((e) => e.type === 'instance' && e.instance.id === id && e.state === state), `WebSocket: ${state}`);
  }
  const phases = events.inbox.items.filter((i) => i.value.type === 'progress' && i.value.instance_id === id).map((i) => i.value.phase);
  tt.same([...new Set(phases)], ['cloning', 'booting', 'waiting-ready', 'ready'], 'launch progress phases in order');
  tt.ok(
    watcher.inbox.items.some((i) => i.value.topic === `${instanceTopic(id)}/progress`),
    'progress is on MQTT too',
  );

  const late = await MqttWatcher.connect(mqttUrl(), `${ROOT_TOPIC}/instances/+`);
  tt.teardown(() => late.close());
  const retained = await late.next((m) => m.topic === instanceTopic(id));
  tt.match(retained.value, { retain: true, json: { state: 'ready', host_port: start.json.instance.host_port } });

  const stop = await agent.delete(`/v1/instances/${id}`);
  tt.equal(stop.status, 200);
  tt.ok(await events.next((e) => e.type === 'instance' && e.instance.id === id && e.state === 'stopping'), 'WebSocket: stopping');
  tt.match((await events.next((e) => e.type === 'instance' && e.instance.id === id && e.state === 'stopped')).value, { reason: 'requested' });
  tt.match((await watcher.next((m) => m.topic === instanceTopic(id) && m.json?.state === 'stopped')).value.json, { reason: 'requested' });
  tt.ok(await watcher.next((m) => m.topic === instanceTopic(id) && m.json === null), 'the retained topic is cleared');
  await assertReleased(tt, id);

  // The retained status comes after any retained instance (same SUBSCRIBE, topics in order): once it is here, the
  // ended instance would have been too, had its topic not been cleared as retained.
  const dashboard = await MqttWatcher.connect(mqttUrl(), [`${ROOT_TOPIC}/instances/+`, `${ROOT_TOPIC}/status`]);
  tt.teardown(() => dashboard.close());
  await dashboard.next((m) => m.topic === `${ROOT_TOPIC}/status`);
  tt.notOk(
    dashboard.inbox.items.some((i) => i.value.topic === instanceTopic(id)),
    'a dashboard connecting after the stop does not see the ended instance',
  );
});

t.test('a Service VM killed outside the agent shows up as crashed on MQTT and WebSocket, and is released', async (tt) => {
  const start = await agent.post('/v1/instances', { service_id: SERVICE });
  tt.equal(start.status, 201, start.body);
  const id = start.json.instance.id;
  const watcher = await MqttWatcher.connect(mqttUrl(), `${ROOT_TOPIC}/instances/+`);
  const events = await EventsSocket.connect(agent.apiPort);
  tt.teardown(async () => {
    await watcher.close();
    await events.close();
  });

  await killQemuOf(id);
  tt.match(
    (await watcher.next((m) => m.topic === instanceTopic(id) && m.json?.state === 'crashed', 10000)).value.json,
    { id, state: 'crashed', reason: 'failed' },
    'MQTT: crashed (QEMU failed)',
  );
  tt.match(
    (await events.next((e) => e.type === 'instance' && e.state === 'crashed', 10000)).value,
    { reason: 'failed', instance: { id } },
    'WebSocket: crashed',
  );
  tt.ok(await watcher.next((m) => m.topic === instanceTopic(id) && m.json === null), 'the retained topic is cleared');
  await assertReleased(tt, id);
  const again = await agent.post('/v1/instances', { service_id: SERVICE });
  tt.equal(again.status, 201, 'the released port range serves the next start');
  await agent.delete(`/v1/instances/${again.json.instance.id}`);
});

t.test('clients only read: a publish anywhere is refused and its client disconnected; nobody sees it', async (tt) => {
  const watcher = await MqttWatcher.connect(mqttUrl(), '#');
  tt.teardown(() => watcher.close());
  const publishAs = async (topic: string, payload: string) => {
    const intruder = await connectMqtt(mqttUrl());
    const closed = new Promise<void>((resolve) => intruder.once('close', () => resolve()));
    intruder.publish(topic, payload, { retain: true });
    await closed;
    await intruder.endAsync(true);
  };
  await publishAs('phones/hello', '{"from":"a phone"}');
  tt.pass("a client publishing outside the agent's tree was disconnected");
  await publishAs(`${ROOT_TOPIC}/status`, JSON.stringify({ state: 'offline' }));
  tt.pass("a client publishing into the agent's tree was disconnected");

  const fresh = await MqttWatcher.connect(mqttUrl(), `${ROOT_TOPIC}/status`);
  tt.teardown(() => fresh.close());
  tt.equal((await fresh.next(() => true)).value.json.state, 'online', 'the retained status was not overwritten');
  tt.notOk(
    watcher.inbox.items.some((i) => i.value.topic === 'phones/hello'),
    "nobody saw the phone's message",
  );
  tt.notOk(
    watcher.inbox.items.some((i) => i.value.topic === `${ROOT_TOPIC}/status` && i.value.json?.state === 'offline'),
    'nobody saw the fake',
  );
});

t.test('MQTT over WebSocket on the API port serves the same tree', async (tt) => {
  const watcher = await MqttWatcher.connect(`ws://127.0.0.1:${agent.apiPort}/mqtt`, `${ROOT_TOPIC}/status`);
  tt.teardown(() => watcher.close());
  tt.equal((await watcher.next(() => true)).value.json.state, 'online');
});

t.test('the external broker gets the tree, and the last will says offline when the agent dies', async (tt) => {
  const watcher = await MqttWatcher.connect(`mqtt://127.0.0.1:${external.port}`, `${ROOT_TOPIC}/#`);
  tt.teardown(() => watcher.close());
  tt.equal((await watcher.next((m) => m.topic === `${ROOT_TOPIC}/status`)).value.json.state, 'online', 'birth: online');
  tt.ok(await watcher.next((m) => m.topic === `${ROOT_TOPIC}/services/${SERVICE}`), 'the service is mirrored');
  // Home Assistant usually has its own broker: the discovery configs (default prefix) are mirrored there too.
  const homeAssistant = await MqttWatcher.connect(`mqtt://127.0.0.1:${external.port}`, 'homeassistant/#');
  tt.teardown(() => homeAssistant.close());
  const online = await homeAssistant.next((m) => m.topic === `homeassistant/binary_sensor/${ROOT_TOPIC.replace(/[^a-z0-9_]/g, '_')}/online/config`);
  tt.match(online.value, { retain: true, json: { state_topic: `${ROOT_TOPIC}/status` } }, "Home Assistant's config topics are mirrored");
  const from = watcher.inbox.items.length;
  await agent.kill();
  tt.equal(
    (await watcher.next((m) => m.topic === `${ROOT_TOPIC}/status` && m.json?.state === 'offline', 10000, from)).value.json.state,
    'offline',
    'last will: offline',
  );
  await agent.launch();
});

// An agent whose MQTT port is taken: test/optional-parts.e2e.test.ts.
