// The suite's entry point (./build.sh test): builds the shared test guest once, runs every test file with tap,
// and ends with the plain `N passed, N failed` line CI reads (tap's own summary is a comment it does not know).
import { spawn, spawnSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import path from 'node:path';

const root = path.resolve(__dirname, '../..');
const guestDir = path.join(root, '.build', 'test-guest');
const builder = path.join(root, 'rootfs', 'guest', 'build-guest.sh');

// Guests are built from Debian packages at test time and shared by every test that boots one. The builder leaves an
// up-to-date guest untouched, so calling it every time costs well under a second.
if (spawnSync('bash', [builder, guestDir], { stdio: 'inherit' }).status !== 0) {
  process.stdout.write('0 passed, 1 failed\n');
  process.exit(1);
}

const only = process.argv.slice(2);
const files = (
  only.length
    ? only
    : readdirSync(path.join(root, 'dist', 'test'))
        .filter((f) => f.endsWith('.test.js'))
        .sort()
).map((f) => path.join('dist', 'test', path.basename(f).replace(/\.ts$/, '.js')));
// Files named *.exclusive.test.* disturb the whole host (they restart the system libvirtd): they run alone, after the rest.
const exclusive = files.filter((f) => f.endsWith('.exclusive.test.js'));
const parallel = files.filter((f) => !exclusive.includes(f));

interface TapOutcome {
  passed: number;
  failed: number;
  ok: boolean;
}

/** One tap run over `list`, its output passed through; the counts come from tap's closing summary comment. */
function runTap(list: string[], jobs: number, timeoutSeconds: number): Promise<TapOutcome> {
  if (!list.length) return Promise.resolve({ passed: 0, failed: 0, ok: true });
  const tap = spawn('npx', ['tap', '--disable-coverage', '--reporter=tap', `--jobs=${jobs}`, `--timeout=${timeoutSeconds}`, ...list], {
    cwd: root,
    env: { ...process.env, CLOUDLET_TEST_GUEST: guestDir },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let tail = '';
  tap.stdout.on('data', (chunk: Buffer) => {
    process.stdout.write(chunk);
    tail = (tail + chunk.toString()).slice(-4096);
  });
  return new Promise((resolve) =>
    tap.on('close', (code) => {
      const summary = /# \{ total: (\d+), pass: (\d+)(?:, fail: (\d+))?/.exec(tail);
      const failed = summary ? Number(summary[3] ?? 0) : 1;
      resolve({ passed: summary ? Number(summary[2]) : 0, failed, ok: code === 0 && failed === 0 && summary !== null });
    }),
  );
}

void (async () => {
  // VM tests bound their own concurrency; two files at a time matches the two cores of these machines.
  // An exclusive file may run long: the benchmarks file runs every benchmark, one after another.
  const runs = [await runTap(parallel, 2, 900), await runTap(exclusive, 1, 2400)];
  const passed = runs.reduce((n, r) => n + r.passed, 0);
  const failed = runs.reduce((n, r) => n + r.failed, 0);
  process.stdout.write(`${passed} passed, ${failed} failed\n`);
  process.exit(runs.every((r) => r.ok) ? 0 : 1);
})();
