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
const files = (only.length ? only : readdirSync(path.join(root, 'dist', 'test')).filter((f) => f.endsWith('.test.js')).sort())
  .map((f) => path.join('dist', 'test', path.basename(f).replace(/\.ts$/, '.js')));

// VM tests bound their own concurrency; two files at a time matches the two cores of these machines.
const tap = spawn('npx', ['tap', '--disable-coverage', '--reporter=tap', '--jobs=2', '--timeout=900', ...files], {
  cwd: root,
  env: { ...process.env, CLOUDLET_TEST_GUEST: guestDir },
  stdio: ['ignore', 'pipe', 'inherit'],
});
let tail = '';
tap.stdout.on('data', (chunk: Buffer) => {
  process.stdout.write(chunk);
  tail = (tail + chunk.toString()).slice(-4096);
});
tap.on('close', (code) => {
  const summary = /# \{ total: (\d+), pass: (\d+)(?:, fail: (\d+))?/.exec(tail);
  const passed = summary ? Number(summary[2]) : 0;
  const failed = summary ? Number(summary[3] ?? 0) : 1;
  process.stdout.write(`${passed} passed, ${failed} failed\n`);
  process.exit(code === 0 && failed === 0 && summary ? 0 : 1);
});
