// Shared by the benchmarks: statistics, the test guest as a named service, RSS, and a ready-time measurement
// through the real agent (request → the service's own HTTP answer through the forwarded port).
import { spawnSync } from 'node:child_process';
import { cp, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { ROOT, request, type AgentProcess } from '../../test/support/agent';

/**
 * `--quick` (CI's run of every benchmark, test/benchmarks.exclusive.test.ts): small sizes and one iteration, so all of
 * them take a few minutes; the same code paths run, and the JSON line keeps its keys (its figures mean little).
 */
export const QUICK = process.argv.includes('--quick');

/** `full` normally, `quick` with --quick. */
export const sized = <T>(full: T, quick: T): T => (QUICK ? quick : full);

/** Iterations: BENCH_RUNS when set, else `full`, or 1 with --quick. */
export const runsOf = (full: number): number => Number(process.env.BENCH_RUNS ?? sized(full, 1));

export const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

export const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;

/** The busybox HTTP test guest, built (or found up to date) under .build. */
export function testGuest(): string {
  const guest = path.join(ROOT, '.build', 'test-guest');
  if (spawnSync('bash', [path.join(ROOT, 'rootfs/guest/build-guest.sh'), guest], { stdio: 'inherit' }).status !== 0) throw new Error('guest build failed');
  return guest;
}

/** A copy of the guest directory under another service id. */
export async function guestAs(serviceId: string, scratch: string, guest: string): Promise<string> {
  const dir = path.join(scratch, serviceId);
  await cp(guest, dir, { recursive: true });
  const manifest = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8'));
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ ...manifest, service_id: serviceId, shareable: false }));
  return dir;
}

export async function rssMb(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => '');
  return Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) / 1024;
}

export interface Started {
  ms: number;
  /** performance.now() when the request was sent. */
  startedAt: number;
  instanceId: string;
  /** How it was launched: memory-state, warm-pool, cold-boot. */
  launch: string;
  timings: { total_ms: number; libvirt_ms: number; guest_ms: number; agent_ms: number };
}

/** Start an instance and wait for the service's first answer; the caller stops it (after measuring it idle, say). */
export async function startAndFetch(agent: AgentProcess, serviceId: string): Promise<Started> {
  const t0 = performance.now();
  const start = await agent.post('/v1/instances', { service_id: serviceId });
  if (start.status !== 201) throw new Error(`start ${serviceId}: ${start.status} ${start.body}`);
  const answer = await request(start.json.endpoint.port, 'GET', '/');
  const ms = performance.now() - t0;
  if (answer.status !== 200) throw new Error(`${serviceId} answered ${answer.status}`);
  return { ms, startedAt: t0, instanceId: start.json.instance.id, launch: start.json.instance.launch, timings: start.json.timings };
}

/** Request → the service's own HTTP answer through the forwarded port, as a phone would experience it; then stop. */
export async function readyTime(agent: AgentProcess, serviceId: string): Promise<Started> {
  const started = await startAndFetch(agent, serviceId);
  await agent.delete(`/v1/instances/${started.instanceId}`);
  return started;
}
