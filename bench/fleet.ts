// ./build.sh bench fleet — the fleet broker (a real mosquitto with TLS, a password per cloudlet and an ACL per tree:
// test/support/fleet-broker.ts) fed by 3 real agents, each through a TCP relay of its own (its uplink). Measures:
// - change → fleet message: every instance state change and launch progress message of Service VM launches on each
//   cloudlet, from the agent's event time (`at` in the payload) to its arrival at a fleet dashboard subscribed with
//   QoS 1; baseline: the same messages at a subscriber of the agent's own aedes broker;
// - a killed cloudlet → offline: SIGKILL of an agent to its last will's arrival at the dashboard; and a silent
//   uplink (the relay freezes: no FIN, no RST) to the broker declaring it offline, against 1.5× the keep-alive;
// - replay of 1,000 queued messages: the uplink module itself (telemetry/uplink.ts) queues 1,000 messages while its
//   relay is severed; from reconnect (its status arriving first) to the 1,000th message at the dashboard; baseline:
//   the same 1,000 messages published while connected.
// Ends with one line of JSON. `--quick`: one launch per cloudlet, to check the bench works (CI), not to measure.
import { spawnSync } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { DEFAULT_CONFIG } from '../agent/src/config';
import { FleetUplink } from '../agent/src/telemetry/uplink';
import { AgentProcess, ROOT } from '../test/support/agent';
import { FleetBroker } from '../test/support/fleet-broker';
import { MqttWatcher, type MqttMessage, type Received } from '../test/support/listeners';
import { TcpRelay } from '../test/support/tcp-relay';
import { OptionalParts } from '../agent/src/core/optional-parts';

const QUICK = process.argv.includes('--quick');
const LAUNCHES = QUICK ? 1 : Number(process.env.BENCH_RUNS ?? 5);
const CLOUDLETS = ['alpha', 'bravo', 'charlie'];
const KEEPALIVE_S = 2;
const REPLAY = 1000;
const SERVICE = 'org.cloudlet.demo.http';
const GUEST = path.join(ROOT, '.build', 'test-guest');

const quantile = (xs: number[], q: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]!;
};
const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;
/** A performance.now() reading as epoch ms, comparable with the agent's `at` stamps. */
const epochMs = (at: number) => performance.timeOrigin + at;

interface Cloudlet {
  name: string;
  agent: AgentProcess;
  uplink: TcpRelay;
}

async function startCloudlet(broker: FleetBroker, scratch: string, name: string, i: number): Promise<Cloudlet> {
  const uplink = await TcpRelay.start({ host: broker.host, port: broker.port });
  const config = path.join(scratch, `${name}.json`);
  const mqtt = { ...broker.agentMqttConfig(name, `mqtts://127.0.0.1:${uplink.port}`), externalKeepaliveSeconds: KEEPALIVE_S, access: 'anonymous-read' };
  await writeFile(config, JSON.stringify({ mqtt }));
  const agent = await AgentProcess.start({ portRange: `${26560 + 10 * i}-${26569 + 10 * i}`, env: { CLOUDLET_CONFIG: config } });
  const imported = await agent.post('/v1/services', { path: GUEST });
  if (imported.status !== 201) throw new Error(`import on ${name}: ${imported.status} ${imported.body}`);
  return { name, agent, uplink };
}

