// ./build.sh bench telemetry — how fast a Service VM's end reaches the agent's listeners. The QEMU process of a ready
// instance is SIGKILLed and we time the arrival of its final state on MQTT (one subscriber, and the last of 100
// subscribers: broker fan-out) and on the /v1/events WebSocket, from the moment libvirt reported the domain stopped
// (the bench's own lifecycle watch: the *_latency_* figures) and from the kill itself (kill_to_*: that adds
// libvirtd's own time to notice). Measured with libvirt lifecycle events (the default) and with the reconcile poll
// alone (CLOUDLET_LIBVIRT_EVENTS=0, every 1000 ms). Ends with one line of JSON. `--quick`: a few runs and
// subscribers, to check the bench works (CI), not to measure.
import { execFile, spawnSync } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { promisify } from 'node:util';
import { Connection, DomainEvent, type LifecycleEvent } from '../native/libvirt';
import { AgentProcess, ROOT } from '../test/support/agent';
import { EventsSocket, MqttWatcher } from '../test/support/listeners';

const QUICK = process.argv.includes('--quick');
const RUNS = QUICK ? 2 : Number(process.env.BENCH_RUNS ?? 20);
const POLL_RUNS = QUICK ? 1 : Number(process.env.BENCH_POLL_RUNS ?? 8);
const SUBSCRIBERS = QUICK ? 10 : 100;
const SERVICE = 'org.cloudlet.demo.http';
const ROOT_TOPIC = 'cloudlet/bench';
const PORT_RANGE = '23200-23299';

const quantile = (xs: number[], q: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]!;
};
const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;

async function qemuPid(uuid: string): Promise<number> {
  const { stdout } = await promisify(execFile)('pgrep', ['-f', `uuid ${uuid}`]);
  return Number(stdout.trim().split('\n')[0]);
}

interface Sample {
  mqtt: number;
  ws: number;
  fanout: number;
  killToMqtt: number;
  killToWs: number;
}

/** When libvirt reported each domain stopped, as seen by a watch of the bench's own (epoch ms, from the shim). */
class StopTimes {
  private readonly stopped = new Map<string, number>();
  private waiters = new Map<string, () => void>();

  onEvents = (events: LifecycleEvent[]) => {
    for (const e of events) {
      if (e.event !== DomainEvent.Stopped) continue;
      this.stopped.set(e.uuid, e.atMs);
      this.waiters.get(e.uuid)?.();
    }
  };

  async of(uuid: string): Promise<number> {
    if (!this.stopped.has(uuid)) await new Promise<void>((resolve) => this.waiters.set(uuid, resolve));
    this.waiters.delete(uuid);
    return this.stopped.get(uuid)!;
  }
}

/** A performance.now() reading as epoch ms, comparable with the shim's CLOCK_REALTIME stamps. */
const epochMs = (at: number) => performance.timeOrigin + at;

/** One run: start a ready instance, kill its QEMU, time the arrival of its final state everywhere. */
async function killAndTime(agent: AgentProcess, watcher: MqttWatcher, fans: MqttWatcher[], events: EventsSocket, stops: StopTimes): Promise<Sample> {
  const start = await agent.post('/v1/instances', { service_id: SERVICE });
  if (start.status !== 201) throw new Error(`start: ${start.status} ${start.body}`);
  const id: string = start.json.instance.id;
  const pid = await qemuPid(id);
  // Crashed (reason failed) when libvirt's event tells; stopped (reason vanished) when the poll only found it gone.
  const ended = (state: string) => state === 'crashed' || state === 'stopped';
  const isFinal = (m: { topic: string; json: any }) => m.topic === `${ROOT_TOPIC}/instances/${id}` && ended(m.json?.state);
  const froms = { watcher: watcher.inbox.items.length, events: events.inbox.items.length, fans: fans.map((f) => f.inbox.items.length) };
  const t0 = performance.now();
  process.kill(pid, 'SIGKILL');
  const [stoppedAt, mqttAt, wsAt, ...fanAt] = await Promise.all([
    stops.of(id),
    watcher.next(isFinal, 30000, froms.watcher),
    events.next((e) => e.type === 'instance' && e.instance.id === id && ended(e.state), 30000, froms.events),
    ...fans.map((f, i) => f.next(isFinal, 30000, froms.fans[i])),
  ]);
  // The port and clone are released before the state is announced; the next start may reuse them at once.
  const sinceStopped = (at: number) => epochMs(at) - stoppedAt;
  return {
    mqtt: sinceStopped(mqttAt.at),
    ws: sinceStopped(wsAt.at),
    fanout: Math.max(...fanAt.map((r) => sinceStopped(r.at))),
    killToMqtt: mqttAt.at - t0,
    killToWs: wsAt.at - t0,
  };
}

