// ./build.sh bench limits — what the limits cost and buy, through the real agent:
//  - a burst of BURST simultaneous Cached VM starts (memory-state restores) with limits.concurrentLaunches 1, 2 and
//    BURST: each start's request → 201 time (its service ready) and the time until all are ready;
//  - the legacy encrypted KD face against the plain one: a /services call, and an APK download;
//  - the request path with and without the rate limiter (anonymous GET /v1/health).
// Ends with one line of JSON.
import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { AgentProcess, request } from '../test/support/agent';
import { guestAs, median, round, runsOf, sized, testGuest } from './support/measure';

const RUNS = runsOf(3);
const BURST = 4;
const CALLS = sized(300, 30);
const APK_MIB = Number(process.env.BENCH_APK_MIB ?? sized(32, 4));
const SERVICE = 'bench.limits';

const keyOf = (password: string) => createHash('sha256').update(password).digest();
function encrypt(text: string, password: string): string {
  const iv = randomBytes(16);
  const cipher = createCipheriv('aes-256-cbc', keyOf(password), iv);
  return Buffer.concat([iv, cipher.update(text), cipher.final()]).toString('base64');
}
function decrypt(body: string, password: string): Buffer {
  const raw = Buffer.from(body, 'base64');
  const decipher = createDecipheriv('aes-256-cbc', keyOf(password), raw.subarray(0, 16));
  return Buffer.concat([decipher.update(raw.subarray(16)), decipher.final()]);
}

async function timed(work: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await work();
  return performance.now() - t0;
}

/** BURST starts at once; each one's time to 201, and the time until the last is ready. */
async function burst(agent: AgentProcess): Promise<{ each: number[]; all: number }> {
  const t0 = performance.now();
  const starts = await Promise.all(
    Array.from({ length: BURST }, async () => {
      const r = await agent.post('/v1/instances', { service_id: SERVICE, join: false });
      if (r.status !== 201) throw new Error(`start: ${r.status} ${r.body}`);
      return { ms: performance.now() - t0, id: r.json.instance.id as string };
    }),
  );
  const all = performance.now() - t0;
  for (const s of starts) await agent.delete(`/v1/instances/${s.id}`);
  return { each: starts.map((s) => s.ms), all };
}

