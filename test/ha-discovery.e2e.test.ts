// Home Assistant MQTT discovery, end to end: the real agent with its embedded broker, a real Cached VM start of the
// test guest (QEMU, TCG), and a real MQTT client reading the retained config topics as Home Assistant does. Each
// config is checked against the keys and types HA's MQTT discovery documents, and each state topic a config names is
// read to see that the entity's value template finds its field there.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { AgentProcess, testGuestDir } from './support/agent';
import { MqttWatcher, type MqttMessage } from './support/listeners';

const SERVICE = 'org.cloudlet.demo.http';
const ROOT = `cloudlet/ha-test-${process.pid}`;
const PREFIX = `ha-test-${process.pid}`;
const NODE = ROOT.replace(/[^a-z0-9_]/g, '_');

/** The sensor and binary_sensor keys the agent may use, as HA documents them, with their JSON types. */
const DOCUMENTED: Record<string, string> = {
  name: 'string',
  unique_id: 'string',
  object_id: 'string',
  default_entity_id: 'string',
  device: 'object',
  origin: 'object',
  state_topic: 'string',
  value_template: 'string',
  availability_topic: 'string',
  availability_template: 'string',
  payload_available: 'string',
  payload_not_available: 'string',
  payload_on: 'string',
  payload_off: 'string',
  device_class: 'string',
  unit_of_measurement: 'string',
  state_class: 'string',
  entity_category: 'string',
  icon: 'string',
  json_attributes_topic: 'string',
};
/** HA's device classes (the ones a cloudlet could use) and state classes. */
const BINARY_SENSOR_CLASSES = ['connectivity', 'running', 'problem'];
const SENSOR_CLASSES = ['data_size', 'timestamp', 'duration'];
const STATE_CLASSES = ['measurement', 'total', 'total_increasing'];

let agent: AgentProcess;
let scratch: string;

t.before(async () => {
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-ha-'));
  const config = path.join(scratch, 'agent.json');
  // The discovery prefix from the config file; anonymous subscribers (MQTT logins are mqtt-access's subject).
  await writeFile(config, JSON.stringify({ mqtt: { topicRoot: ROOT, discoveryPrefix: PREFIX, metricsIntervalMs: 500, access: 'anonymous-read' } }));
  agent = await AgentProcess.start({ portRange: '21450-21499', env: { CLOUDLET_CONFIG: config } });
  const imported = await agent.post('/v1/services', { path: testGuestDir() });
  if (imported.status !== 201) throw new Error(`import failed: ${imported.body}`);
});

t.teardown(async () => {
  await agent.dispose();
  await rm(scratch, { recursive: true, force: true });
});

const mqttUrl = () => `mqtt://127.0.0.1:${agent.mqttPort}`;
const configTopic = (component: string, objectId: string) => `${PREFIX}/${component}/${NODE}/${objectId}/config`;
const isConfig = (m: MqttMessage) => m.topic.startsWith(`${PREFIX}/`) && m.topic.endsWith('/config');

/** Checks one config message against HA's documented keys, and returns it. */
function checkConfig(tt: Test, message: MqttMessage): any {
  const config = message.json;
  const [, component, node, objectId] = message.topic.split('/');
  tt.equal(node, NODE, 'under the cloudlet node id');
  tt.match(objectId, /^[a-zA-Z0-9_-]+$/, 'an object id HA accepts');
  for (const [key, value] of Object.entries(config)) tt.equal(typeof value, DOCUMENTED[key] ?? 'an undocumented key', `${objectId}: ${key}`);
  tt.notOk(
    Object.keys(config).some((key) => key.startsWith('command')),
    `${objectId}: read-only, no command topic`,
  );
  tt.equal(config.unique_id, `${NODE}_${objectId}`, 'a unique id per entity');
  tt.equal(config.default_entity_id, `${component}.${config.unique_id}`, 'default_entity_id is the domain and the slug');
  tt.match(config.default_entity_id, /^[a-z_]+\.[a-z0-9_]+$/, 'an entity id HA accepts');
  tt.match(config.device, { identifiers: [NODE], name: String, model: String, manufacturer: String, sw_version: String }, 'one device per cloudlet');
  tt.ok(config.state_topic.startsWith(`${ROOT}/`), "a state topic of the agent's tree");
  if (config.availability_topic !== undefined) {
    tt.equal(config.availability_topic, `${ROOT}/status`, "availability on the agent's status topic");
    tt.match(config, { payload_available: 'online', payload_not_available: 'offline' });
  }
  if (config.device_class !== undefined)
    tt.ok((component === 'binary_sensor' ? BINARY_SENSOR_CLASSES : SENSOR_CLASSES).includes(config.device_class), `${objectId}: a device class of HA's`);
  if (config.state_class !== undefined) tt.ok(STATE_CLASSES.includes(config.state_class), `${objectId}: a state class of HA's`);
  return config;
}

/** The retained JSON on a config's state topic, and the fields its value template reads there. */
async function stateOf(watcher: MqttWatcher, config: any): Promise<{ state: any; fields: string[] }> {
  const state = (await watcher.next((m) => m.topic === config.state_topic && m.json !== null)).value.json;
  const fields = [...new Set([...(config.value_template as string).matchAll(/value_json\.(\w+)/g)].map((m) => m[1]!))];
  return { state, fields };
}

