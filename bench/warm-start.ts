// ./build.sh bench warm-start — application-ready time (request → the guest's first answer through its forward) of a
// start handed a VM of the warm pool, against a restore of the same memory state, interleaved in one run through the
// real agent; how long the pool takes to refill after a start took its VM; the agent's memory, and what a pooled VM
// costs. Ends with one line of JSON.
import { readdir, readFile, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { AgentProcess } from '../test/support/agent';
import { guestAs, median, readyTime, round, rssMb, runsOf, testGuest } from './support/measure';

const RUNS = runsOf(7);
/** Kept warm: a pool of 1. */
const POOLED = 'bench.pooled';
/** The same memory state, with no pool: every start restores. */
const RESTORED = 'bench.restored';
/** Generous: a restore under TCG on a loaded machine takes seconds. */
const REFILL_TIMEOUT_MS = 120_000;

interface Pool {
  ready: number;
  filling: number;
}

async function poolOf(agent: AgentProcess, id: string): Promise<Pool> {
  return (await agent.get(`/v1/services/${id}`)).json.pool;
}

/** Polls (every 20 ms) until the pool of `id` holds a ready VM and fills nothing; resolves with when it saw that. */
async function untilRefilled(agent: AgentProcess, id: string): Promise<number> {
  const deadline = performance.now() + REFILL_TIMEOUT_MS;
  for (;;) {
    const pool = await poolOf(agent, id);
    if (pool.ready >= 1 && pool.filling === 0) return performance.now();
    if (performance.now() > deadline) throw new Error(`the pool of ${id} did not refill within ${REFILL_TIMEOUT_MS} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The resident memory of the QEMU process of the domain `uuid`, from its command line. */
async function qemuRssMb(uuid: string): Promise<number> {
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.includes(`uuid\0${uuid}`)) return rssMb(Number(pid));
  }
  return NaN;
}

async function main() {
  const guest = testGuest();
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-bench-'));
  const config = path.join(scratch, 'agent.json');
  await writeFile(config, JSON.stringify({ pool: { sizes: { [POOLED]: 1, [RESTORED]: 0 } } }));
  const agent = await AgentProcess.start({ portRange: '23300-23399', env: { CLOUDLET_CONFIG: config, CLOUDLET_POOL_BUDGET_MIB: '512' } });
  try {
    const imported = await agent.post('/v1/services', { path: await guestAs(POOLED, scratch, guest) });
    if (imported.status !== 201) throw new Error(`import ${POOLED}: ${imported.body}`);
    const captured = await agent.post(`/v1/services/${POOLED}/state`);
    if (captured.status !== 200) throw new Error(`capture: ${captured.body}`);
    // The same disk and memory state under a second id, whose pool is 0.
    const copy = await agent.post('/v1/services', { path: await guestAs(RESTORED, scratch, captured.json.dir) });
    if (copy.status !== 201) throw new Error(`import ${RESTORED}: ${copy.body}`);
    await untilRefilled(agent, POOLED);
    const pooledId = await pooledDomain(agent);
    const pooledVmRss = pooledId ? await qemuRssMb(pooledId) : NaN;
    const agentRss = await rssMb(agent.pid ?? 0);

    const warm: number[] = [];
    const restore: number[] = [];
    const refill: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      // Interleaved, so drift on the machine affects both alike; each measured with no fill under way.
      const w = await readyTime(agent, POOLED);
      if (w.launch !== 'warm-pool') throw new Error(`run ${i + 1}: the start of ${POOLED} was a ${w.launch}, not a pooled VM`);
      const refilled = await untilRefilled(agent, POOLED);
      const r = await readyTime(agent, RESTORED);
      warm.push(w.ms);
      restore.push(r.ms);
      refill.push(refilled - w.startedAt);
      process.stderr.write(
        `run ${i + 1}: warm ${round(w.ms)} ms, restore ${round(r.ms)} ms, refilled ${round(refilled - w.startedAt)} ms after the warm start\n`,
      );
    }
    const result = {
      bench: 'warm-start',
      runs: RUNS,
      warm_ready_ms: round(median(warm)),
      restore_ready_ms: round(median(restore)),
      warm_vs_restore: round(median(warm) / median(restore), 3),
      refill_ms: round(median(refill)),
      agent_rss_mb: round(agentRss),
      agent_rss_after_mb: round(await rssMb(agent.pid ?? 0)),
      pooled_vm_rss_mb: round(pooledVmRss),
    };
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    await agent.dispose();
    await rm(scratch, { recursive: true, force: true });
  }
}

/** The pooled VM, while it is the agent's only VM: the one instance directory (no instance is listed then). */
async function pooledDomain(agent: AgentProcess): Promise<string | null> {
  const dirs = await readdir(path.join(agent.dataDir, 'instances'));
  return dirs.length === 1 ? dirs[0]! : null;
}

main().catch((err) => {
  process.stderr.write(`bench warm-start failed: ${err.stack ?? err}\n`);
  process.exit(1);
});
