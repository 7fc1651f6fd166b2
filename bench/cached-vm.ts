// ./build.sh bench cached-vm — application-ready time of a Cached VM: memory-state restore vs cold boot of the same
// guest, measured in one run through the real agent, plus the agent's own overhead, idle RSS and start time.
// Ends with one line of JSON.
import { spawnSync } from 'node:child_process';
import { cp, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { AgentProcess, ROOT, request } from '../test/support/agent';

const RUNS = Number(process.env.BENCH_RUNS ?? 5);
const COLD = 'bench.cold';
const WARM = 'bench.restore';

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;

async function guestAs(serviceId: string, scratch: string, guest: string): Promise<string> {
  const dir = path.join(scratch, serviceId);
  await cp(guest, dir, { recursive: true });
  const manifest = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8'));
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ ...manifest, service_id: serviceId, shareable: false }));
  return dir;
}

async function rssMb(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) / 1024;
}

/** Request → the guest's own HTTP answer through the forwarded port, as a phone would experience it. */
async function readyTime(agent: AgentProcess, serviceId: string) {
  const t0 = performance.now();
  const start = await agent.post('/v1/instances', { service_id: serviceId });
  if (start.status !== 201) throw new Error(`start ${serviceId}: ${start.status} ${start.body}`);
  const answer = await request(start.json.endpoint.port, 'GET', '/');
  const ms = performance.now() - t0;
  if (answer.status !== 200) throw new Error(`guest answered ${answer.status}`);
  await agent.delete(`/v1/instances/${start.json.instance.id}`);
  return { ms, timings: start.json.timings as { total_ms: number; libvirt_ms: number; guest_ms: number; agent_ms: number } };
}

async function main() {
  const guest = path.join(ROOT, '.build', 'test-guest');
  if (spawnSync('bash', [path.join(ROOT, 'rootfs/guest/build-guest.sh'), guest], { stdio: 'inherit' }).status !== 0) throw new Error('guest build failed');
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-bench-'));

  const agent = await AgentProcess.start({ portRange: '23000-23099' });
  try {
    const startMs = Number(/listening on \S+ after (\d+) ms/.exec(agent.log)?.[1] ?? NaN);
    await new Promise((r) => setTimeout(r, 1000));
    const idleRss = await rssMb(agent.pid ?? 0);

    for (const id of [COLD, WARM]) {
      const r = await agent.post('/v1/services', { path: await guestAs(id, scratch, guest) });
      if (r.status !== 201) throw new Error(`import ${id}: ${r.body}`);
    }
    const capture = await agent.post(`/v1/services/${WARM}/state`);
    if (capture.status !== 200) throw new Error(`capture: ${capture.body}`);

    const cold: number[] = [];
    const restore: number[] = [];
    const overhead: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      // Interleaved, so drift on the machine affects both alike.
      const c = await readyTime(agent, COLD);
      const w = await readyTime(agent, WARM);
      cold.push(c.ms);
      restore.push(w.ms);
      overhead.push(c.timings.agent_ms, w.timings.agent_ms);
      process.stderr.write(`run ${i + 1}: cold ${round(c.ms)} ms (agent ${c.timings.agent_ms}), restore ${round(w.ms)} ms (agent ${w.timings.agent_ms})\n`);
    }
    const result = {
      bench: 'cached-vm',
      runs: RUNS,
      restore_ready_ms: round(median(restore)),
      cold_ready_ms: round(median(cold)),
      restore_vs_cold: round(median(restore) / median(cold), 3),
      agent_overhead_ms: round(median(overhead)),
      idle_rss_mb: round(idleRss),
      start_ms: round(startMs),
    };
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    await agent.dispose();
    await rm(scratch, { recursive: true, force: true });
  }
}

main().catch((err) => {
  process.stderr.write(`bench cached-vm failed: ${err.stack ?? err}\n`);
  process.exit(1);
});