/** Latency samples of every timestamped message of `launches` start-and-stop cycles on one cloudlet, locally and at the fleet. */
async function launchCycles(c: Cloudlet, dashboard: MqttWatcher): Promise<{ local: number[]; fleet: number[] }> {
  const local = await MqttWatcher.connect(`mqtt://127.0.0.1:${c.agent.mqttPort}`, `cloudlet/${c.name}/instances/#`, undefined, 1);
  const fleetFrom = dashboard.inbox.items.length;
  try {
    for (let i = 0; i < LAUNCHES; i++) {
      const start = await c.agent.post('/v1/instances', { service_id: SERVICE });
      if (start.status !== 201) throw new Error(`start on ${c.name}: ${start.status} ${start.body}`);
      const topic = `cloudlet/${c.name}/instances/${start.json.instance.id}`;
      await local.next((m) => m.topic === topic && m.json?.state === 'ready', 120000);
      await c.agent.delete(`/v1/instances/${start.json.instance.id}`);
      await dashboard.next((m) => m.topic === topic && m.json === null, 60000, fleetFrom);
    }
    const mine = (r: Received<MqttMessage>) => r.value.topic.startsWith(`cloudlet/${c.name}/instances/`) && typeof r.value.json?.at === 'string';
    const latency = (r: Received<MqttMessage>) => epochMs(r.at) - Date.parse(r.value.json.at);
    return { local: local.inbox.items.filter(mine).map(latency), fleet: dashboard.inbox.items.slice(fleetFrom).filter(mine).map(latency) };
  } finally {
    await local.close();
  }
}

/** SIGKILL → the last will at the dashboard. */
async function killToOffline(c: Cloudlet, dashboard: MqttWatcher): Promise<number> {
  const from = dashboard.inbox.items.length;
  const t0 = performance.now();
  await c.agent.kill();
  const offline = await dashboard.next((m) => m.topic === `cloudlet/${c.name}/status` && m.json?.state === 'offline', 30000, from);
  return offline.at - t0;
}

/** A silent uplink → the broker's keep-alive check declares the cloudlet offline. */
async function silentToOffline(c: Cloudlet, dashboard: MqttWatcher): Promise<number> {
  const from = dashboard.inbox.items.length;
  const t0 = performance.now();
  c.uplink.freeze();
  const offline = await dashboard.next((m) => m.topic === `cloudlet/${c.name}/status` && m.json?.state === 'offline', 60000, from);
  c.uplink.restore();
  return offline.at - t0;
}

/** The uplink module alone, as the cloudlet `name` (its credentials), through a relay the bench severs. */
async function replay(broker: FleetBroker, name: string, dashboard: MqttWatcher): Promise<{ replayMs: number; reconnectMs: number; liveMs: number }> {
  const relay = await TcpRelay.start({ host: broker.host, port: broker.port });
  const config = { ...DEFAULT_CONFIG.mqtt, ...broker.agentMqttConfig(name, `mqtts://127.0.0.1:${relay.port}`), externalUrl: `mqtts://127.0.0.1:${relay.port}` };
  let lost = () => {};
  const uplinkKnowsItIsDown = new Promise<void>((resolve) => (lost = resolve));
  const statusTopic = `cloudlet/${name}/status`;
  const online = JSON.stringify({ state: 'online' });
  const uplink = (await FleetUplink.connect({
    config,
    clientId: name,
    parts: new OptionalParts(() => {}),
    log: (line) => {
      if (/connection lost/.test(line)) lost();
    },
    will: { topic: statusTopic, payload: JSON.stringify({ state: 'offline' }) },
    latestOnly: new Set([statusTopic]),
    current: (topic) => (topic === statusTopic ? online : ''),
    snapshot: () => [[statusTopic, online]],
  }))!;
  const burst = async (tag: string) => {
    const from = dashboard.inbox.items.length;
    const t0 = performance.now();
    for (let i = 0; i < REPLAY; i++) uplink.publish(`cloudlet/${name}/bench/${tag}`, JSON.stringify({ i }), false);
    const last = await dashboard.next((m) => m.topic === `cloudlet/${name}/bench/${tag}` && m.json?.i === REPLAY - 1, 60000, from);
    const got = dashboard.inbox.items.slice(from).filter((r) => r.value.topic === `cloudlet/${name}/bench/${tag}`);
    if (got.length < REPLAY || got.some((r, i) => r.value.json.i !== i)) throw new Error(`${tag}: ${got.length} of ${REPLAY} arrived, or out of order`);
    return { t0, from, lastAt: last.at };
  };
  try {
    await dashboard.next((m) => m.topic === statusTopic && m.json?.state === 'online', 30000);
    const live = await burst('live');
    const from = dashboard.inbox.items.length;
    relay.sever();
    await dashboard.next((m) => m.topic === statusTopic && m.json?.state === 'offline', 30000, from);
    // From then on the uplink queues (what it had handed to the connection before would be re-sent first instead).
    await uplinkKnowsItIsDown;
    for (let i = 0; i < REPLAY; i++) uplink.publish(`cloudlet/${name}/bench/replay`, JSON.stringify({ i }), false);
    const restoredAt = performance.now();
    relay.restore();
    const back = await dashboard.next((m) => m.topic === statusTopic && m.json?.state === 'online', 30000, from);
    const last = await dashboard.next((m) => m.topic === `cloudlet/${name}/bench/replay` && m.json?.i === REPLAY - 1, 60000, from);
    const got = dashboard.inbox.items.slice(from).filter((r) => r.value.topic === `cloudlet/${name}/bench/replay`);
    if (got.length !== REPLAY || got.some((r, i) => r.value.json.i !== i)) throw new Error(`replay: ${got.length} of ${REPLAY} arrived, or out of order`);
    return { replayMs: last.at - back.at, reconnectMs: back.at - restoredAt, liveMs: live.lastAt - live.t0 };
  } finally {
    await uplink.close();
    await relay.close();
  }
}

