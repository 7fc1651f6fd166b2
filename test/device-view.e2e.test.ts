// A paired device sees only its own instances, and no other device's id, wherever instances show: /v1/instances,
// the /v1/events WebSocket and the MQTT instance topics (live and retained). The operator sees them all. Real agent,
// real QEMU (TCG) guests started by two paired devices, real WebSocket and MQTT clients.
import t from 'tap';
import { AgentProcess, request, testGuestDir } from './support/agent';
import { EventsSocket, MqttWatcher } from './support/listeners';

const SERVICE = 'org.cloudlet.demo.http';

let agent: AgentProcess;

t.before(async () => {
  agent = await AgentProcess.start({ portRange: '26310-26349' });
  const imported = await agent.post('/v1/services', { path: testGuestDir() });
  if (imported.status !== 201) throw new Error(`import failed: ${imported.body}`);
});
t.teardown(() => agent?.dispose());

interface Device {
  id: string;
  token: string;
  as: Record<string, string>;
}

async function pair(id: string): Promise<Device> {
  const window = await agent.post('/v1/pairing', {});
  const claim = await agent.post('/v1/pairing/claim', { code: window.json.code, device_id: id, name: `Phone ${id}` });
  if (claim.status !== 201) throw new Error(`claim: ${claim.body}`);
  return { id, token: claim.json.token, as: { authorization: `Bearer ${claim.json.token}` } };
}

const startAs = async (device: Device, join = false) => {
  const started = await request(agent.apiPort, 'POST', '/v1/instances', { service_id: SERVICE, join }, device.as);
  if (started.status !== 201) throw new Error(`start: ${started.body}`);
  return started.json;
};

t.test('each device sees only its own instances, in the listing, on /v1/events and on MQTT; the operator sees all', async (tt) => {
  const alice = await pair('alice-phone');
  const bob = await pair('bob-phone');
  const mqttUrl = `mqtt://127.0.0.1:${agent.mqttPort}`;
  const topic = 'cloudlet/+/instances/#';
  const aliceEvents = await EventsSocket.connect(agent.apiPort, { headers: alice.as });
  const aliceMqtt = await MqttWatcher.connect(mqttUrl, topic, { username: alice.id, password: alice.token });
  const operatorEvents = await EventsSocket.connect(agent.apiPort);
  tt.teardown(() => Promise.all([aliceEvents.close(), aliceMqtt.close(), operatorEvents.close()]));

  const mine = (await startAs(alice)).instance.id as string;
  const bobs = (await startAs(bob)).instance.id as string;
  // Bob joins Alice's instance (shareable, the least shared ready one): both are its users now.
  const joined = await startAs(bob, true);
  tt.equal(joined.instance.id, mine, "bob joined alice's instance");
  tt.same(joined.instance.owners, [bob.id], 'the join answer names no other device');

  const aliceList = await request(agent.apiPort, 'GET', '/v1/instances', undefined, alice.as);
  tt.same(
    aliceList.json.instances.map((i: { id: string }) => i.id),
    [mine],
    'alice lists only her instance',
  );
  tt.same(aliceList.json.instances[0].owners, [alice.id], 'with only her own entry in owners');
  tt.notOk(aliceList.body.includes(bobs) || aliceList.body.includes(bob.id), "no id of bob's appears");
  const bobList = await request(agent.apiPort, 'GET', '/v1/instances', undefined, bob.as);
  tt.same(bobList.json.instances.map((i: { id: string }) => i.id).sort(), [mine, bobs].sort(), 'bob lists both he uses');
  tt.notOk(bobList.body.includes(alice.id), "without alice's id");
  tt.match(
    (await request(agent.apiPort, 'GET', `/v1/instances/${bobs}`, undefined, alice.as)).json,
    { code: 'INSTANCE_NOT_FOUND' },
    "bob's own instance does not exist for alice",
  );
  tt.same((await agent.get('/v1/instances')).json.instances.map((i: { id: string }) => i.id).sort(), [mine, bobs].sort(), 'the operator lists all');

  // A dashboard of alice's connecting now gets the retained state of her instance only (status comes after the
  // retained instances of the same SUBSCRIBE, so once it is here they all are).
  const late = await MqttWatcher.connect(mqttUrl, ['cloudlet/+/instances/+', 'cloudlet/+/status'], { username: alice.id, password: alice.token });
  tt.teardown(() => late.close());
  await late.next((m) => m.topic.endsWith('/status'));
  tt.same(
    late.inbox.items.filter((i) => i.value.topic.includes('/instances/')).map((i) => i.value.json.id),
    [mine],
    'retained: hers only',
  );

  for (const id of [mine, bobs]) await agent.delete(`/v1/instances/${id}`);
  await agent.delete(`/v1/instances/${mine}`);
  await operatorEvents.next((e) => e.type === 'instance' && e.instance.id === bobs && e.state === 'stopped');
  await operatorEvents.next((e) => e.type === 'instance' && e.instance.id === mine && e.state === 'stopped');
  await aliceEvents.next((e) => e.type === 'instance' && e.instance.id === mine && e.state === 'stopped');
  await aliceMqtt.next((m) => m.topic.endsWith(`/instances/${mine}`) && m.json === null);
  tt.pass('alice saw her instance end, on /v1/events and on MQTT');

  const aliceSaw = JSON.stringify([aliceEvents.inbox.items, aliceMqtt.inbox.items, late.inbox.items]);
  tt.notOk(aliceSaw.includes(bobs), "bob's instance never reached alice's events socket or MQTT");
  tt.notOk(aliceSaw.includes(bob.id), "nor did bob's device id");
  tt.ok(
    operatorEvents.inbox.items.some((i) => i.value.type === 'progress' && i.value.instance_id === bobs),
    "the operator saw bob's launch",
  );
  tt.ok(
    aliceEvents.inbox.items.some((i) => i.value.type === 'progress' && i.value.instance_id === mine),
    'alice saw her own launch',
  );
});
