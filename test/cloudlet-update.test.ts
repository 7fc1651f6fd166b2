// Field updates with rollback, end to end: a real agent runs from the release `current` points at, supervised as
// systemd would (restarted whenever it exits), and the real cloudlet-update command installs bundles signed with keys
// made here. A good bundle is committed; a bundle whose agent crashes is rolled back; unsigned, foreign-signed and
// corrupt bundles are refused before anything changes; an update interrupted before it was confirmed is undone at the
// next start. Through all of it the box keeps serving.
import t from 'tap';
import { execFile } from 'node:child_process';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { chmod, cp, mkdir, mkdtemp, readdir, readFile, readlink, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createBundle } from '../agent/src/update/bundle';
import { ReleaseStore } from '../agent/src/update/releases';
import { request, ROOT } from './support/agent';
import { SupervisedAgent } from './support/supervised-agent';

const CLI = path.join(ROOT, 'dist', 'agent', 'src', 'update', 'cli.js');
const FORWARD_RANGE = '22290-22299';

/**
 * A release directory of the agent built in this tree, as a bundle carries it, with its own version. Its node_modules
 * is the tree's, found through NODE_PATH (SupervisedAgent sets it) rather than copied into every test bundle.
 */
async function makeRelease(dir: string, version: string, opts: { crashesAtStart?: boolean } = {}): Promise<string> {
  await mkdir(path.join(dir, 'native', 'build'), { recursive: true });
  await cp(path.join(ROOT, 'dist', 'agent'), path.join(dir, 'dist', 'agent'), { recursive: true });
  await cp(path.join(ROOT, 'dist', 'native'), path.join(dir, 'dist', 'native'), { recursive: true });
  await cp(path.join(ROOT, 'native', 'build', 'libcloudlet_virt.so'), path.join(dir, 'native', 'build', 'libcloudlet_virt.so'));
  const pkg = JSON.parse(await readFile(path.join(ROOT, 'package.json'), 'utf8')) as Record<string, unknown>;
  await writeFile(path.join(dir, 'package.json'), JSON.stringify({ ...pkg, version }));
  if (opts.crashesAtStart) {
    await writeFile(
      path.join(dir, 'dist', 'agent', 'src', 'main.js'),
      "process.stderr.write('cloudlet-agent: cannot start: broken release\\n'); process.exit(1);\n",
    );
  }
  return dir;
}

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

function cloudletUpdate(args: string[]): Promise<CliResult> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [CLI, ...args],
      { env: { ...process.env, CLOUDLET_CONFIG: path.join(ROOT, 'test', 'support', 'no-config.json') } },
      (err, stdout, stderr) => {
        resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
      },
    );
  });
}

async function servingVersion(agent: SupervisedAgent): Promise<string> {
  return (await request(agent.apiPort, 'GET', '/v1/system')).json.agent_version as string;
}

