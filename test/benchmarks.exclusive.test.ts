// Every benchmark still runs: each bench/NAME in its quick mode (small sizes, one iteration), as a child process, must
// exit 0 and end with its one JSON line, named after it, holding its headline figures and no missing figure (a NaN
// prints as null). A change that breaks a benchmark fails the suite. Exclusive: the benchmarks start the agent, VMs and
// sandboxes of their own, and their figures would only disturb (and be disturbed by) the other files.
import t from 'tap';
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { ROOT } from './support/agent';

/** Each benchmark's headline figures (docs/benchmarks.md), besides `bench`. */
const HEADLINES: Record<string, string[]> = {
  appvirt: ['appvirt_ready_ms', 'vm_ready_ms'],
  'cached-vm': ['restore_ready_ms', 'cold_ready_ms', 'agent_overhead_ms', 'idle_rss_mb'],
  fleet: ['cloudlets', 'fleet_latency_ms_median', 'fleet_latency_ms_p99', 'offline_detect_ms', 'offline_silent_ms', 'replay_1000_ms'],
  http: ['agent_rps', 'node_http_rps', 'rps_vs_node_http', 'p99_ms'],
  limits: ['burst'],
  native: ['direct_sync_call_us', 'shim_threaded_call_us'],
  'on-demand': ['on_demand_ready_ms', 'cached_ready_ms'],
  scale: [
    'idle_private_mb',
    'idle_rss_mb',
    'private_mb_1',
    'private_mb_50',
    'private_kb_per_instance',
    'p99_ms_50',
    'control_p99_ms_50',
    'reconcile_ms_50',
    'loop_lag_ms_p99_50',
  ],
  synthesis: ['overlay_bytes', 'xdelta3_xz_bytes', 'zstd_patch_bytes', 'apply_ms', 'restore_ready_ms'],
  'synthesis-features': ['create_index_speedup', 'upload_mib_per_s'],
  'synthesis-link': ['e2e_ms_100mbit', 'elijah_e2e_ms_100mbit', 'e2e_vs_elijah_100mbit', 'after_last_byte_ms_100mbit'],
  telemetry: ['mqtt_latency_ms_median', 'mqtt_latency_ms_p99'],
  trust: ['open_plain_ms', 'device_plain_ms', 'device_https_handshake_ms'],
  web: ['page_bytes', 'first_render_ms'],
  'warm-start': ['warm_ready_ms', 'restore_ready_ms', 'warm_vs_restore', 'refill_ms', 'agent_rss_mb'],
};

/** How long one quick benchmark may run before it is killed. */
const BENCH_DEADLINE_MS = 14 * 60_000;

interface Outcome {
  code: number | null;
  lastLine: string;
  stderr: string;
}

function runBench(name: string): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(ROOT, 'dist', 'bench', `${name}.js`), '--quick'], {
      cwd: ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: BENCH_DEADLINE_MS,
      killSignal: 'SIGKILL',
    }); // a hung benchmark must not hold the file open past its test
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
    });
    child.stderr.on('data', (d: Buffer) => {
      stderr = (stderr + d.toString()).slice(-8192);
    });
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, lastLine: stdout.trim().split('\n').pop() ?? '', stderr }));
  });
}

const benches = readdirSync(path.join(ROOT, 'bench'))
  .filter((f) => f.endsWith('.ts'))
  .map((f) => f.slice(0, -3))
  .sort();

t.test('every benchmark has its headline figures listed here', async (tt) => {
  tt.same(benches, Object.keys(HEADLINES).sort());
});

for (const name of benches) {
  t.test(`benchmark ${name} runs in its quick mode and ends with its JSON line`, { timeout: BENCH_DEADLINE_MS + 60_000 }, async (tt) => {
    const { code, lastLine, stderr } = await runBench(name);
    tt.equal(code, 0, `exit code; the end of its stderr:\n${stderr}`);
    let result: Record<string, unknown> = {};
    tt.doesNotThrow(() => {
      result = JSON.parse(lastLine) as Record<string, unknown>;
    }, `its last line is JSON: ${lastLine}`);
    tt.equal(result.bench, name);
    for (const key of HEADLINES[name] ?? []) tt.type(result[key], 'number', key);
    tt.notMatch(lastLine, /:null\b/, 'no figure is missing (NaN)');
  });
}
