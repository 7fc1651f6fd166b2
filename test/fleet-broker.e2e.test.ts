// The fleet broker, end to end: three real agents publish their trees to a real mosquitto (TLS, a password per
// cloudlet, an ACL per tree: test/support/fleet-broker.ts, the configuration docs/fleet.md describes), watched by a
// fleet dashboard; real QEMU (TCG) guests for the state changes. Each cloudlet reaches the broker through a TCP relay
// of its own, the test's hand on that cloudlet's uplink.
//
// Until the fleet harness (test/support/fleet.ts) runs each cloudlet in its own namespace, the three agents share the
// root namespace on loopback; on the harness the relay becomes the link between a cloudlet's namespace and the broker's.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { AgentProcess, testGuestDir } from './support/agent';
import { FleetBroker } from './support/fleet-broker';
import { connectMqtt, MqttWatcher, type MqttMessage } from './support/listeners';
import { TcpRelay } from './support/tcp-relay';

const CLOUDLETS = ['alpha', 'bravo', 'charlie'] as const;
type Name = (typeof CLOUDLETS)[number];
const SERVICE = 'org.cloudlet.demo.http';
/** How long the uplink stays down in the store-and-forward test, as the issue asks. */
const OUTAGE_MS = 30000;

let broker: FleetBroker;
let scratch: string;
let dashboard: MqttWatcher;
const agents = {} as Record<Name, AgentProcess>;
const uplinks = {} as Record<Name, TcpRelay>;

const status = (name: Name) => `cloudlet/${name}/status`;
const isStatus = (name: Name, state: string) => (m: MqttMessage) => m.topic === status(name) && m.json?.state === state;

t.before(async () => {
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-fleet-broker-test-'));
  broker = await FleetBroker.start([...CLOUDLETS]);
  dashboard = await broker.dashboard();
  await Promise.all(
    CLOUDLETS.map(async (name, i) => {
      uplinks[name] = await TcpRelay.start({ host: broker.host, port: broker.port });
      const config = path.join(scratch, `${name}.json`);
      const mqtt = { ...broker.agentMqttConfig(name, `mqtts://127.0.0.1:${uplinks[name].port}`), metricsIntervalMs: 1000, access: 'anonymous-read' };
      await writeFile(config, JSON.stringify({ mqtt }));
      agents[name] = await AgentProcess.start({ portRange: `${26500 + 10 * i}-${26509 + 10 * i}`, env: { CLOUDLET_CONFIG: config } });
    }),
  );
});

t.teardown(async () => {
  await dashboard?.close();
  for (const name of CLOUDLETS) {
    await agents[name]?.dispose();
    await uplinks[name]?.close();
  }
  await broker?.stop();
  await rm(scratch, { recursive: true, force: true });
});

t.test("the fleet dashboard sees all three cloudlets' trees", async (tt) => {
  for (const name of CLOUDLETS) {
    tt.match((await dashboard.next(isStatus(name, 'online'), 30000)).value.json, { state: 'online' }, `${name} is online`);
    const metrics = await dashboard.next((m) => m.topic === `cloudlet/${name}/metrics`, 30000);
    tt.type(metrics.value.json.memory_free_bytes, 'number', `${name}'s host metrics`);
  }
});

t.test("a cloudlet cannot write into another cloudlet's tree, nor log in with a wrong password", async (tt) => {
  // MQTT 5, so the broker says no in the PUBACK instead of dropping the message silently.
  const alpha = await connectMqtt(broker.url, { ...broker.login('alpha'), protocolVersion: 5 });
  tt.teardown(() => alpha.endAsync(true));
  const from = dashboard.inbox.items.length;
  const forged = JSON.stringify({ state: 'offline', hostname: 'bravo' });
  await tt.rejects(alpha.publishAsync(status('bravo'), forged, { qos: 1, retain: true }), /Not authorized/, "alpha may not write bravo's status");
  await alpha.publishAsync('cloudlet/alpha/marker', JSON.stringify({ marker: true }), { qos: 1 });
  // One publisher's messages reach a subscriber in order: had the forgery passed, it would be here before the marker.
  await dashboard.next((m) => m.topic === 'cloudlet/alpha/marker', 30000, from);
  tt.notOk(
    dashboard.inbox.items.slice(from).some((i) => i.value.topic.startsWith('cloudlet/bravo/')),
    "the dashboard saw nothing of the forgery in bravo's tree",
  );
  const late = await MqttWatcher.connect(broker.url, status('bravo'), broker.login('dashboard'), 1);
  tt.teardown(() => late.close());
  tt.equal((await late.next(() => true, 30000)).value.json.state, 'online', "bravo's retained status is still its own");

  await tt.rejects(
    connectMqtt(broker.url, broker.login('alpha', 'not-the-password')),
    /Not authorized|Bad username or password/,
    'a wrong password is refused',
  );
  await tt.rejects(connectMqtt(broker.url, { ca: broker.caPem }), /Not authorized/, 'an anonymous client is refused');
});

