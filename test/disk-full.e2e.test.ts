// The data directory fills up: an agent whose data directory is on a small tmpfs (mounted here; we are root), with
// a filler file beside it taking the free space. Imports, uploads, a state capture and an instance start that do not
// fit each answer 507 NO_SPACE saying the data directory is full (with the bytes needed and free where known); nothing
// half-written stays behind, the catalogs list what they listed before, a running instance keeps serving, and once
// space is freed the same request succeeds.
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, rmdir, statfs, writeFile } from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import t, { type Test } from 'tap';
import { AgentProcess, adminHeaders, domainsUnder, fetchText, testGuestDir } from './support/agent';
import { PACKAGE_CLI } from './support/app-package';

const run = promisify(execFile);
const SERVICE = 'org.cloudlet.demo.http';
/** Room for the test guest (16 MiB) and a running instance, but not for a 128 MiB memory state. */
const TMPFS_MIB = 96;
const MIB = 2 ** 20;

let mount = '';
let mounted = false;
let scratch = '';
let agent: AgentProcess | undefined;

t.teardown(async () => {
  // Always, whatever failed: the agent (and its VMs) first, then the file system under it.
  await agent?.dispose().catch(() => {});
  if (mounted) await run('umount', [mount]).catch(() => run('umount', ['-l', mount]));
  if (mount) await rmdir(mount).catch(() => {});
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

t.before(async () => {
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-diskfull-scratch-'));
  mount = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-diskfull-'));
  await run('mount', ['-t', 'tmpfs', '-o', `size=${TMPFS_MIB}m,mode=0755`, 'tmpfs', mount]);
  mounted = true;
  const dataDir = path.join(mount, 'data');
  await mkdir(dataDir);
  agent = await AgentProcess.start({ portRange: '25050-25099', dataDir });
});

const FILLER = () => path.join(mount, 'filler');

async function freeBytes(): Promise<number> {
  const fs = await statfs(mount);
  return fs.bavail * fs.bsize;
}

/** Take the free space of the tmpfs, leaving `leave` bytes (0: all of it). */
async function fill(leave: number): Promise<void> {
  await rm(FILLER(), { force: true });
  // A running guest may write to its clone between the measure and the fill: measure again and retry then.
  for (let attempt = 1; ; attempt++) {
    const size = (await freeBytes()) - leave;
    if (size <= 0) return;
    try {
      await run('fallocate', ['-l', String(size), FILLER()]);
      return;
    } catch (err) {
      await rm(FILLER(), { force: true });
      if (attempt === 5) throw err;
    }
  }
}

async function unfill(): Promise<void> {
  await rm(FILLER(), { force: true });
}

/** An upload of raw bytes as the operator sends it (Content-Length, the admin token). */
function upload(urlPath: string, bytes: Buffer, contentType: string): Promise<{ status: number; json: any }> {
  const a = agent!;
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: '127.0.0.1',
        port: a.apiPort,
        method: 'POST',
        path: urlPath,
        agent: false,
        headers: { ...adminHeaders(a.apiPort), 'Content-Type': contentType, 'Content-Length': bytes.length },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(Buffer.concat(chunks).toString() || 'null') }));
      },
    );
    req.on('error', reject);
    req.end(bytes);
  });
}

/** A clear NO_SPACE: 507, the data directory named as full, and the sizes when the request's size was known. */
function isNoSpace(tt: Test, r: { status: number; json: any }, sizesKnown: boolean): void {
  tt.equal(r.status, 507, JSON.stringify(r.json));
  tt.equal(r.json?.code, 'NO_SPACE');
  tt.match(r.json?.message, /data directory is full/);
  if (sizesKnown) tt.ok(r.json.details.needed_bytes > r.json.details.free_bytes, `needs ${r.json.details.needed_bytes} B, ${r.json.details.free_bytes} B free`);
}

async function nothingHalfWritten(tt: Test): Promise<void> {
  tt.same(await readdir(path.join(agent!.dataDir, 'tmp')), [], 'nothing left in the staging directory');
}

t.test('a service import that does not fit is refused before a byte is written; after freeing space it succeeds', async (tt) => {
  await fill(4 * MIB);
  const refused = await agent!.post('/v1/services', { path: testGuestDir() });
  isNoSpace(tt, refused, true);
  tt.same((await agent!.get('/v1/services')).json.services, [], 'the catalog is as it was');
  tt.same(await readdir(path.join(agent!.dataDir, 'services')), []);
  await nothingHalfWritten(tt);

  await unfill();
  const imported = await agent!.post('/v1/services', { path: testGuestDir() });
  tt.equal(imported.status, 201, imported.body);
});