async function main() {
  const guest = testGuest();
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-bench-limits-'));
  const agent = await AgentProcess.start({ portRange: '24600-24649' });
  try {
    const imported = await agent.post('/v1/services', { path: await guestAs(SERVICE, scratch, guest) });
    if (imported.status !== 201) throw new Error(`import: ${imported.body}`);
    const capture = await agent.post(`/v1/services/${SERVICE}/state`);
    if (capture.status !== 200) throw new Error(`capture: ${capture.body}`);

    // Launch concurrency: interleaved settings, so drift on the machine affects them alike.
    const bounds = [1, 2, BURST];
    const launches = new Map(bounds.map((n) => [n, { each: [] as number[], all: [] as number[] }]));
    for (let i = 0; i < RUNS; i++) {
      for (const n of bounds) {
        await agent.stop();
        await agent.launch({ CLOUDLET_MAX_LAUNCHES: String(n), CLOUDLET_LAUNCH_QUEUE: String(BURST) });
        const r = await burst(agent);
        launches.get(n)!.each.push(...r.each);
        launches.get(n)!.all.push(r.all);
        process.stderr.write(`run ${i + 1}, ${n} at once: each ${r.each.map((x) => round(x, 0)).join('/')} ms, all ready ${round(r.all, 0)} ms\n`);
      }
    }

    // The KD faces: the same agent in plain mode, then in encrypted mode with a paired device; calls as fast as they
    // come, so the rate limit is lifted.
    const unlimited = { CLOUDLET_RATE_PER_SECOND: '1000000', CLOUDLET_RATE_BURST: '1000000' };
    const apk = randomBytes(APK_MIB * 1024 * 1024);
    await agent.stop();
    await agent.launch({ ...unlimited, CLOUDLET_APP_MAX_BYTES: String(2 * apk.length) });
    const app = await request(agent.apiPort, 'POST', `/v1/apps?service_id=${SERVICE}&name=Bench&file_name=bench.apk&kind=android`, apk, {
      'content-type': 'application/octet-stream',
    });
    if (app.status !== 201) throw new Error(`app: ${app.body}`);
    const plainCall: number[] = [];
    const plain = async (url: string) => {
      const r = await request(agent.apiPort, 'GET', url, undefined, { authorization: '' });
      if (r.status !== 200) throw new Error(`${url}: ${r.status} ${r.body}`);
    };
    for (let i = 0; i < CALLS; i++) plainCall.push(await timed(() => plain('/api/services')));
    const plainDownload: number[] = [];
    for (let i = 0; i < RUNS; i++) plainDownload.push(await timed(() => plain(`/api/apps/get?appId=${app.json.id}`)));

    const window = await agent.post('/v1/pairing', {});
    const claim = await agent.post('/v1/pairing/claim', { code: window.json.code, device_id: 'bench-phone', name: 'Bench' });
    await agent.stop();
    await agent.launch({ ...unlimited, CLOUDLET_KD_API: 'encrypted' });
    const password: string = claim.json.legacy_password;
    const command = async (text: string) => {
      const r = await request(agent.apiPort, 'POST', '/api/command', `command=${encodeURIComponent(encrypt(text, password))}`, {
        'content-type': 'application/x-www-form-urlencoded',
        'x-device-id': 'bench-phone',
        authorization: '',
      });
      if (r.status !== 200) throw new Error(`${text}: ${r.status} ${r.body}`);
      return r;
    };
    const encryptedCall: number[] = [];
    for (let i = 0; i < CALLS; i++) encryptedCall.push(await timed(async () => decrypt((await command('/services')).body, password)));
    const encryptedDownload: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      encryptedDownload.push(
        await timed(async () => {
          const r = await command(`/apps/get&appId=${app.json.id}`);
          if (!decrypt(r.body, password).equals(apk)) throw new Error('the APK did not decrypt to itself');
        }),
      );
    }

    // The rate limiter on the request path: an anonymous client within a generous limit, against no limit (admin).
    await agent.stop();
    await agent.launch(unlimited);
    const limited: number[] = [];
    const exempt: number[] = [];
    for (let i = 0; i < CALLS; i++) {
      limited.push(await timed(() => request(agent.apiPort, 'GET', '/v1/health', undefined, { authorization: '' })));
      exempt.push(await timed(() => request(agent.apiPort, 'GET', '/v1/health')));
    }

    const pick = (n: number) => launches.get(n)!;
    const result = {
      bench: 'limits',
      runs: RUNS,
      burst: BURST,
      ...Object.fromEntries(
        bounds.flatMap((n) => [
          [`launches_${n}_each_ready_ms_median`, round(median(pick(n).each))],
          [`launches_${n}_all_ready_ms_median`, round(median(pick(n).all))],
          // Against admitting one launch at a time (the baseline) in the same run.
          [`launches_${n}_all_ready_vs_1`, round(median(pick(n).all) / median(pick(bounds[0]!).all), 2)],
        ]),
      ),
      kd_plain_call_ms_median: round(median(plainCall), 2),
      kd_encrypted_call_ms_median: round(median(encryptedCall), 2),
      apk_mib: APK_MIB,
      kd_plain_download_ms_median: round(median(plainDownload)),
      kd_encrypted_download_ms_median: round(median(encryptedDownload)),
      health_rate_limited_ms_median: round(median(limited), 3),
      health_admin_ms_median: round(median(exempt), 3),
      kd_encrypted_vs_plain_call: round(median(encryptedCall) / median(plainCall), 2),
      rate_limited_vs_admin_call: round(median(limited) / median(exempt), 2),
    };
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    await agent.dispose();
    await rm(scratch, { recursive: true, force: true });
  }
}

main().catch((err) => {
  process.stderr.write(`bench limits failed: ${err.stack ?? err}\n`);
  process.exit(1);
});
