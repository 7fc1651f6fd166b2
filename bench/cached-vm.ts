// ./build.sh bench cached-vm — application-ready time of a Cached VM: memory-state restore vs cold boot of the same
// guest, measured in one run through the real agent, plus the agent's own overhead, idle RSS and start time.
// Ends with one line of JSON.
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { AgentProcess } from '../test/support/agent';
import { guestAs, median, readyTime, round, rssMb, runsOf, testGuest } from './support/measure';

const RUNS = runsOf(5);
const COLD = 'bench.cold';
const WARM = 'bench.restore';

async function main() {
  const guest = testGuest();
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