t.test('a state capture that cannot fit (128 MiB of memory) is refused before the VM boots; the service is unchanged', async (tt) => {
  const before = (await agent!.get(`/v1/services/${SERVICE}`)).json;
  const refused = await agent!.post(`/v1/services/${SERVICE}/state`);
  isNoSpace(tt, refused, true);
  tt.ok(refused.json.details.needed_bytes >= 128 * MIB, 'the memory state is counted');
  tt.same((await agent!.get(`/v1/services/${SERVICE}`)).json, before, 'same manifest, no state');
  tt.same(await domainsUnder(agent!.dataDir), [], 'no VM was started');
  await nothingHalfWritten(tt);
});

t.test('an app upload larger than the free space is refused from its Content-Length; after freeing space it is stored', async (tt) => {
  const apk = Buffer.alloc(8 * MIB, 7);
  const query = new URLSearchParams({ service_id: SERVICE, name: 'Big', file_name: 'big.apk' }).toString();
  await fill(2 * MIB);
  const refused = await upload(`/v1/apps?${query}`, apk, 'application/vnd.android.package-archive');
  isNoSpace(tt, refused, true);
  tt.same((await agent!.get('/v1/apps')).json.apps, [], 'no app listed');
  tt.same(await readdir(path.join(agent!.dataDir, 'apps')), []);
  await nothingHalfWritten(tt);

  await unfill();
  const stored = await upload(`/v1/apps?${query}`, apk, 'application/vnd.android.package-archive');
  tt.equal(stored.status, 201, JSON.stringify(stored.json));
  tt.equal((await agent!.delete(`/v1/apps/${stored.json.id}`)).status, 204);
});

t.test('a package that unpacks to more than the free space is NO_SPACE (not a broken tarball) and leaves nothing', async (tt) => {
  // 40 MiB of zeros compress to a few KiB: the upload passes the pre-check, its unpacking runs out of space.
  const dir = path.join(scratch, 'pkg');
  await mkdir(path.join(dir, 'bin'), { recursive: true });
  await writeFile(path.join(dir, 'zeros.bin'), Buffer.alloc(40 * MIB));
  const tarball = path.join(scratch, 'zeros.tar.gz');
  await run(process.execPath, [
    PACKAGE_CLI,
    '--app-id',
    'org.cloudlet.test.zeros',
    '--port',
    '8080',
    '--dir',
    dir,
    '--output',
    tarball,
    '--memory-mib',
    '32',
    '--description',
    'zeros',
    '--',
    '/app/bin/none',
  ]);
  const bytes = await readFile(tarball);
  tt.ok(bytes.length < MIB, `the tarball is small (${bytes.length} B)`);

  await fill(20 * MIB);
  const refused = await upload('/v1/packages', bytes, 'application/gzip');
  isNoSpace(tt, refused, false);
  tt.same((await agent!.get('/v1/packages')).json.packages, [], 'no package listed');
  tt.same(await readdir(path.join(agent!.dataDir, 'packages')), []);
  await nothingHalfWritten(tt);

  await unfill();
  const imported = await upload('/v1/packages', bytes, 'application/gzip');
  tt.equal(imported.status, 201, JSON.stringify(imported.json));
  tt.equal((await agent!.delete('/v1/packages/org.cloudlet.test.zeros')).status, 204);
});

t.test('a start whose disk clone cannot be written is NO_SPACE and leaves nothing; a running instance keeps serving', async (tt) => {
  const running = await agent!.post('/v1/instances', { service_id: SERVICE });
  tt.equal(running.status, 201, running.body);
  const port = running.json.endpoint.port;
  const page = await fetchText(port);

  await fill(0);
  const refused = await agent!.post('/v1/instances', { service_id: SERVICE, join: false });
  isNoSpace(tt, refused, false);
  tt.same(
    (await agent!.get('/v1/instances')).json.instances.map((i: { id: string }) => i.id),
    [running.json.instance.id],
    'only the running instance',
  );
  tt.same(await readdir(path.join(agent!.dataDir, 'instances')), [running.json.instance.id], 'no directory of the failed start');
  tt.equal((await domainsUnder(agent!.dataDir)).length, 1, 'one domain: the running one');
  tt.equal(await fetchText(port), page, 'the running instance is still served');
  await nothingHalfWritten(tt);

  await unfill();
  const started = await agent!.post('/v1/instances', { service_id: SERVICE, join: false });
  tt.equal(started.status, 201, started.body);
  for (const id of [running.json.instance.id, started.json.instance.id]) tt.equal((await agent!.delete(`/v1/instances/${id}`)).status, 200);
});