t.test('killing an agent shows it offline on the fleet broker (last will), and its restart online again', async (tt) => {
  await dashboard.next(isStatus('charlie', 'online'), 30000);
  const from = dashboard.inbox.items.length;
  await agents.charlie.kill();
  const offline = await dashboard.next(isStatus('charlie', 'offline'), 30000, from);
  tt.match(offline.value.json, { state: 'offline', hostname: os.hostname() }, 'the dashboard sees charlie go offline');
  const late = await MqttWatcher.connect(broker.url, status('charlie'), broker.login('dashboard'), 1);
  tt.teardown(() => late.close());
  tt.match((await late.next(() => true, 30000)).value, { retain: true, json: { state: 'offline' } }, 'and so does a dashboard that comes later (retained)');
  await agents.charlie.launch();
  tt.ok(await dashboard.next(isStatus('charlie', 'online'), 30000, from), 'and online again once restarted');
});

t.test("cutting a cloudlet's uplink for 30 s loses no state change: all arrive after it, in order", async (tt) => {
  const alpha = agents.alpha;
  // The agent's own broker sees every message as it is published: the reference the fleet broker must match.
  const local = await MqttWatcher.connect(`mqtt://127.0.0.1:${alpha.mqttPort}`, 'cloudlet/alpha/#', undefined, 1);
  tt.teardown(() => local.close());
  await dashboard.next(isStatus('alpha', 'online'), 30000);
  await local.next((m) => m.topic === status('alpha'), 30000);
  // Samples, not changes: only the newest host metrics and status are sent after an outage.
  // (The retain flag is left out: a broker clears it on messages to subscribers that were already there.)
  const changes = (items: { value: MqttMessage }[]) =>
    items
      .map((i) => i.value)
      .filter((m) => m.topic.startsWith('cloudlet/alpha/') && !/\/(metrics|status)$/.test(m.topic))
      .map((m) => ({ topic: m.topic, json: m.json }));
  const localFrom = local.inbox.items.length;
  const fleetFrom = dashboard.inbox.items.length;

  uplinks.alpha.sever();
  const cutAt = Date.now();
  tt.ok(await dashboard.next(isStatus('alpha', 'offline'), 30000, fleetFrom), 'the fleet sees alpha go offline');
  // During the outage: a service imported, an instance started and stopped.
  const imported = await alpha.post('/v1/services', { path: testGuestDir() });
  tt.equal(imported.status, 201, imported.body);
  await local.next((m) => m.topic === `cloudlet/alpha/services/${SERVICE}`, 30000, localFrom);
  const start = await alpha.post('/v1/instances', { service_id: SERVICE });
  tt.equal(start.status, 201, start.body);
  const id: string = start.json.instance.id;
  const instance = `cloudlet/alpha/instances/${id}`;
  await local.next((m) => m.topic === instance && m.json?.state === 'ready', 120000, localFrom);
  tt.equal((await alpha.delete(`/v1/instances/${id}`)).status, 200);
  await local.next((m) => m.topic === instance && m.json === null, 60000, localFrom);
  await local.next((m) => m.topic === `cloudlet/alpha/services/${SERVICE}` && m.json?.instances === 0, 30000, localFrom);
  tt.same(changes(dashboard.inbox.items.slice(fleetFrom)), [], 'nothing of it reached the fleet during the outage');

  // The outage lasts its 30 s however quickly the changes above were made (a scenario's length, not a synchronisation).
  await new Promise((resolve) => setTimeout(resolve, Math.max(0, OUTAGE_MS - (Date.now() - cutAt))));
  const restoredFrom = dashboard.inbox.items.length;
  uplinks.alpha.restore();
  const online = await dashboard.next(isStatus('alpha', 'online'), 30000, restoredFrom);
  const expected = changes(local.inbox.items.slice(localFrom));
  // Waits for as many changes as were made (the same state may recur: the service's count goes 0, 1, 0).
  await dashboard.next(() => changes(dashboard.inbox.items.slice(restoredFrom)).length >= expected.length, 60000, restoredFrom);
  const replayed = dashboard.inbox.items.slice(restoredFrom);
  tt.same(changes(replayed), expected, `all ${expected.length} changes arrived, in order`);
  tt.same(changes(replayed.slice(0, replayed.indexOf(online))), [], 'alpha is online again before its backlog arrives');
  tt.ok(expected.some((m) => m.topic === `${instance}/progress`) && expected.some((m) => m.json?.state === 'stopped'), 'events as well as state');
});
