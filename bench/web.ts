// ./build.sh bench web — the phone page and app downloads, measured in one run against the real agent on loopback:
// the bytes a phone transfers to render the page and the time to first render in headless Chromium (cold cache), and
// app download throughput with curl, against curl of the same file from a static server (busybox httpd) as baseline.
// Ends with one line of JSON.
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, open, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { AgentProcess, ROOT, request } from '../test/support/agent';
import { countTransferredBytes, launchChromium } from '../test/support/browser';
import { cli } from '../test/support/cli';
import { runsOf, sized } from './support/measure';

const run = promisify(execFile);
const RUNS = runsOf(5);
const APP_MIB = Number(process.env.BENCH_APP_MIB ?? sized(256, 8));
const STATIC_PORT = 24090;

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;

/** curl's own measure of a download to /dev/null, in bytes per second. */
async function curlSpeed(url: string): Promise<number> {
  const { stdout } = await run('curl', ['-sS', '--fail', '-o', '/dev/null', '-w', '%{speed_download}', url]);
  return Number(stdout);
}

async function writeRandomFile(file: string, mib: number): Promise<void> {
  const handle = await open(file, 'w');
  try {
    for (let i = 0; i < mib; i++) await handle.write(randomBytes(1024 * 1024));
  } finally {
    await handle.close();
  }
}

async function main() {
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-bench-web-'));
  const agent = await AgentProcess.start({
    portRange: '24000-24009',
    env: { CLOUDLET_DISCOVERY: '0', CLOUDLET_MQTT_HOST: '127.0.0.1', CLOUDLET_MQTT_PORT: '0', CLOUDLET_APP_MAX_BYTES: String(2 * APP_MIB * 1024 * 1024) },
  });
  await mkdir(path.join(scratch, 'www'));
  const staticServer = spawn('busybox', ['httpd', '-f', '-p', `127.0.0.1:${STATIC_PORT}`, '-h', path.join(scratch, 'www')], { stdio: 'ignore' });
  try {
    // What a real cloudlet shows: its demo service and an app.
    const guest = path.join(ROOT, '.build', 'test-guest');
    await agent.post('/v1/services', { path: guest });
    const appFile = path.join(scratch, 'www', 'big.apk');
    await writeRandomFile(appFile, APP_MIB);
    const added = await cli([
      'add-app',
      appFile,
      '--service',
      'org.cloudlet.demo.http',
      '--name',
      'Big app',
      '--cloudlet',
      `127.0.0.1:${agent.apiPort}`,
      '--json',
    ]);
    if (added.code !== 0) throw new Error(`add-app: ${added.stderr}`);
    // The page shows services to a paired phone: one is paired here and its token put where the page keeps it.
    const window = await agent.post('/v1/pairing', {});
    const paired = await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: window.json.code, name: 'bench phone' }, { authorization: '' });
    if (paired.status !== 201) throw new Error(`pairing: ${paired.body}`);

    // The page, cold each time: a fresh profile per run, so nothing comes from a cache.
    const pageBytes: number[] = [];
    const firstRender: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      const profile = path.join(scratch, `profile-${i}`);
      const browser = await launchChromium(profile);
      try {
        const page = browser.pages()[0] ?? (await browser.newPage());
        await page.addInitScript(`localStorage.setItem('cloudlet.token', ${JSON.stringify(paired.json.token)})`);
        const transferred = await countTransferredBytes(browser, page);
        await page.goto(`http://127.0.0.1:${agent.apiPort}/`, { waitUntil: 'networkidle' });
        await page.locator('li[data-service]').first().waitFor();
        const fcp = await page.evaluate(() => performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? NaN);
        pageBytes.push(transferred.bytes);
        firstRender.push(fcp);
        process.stderr.write(`page run ${i + 1}: ${transferred.bytes} bytes, first render ${round(fcp)} ms\n`);
      } finally {
        await browser.close();
        await rm(profile, { recursive: true, force: true });
      }
    }

    const agentUrl = `http://127.0.0.1:${agent.apiPort}${added.json.download}`;
    const staticUrl = `http://127.0.0.1:${STATIC_PORT}/big.apk`;
    const agentSpeed: number[] = [];
    const staticSpeed: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      // Interleaved, so drift on the machine affects both alike.
      staticSpeed.push(await curlSpeed(staticUrl));
      agentSpeed.push(await curlSpeed(agentUrl));
      process.stderr.write(`download run ${i + 1}: agent ${round(agentSpeed[i]! / 2 ** 20)} MiB/s, static ${round(staticSpeed[i]! / 2 ** 20)} MiB/s\n`);
    }
    const result = {
      bench: 'web',
      runs: RUNS,
      page_bytes: median(pageBytes),
      first_render_ms: round(median(firstRender)),
      app_mib: APP_MIB,
      download_mib_s: round(median(agentSpeed) / 2 ** 20),
      static_mib_s: round(median(staticSpeed) / 2 ** 20),
      download_vs_curl: round(median(agentSpeed) / median(staticSpeed), 3),
    };
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    staticServer.kill();
    await agent.dispose();
    await rm(scratch, { recursive: true, force: true });
  }
}

main().catch((err) => {
  process.stderr.write(`bench web failed: ${err.stack ?? err}\n`);
  process.exit(1);
});
