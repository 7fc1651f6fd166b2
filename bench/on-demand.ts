// ./build.sh bench on-demand — application-ready time of On-Demand VM Provisioning (a recipe applied to the busybox
// Base VM at request time) vs a Cached VM start of that recipe's cached result, in one run through the real agent.
// Ends with one line of JSON.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { AgentProcess, ROOT, request } from '../test/support/agent';
import { runsOf } from './support/measure';

const RUNS = runsOf(5);
const RECIPE = 'bench.on-demand';

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;

const recipe = (serviceId: string) => ({
  format: 1,
  service_id: serviceId,
  version: '1',
  base: 'busybox',
  port: 8080,
  readiness: { type: 'http', path: '/', timeout_ms: 60000 },
  files: [{ path: '/srv/www/index.html', content: 'hello from a recipe\n' }],
  script: '#!/bin/sh\nset -e\necho "provisioned at $(cat /proc/uptime)" >> /srv/www/index.html\n',
});

/** Request → the guest's own HTTP answer through the forwarded port, as a phone would experience it. */
async function readyTime(agent: AgentProcess, id: string, mechanism: string) {
  const t0 = performance.now();
  const start = await agent.post(`/v1/recipes/${id}/instances`);
  if (start.status !== 201) throw new Error(`provision ${id}: ${start.status} ${start.body}`);
  if (start.json.instance.mechanism !== mechanism) throw new Error(`expected ${mechanism}, got ${start.json.instance.mechanism}`);
  const answer = await request(start.json.endpoint.port, 'GET', '/');
  const ms = performance.now() - t0;
  if (answer.status !== 200 || !answer.body.startsWith('hello from a recipe')) throw new Error(`guest answered ${answer.status} ${answer.body}`);
  await agent.delete(`/v1/instances/${start.json.instance.id}`);
  return ms;
}

async function main() {
  const guest = path.join(ROOT, '.build', 'test-guest');
  if (spawnSync('bash', [path.join(ROOT, 'rootfs/guest/build-guest.sh'), guest], { stdio: 'inherit' }).status !== 0) throw new Error('guest build failed');
  const agent = await AgentProcess.start({ portRange: '23800-23899' });
  try {
    const base = await agent.post('/v1/bases', { path: guest, name: 'busybox' });
    if (base.status !== 201) throw new Error(`base import: ${base.body}`);
    // Two copies of one recipe: one is only ever provisioned, the other is served from its cached result.
    const cachedId = `${RECIPE}.cached`;
    for (const id of [RECIPE, cachedId]) {
      const r = await agent.post('/v1/recipes', recipe(id));
      if (r.status !== 201) throw new Error(`recipe ${id}: ${r.body}`);
    }
    const t0 = performance.now();
    const cache = await agent.post(`/v1/recipes/${cachedId}/cache`);
    if (cache.status !== 200) throw new Error(`cache: ${cache.body}`);
    const cacheMs = performance.now() - t0;

    const onDemand: number[] = [];
    const cached: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      // Interleaved, so drift on the machine affects both alike.
      onDemand.push(await readyTime(agent, RECIPE, 'on-demand'));
      cached.push(await readyTime(agent, cachedId, 'cached-vm'));
      process.stderr.write(`run ${i + 1}: on demand ${round(onDemand[i]!)} ms, cached ${round(cached[i]!)} ms\n`);
    }
    process.stdout.write(
      JSON.stringify({
        bench: 'on-demand',
        runs: RUNS,
        on_demand_ready_ms: round(median(onDemand)),
        cached_ready_ms: round(median(cached)),
        cached_vs_on_demand: round(median(cached) / median(onDemand), 3),
        cache_result_ms: round(cacheMs),
      }) + '\n',
    );
  } finally {
    await agent.dispose();
  }
}

main().catch((err) => {
  process.stderr.write(`bench on-demand failed: ${err.stack ?? err}\n`);
  process.exit(1);
});
