// ./build.sh bench http — the HTTP path under load: GET /api/services (the open KD face) and a paired device's
// GET /v1/instances through the agent, against a node:http server (bench/support/same-bytes-server.ts) answering
// the same paths with the same bytes, each in a process of its own, in the same run. The load is wrk (C, epoll) at
// BENCH_CONNECTIONS (100) keep-alive connections; runs alternate between the two servers so that drift on the machine
// hits both alike. On a machine of 2 CPUs or more, each server is pinned to CPU 0 and wrk to the others (taskset), so
// the load generator never takes the server's CPU and both servers get the same one. The rate limits are raised for
// the run through the agent's config file, as an operator would. Ends with one line of JSON: requests/s over both
// routes (agent_rps, node_http_rps), their ratio, the worse route's p99 (saturated: with 100 connections it is about
// 100 ÷ requests/s by Little's law), and each server's CPU time per request (its own cost, whatever the load).
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { AgentProcess } from '../test/support/agent';
import { as, pairDevice } from '../test/support/pairing';
import { median, round, runsOf, sized, testGuest } from './support/measure';
import { startSameBytesServer, type CannedReply, type SameBytesServer } from './support/same-bytes';
import { wrk } from './support/wrk';

const RUNS = runsOf(3);
const SECONDS = Number(process.env.BENCH_SECONDS ?? sized(8, 2));
const CONNECTIONS = Number(process.env.BENCH_CONNECTIONS ?? 100);

/** Headers each server writes itself: everything else in the agent's reply is served as it was. */
const OWN_HEADERS = new Set(['date', 'content-length', 'connection', 'keep-alive', 'uwebsockets']);

interface Load {
  rps: number;
  p50: number;
  p99: number;
  /** The server's CPU time (user + system) per request: its cost, whatever the load generator could send. */
  cpuUs: number;
}

/** A process's CPU time so far in µs (/proc/PID/stat utime + stime, in clock ticks of 10 ms). */
async function cpuUs(pid: number): Promise<number> {
  const fields = (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1]!.split(' ');
  return (Number(fields[11]) + Number(fields[12])) * 10_000;
}

/** With 2 CPUs or more: the servers on CPU 0, wrk on the rest (one thread each); else all share the one. */
const CPUS = os.availableParallelism();
const PINNED = CPUS >= 2;
const WRK_CPUS = PINNED ? `1-${CPUS - 1}` : undefined;
const WRK_THREADS = PINNED ? CPUS - 1 : 1;

/** Pins every thread of a server process to CPU 0. */
async function pinServer(pid: number): Promise<void> {
  if (PINNED) await promisify(execFile)('taskset', ['-a', '-p', '-c', '0', String(pid)]);
}

async function load(url: string, headers: Record<string, string>, serverPid: number): Promise<Load> {
  const cpuBefore = await cpuUs(serverPid);
  const result = await wrk({ url, connections: CONNECTIONS, seconds: SECONDS, threads: WRK_THREADS, headers, cpus: WRK_CPUS });
  const cpu = (await cpuUs(serverPid)) - cpuBefore;
  if (result.failed > 0) throw new Error(`${url}: ${result.failed} of ${result.requests} requests failed or were not 2xx`);
  return { rps: result.rps, p50: result.p50Ms, p99: result.p99Ms, cpuUs: cpu / result.requests };
}

