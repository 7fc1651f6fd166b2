// The suite's entry point (./build.sh test): builds the shared test guest once, runs every test file with tap,
// and ends with the plain `N passed, N failed` line CI reads (tap's own summary is a comment it does not know).
// CLOUDLET_TEST_STACK=trixie runs the files on the appliance's stack instead (rootfs/test-stack.sh): this runner then
// builds the guest on the host and runs itself again inside that environment, where each file's result line names it.
import { spawn, spawnSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';

const root = path.resolve(__dirname, '../..');
const guestDir = path.join(root, '.build', 'test-guest');
const builder = path.join(root, 'rootfs', 'guest', 'build-guest.sh');
const stack = process.env.CLOUDLET_TEST_STACK ?? 'host';
if (stack !== 'host' && stack !== 'trixie') {
  process.stderr.write(`CLOUDLET_TEST_STACK=${stack}: unknown stack (host or trixie)\n`);
  process.exit(2);
}
const insideStack = process.env.CLOUDLET_TEST_STACK_INSIDE === '1';

// Guests are built from Debian packages at test time and shared by every test that boots one. The builder leaves an
// up-to-date guest untouched, so calling it every time costs well under a second. Inside the appliance's stack the
// host's guest is used as it is: the guest is the same on every stack (its kernel comes from the host's packages).
if (!insideStack && spawnSync('bash', [builder, guestDir], { stdio: 'inherit' }).status !== 0) {
  process.stdout.write('0 passed, 1 failed\n');
  process.exit(1);
}
if (stack === 'trixie' && !insideStack) {
  const inside = spawnSync('bash', [path.join(root, 'rootfs', 'test-stack.sh'), 'run', ...process.argv.slice(2)], { stdio: 'inherit' });
  process.exit(inside.status ?? 1);
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

/** What the files run on, e.g. `trixie (Debian 13.2, Node v24.21.0, libvirt 11.3.0, QEMU 10.0.2, uWS 20.57.0)`. */
const stackName = `${stack} (${describeStack()})`;
process.stdout.write(`# stack ${stackName}\n`);

function describeStack(): string {
  const first = (command: string, args: string[], pattern: RegExp) => pattern.exec(spawnSync(command, args, { encoding: 'utf8' }).stdout ?? '')?.[1] ?? '?';
  const debian = first('cat', ['/etc/debian_version'], /^(\S+)/);
  const libvirt = first('libvirtd', ['--version'], /(\d+\.\d+\.\d+)/);
  const qemu = first('qemu-system-x86_64', ['--version'], /version (\d+\.\d+\.\d+)/);
  const uws = (JSON.parse(readFileSync(path.join(root, 'node_modules', 'uWebSockets.js', 'package.json'), 'utf8')) as { version: string }).version;
  return `Debian ${debian}, Node ${process.version}, libvirt ${libvirt}, QEMU ${qemu}, uWS ${uws}`;
}

/** A file's result line (`ok 3 - dist/test/x.test.js # time=…`) with the stack it ran on. */
function labelled(line: string): string {
  return line.replace(/^((?:not )?ok \d+ - \S+\.js)(?= |$)/, `$1 [${stack}]`);
}

interface TapOutcome {
  passed: number;
  failed: number;
  ok: boolean;
}

/** One tap run over `list`, its output passed through; the counts come from tap's closing summary comment. */
function runTap(list: string[], jobs: number, timeoutSeconds: number): Promise<TapOutcome> {
  if (!list.length) return Promise.resolve({ passed: 0, failed: 0, ok: true });
  // tap through the Node running this file (the appliance's stack has Node's binary only, no npx).
  const tapCli = path.join(root, 'node_modules', 'tap', 'dist', 'esm', 'run.mjs');
  const tap = spawn(process.execPath, [tapCli, '--disable-coverage', '--reporter=tap', `--jobs=${jobs}`, `--timeout=${timeoutSeconds}`, ...list], {
    cwd: root,
    env: { ...process.env, CLOUDLET_TEST_GUEST: guestDir },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let tail = '';
  let partial = '';
  tap.stdout.on('data', (chunk: Buffer) => {
    const lines = (partial + chunk.toString()).split('\n');
    partial = lines.pop() ?? '';
    process.stdout.write(lines.map((line) => `${labelled(line)}\n`).join(''));
    tail = (tail + chunk.toString()).slice(-4096);
  });
  tap.stdout.on('end', () => {
    if (partial) process.stdout.write(labelled(partial));
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
  process.stdout.write(`# stack ${stackName}: ${passed} passed, ${failed} failed\n${passed} passed, ${failed} failed\n`);
  process.exit(runs.every((r) => r.ok) ? 0 : 1);
})();
