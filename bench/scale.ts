// ./build.sh bench scale — how the agent's cost grows with its work: 1, 10 and 50 concurrent instances (app
// sandboxes for density, with 4 Cached VMs among them at the top step), while 100 MQTT subscribers listen and 50
// paired devices each call GET /v1/instances once a second. At each step, over a steady window: the agent's private
// memory (anonymous RSS, /proc/PID/status RssAnon: the heap and what the agent allocated, not the file pages of the
// Node binary), p50/p99 latency of GET /v1/instances (the operator's, listing every instance, and the devices') and
// GET /api/services, the reconcile poll's cost and the event loop's delay (both from /v1/health's `load`, which the
// agent measures itself). Beside the agent, in the same window and on the same kept-alive terms, a node:http process
// answering a canned reply (bench/support/same-bytes-server.ts) is timed too: what the machine itself (4 VMs under TCG,
// the load generators) adds to any server's p99, told apart from the agent's own. Before any of it: the idle agent's
// private memory next to its RSS, and bare `node`'s as the baseline. `--quick`: steps of 1 and 3 instances (one VM),
// 10 devices, 20 subscribers. Ends with one line of JSON.
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import type { MqttClient } from 'mqtt';
import { LOOP_WINDOW_MS } from '../agent/src/system/loop-delay';
import { AgentProcess, adminHeaders } from '../test/support/agent';
import { buildHttpdPackage, destroySandboxesUnder } from '../test/support/app-package';
import { connectMqtt } from '../test/support/listeners';
import { as, pairDevice } from '../test/support/pairing';
import { QUICK, guestAs, median, round, sized, testGuest } from './support/measure';
import { startSameBytesServer } from './support/same-bytes';

const STEPS = sized([1, 10, 50], [1, 3]);
const VMS = sized(4, 1);
const DEVICES = sized(50, 10);
const SUBSCRIBERS = sized(100, 20);
/** A step's steady window: long enough that the agent's last complete event-loop window (LOOP_WINDOW_MS) lies inside. */
const WINDOW_MS = 2 * LOOP_WINDOW_MS + sized(5000, 1000);
const APP = 'bench.scale.app';
const VM = 'bench.scale.vm';

const quantile = (xs: number[], q: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]! : NaN;
};

/** Anonymous and total resident memory of a process, in MB. */
async function memoryOf(pid: number): Promise<{ anonMb: number; rssMb: number }> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const kb = (field: string) => Number(new RegExp(`${field}:\\s+(\\d+)`).exec(status)?.[1] ?? NaN);
  return { anonMb: kb('RssAnon') / 1024, rssMb: kb('VmRSS') / 1024 };
}

/** The median of a process's memory sampled every 250 ms for `ms` (the heap breathes with GC). */
async function settledMemory(pid: number, ms: number): Promise<{ anonMb: number; rssMb: number }> {
  const samples: { anonMb: number; rssMb: number }[] = [];
  for (const until = Date.now() + ms; Date.now() < until; await new Promise((r) => setTimeout(r, 250))) samples.push(await memoryOf(pid));
  return { anonMb: median(samples.map((s) => s.anonMb)), rssMb: median(samples.map((s) => s.rssMb)) };
}

/** A GET on a kept-alive connection, timed from sending to the answer's last byte. */
function timedGet(port: number, urlPath: string, headers: Record<string, string>, agent: http.Agent): Promise<number> {
  const started = performance.now();
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port, path: urlPath, headers, agent }, (res) => {
        res.resume();
        res.on('end', () => (res.statusCode === 200 ? resolve(performance.now() - started) : reject(new Error(`${urlPath}: ${res.statusCode}`))));
      })
      .on('error', reject);
  });
}

