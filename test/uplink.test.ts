// The fleet uplink's store and forward (agent/src/telemetry/uplink.ts), against a real broker (aedes, in process) on
// loopback, through a TCP relay the test severs: what is queued while the link is down, in what order it is replayed,
// and what the bound does. End to end with mosquitto and real agents: test/fleet-broker.e2e.test.ts.
import { Aedes } from 'aedes';
import net from 'node:net';
import t, { type Test } from 'tap';
import { DEFAULT_CONFIG } from '../agent/src/config';
import { FleetUplink } from '../agent/src/telemetry/uplink';
import { MqttWatcher, type MqttMessage } from './support/listeners';
import { TcpRelay } from './support/tcp-relay';
import { OptionalParts } from '../agent/src/core/optional-parts';

const STATUS = 'cloudlet/box/status';
const METRICS = 'cloudlet/box/metrics';

/** A broker, a relay in front of it, an uplink through the relay and a subscriber to everything; all closed at the end. */
async function setUp(t: Test, queueLimit: number) {
  const broker = await Aedes.createBroker();
  const server = net.createServer((socket) => broker.handle(socket));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const relay = await TcpRelay.start({ host: '127.0.0.1', port: (server.address() as net.AddressInfo).port });
  const retained = new Map<string, string>([[STATUS, '{"state":"online"}']]);
  const log: string[] = [];
  const logged: Array<{ pattern: RegExp; resolve: () => void }> = [];
  const uplink = (await FleetUplink.connect({
    config: { ...DEFAULT_CONFIG.mqtt, externalUrl: `mqtt://127.0.0.1:${relay.port}`, externalQueueLimit: queueLimit },
    clientId: 'box',
    parts: new OptionalParts(() => {}),
    log: (line) => {
      log.push(line);
      for (const w of logged.filter((w) => w.pattern.test(line))) w.resolve();
    },
    will: { topic: STATUS, payload: '{"state":"offline"}' },
    latestOnly: new Set([STATUS, METRICS]),
    current: (topic) => retained.get(topic) ?? '',
    snapshot: () => retained,
  }))!;
  const watcher = await MqttWatcher.connect(`mqtt://127.0.0.1:${(server.address() as net.AddressInfo).port}`, 'cloudlet/#', undefined, 1);
  t.teardown(async () => {
    await watcher.close();
    await uplink.close();
    await relay.close();
    await new Promise<void>((resolve) => broker.close(() => resolve()));
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  const untilLogged = (pattern: RegExp) =>
    log.some((line) => pattern.test(line)) ? Promise.resolve() : new Promise<void>((resolve) => logged.push({ pattern, resolve }));
  /** Publishes as the agent does: retained topics remember their value (`''` clears it). */
  const publish = (topic: string, payload: string, retain: boolean) => {
    if (retain && payload === '') retained.delete(topic);
    else if (retain) retained.set(topic, payload);
    uplink.publish(topic, payload, retain);
  };
  const online = (from = 0) => watcher.next((m) => m.topic === STATUS && m.json?.state === 'online', 10000, from);
  /** Cuts the link and waits until the uplink knows (from then on it queues). */
  const cut = async () => {
    const known = log.length;
    relay.sever();
    await untilLogged(/connection lost; queueing up to/);
    return known;
  };
  await online();
  return { watcher, publish, relay, log, cut, online, uplink };
}

const shape = (m: MqttMessage) => `${m.topic}=${m.json === null ? '' : JSON.stringify(m.json)}`;

t.test('below the bound nothing is lost: a restored uplink sends its status, then every queued message in order', async (t) => {
  const { watcher, publish, relay, cut, online, uplink } = await setUp(t, 100);
  await cut();
  const sent: string[] = [];
  for (let i = 0; i < 40; i++) {
    const topic = i % 4 === 0 ? `cloudlet/box/instances/i${i}` : `cloudlet/box/instances/i${i - (i % 4)}/progress`;
    publish(topic, JSON.stringify({ i }), i % 4 === 0);
    sent.push(`${topic}={"i":${i}}`);
  }
  publish('cloudlet/box/instances/i0', '', true);
  sent.push('cloudlet/box/instances/i0=');
  t.equal(uplink.queued, 41, 'all queued');
  const from = watcher.inbox.items.length;
  relay.restore();
  const back = await online(from);
  const clear = await watcher.next((m) => m.topic === 'cloudlet/box/instances/i0' && m.json === null, 10000, from);
  await watcher.next((m) => m.topic === 'cloudlet/box/instances/i36', 10000, watcher.inbox.items.indexOf(clear));
  const after = watcher.inbox.items.slice(watcher.inbox.items.indexOf(back) + 1).map((r) => r.value);
  t.same(after.slice(0, sent.length).map(shape), sent, 'the status first, then all 41 in order');
  // aedes keeps no session for a client without subscriptions: the uplink, told so, sends its retained state again.
  t.same(
    new Set(after.slice(sent.length).map(shape)),
    new Set(Array.from({ length: 9 }, (_, k) => `cloudlet/box/instances/i${4 * k + 4}={"i":${4 * k + 4}}`)),
    'then, as the broker has forgotten the session, only the current retained state',
  );
  t.equal(uplink.queued, 0);
});

t.test('over the bound the oldest messages go, the log says so, and retained state still arrives with its newest value', async (t) => {
  const { watcher, publish, relay, log, cut, online } = await setUp(t, 3);
  await cut();
  publish('cloudlet/box/services/s', '{"instances":1}', true);
  for (let i = 1; i <= 4; i++) publish('cloudlet/box/instances/x/progress', JSON.stringify({ i }), false);
  for (let i = 1; i <= 3; i++) publish(METRICS, JSON.stringify({ i }), true);
  t.match(log.join('\n'), /3 messages queued: dropping the oldest; retained state is kept/);
  const from = watcher.inbox.items.length;
  relay.restore();
  const back = await online(from);
  await watcher.next((m) => m.topic === METRICS, 10000, from);
  const after = watcher.inbox.items.slice(watcher.inbox.items.indexOf(back) + 1).map((r) => shape(r.value));
  t.same(
    after,
    [
      'cloudlet/box/instances/x/progress={"i":2}',
      'cloudlet/box/instances/x/progress={"i":3}',
      'cloudlet/box/instances/x/progress={"i":4}',
      'cloudlet/box/services/s={"instances":1}',
      'cloudlet/box/metrics={"i":3}',
    ],
    'the newest 3 events in order, then the dropped service state sent again, and the metrics only at their newest',
  );
  t.match(log.join('\n'), /replaying 3 queued messages \(2 older ones were dropped over the queue's bound\)/);
});

t.test('a retained topic cleared during the outage is cleared at the fleet broker, even when the clear itself was dropped', async (t) => {
  const { watcher, publish, relay, cut, online } = await setUp(t, 1);
  publish('cloudlet/box/instances/gone', '{"state":"ready"}', true);
  await watcher.next((m) => m.topic === 'cloudlet/box/instances/gone');
  await cut();
  publish('cloudlet/box/instances/gone', '', true);
  publish('cloudlet/box/instances/other/progress', '{"i":1}', false);
  const from = watcher.inbox.items.length;
  relay.restore();
  await online(from);
  const cleared = await watcher.next((m) => m.topic === 'cloudlet/box/instances/gone', 10000, from);
  t.equal(cleared.value.json, null, 'the clear arrives though the queue had room for one message only');
});