async function measure(agent: AgentProcess, runs: number, fanout: boolean): Promise<Sample[]> {
  const url = `mqtt://127.0.0.1:${agent.mqttPort}`;
  const watcher = await MqttWatcher.connect(url, `${ROOT_TOPIC}/instances/+`);
  const fans = fanout ? await Promise.all(Array.from({ length: SUBSCRIBERS }, () => MqttWatcher.connect(url, `${ROOT_TOPIC}/instances/+`))) : [];
  const events = await EventsSocket.connect(agent.apiPort);
  const stops = new StopTimes();
  const libvirt = await Connection.open('qemu:///system');
  await libvirt.watchLifecycle(stops.onEvents);
  try {
    const samples: Sample[] = [];
    for (let i = 0; i < runs; i++) {
      const s = await killAndTime(agent, watcher, fans, events, stops);
      samples.push(s);
      process.stderr.write(
        `run ${i + 1}/${runs}: stopped → mqtt ${round(s.mqtt)} ms, ws ${round(s.ws)} ms${fanout ? `, last of ${SUBSCRIBERS} ${round(s.fanout)} ms` : ''}; kill → mqtt ${round(s.killToMqtt)} ms\n`,
      );
    }
    return samples;
  } finally {
    await Promise.all([watcher.close(), events.close(), ...fans.map((f) => f.close()), libvirt.close()]);
  }
}

async function main() {
  const guest = path.join(ROOT, '.build', 'test-guest');
  if (spawnSync('bash', [path.join(ROOT, 'rootfs/guest/build-guest.sh'), guest], { stdio: 'inherit' }).status !== 0) throw new Error('guest build failed');
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-bench-telemetry-'));
  const config = path.join(scratch, 'agent.json');
  // Subscribers without credentials: the latency measured is the broker's, not a login's. All of them come from one
  // address at once, which the default limits (rightly) refuse: the bench's agent is configured for its load, as an
  // operator whose dashboards share a host would configure it.
  const connections = SUBSCRIBERS + 10;
  await writeFile(
    config,
    JSON.stringify({
      mqtt: { topicRoot: ROOT_TOPIC, access: 'anonymous-read' },
      limits: { requestBurst: connections + 100, mqttConnectionsPerAddress: connections },
    }),
  );

  let agent = await AgentProcess.start({ portRange: PORT_RANGE, env: { CLOUDLET_CONFIG: config } });
  try {
    const imported = await agent.post('/v1/services', { path: guest });
    if (imported.status !== 201) throw new Error(`import: ${imported.body}`);
    // Restored instances are ready in about a second: more runs in the same time.
    const capture = await agent.post(`/v1/services/${SERVICE}/state`);
    if (capture.status !== 200) throw new Error(`capture: ${capture.body}`);

    process.stderr.write(`libvirt lifecycle events, ${RUNS} runs, ${SUBSCRIBERS} extra MQTT subscribers:\n`);
    const events = await measure(agent, RUNS, true);

    // Same data directory, same catalog; only the way of noticing changes.
    await agent.stop();
    agent = await AgentProcess.start({ dataDir: agent.dataDir, portRange: PORT_RANGE, env: { CLOUDLET_CONFIG: config, CLOUDLET_LIBVIRT_EVENTS: '0' } });
    process.stderr.write(`reconcile poll only (every 1000 ms), ${POLL_RUNS} runs:\n`);
    const poll = await measure(agent, POLL_RUNS, false);

    const pick = (samples: Sample[], key: keyof Sample, q: number) =>
      round(
        quantile(
          samples.map((s) => s[key]),
          q,
        ),
      );
    process.stdout.write(
      JSON.stringify({
        bench: 'telemetry',
        ...(QUICK ? { quick: true } : {}),
        runs: RUNS,
        mqtt_latency_ms_median: pick(events, 'mqtt', 0.5),
        mqtt_latency_ms_p99: pick(events, 'mqtt', 0.99),
        ws_latency_ms_median: pick(events, 'ws', 0.5),
        ws_latency_ms_p99: pick(events, 'ws', 0.99),
        fanout_subscribers: SUBSCRIBERS,
        fanout_last_subscriber_ms_median: pick(events, 'fanout', 0.5),
        fanout_last_subscriber_ms_p99: pick(events, 'fanout', 0.99),
        kill_to_mqtt_ms_median: pick(events, 'killToMqtt', 0.5),
        kill_to_mqtt_ms_p99: pick(events, 'killToMqtt', 0.99),
        kill_to_ws_ms_median: pick(events, 'killToWs', 0.5),
        poll_runs: POLL_RUNS,
        poll_mqtt_latency_ms_median: pick(poll, 'mqtt', 0.5),
        poll_mqtt_latency_ms_p99: pick(poll, 'mqtt', 0.99),
        poll_ws_latency_ms_median: pick(poll, 'ws', 0.5),
        poll_kill_to_mqtt_ms_median: pick(poll, 'killToMqtt', 0.5),
      }) + '\n',
    );
  } catch (err) {
    process.stderr.write(`agent log (tail):\n${agent.log.slice(-4000)}\n`);
    throw err;
  } finally {
    await agent.dispose();
    await rm(scratch, { recursive: true, force: true });
  }
}

main().catch((err) => {
  process.stderr.write(`bench telemetry failed: ${err.stack ?? err}\n`);
  process.exit(1);
});