async function main() {
  // Bare node, the floor of any Node process's private memory.
  const bare = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1e9)'], { stdio: 'ignore' });
  await new Promise((r) => setTimeout(r, 1000));
  const bareNode = await settledMemory(bare.pid!, 1000);
  bare.kill();

  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-bench-scale-'));
  const configFile = path.join(scratch, 'agent.json');
  // As an operator sizing a busy box would: launches run a few at a time and queue, every subscriber of this one
  // test host may connect, and its burst of connections (each MQTT connection takes a request token of its address)
  // and pairing claims is allowed.
  const limits = { concurrentLaunches: 4, queuedLaunches: 64, mqttConnectionsPerAddress: SUBSCRIBERS + 10, requestBurst: 4 * (SUBSCRIBERS + DEVICES) };
  await writeFile(configFile, JSON.stringify({ limits, mqtt: { topicRoot: 'cloudlet/bench' } }));
  const agent = await AgentProcess.start({ portRange: '24100-24199', env: { CLOUDLET_CONFIG: configFile } });
  const pid = agent.pid!;
  const stopping: (() => void)[] = [];
  const subscribers: MqttClient[] = [];
  try {
    await new Promise((r) => setTimeout(r, 2000));
    const idle = await settledMemory(pid, 2000);
    process.stderr.write(`idle: anonymous ${round(idle.anonMb)} MB of RSS ${round(idle.rssMb)} MB (bare node ${round(bareNode.anonMb)} MB)\n`);

    const hostSecret = path.join(scratch, 'unused');
    await writeFile(hostSecret, '');
    const tarball = await buildHttpdPackage(scratch, { appId: APP, hostSecret, memoryMib: 32 });
    for (const [route, body] of [
      ['/v1/packages', { path: tarball }],
      ['/v1/services', { path: await guestAs(VM, scratch, testGuest()) }],
    ] as const) {
      const r = await agent.post(route, body);
      if (r.status !== 201) throw new Error(`import ${route}: ${r.body}`);
    }

    // The steady background: devices polling once a second, subscribers listening.
    const devices = [];
    for (let i = 0; i < DEVICES; i++) devices.push(await pairDevice(agent, `bench phone ${i}`));
    let received = 0;
    for (let i = 0; i < SUBSCRIBERS; i++) {
      const device = devices[i % devices.length]!;
      const client = await connectMqtt(`mqtt://127.0.0.1:${agent.mqttPort}`, { username: device.id, password: device.token });
      client.on('message', () => received++);
      await client.subscribeAsync('cloudlet/bench/#');
      subscribers.push(client);
    }
    let deviceTimes: number[] = [];
    let pollFailures = 0;
    devices.forEach((device, i) => {
      const keepAlive = new http.Agent({ keepAlive: true, maxSockets: 1 });
      const poll = () => {
        timedGet(agent.apiPort, '/v1/instances', as(device.token), keepAlive).then(
          (ms) => deviceTimes.push(ms),
          () => pollFailures++,
        );
      };
      // Spread over the second, as phones that woke at different times.
      const timer = setTimeout(
        () => {
          poll();
          const every = setInterval(poll, 1000);
          stopping.push(() => clearInterval(every));
        },
        (1000 * i) / devices.length,
      );
      stopping.push(() => {
        clearTimeout(timer);
        keepAlive.destroy();
      });
    });

    const admin = adminHeaders(agent.apiPort);
    const started: string[] = [];
    const start = async (serviceId: string) => {
      const r = await agent.post('/v1/instances', { service_id: serviceId });
      if (r.status !== 201) throw new Error(`start ${serviceId}: ${r.status} ${r.body}`);
      started.push(r.json.instance.id);
    };
    const steps: Record<string, number>[] = [];
    for (const count of STEPS) {
      const top = count === STEPS.at(-1);
      const vms = top ? VMS : 0;
      const wanted = [...Array<string>(count - vms - started.length).fill(APP), ...Array<string>(vms).fill(VM)];
      // A few at a time, as the launch gate runs them anyway.
      for (let i = 0; i < wanted.length; i += 4) await Promise.all(wanted.slice(i, i + 4).map(start));
      process.stderr.write(`step ${count}: ${started.length} instances running; measuring for ${WINDOW_MS / 1000} s\n`);

      deviceTimes = [];
      // A connection of its own each step: uWS closes one left idle while the step's instances start.
      const sampler = new http.Agent({ keepAlive: true, maxSockets: 1 });
      stopping.push(() => sampler.destroy());
      const operatorTimes: number[] = [];
      const servicesTimes: number[] = [];
      const controlTimes: number[] = [];
      // The control answers what the operator's list is now, from a process that does nothing else.
      const listing = { status: 200, headers: { 'Content-Type': 'application/json; charset=utf-8' }, body: (await agent.get('/v1/instances')).body };
      const control = await startSameBytesServer({ '/v1/instances': listing }, path.join(scratch, 'control.json'));
      stopping.push(() => control.stop());
      const controlAgent = new http.Agent({ keepAlive: true, maxSockets: 1 });
      stopping.push(() => controlAgent.destroy());
      const memory = settledMemory(pid, WINDOW_MS);
      for (const until = Date.now() + WINDOW_MS; Date.now() < until; await new Promise((r) => setTimeout(r, 50))) {
        operatorTimes.push(await timedGet(agent.apiPort, '/v1/instances', admin, sampler));
        servicesTimes.push(await timedGet(agent.apiPort, '/api/services', admin, sampler));
        controlTimes.push(await timedGet(control.port, '/v1/instances', {}, controlAgent));
      }
      control.stop();
      const { anonMb, rssMb } = await memory;
      const health = (await agent.get('/v1/health')).json;
      const listed = (await agent.get('/v1/instances')).json.instances.length;
      if (listed !== count) throw new Error(`step ${count}: the agent lists ${listed} instances`);
      const all = [...operatorTimes, ...servicesTimes, ...deviceTimes];
      const step = {
        instances: count,
        private_mb: round(anonMb, 2),
        rss_mb: round(rssMb),
        p50_ms: round(quantile(all, 0.5), 2),
        p99_ms: round(quantile(all, 0.99), 2),
        instances_p99_ms: round(quantile(operatorTimes, 0.99), 2),
        services_p99_ms: round(quantile(servicesTimes, 0.99), 2),
        devices_p99_ms: round(quantile(deviceTimes, 0.99), 2),
        control_p99_ms: round(quantile(controlTimes, 0.99), 2),
        reconcile_ms: health.load.reconcile_ms.median,
        reconcile_max_ms: health.load.reconcile_ms.max,
        loop_lag_ms_p99: health.load.event_loop_delay_ms.p99,
      };
      process.stderr.write(`step ${count}: ${JSON.stringify(step)}\n`);
      steps.push(step);
    }
    if (pollFailures > 0) throw new Error(`${pollFailures} device polls failed`);
    if (received === 0) throw new Error('no subscriber received anything');

    const first = steps[0]!;
    const last = steps.at(-1)!;
    const result = {
      bench: 'scale',
      quick: QUICK,
      steps: STEPS,
      vms: VMS,
      devices: DEVICES,
      subscribers: SUBSCRIBERS,
      idle_private_mb: round(idle.anonMb, 2),
      idle_rss_mb: round(idle.rssMb),
      bare_node_private_mb: round(bareNode.anonMb, 2),
      private_mb_1: first.private_mb,
      private_mb_50: last.private_mb,
      private_kb_per_instance: round(((last.private_mb! - first.private_mb!) * 1024) / (last.instances! - first.instances!), 0),
      p50_ms_50: last.p50_ms,
      p99_ms_1: first.p99_ms,
      p99_ms_50: last.p99_ms,
      control_p99_ms_50: last.control_p99_ms,
      reconcile_ms_1: first.reconcile_ms,
      reconcile_ms_50: last.reconcile_ms,
      reconcile_max_ms_50: last.reconcile_max_ms,
      loop_lag_ms_p99_1: first.loop_lag_ms_p99,
      loop_lag_ms_p99_50: last.loop_lag_ms_p99,
      mqtt_messages: received,
      by_step: steps,
    };
    for (const id of started) await agent.delete(`/v1/instances/${id}`);
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    for (const stop of stopping) stop();
    await Promise.all(subscribers.map((client) => client.endAsync(true)));
    // Sandboxes outlive their agent (as VMs do): whatever a failed run left is ended here.
    await agent.stop();
    await destroySandboxesUnder(agent.dataDir);
    await agent.dispose();
    await rm(scratch, { recursive: true, force: true });
  }
}

main().catch((err) => {
  process.stderr.write(`bench scale failed: ${err.stack ?? err}\n`);
  process.exit(1);
});
