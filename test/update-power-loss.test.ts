// Field updates against hostile payloads and power loss, without an agent: a payload is hashed whole before any of it
// is unpacked, and unpacked without the tar's owners or setuid/setgid bits; a torn or empty update.json never stops
// the agent's start (the unit's `cloudlet-update --recover`, run here as the real command).
import t from 'tap';
import { execFile } from 'node:child_process';
import { createHash, generateKeyPairSync, sign, type KeyObject } from 'node:crypto';
import { chmod, chown, mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { create as packTar } from 'tar';
import { openBundle, unpackBundle } from '../agent/src/update/bundle';
import { ReleaseStore } from '../agent/src/update/releases';
import { ROOT } from './support/agent';

const CLI = path.join(ROOT, 'dist', 'agent', 'src', 'update', 'cli.js');
const FOREIGN_ID = 4242;
const sha256 = (bytes: Buffer) => createHash('sha256').update(bytes).digest('hex');

/** A gzipped tar of `dir` that keeps owners as they are on disk (createBundle's own tars never carry any). */
async function tarOf(dir: string, out: string): Promise<Buffer> {
  await packTar({ gzip: true, cwd: dir, portable: false, file: out }, ['.']);
  return readFile(out);
}

/** A bundle of `payload` whose header, signed with `key`, claims `sha256` (by default the payload's own). */
async function signedBundle(file: string, payload: Buffer, key: KeyObject, claimedSha256 = sha256(payload)): Promise<string> {
  const header = JSON.stringify({ version: '2.0.0', sha256: claimedSha256, size: payload.length });
  const signature = sign(null, Buffer.from(header), key).toString('base64');
  await writeFile(file, Buffer.concat([Buffer.from(`cloudlet-bundle 1\n${header}\n${signature}\n`), payload]));
  return file;
}

function cloudletUpdate(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], (err, stdout, stderr) =>
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr }),
    );
  });
}

