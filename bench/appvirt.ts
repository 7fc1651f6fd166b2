// ./build.sh bench appvirt — application-ready time of the same busybox HTTP service as a sandboxed app package
// and as a Cached VM restored from its memory state, in one run through the real agent, and the idle memory of one
// instance of each. Ends with one line of JSON.
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { SandboxCgroup, openCgroups } from '../agent/src/sandbox/cgroups';
import { AgentProcess } from '../test/support/agent';
import { buildHttpdPackage } from '../test/support/app-package';
import { guestAs, median, readyTime, round, rssMb, runsOf, startAndFetch, testGuest } from './support/measure';

const RUNS = runsOf(5);
const APP = 'bench.appvirt';
const VM = 'bench.vm';
const run = promisify(execFile);

/** Every process of a sandbox: pasta (`net`) and the sandboxed tree (`app`). */
async function sandboxRssMb(instanceId: string): Promise<{ total: number; app: number }> {
  const cgroup = new SandboxCgroup(await openCgroups(), instanceId);
  const sum = async (pids: number[]) => (await Promise.all(pids.map(rssMb))).reduce((a, b) => a + b, 0);
  const app = await sum(await cgroup.pids('app'));
  return { app, total: app + (await sum(await cgroup.pids('net'))) };
}

async function qemuRssMb(instanceId: string): Promise<number> {
  const { stdout } = await run('pgrep', ['-f', `uuid ${instanceId}`]);
  return rssMb(Number(stdout.trim().split('\n')[0]));
}

async function main() {
  const guest = testGuest();
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-bench-'));
  const agent = await AgentProcess.start({ portRange: '23400-23499' });
  try {
    const hostSecret = path.join(scratch, 'unused');
    await writeFile(hostSecret, '');
    const tarball = await buildHttpdPackage(scratch, { appId: APP, hostSecret, memoryMib: 64 });
    for (const [what, body] of [
      ['package', { path: tarball }],
      ['service', { path: await guestAs(VM, scratch, guest) }],
    ] as const) {
      const r = await agent.post(what === 'package' ? '/v1/packages' : '/v1/services', body);
      if (r.status !== 201) throw new Error(`import ${what}: ${r.body}`);
    }
    const capture = await agent.post(`/v1/services/${VM}/state`);
    if (capture.status !== 200) throw new Error(`capture: ${capture.body}`);

    const app: number[] = [];
    const vm: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      // Interleaved, so drift on the machine affects both alike.
      const a = await readyTime(agent, APP);
      const v = await readyTime(agent, VM);
      app.push(a.ms);
      vm.push(v.ms);
      process.stderr.write(`run ${i + 1}: appvirt ${round(a.ms)} ms (agent ${a.timings.agent_ms}), vm ${round(v.ms)} ms (agent ${v.timings.agent_ms})\n`);
    }

    // Idle: started, answered once, then left alone for a second.
    const idleApp = await startAndFetch(agent, APP);
    const idleVm = await startAndFetch(agent, VM);
    await new Promise((r) => setTimeout(r, 1000));
    const appRss = await sandboxRssMb(idleApp.instanceId);
    const vmRss = await qemuRssMb(idleVm.instanceId);
    for (const started of [idleApp, idleVm]) await agent.delete(`/v1/instances/${started.instanceId}`);

    const result = {
      bench: 'appvirt',
      runs: RUNS,
      appvirt_ready_ms: round(median(app)),
      vm_ready_ms: round(median(vm)),
      appvirt_vs_vm: round(median(app) / median(vm), 3),
      appvirt_idle_rss_mb: round(appRss.total),
      appvirt_app_only_rss_mb: round(appRss.app),
      vm_idle_rss_mb: round(vmRss),
      cgroup_version: (await openCgroups()).version,
    };
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    await agent.dispose();
    await rm(scratch, { recursive: true, force: true });
  }
}

main().catch((err) => {
  process.stderr.write(`bench appvirt failed: ${err.stack ?? err}\n`);
  process.exit(1);
});