t.test('cloudlet-update', async (t) => {
  const work = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-update-'));
  await chmod(work, 0o755); // the data directory below it must be reachable by QEMU's user, or the agent refuses to start
  t.teardown(() => rm(work, { recursive: true, force: true }));
  const home = path.join(work, 'home');
  const keysDir = path.join(work, 'trusted-keys');
  await mkdir(keysDir, { recursive: true });
  await mkdir(home);
  const trusted = generateKeyPairSync('ed25519');
  const foreign = generateKeyPairSync('ed25519');
  await writeFile(path.join(keysDir, 'release.pem'), trusted.publicKey.export({ type: 'spki', format: 'pem' }));

  const factory = await makeRelease(path.join(work, 'factory'), '1.0.0');
  const store = new ReleaseStore(home, factory);
  await store.switchTo(factory);
  const bundle = async (version: string, key: KeyObject, opts?: { crashesAtStart?: boolean }) => {
    const file = path.join(work, `${version}.bundle`);
    await createBundle(await makeRelease(path.join(work, `src-${version}`), version, opts), version, key, file);
    return file;
  };

  const agent = await SupervisedAgent.start(home, path.join(work, 'data'), FORWARD_RANGE);
  t.teardown(() => agent.stop());
  const update = (file: string, deadlineSeconds = 30) =>
    cloudletUpdate([
      file,
      '--home',
      home,
      '--factory',
      factory,
      '--keys',
      keysDir,
      '--api',
      agent.url,
      '--deadline',
      String(deadlineSeconds),
      '--stable',
      '1',
      '--restart-command',
      agent.restartCommand,
    ]);
  const waitServing = async () => {
    for (let i = 0; i < 200 && (await request(agent.apiPort, 'GET', '/v1/health').catch(() => null))?.status !== 200; i++)
      await new Promise((r) => setTimeout(r, 100));
  };
  await waitServing();
  t.equal(await servingVersion(agent), '1.0.0', 'the box starts on its factory release');

  t.test('a good bundle is installed next to the running release, switched to, and committed once healthy', async (t) => {
    const result = await update(await bundle('1.1.0', trusted.privateKey));
    t.equal(result.code, 0, result.stderr);
    t.equal(result.stdout.trim(), 'committed 1.1.0');
    t.equal(await servingVersion(agent), '1.1.0', 'the new release is the one serving');
    t.match(await readlink(store.currentLink), /releases\/1\.1\.0-[0-9a-f]{12}$/);
    t.match(await store.record(), { state: 'committed', version: '1.1.0', from: factory });
  });

  t.test('a bundle whose agent crashes at start is rolled back, and the previous release serves again', async (t) => {
    const before = await readlink(store.currentLink);
    const result = await update(await bundle('1.2.0', trusted.privateKey, { crashesAtStart: true }), 6);
    t.equal(result.code, 1);
    t.match(result.stderr, /UPDATE_ROLLED_BACK: 1\.2\.0 did not become healthy .*rolled back to 1\.1\.0/);
    t.equal(await readlink(store.currentLink), before);
    t.equal(await servingVersion(agent), '1.1.0');
    t.match(await store.record(), { state: 'rolled-back', version: '1.2.0' });
    t.notOk(
      (await readdir(store.releasesDir)).some((name) => name.startsWith('1.2.0')),
      'the bad release is deleted',
    );
    t.ok(agent.restarts >= 2, 'the crashing agent was restarted by its supervisor until the rollback');
  });

  t.test('bad bundles are refused before anything is switched or restarted', async (t) => {
    const good = await bundle('1.3.0', trusted.privateKey);
    const text = await readFile(good);
    const lines = (n: number) => text.indexOf('\n', n) + 1;
    const unsigned = path.join(work, 'unsigned.bundle');
    const signatureStart = lines(lines(0));
    await writeFile(unsigned, Buffer.concat([text.subarray(0, signatureStart), Buffer.from('\n'), text.subarray(lines(signatureStart))]));
    const corrupt = path.join(work, 'corrupt.bundle');
    const flipped = Buffer.from(text);
    flipped[flipped.length - 100]! ^= 0xff;
    await writeFile(corrupt, flipped);
    const notABundle = path.join(work, 'random.bundle');
    await writeFile(notABundle, 'hello\n');

    const restartsBefore = agent.restarts;
    const releasesBefore = await readdir(store.releasesDir);
    for (const [file, code] of [
      [unsigned, 'BUNDLE_UNTRUSTED'],
      [await bundle('1.4.0', foreign.privateKey), 'BUNDLE_UNTRUSTED'],
      [corrupt, 'BUNDLE_INVALID'],
      [notABundle, 'BUNDLE_INVALID'],
    ] as const) {
      const result = await update(file);
      t.equal(result.code, 1, `${path.basename(file)} is refused`);
      t.match(result.stderr, new RegExp(`^cloudlet-update: ${code}: `), `${path.basename(file)}: ${code}`);
    }
    t.equal(agent.restarts, restartsBefore, 'the agent was never restarted');
    t.same(await readdir(store.releasesDir), releasesBefore, 'nothing was installed, and no staging is left');
    t.equal(await servingVersion(agent), '1.1.0');
  });

  t.test('re-installing the running version is refused', async (t) => {
    const result = await update(path.join(work, '1.1.0.bundle'));
    t.equal(result.code, 1);
    t.match(result.stderr, /CONFLICT: version 1\.1\.0 is already the running release/);
  });

  t.test('a second update while one runs is refused', async (t) => {
    const lock = path.join(home, 'update.lock');
    const bootId = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim();
    await writeFile(lock, JSON.stringify({ pid: process.pid, bootId }));
    t.teardown(() => rm(lock, { force: true }));
    const result = await update(path.join(work, '1.3.0.bundle'));
    t.equal(result.code, 1);
    t.match(result.stderr, /UPDATE_IN_PROGRESS: an update is already running/);
  });

  t.test('an update interrupted before it was confirmed healthy is rolled back before the next agent start', async (t) => {
    const running = await readlink(store.currentLink);
    // What a power cut while verifying leaves: `current` switched, the record "verifying", no live updater.
    const installed = path.join(store.releasesDir, 'interrupted');
    await makeRelease(installed, '1.5.0');
    await store.writeRecord({ state: 'verifying', version: '1.5.0', from: running, to: installed, at: new Date().toISOString() });
    await store.switchTo(installed);
    await writeFile(path.join(home, 'update.lock'), JSON.stringify({ pid: process.pid, bootId: 'an earlier boot' }));

    const result = await cloudletUpdate(['--recover', '--home', home, '--factory', factory]);
    t.equal(result.code, 0, result.stderr);
    t.match(result.stderr, /the update to 1\.5\.0 was interrupted/);
    t.equal(await readlink(store.currentLink), running);
    t.match(await store.record(), { state: 'rolled-back', version: '1.5.0', reason: /interrupted/ });
    t.notOk((await readdir(store.releasesDir)).includes('interrupted'));

    const again = await cloudletUpdate(['--recover', '--home', home, '--factory', factory]);
    t.equal(again.code, 0);
    t.equal(again.stderr, '', 'with nothing interrupted, --recover does nothing');
  });
});
