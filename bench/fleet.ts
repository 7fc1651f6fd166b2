// ./build.sh bench fleet — on the fleet harness (test/support/fleet.ts): 3 whole cloudlets, each in its own namespaces
// with its own libvirtd and agent, and a fleet broker host on the same test bridge running a real mosquitto (TLS, a
// password per cloudlet, an ACL per tree: test/support/fleet-broker.ts), each agent reaching it over its own uplink,
// and a fleet dashboard subscribed on the broker's host with QoS 1. Measures:
// - change → fleet message: every instance state change and launch progress message of Service VM launches on each
//   cloudlet, from the agent's event time (`at` in the payload) to its arrival at the dashboard; baseline: the same
//   messages at a subscriber of the agent's own aedes broker, on the cloudlet's own box;
// - a killed cloudlet → offline: SIGKILL of an agent to its last will's arrival at the dashboard; and a silent uplink
//   (the cloudlet's port on the bridge goes down: no FIN, no RST) to the broker declaring it offline, from the last
//   packet the broker received from it (the reference of MQTT's 1.5× keep-alive rule) and from the cut;
// - replay of 1,000 queued messages: the uplink module itself (telemetry/uplink.ts) on a phone of the bridge queues
//   1,000 messages while the phone's link is cut; from reconnect (its status arriving first) to the 1,000th message at
//   the dashboard; baseline: the same 1,000 messages published while connected.
// Ends with one line of JSON. `--quick`: one launch per cloudlet and one silent cut, to check the bench works (CI).
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { type CloudletBox, MQTT_PORT } from '../test/support/cloudlet-box';
import { Fleet, type Phone } from '../test/support/fleet';
import type { MqttMessage, Received } from '../test/support/listeners';
import { NetnsMqttClient } from '../test/support/netns-mqtt';
import { RemoteProcess } from '../test/support/remote-process';
import { QUICK, round, runsOf, testGuest } from './support/measure';

const LAUNCHES = runsOf(5);
const CLOUDLETS = ['alpha', 'bravo', 'charlie'];
const KEEPALIVE_S = 2;
/**
 * Mosquitto 2.0 sweeps its clients' keep-alives once every 6 s of its whole-second clock (src/keepalive.c:
 * `last_keepalive_check + 5 < db.now_s`), and declares a client gone when more than ⌊1.5 × keep-alive⌋ whole seconds
 * passed since its last packet: the offline will comes within ⌊1.5 × keep-alive⌋ + 6 s of that packet (+ its 100 ms loop).
 */
const SWEEP_S = 6;
const SILENT_BOUND_MS = (Math.floor(1.5 * KEEPALIVE_S) + SWEEP_S) * 1000 + 100;
const REPLAY = 1000;
const BENCH_LOGIN = 'uplink-bench';
const SERVICE = 'org.cloudlet.demo.http';

const quantile = (xs: number[], q: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]!;
};
/** A performance.now() reading as epoch ms, comparable with the agent's `at` stamps. */
const epochMs = (at: number) => performance.timeOrigin + at;
const isStatus = (name: string, state: string) => (m: MqttMessage) => m.topic === `cloudlet/${name}/status` && m.json?.state === state;

/** Latency samples of every timestamped message of start-and-stop cycles on one cloudlet, on its box and at the fleet. */
async function launchCycles(box: CloudletBox, dashboard: NetnsMqttClient): Promise<{ local: number[]; fleet: number[] }> {
  const local = await NetnsMqttClient.watch(box.enter(), `mqtt://127.0.0.1:${MQTT_PORT}`, `cloudlet/${box.name}/instances/#`, {}, 1);
  const fleetFrom = dashboard.inbox.items.length;
  try {
    for (let i = 0; i < LAUNCHES; i++) {
      const start = await box.operator('POST', '/v1/instances', { service_id: SERVICE });
      if (start.status !== 201) throw new Error(`start on ${box.name}: ${start.status} ${start.body}`);
      const topic = `cloudlet/${box.name}/instances/${start.json.instance.id}`;
      await local.next((m) => m.topic === topic && m.json?.state === 'ready', 120000);
      await box.operator('DELETE', `/v1/instances/${start.json.instance.id}`);
      await dashboard.next((m) => m.topic === topic && m.json === null, 60000, fleetFrom);
    }
    const mine = (r: Received<MqttMessage>) => r.value.topic.startsWith(`cloudlet/${box.name}/instances/`) && typeof r.value.json?.at === 'string';
    const latency = (r: Received<MqttMessage>) => epochMs(r.at) - Date.parse(r.value.json.at);
    return { local: local.inbox.items.filter(mine).map(latency), fleet: dashboard.inbox.items.slice(fleetFrom).filter(mine).map(latency) };
  } finally {
    await local.close();
  }
}