async function main() {
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-bench-http-'));
  const configFile = path.join(scratch, 'agent.json');
  // Far above what the load generator can send: the run measures the path, not the limiter's refusals.
  await writeFile(configFile, JSON.stringify({ limits: { requestsPerSecond: 10_000_000, requestBurst: 10_000_000 } }));
  const agent = await AgentProcess.start({ portRange: '24020-24029', env: { CLOUDLET_CONFIG: configFile } });
  let baseline: SameBytesServer | undefined;
  try {
    // What a real cloudlet lists: its demo service.
    const imported = await agent.post('/v1/services', { path: testGuest() });
    if (imported.status !== 201) throw new Error(`import: ${imported.body}`);
    const device = await pairDevice(agent, 'bench phone');
    const routes = [
      { path: '/api/services', headers: {} as Record<string, string> },
      { path: '/v1/instances', headers: as(device.token) },
    ];
    const replies: Record<string, CannedReply> = {};
    for (const route of routes) {
      const r = await agent.get(route.path, route.headers.authorization ? route.headers : { authorization: '' });
      if (r.status !== 200) throw new Error(`${route.path}: ${r.status} ${r.body}`);
      const headers = Object.fromEntries(Object.entries(r.headers).filter(([name]) => !OWN_HEADERS.has(name))) as Record<string, string>;
      replies[route.path] = { status: r.status, headers, body: r.body };
    }
    const started = await startSameBytesServer(replies, path.join(scratch, 'replies.json'));
    baseline = started;
    await pinServer(agent.pid!);
    await pinServer(started.proc.pid!);

    const figures = new Map<string, { agent: Load[]; node: Load[] }>();
    const line = (l: Load) => `${round(l.rps, 0)} req/s, p99 ${round(l.p99, 2)} ms, ${round(l.cpuUs)} µs CPU/request`;
    for (const route of routes) {
      const runs = { agent: [] as Load[], node: [] as Load[] };
      figures.set(route.path, runs);
      const nodeUrl = `http://127.0.0.1:${started.port}${route.path}`;
      const agentUrl = `http://127.0.0.1:${agent.apiPort}${route.path}`;
      for (let i = 0; i < RUNS; i++) {
        runs.node.push(await load(nodeUrl, route.headers, started.proc.pid!));
        runs.agent.push(await load(agentUrl, route.headers, agent.pid!));
        process.stderr.write(`${route.path} run ${i + 1}: agent ${line(runs.agent.at(-1)!)}; node:http ${line(runs.node.at(-1)!)}\n`);
      }
    }
    const perRoute = [...figures.entries()].map(([route, runs]) => ({
      route,
      agent: median(runs.agent.map((r) => r.rps)),
      node: median(runs.node.map((r) => r.rps)),
      p50: median(runs.agent.map((r) => r.p50)),
      p99: median(runs.agent.map((r) => r.p99)),
      nodeP99: median(runs.node.map((r) => r.p99)),
      cpu: median(runs.agent.map((r) => r.cpuUs)),
      nodeCpu: median(runs.node.map((r) => r.cpuUs)),
    }));
    const [services, instances] = perRoute;
    const agentRps = perRoute.reduce((sum, r) => sum + r.agent, 0) / perRoute.length;
    const nodeRps = perRoute.reduce((sum, r) => sum + r.node, 0) / perRoute.length;
    const result = {
      bench: 'http',
      runs: RUNS,
      seconds: SECONDS,
      connections: CONNECTIONS,
      pinned: PINNED,
      agent_rps: round(agentRps, 0),
      node_http_rps: round(nodeRps, 0),
      rps_vs_node_http: round(agentRps / nodeRps, 2),
      p99_ms: round(Math.max(...perRoute.map((r) => r.p99)), 2),
      node_http_p99_ms: round(Math.max(...perRoute.map((r) => r.nodeP99)), 2),
      services_rps: round(services!.agent, 0),
      services_vs_node_http: round(services!.agent / services!.node, 2),
      instances_rps: round(instances!.agent, 0),
      instances_vs_node_http: round(instances!.agent / instances!.node, 2),
      p50_ms: round(Math.max(...perRoute.map((r) => r.p50)), 2),
      cpu_us_per_request: round(perRoute.reduce((sum, r) => sum + r.cpu, 0) / perRoute.length),
      node_http_cpu_us_per_request: round(perRoute.reduce((sum, r) => sum + r.nodeCpu, 0) / perRoute.length),
    };
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    baseline?.stop();
    await agent.dispose();
    await rm(scratch, { recursive: true, force: true });
  }
}

main().catch((err) => {
  process.stderr.write(`bench http failed: ${err.stack ?? err}\n`);
  process.exit(1);
});