async function main() {
  if (spawnSync('bash', [path.join(ROOT, 'rootfs/guest/build-guest.sh'), GUEST], { stdio: 'inherit' }).status !== 0) throw new Error('guest build failed');
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-bench-fleet-'));
  const broker = await FleetBroker.start([...CLOUDLETS, 'uplink-bench']);
  const cloudlets: Cloudlet[] = [];
  let dashboard: MqttWatcher | undefined;
  try {
    dashboard = await broker.dashboard();
    for (const [i, name] of CLOUDLETS.entries()) cloudlets.push(await startCloudlet(broker, scratch, name, i));
    for (const c of cloudlets) await dashboard.next((m) => m.topic === `cloudlet/${c.name}/status` && m.json?.state === 'online', 30000);
    const local: number[] = [];
    const fleet: number[] = [];
    for (const c of cloudlets) {
      const s = await launchCycles(c, dashboard);
      local.push(...s.local);
      fleet.push(...s.fleet);
      process.stderr.write(
        `${c.name}: ${s.fleet.length} messages, fleet median ${round(quantile(s.fleet, 0.5))} ms, local ${round(quantile(s.local, 0.5))} ms\n`,
      );
    }
    const offlineDetect = await killToOffline(cloudlets[2]!, dashboard);
    process.stderr.write(`SIGKILL → offline at the fleet: ${round(offlineDetect)} ms\n`);
    const offlineSilent = await silentToOffline(cloudlets[1]!, dashboard);
    process.stderr.write(`silent uplink → offline: ${round(offlineSilent)} ms (keep-alive ${KEEPALIVE_S} s, target ≤ ${1.5 * KEEPALIVE_S * 1000} ms)\n`);
    const r = await replay(broker, 'uplink-bench', dashboard);
    process.stderr.write(
      `replay of ${REPLAY}: ${round(r.replayMs)} ms after reconnecting (${round(r.reconnectMs)} ms after the link came back); live: ${round(r.liveMs)} ms\n`,
    );
    console.log(
      JSON.stringify({
        bench: 'fleet',
        ...(QUICK ? { quick: true } : {}),
        cloudlets: cloudlets.length,
        messages: fleet.length,
        fleet_latency_ms_median: round(quantile(fleet, 0.5)),
        fleet_latency_ms_p99: round(quantile(fleet, 0.99)),
        local_latency_ms_median: round(quantile(local, 0.5)),
        local_latency_ms_p99: round(quantile(local, 0.99)),
        offline_detect_ms: round(offlineDetect),
        keepalive_s: KEEPALIVE_S,
        offline_silent_ms: round(offlineSilent),
        replay_1000_ms: round(r.replayMs),
        reconnect_ms: round(r.reconnectMs),
        live_1000_ms: round(r.liveMs),
      }),
    );
  } finally {
    await dashboard?.close();
    for (const c of cloudlets) {
      await c.agent.dispose();
      await c.uplink.close();
    }
    await broker.stop();
    await rm(scratch, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