/** SIGKILL → the last will at the dashboard. */
async function killToOffline(box: CloudletBox, dashboard: NetnsMqttClient): Promise<number> {
  const from = dashboard.inbox.items.length;
  const t0 = performance.now();
  await box.stopAgent('SIGKILL');
  const offline = await dashboard.next(isStatus(box.name, 'offline'), 30000, from);
  return offline.at - t0;
}

/** A silent uplink → the broker's keep-alive check declares the cloudlet offline; then the uplink is restored. */
async function silentToOffline(fleet: Fleet, box: CloudletBox, dashboard: NetnsMqttClient): Promise<{ fromLastPacket: number; fromCut: number }> {
  const from = dashboard.inbox.items.length;
  // Taken before the cut (and before asking the broker's kernel): both figures err long, never short.
  const cutAt = performance.now();
  await fleet.setUplink(box.name, false);
  const askedAt = performance.now();
  const connection = (await fleet.broker!.connections()).find((c) => c.peer === box.address);
  if (!connection || !Number.isFinite(connection.lastReceivedMs)) throw new Error(`the broker has no connection from ${box.name}`);
  const lastPacketAt = askedAt - connection.lastReceivedMs;
  const offline = await dashboard.next(isStatus(box.name, 'offline'), 60000, from);
  await fleet.setUplink(box.name, true);
  await dashboard.next(isStatus(box.name, 'online'), 60000, dashboard.inbox.items.indexOf(offline));
  return { fromLastPacket: offline.at - lastPacketAt, fromCut: offline.at - cutAt };
}

/** The uplink module alone on `phone`, as the login BENCH_LOGIN, its link cut while 1,000 messages are queued. */
async function replay(fleet: Fleet, phone: Phone, dashboard: NetnsMqttClient): Promise<{ replayMs: number; reconnectMs: number; liveMs: number }> {
  const broker = fleet.broker!;
  const logged: string[] = [];
  let onLog = () => {};
  const host = RemoteProcess.start(phone.enter(), path.join(__dirname, 'support', 'uplink-host.js'), (event: { log: string }) => {
    logged.push(event.log);
    onLog();
  });
  const logs = (pattern: RegExp) =>
    new Promise<void>((resolve) => {
      onLog = () => logged.some((line) => pattern.test(line)) && resolve();
      onLog();
    });
  const topic = (tag: string) => `cloudlet/${BENCH_LOGIN}/bench/${tag}`;
  const burst = async (tag: string) => {
    const from = dashboard.inbox.items.length;
    const t0 = performance.now();
    await host.request('burst', { topic: topic(tag), count: REPLAY });
    const last = await dashboard.next((m) => m.topic === topic(tag) && m.json?.i === REPLAY - 1, 60000, from);
    return { from, t0, lastAt: last.at };
  };
  const check = (tag: string, from: number) => {
    const got = dashboard.inbox.items.slice(from).filter((r) => r.value.topic === topic(tag));
    if (got.length !== REPLAY || got.some((r, i) => r.value.json.i !== i)) throw new Error(`${tag}: ${got.length} of ${REPLAY} arrived, or out of order`);
  };
  try {
    await host.request('connect', { mqtt: broker.agentMqttConfig(BENCH_LOGIN), name: BENCH_LOGIN, keepaliveSeconds: KEEPALIVE_S });
    await dashboard.next(isStatus(BENCH_LOGIN, 'online'), 30000);
    const live = await burst('live');
    check('live', live.from);
    const from = dashboard.inbox.items.length;
    logged.length = 0;
    await fleet.setUplink(phone, false);
    // From the moment the module knows (its pings unanswered) it queues; what it had handed over before is re-sent first.
    await logs(/connection lost/);
    await host.request('burst', { topic: topic('replay'), count: REPLAY });
    const restoredAt = performance.now();
    await fleet.setUplink(phone, true);
    const back = await dashboard.next(isStatus(BENCH_LOGIN, 'online'), 60000, from);
    const last = await dashboard.next((m) => m.topic === topic('replay') && m.json?.i === REPLAY - 1, 60000, from);
    check('replay', from);
    return { replayMs: last.at - back.at, reconnectMs: back.at - restoredAt, liveMs: live.lastAt - live.t0 };
  } finally {
    await host.request('close').catch(() => {});
    await host.close();
  }
}