t.test('a new subscriber gets the cloudlet as one Home Assistant device with its host and service entities', async (tt) => {
  const watcher = await MqttWatcher.connect(mqttUrl(), [`${PREFIX}/#`, `${ROOT}/#`]);
  tt.teardown(() => watcher.close());
  const expected = [
    ['binary_sensor', 'online'],
    ['sensor', 'instances'],
    ['sensor', 'cpu'],
    ['sensor', 'memory_available'],
    ['sensor', 'disk_free'],
    ['sensor', 'last_provisioned'],
  ];
  const configs = new Map<string, any>();
  for (const [component, objectId] of expected) {
    const message = (await watcher.next((m) => m.topic === configTopic(component!, objectId!))).value;
    // Published when the agent started: a new subscriber gets it as a retained message (live ones never carry the flag).
    tt.equal(message.retain, true, `${message.topic} is retained`);
    configs.set(objectId!, checkConfig(tt, message));
  }
  const online = configs.get('online');
  tt.match(online, { device_class: 'connectivity', payload_on: 'online', payload_off: 'offline', state_topic: `${ROOT}/status` });
  tt.equal(online.availability_topic, undefined, 'the online status is itself the availability of the others');
  tt.equal((await stateOf(watcher, online)).state.state, 'online', 'and resolves to payload_on');
  for (const objectId of ['instances', 'cpu', 'memory_available', 'disk_free']) {
    const { state, fields } = await stateOf(watcher, configs.get(objectId));
    tt.equal(fields.length, 1, `${objectId} reads one field`);
    tt.type(state[fields[0]!], 'number', `${objectId}: ${fields[0]} is a number on ${configs.get(objectId).state_topic}`);
  }
  tt.match(configs.get('disk_free'), { device_class: 'data_size', unit_of_measurement: 'B', state_class: 'measurement' });
  tt.match(configs.get('cpu'), { unit_of_measurement: '%', state_class: 'measurement' });
  tt.match(configs.get('last_provisioned'), { device_class: 'timestamp' });
  tt.equal((await stateOf(watcher, configs.get('last_provisioned'))).state.last_provisioned_at, null, 'nothing provisioned yet: no value');

  const service = (await watcher.next((m) => isConfig(m) && m.topic.includes('/binary_sensor/') && m.json?.name?.startsWith(SERVICE))).value;
  const serviceConfig = checkConfig(tt, service);
  tt.match(serviceConfig, { device_class: 'running', state_topic: `${ROOT}/services/${SERVICE}`, availability_topic: `${ROOT}/status` });
  const { state, fields } = await stateOf(watcher, serviceConfig);
  tt.same(fields, ['instances'], 'running when it has instances');
  tt.equal(state.instances, 0, 'not running yet');
});

t.test('an instance gets an entity while it runs; its end clears the config topic; the last provisioning time is a timestamp', async (tt) => {
  const watcher = await MqttWatcher.connect(mqttUrl(), [`${PREFIX}/#`, `${ROOT}/#`]);
  tt.teardown(() => watcher.close());
  const start = await agent.post('/v1/instances', { service_id: SERVICE });
  tt.equal(start.status, 201, start.body);
  const id = start.json.instance.id;
  const message = (await watcher.next((m) => isConfig(m) && m.json?.state_topic === `${ROOT}/instances/${id}`)).value;
  tt.ok(message.topic.startsWith(`${PREFIX}/sensor/`), 'a sensor');
  const config = checkConfig(tt, message);
  tt.equal(config.state_topic, `${ROOT}/instances/${id}`, "the instance's own topic");
  tt.equal((await watcher.next((m) => m.topic === config.state_topic && m.json?.state === 'ready')).value.json.state, 'ready', 'its state resolves');
  const newcomer = await MqttWatcher.connect(mqttUrl(), `${PREFIX}/#`);
  tt.teardown(() => newcomer.close());
  tt.equal((await newcomer.next((m) => m.topic === message.topic)).value.retain, true, 'a new subscriber gets it retained');
  const provisioned = await watcher.next((m) => m.topic === `${ROOT}/metrics` && typeof m.json?.last_provisioned_at === 'string');
  tt.ok(!Number.isNaN(Date.parse(provisioned.value.json.last_provisioned_at)), 'the last provisioning time is an ISO 8601 timestamp');

  tt.equal((await agent.delete(`/v1/instances/${id}`)).status, 200);
  tt.ok(await watcher.next((m) => m.topic === message.topic && m.json === null), "the ended instance's config topic is cleared (an empty message)");
  const late = await MqttWatcher.connect(mqttUrl(), [`${PREFIX}/#`, `${ROOT}/status`]);
  tt.teardown(() => late.close());
  // Retained messages come topic by topic, in the order subscribed: once the status is here, the config would be too.
  await late.next((m) => m.topic === `${ROOT}/status`);
  tt.notOk(
    late.inbox.items.some((i) => i.value.topic === message.topic),
    'and retained empty: a later subscriber does not get it',
  );
});

t.test("a removed service's config topic is cleared, and a later subscriber no longer sees it", async (tt) => {
  const watcher = await MqttWatcher.connect(mqttUrl(), `${PREFIX}/#`);
  tt.teardown(() => watcher.close());
  const service = (await watcher.next((m) => isConfig(m) && m.json?.state_topic === `${ROOT}/services/${SERVICE}`)).value;
  tt.equal(service.retain, true, "the service's config is retained");
  tt.equal((await agent.delete(`/v1/services/${SERVICE}`)).status, 204);
  tt.ok(await watcher.next((m) => m.topic === service.topic && m.json === null), 'cleared');

  const late = await MqttWatcher.connect(mqttUrl(), [`${PREFIX}/#`, `${ROOT}/status`]);
  tt.teardown(() => late.close());
  await late.next((m) => m.topic === `${ROOT}/status`);
  tt.notOk(
    late.inbox.items.some((i) => i.value.topic === service.topic),
    'not delivered to a new subscriber',
  );
  tt.ok(
    late.inbox.items.some((i) => i.value.topic === configTopic('binary_sensor', 'online')),
    'while the host entities stay',
  );
});