t.test('cloudlet-update and hostile payloads', async (t) => {
  const work = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-update-payload-'));
  t.teardown(() => rm(work, { recursive: true, force: true }));
  const { publicKey, privateKey } = generateKeyPairSync('ed25519');
  const release = path.join(work, 'release');
  await mkdir(path.join(release, 'bin'), { recursive: true });
  await mkdir(path.join(release, 'shared'), { mode: 0o755 });
  await writeFile(path.join(release, 'package.json'), JSON.stringify({ version: '2.0.0' }));
  await writeFile(path.join(release, 'bin', 'root-setuid'), '#!/bin/sh\nid\n');
  await writeFile(path.join(release, 'bin', 'foreign-setgid'), '#!/bin/sh\nid\n');
  await chmod(path.join(release, 'bin', 'root-setuid'), 0o4755);
  await chown(path.join(release, 'bin', 'foreign-setgid'), FOREIGN_ID, FOREIGN_ID);
  await chmod(path.join(release, 'bin', 'foreign-setgid'), 0o2755);
  await chown(path.join(release, 'shared'), FOREIGN_ID, FOREIGN_ID);
  await chmod(path.join(release, 'shared'), 0o2775);
  const payload = await tarOf(release, path.join(work, 'payload.tar.gz'));

  t.test('a payload that is not the signed one is refused before a single byte of it is unpacked', async (t) => {
    // A validly signed header of the right size, but for other bytes: every entry of this payload is a good tar entry.
    const file = await signedBundle(path.join(work, 'swapped.bundle'), payload, privateKey, sha256(Buffer.from('the signed release')));
    const bundle = await openBundle(file, [publicKey]);
    const parent = await mkdtemp(path.join(work, 'unpack-'));
    const dir = path.join(parent, 'staging');
    await mkdir(dir);
    await t.rejects(unpackBundle(bundle, dir), { code: 'BUNDLE_INVALID', message: /payload's SHA-256 is [0-9a-f]{64}, the signed header says/ });
    t.same(await readdir(dir), [], 'nothing of the payload was unpacked');
    t.same(await readdir(parent), ['staging'], 'and no copy of it is left beside the staging directory');
  });

  t.test("a payload is unpacked as the updater's own: no owners from the tar, no setuid or setgid bits", async (t) => {
    t.equal((await stat(path.join(release, 'bin', 'root-setuid'))).mode & 0o4000, 0o4000, 'the tar does carry a setuid file');
    const bundle = await openBundle(await signedBundle(path.join(work, 'privileged.bundle'), payload, privateKey), [publicKey]);
    const dir = await mkdtemp(path.join(work, 'unpacked-'));
    await unpackBundle(bundle, dir);
    for (const name of ['bin/root-setuid', 'bin/foreign-setgid', 'shared']) {
      const unpacked = await stat(path.join(dir, name));
      t.equal(unpacked.mode & 0o6000, 0, `${name}: no setuid or setgid bit`);
      if (unpacked.isFile()) t.equal(unpacked.mode & 0o777, 0o755, `${name}: its other permission bits are kept`);
      t.same([unpacked.uid, unpacked.gid], [process.getuid!(), process.getgid!()], `${name}: owned by the updater, not by ${FOREIGN_ID}`);
    }
    t.equal(await readFile(path.join(dir, 'bin', 'root-setuid'), 'utf8'), '#!/bin/sh\nid\n');
  });
});

t.test('a torn or empty update.json never stops the agent from starting', async (t) => {
  const work = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-update-record-'));
  t.teardown(() => rm(work, { recursive: true, force: true }));
  const home = path.join(work, 'home');
  const factory = path.join(work, 'factory');
  await mkdir(factory, { recursive: true });
  await writeFile(path.join(factory, 'package.json'), JSON.stringify({ version: '1.0.0' }));
  const store = new ReleaseStore(home, factory);
  const installed = path.join(store.releasesDir, '1.1.0-0123456789ab');
  await mkdir(installed, { recursive: true });
  await writeFile(path.join(installed, 'package.json'), JSON.stringify({ version: '1.1.0' }));
  const recordFile = path.join(home, 'update.json');
  const recover = () => cloudletUpdate(['--recover', '--home', home, '--factory', factory]);

  t.test('with an installed release running, an empty record sends the box back to the factory release', async (t) => {
    await store.switchTo(installed);
    await writeFile(recordFile, '');
    const result = await recover();
    t.equal(result.code, 0, `--recover succeeds, so the unit starts the agent: ${result.stderr}`);
    t.equal(result.stderr.trim().split('\n').length, 1, 'one log line says what happened');
    t.match(result.stderr, /update\.json was unreadable .*going back to the factory release/);
    t.equal(await readlink(store.currentLink), factory, 'the release known good without a record runs');
    t.match(await store.record(), { state: 'rolled-back', version: '1.1.0', from: factory, to: installed, reason: /unreadable/ });
    t.same(await readdir(installed), ['package.json'], 'the installed release is kept, to be updated to again');
    t.equal(await readFile(`${recordFile}.unreadable`, 'utf8'), '', 'the unreadable record is set aside');
  });

  t.test('with the factory release running, a torn record is set aside and nothing else changes', async (t) => {
    await writeFile(recordFile, '{\n  "state": "verifying",\n  "version": "1.');
    const result = await recover();
    t.equal(result.code, 0, result.stderr);
    t.match(result.stderr, /^cloudlet-update: update\.json was unreadable .*nothing is to undo\n$/);
    t.equal(await readlink(store.currentLink), factory);
    t.equal(await store.record(), null, 'no record: the next update starts afresh');
    const again = await recover();
    t.same([again.code, again.stderr], [0, ''], 'the next start has nothing to say');
    const status = await cloudletUpdate(['--status', '--home', home, '--factory', factory]);
    t.equal(status.code, 0, status.stderr);
    t.same(JSON.parse(status.stdout), { current: factory, last: null });
  });

  t.test('a record that is valid JSON but not a record is unreadable too', async (t) => {
    await writeFile(recordFile, '{"state": "verifying"}');
    t.equal(await store.record(), 'unreadable');
    await writeFile(recordFile, 'null');
    t.equal(await store.record(), 'unreadable');
    await rm(recordFile);
  });
});