async function main() {
  const guest = testGuest();
  const fleet = await Fleet.start({
    cloudlets: CLOUDLETS,
    broker: true,
    brokerLogins: [BENCH_LOGIN],
    config: () => ({ mqtt: { externalKeepaliveSeconds: KEEPALIVE_S, access: 'anonymous-read' } }),
  });
  let dashboard: NetnsMqttClient | undefined;
  try {
    dashboard = await fleet.broker!.dashboard();
    const phone = await fleet.addPhone();
    for (const box of fleet.cloudlets) {
      const imported = await box.operator('POST', '/v1/services', { path: guest });
      if (imported.status !== 201) throw new Error(`import on ${box.name}: ${imported.status} ${imported.body}`);
      await dashboard.next(isStatus(box.name, 'online'), 30000);
    }
    const local: number[] = [];
    const fleetLatency: number[] = [];
    for (const box of fleet.cloudlets) {
      const s = await launchCycles(box, dashboard);
      local.push(...s.local);
      fleetLatency.push(...s.fleet);
      process.stderr.write(
        `${box.name}: ${s.fleet.length} messages, fleet median ${round(quantile(s.fleet, 0.5))} ms, local ${round(quantile(s.local, 0.5))} ms\n`,
      );
    }
    const silent: Array<{ fromLastPacket: number; fromCut: number }> = [];
    for (const box of QUICK ? fleet.cloudlets.slice(1, 2) : fleet.cloudlets) {
      const s = await silentToOffline(fleet, box, dashboard);
      silent.push(s);
      process.stderr.write(`${box.name}: silent uplink → offline ${round(s.fromLastPacket)} ms after its last packet, ${round(s.fromCut)} ms after the cut\n`);
    }
    const offlineSilent = Math.max(...silent.map((s) => s.fromLastPacket));
    process.stderr.write(
      `silent uplink → offline, worst of ${silent.length}: ${round(offlineSilent)} ms (keep-alive ${KEEPALIVE_S} s; mosquitto 2.0's bound ${SILENT_BOUND_MS} ms)\n`,
    );
    const offlineDetect = await killToOffline(fleet.cloudlets[2]!, dashboard);
    process.stderr.write(`SIGKILL → offline at the fleet: ${round(offlineDetect)} ms\n`);
    const r = await replay(fleet, phone, dashboard);
    process.stderr.write(
      `replay of ${REPLAY}: ${round(r.replayMs)} ms after reconnecting (${round(r.reconnectMs)} ms after the link came back); live: ${round(r.liveMs)} ms\n`,
    );
    console.log(
      JSON.stringify({
        bench: 'fleet',
        ...(QUICK ? { quick: true } : {}),
        cloudlets: fleet.cloudlets.length,
        messages: fleetLatency.length,
        fleet_latency_ms_median: round(quantile(fleetLatency, 0.5)),
        fleet_latency_ms_p99: round(quantile(fleetLatency, 0.99)),
        local_latency_ms_median: round(quantile(local, 0.5)),
        local_latency_ms_p99: round(quantile(local, 0.99)),
        offline_detect_ms: round(offlineDetect),
        keepalive_s: KEEPALIVE_S,
        offline_silent_ms: round(offlineSilent),
        offline_silent_after_cut_ms: round(Math.max(...silent.map((s) => s.fromCut))),
        offline_silent_bound_ms: SILENT_BOUND_MS,
        replay_1000_ms: round(r.replayMs),
        reconnect_ms: round(r.reconnectMs),
        live_1000_ms: round(r.liveMs),
      }),
    );
  } finally {
    await dashboard?.close();
    await fleet.stop();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
