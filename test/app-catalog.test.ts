// Cloudlet Push: the app catalog through the real agent process and the real `cloudlet` CLI, over loopback.
// Apps are added with the CLI as an operator does, then read as the KD Android client and our /v1 clients read them.
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { AgentProcess, adminHeaders, testGuestDir } from './support/agent';
import { cli } from './support/cli';

const SERVICE = 'org.cloudlet.demo.http';
/** Small enough that a test can upload past it quickly. */
const MAX_UPLOAD = 8 * 1024 * 1024;
const KD_APP_KEYS = ['_id', 'app_version', 'description', 'md5sum', 'min_android_version', 'name', 'package_name', 'service_id', 'tags'];

let agent: AgentProcess;
let scratch: string;
let cloudlet: string;
const apk = { file: '', bytes: Buffer.alloc(0), id: '' };
const webBundle = { file: '', bytes: Buffer.alloc(0), id: '' };
const oldApk = { file: '', bytes: Buffer.alloc(0), id: '' };

const md5 = (b: Buffer) => createHash('md5').update(b).digest('hex');
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

async function leftovers(): Promise<string[]> {
  return (await readdir(path.join(agent.dataDir, 'tmp'))).filter((name) => name.startsWith('app-'));
}

/**
 * A raw upload, for what the CLI never sends. `body` is sent whole; with `announce`, Content-Length claims that many
 * bytes and zeros are streamed after `body` until the agent answers (at most 64 MiB: the loop is bounded).
 */
function rawUpload(query: string, body: Buffer, announce?: number): Promise<{ status: number; json: any }> {
  return new Promise((resolve, reject) => {
    const headers = { 'content-type': 'application/octet-stream', 'content-length': String(announce ?? body.length), ...adminHeaders(agent.apiPort) };
    let answered = false;
    const req = http.request({ host: '127.0.0.1', port: agent.apiPort, method: 'POST', path: `/v1/apps?${query}`, headers, agent: false }, (res) => {
      answered = true;
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        req.destroy();
        resolve({ status: res.statusCode ?? 0, json: JSON.parse(Buffer.concat(chunks).toString() || 'null') });
      });
    });
    // Cut off without an answer: status 0.
    req.on('error', (err) => {
      if (answered) return;
      if (announce === undefined) reject(err);
      else resolve({ status: 0, json: null });
    });
    req.write(body);
    if (announce === undefined) return void req.end();
    const zeros = Buffer.alloc(64 * 1024);
    let sent = body.length;
    const more = () => {
      while (!answered && !req.destroyed && sent < 64 * 1024 * 1024) {
        sent += zeros.length;
        if (!req.write(zeros)) return void req.once('drain', more);
      }
    };
    more();
  });
}

t.before(async () => {
  agent = await AgentProcess.start({
    portRange: '22010-22019',
    env: { CLOUDLET_APP_MAX_BYTES: String(MAX_UPLOAD), CLOUDLET_DISCOVERY: '0', CLOUDLET_MQTT_HOST: '127.0.0.1', CLOUDLET_MQTT_PORT: '0' },
  });
  cloudlet = `127.0.0.1:${agent.apiPort}`;
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-apps-'));
  const imported = await agent.post('/v1/services', { path: testGuestDir() });
  if (imported.status !== 201) throw new Error(imported.body);
  for (const [app, name, size] of [
    [apk, 'speech.apk', 3 * 1024 * 1024 + 17],
    [webBundle, 'speech-web.zip', 200 * 1024],
    [oldApk, 'legacy.apk', 4096],
  ] as const) {
    app.file = path.join(scratch, name);
    app.bytes = randomBytes(size);
    await writeFile(app.file, app.bytes);
  }
});
t.teardown(async () => {
  await agent.dispose();
  await rm(scratch, { recursive: true, force: true });
});

t.test('an operator adds apps with the CLI; each is stored with its real MD5 and SHA-256', async (tt) => {
  const added = await cli([
    'add-app',
    apk.file,
    '--service',
    SERVICE,
    '--name',
    'Speech',
    '--package',
    'edu.cmu.sei.speech',
    '--version',
    '2.1',
    '--min-os',
    '8.0',
    '--tags',
    'speech,demo',
    '--description',
    'Speech recognition client',
    '--cloudlet',
    cloudlet,
    '--json',
  ]);
  tt.equal(added.code, 0, added.stderr);
  tt.match(added.json, {
    kind: 'android',
    os_name: 'Android',
    service_id: SERVICE,
    name: 'Speech',
    package_name: 'edu.cmu.sei.speech',
    version: '2.1',
    min_os_version: '8.0',
    tags: ['speech', 'demo'],
    file_name: 'speech.apk',
    size: apk.bytes.length,
    md5: md5(apk.bytes),
    sha256: sha256(apk.bytes),
  });
  apk.id = added.json.id;
  tt.match(apk.id, /^[0-9a-f]{24}$/, "ids look like pycloud's Mongo ids");

  const web = await cli([
    'add-app',
    webBundle.file,
    '--kind',
    'web',
    '--service',
    SERVICE,
    '--name',
    'Speech (web)',
    '--tags',
    'speech',
    '--cloudlet',
    cloudlet,
    '--json',
  ]);
  tt.equal(web.code, 0, web.stderr);
  webBundle.id = web.json.id;
  const old = await cli([
    'add-app',
    oldApk.file,
    '--service',
    SERVICE,
    '--name',
    'Legacy',
    '--min-os',
    '4.4',
    '--tags',
    'legacy',
    '--cloudlet',
    cloudlet,
    '--json',
  ]);
  tt.equal(old.code, 0, old.stderr);
  oldApk.id = old.json.id;

  const listed = await cli(['apps', '--cloudlet', cloudlet, '--json']);
  tt.same(
    listed.json.apps.map((a: { name: string }) => a.name),
    ['Legacy', 'Speech', 'Speech (web)'],
    'all three, by name',
  );
  const table = await cli(['apps', '--cloudlet', cloudlet]);
  tt.match(table.stdout, /^APP\s+NAME\s+KIND/, 'a table for people');
  tt.match(table.stdout, new RegExp(`${apk.id}\\s+Speech\\s+android\\s+2\\.1\\s+3\\.0 MiB\\s+${SERVICE}`));
  tt.same(await leftovers(), [], 'no staging leftovers');
});

t.test("KD /api/apps lists Android apps in pycloud's shape, with md5sum filled in", async (tt) => {
  const r = await agent.get('/api/apps?osName=Android&osVersion=9&tags=');
  tt.equal(r.status, 200);
  tt.equal(r.headers['content-length'], String(Buffer.byteLength(r.body)));
  const speech = r.json.apps.find((a: { _id: string }) => a._id === apk.id);
  tt.same(Object.keys(speech).sort(), KD_APP_KEYS, "exactly pycloud's keys");
  tt.same(speech, {
    _id: apk.id,
    name: 'Speech',
    service_id: SERVICE,
    description: 'Speech recognition client',
    package_name: 'edu.cmu.sei.speech',
    min_android_version: '8.0',
    md5sum: md5(apk.bytes),
    app_version: '2.1',
    tags: ['speech', 'demo'],
  });
  tt.notOk(
    r.json.apps.some((a: { _id: string }) => a._id === webBundle.id),
    'web bundles are not offered to Android clients',
  );
  const system = await agent.get('/api/system?apps=true');
  tt.same(system.json.apps.map((a: { _id: string }) => a._id).sort(), [apk.id, oldApk.id].sort(), '/api/system?apps=true carries the same list');
});

t.test('KD /api/apps applies osName, osVersion and tags', async (tt) => {
  const ids = async (query: string) => (await agent.get(`/api/apps?${query}`)).json.apps.map((a: { _id: string }) => a._id).sort();
  tt.same(await ids('osName=Android&osVersion=7.1'), [oldApk.id], 'an Android 7.1 phone does not get an app that needs 8.0');
  tt.same(await ids('osName=Android&osVersion=10'), [apk.id, oldApk.id].sort(), '"10" is newer than "8.0"');
  tt.same(await ids('osName=Android&osVersion=9&tags=legacy,other'), [oldApk.id], 'any one tag matches');
  tt.same(await ids('osName=Android&osVersion=9&tags=nothing'), []);
  tt.same(await ids('osName=iOS&osVersion=17'), [], 'no Android apps for another OS');
  tt.same(await ids(''), [apk.id, oldApk.id].sort(), 'no filter: every Android app');
});

t.test("KD /api/apps/get streams the APK with Content-Length, its content type and pycloud's file name", async (tt) => {
  const r = await new Promise<{ status: number; headers: http.IncomingHttpHeaders; body: Buffer }>((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port: agent.apiPort, path: `/api/apps/get?appId=${apk.id}`, agent: false }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
      })
      .on('error', reject);
  });
  tt.equal(r.status, 200);
  tt.equal(r.headers['content-length'], String(apk.bytes.length), 'Content-Length, never chunked');
  tt.notOk(r.headers['transfer-encoding']);
  tt.equal(r.headers['content-type'], 'application/vnd.android.package-archive');
  tt.equal(r.headers['content-disposition'], `attachment; filename="${apk.id}-speech.apk"`);
  tt.equal(md5(r.body), md5(apk.bytes), "client-lib's check: the MD5 of the received bytes equals md5sum");

  const missing = await agent.get('/api/apps/get');
  tt.equal(missing.status, 400);
  tt.match(missing.body, /400 Bad Request - must provide app_id {2}$/);
  const unknown = await agent.get('/api/apps/get?appId=0123456789abcdef01234567');
  tt.equal(unknown.status, 404);
  tt.match(unknown.body, /404 Not Found - app with id "0123456789abcdef01234567" was not found/);
  const traversal = await agent.get(`/api/apps/get?appId=${encodeURIComponent('../../../etc/passwd')}`);
  tt.equal(traversal.status, 404, 'a path in the id is just an unknown id');
  const web = await agent.get(`/api/apps/get?appId=${webBundle.id}`);
  tt.equal(web.status, 404, 'a web bundle is not an APK');
});

t.test('/v1 downloads carry the SHA-256 as ETag and answer ranges, so a download resumes', async (tt) => {
  const full = await agent.get(`/v1/apps/${webBundle.id}/file`);
  tt.equal(full.status, 200);
  tt.equal(full.headers['content-type'], 'application/zip');
  tt.equal(full.headers['accept-ranges'], 'bytes');
  tt.equal(full.headers.etag, `"${sha256(webBundle.bytes)}"`);
  tt.equal(full.headers['content-disposition'], 'attachment; filename="speech-web.zip"');

  const part = await agent.get(`/v1/apps/${apk.id}/file`, { range: 'bytes=1000-1999' });
  tt.equal(part.status, 206);
  tt.equal(part.headers['content-range'], `bytes 1000-1999/${apk.bytes.length}`);
  tt.equal(part.headers['content-length'], '1000');
  const tail = await agent.get(`/v1/apps/${oldApk.id}/file`, { range: 'bytes=-96' });
  tt.equal(tail.headers['content-range'], 'bytes 4000-4095/4096', 'a suffix range');
  const beyond = await agent.get(`/v1/apps/${apk.id}/file`, { range: `bytes=${apk.bytes.length}-` });
  tt.equal(beyond.status, 416);
  tt.equal(beyond.headers['content-range'], `bytes */${apk.bytes.length}`);
  const stale = await agent.get(`/v1/apps/${apk.id}/file`, { range: 'bytes=10-', 'if-range': '"another-version"' });
  tt.equal(stale.status, 200, 'If-Range naming other content gets the whole file');

  // An interrupted download: the first 1 MiB is on disk as .part; the CLI asks for the rest only.
  const output = path.join(scratch, 'download', 'speech.apk');
  await rm(path.dirname(output), { recursive: true, force: true });
  await mkdir(path.dirname(output));
  await writeFile(`${output}.part`, apk.bytes.subarray(0, 1024 * 1024));
  const resumed = await cli(['download', apk.id, '--output', output, '--cloudlet', cloudlet, '--json']);
  tt.equal(resumed.code, 0, resumed.stderr);
  tt.match(resumed.json, { resumed_from: 1024 * 1024, transferred: apk.bytes.length - 1024 * 1024, sha256: sha256(apk.bytes) });
  tt.ok((await readFile(output)).equals(apk.bytes), 'the resumed file is the app, byte for byte');
  tt.same(await readdir(path.dirname(output)), ['speech.apk'], 'the .part file took its final name');

  // A damaged partial file is caught by the SHA-256 check, deleted, and the exit status says so.
  await writeFile(`${output}-2.part`, randomBytes(4096));
  const damaged = await cli(['download', apk.id, '--output', `${output}-2`, '--cloudlet', cloudlet, '--json']);
  tt.equal(damaged.code, 5);
  tt.equal(damaged.json.error.code, 'CHECKSUM_MISMATCH');
  tt.same((await readdir(path.dirname(output))).sort(), ['speech.apk'], 'nothing damaged is kept');

  const fresh = await cli(['download', oldApk.id, '--cloudlet', cloudlet], { cwd: path.dirname(output) });
  tt.equal(fresh.code, 0, fresh.stderr);
  tt.match(fresh.stdout, /legacy\.apk \(4\.0 KiB\), SHA-256 verified/);
  tt.ok((await readFile(path.join(path.dirname(output), 'legacy.apk'))).equals(oldApk.bytes), 'saved under its own name by default');
});

t.test('bad uploads are refused with clear errors and leave nothing behind', async (tt) => {
  const before = (await agent.get('/v1/apps')).json.apps.length;
  const bytes = randomBytes(1024);
  const query = (fields: Record<string, string>) => new URLSearchParams({ service_id: SERVICE, name: 'Bad', file_name: 'bad.apk', ...fields }).toString();

  const traversal = await rawUpload(query({ file_name: '../../etc/cron.d/evil' }), bytes);
  tt.equal(traversal.status, 400);
  tt.match(traversal.json, { code: 'INVALID_PARAMETER', details: { parameter: 'file_name' } });
  const unknownService = await rawUpload(query({ service_id: 'no.such.service' }), bytes);
  tt.equal(unknownService.status, 404);
  tt.equal(unknownService.json.code, 'SERVICE_NOT_FOUND');
  const damaged = await rawUpload(query({ sha256: sha256(Buffer.from('something else')) }), bytes);
  tt.equal(damaged.status, 422);
  tt.equal(damaged.json.code, 'INVALID_APP');
  const missingName = await rawUpload(new URLSearchParams({ service_id: SERVICE, file_name: 'x.apk' }).toString(), bytes);
  tt.match(missingName.json, { code: 'MISSING_PARAMETER', details: { parameter: 'name' } });
  const unknownKind = await rawUpload(query({ kind: 'exe' }), bytes);
  tt.match(unknownKind.json, { code: 'INVALID_PARAMETER', details: { parameter: 'kind' } });
  // An inherited property of the kinds table is no kind either (it was stored, and every listing then failed).
  for (const kind of ['toString', '__proto__'])
    tt.match((await rawUpload(query({ kind }), bytes)).json, { code: 'INVALID_PARAMETER', details: { parameter: 'kind' } });

  // Announced as 100 GiB: refused from the headers alone, not a byte stored; an uploader that keeps sending anyway is
  // cut off once the agent has dropped 16 MiB of it.
  const huge = await rawUpload(query({}), bytes, 100 * 1024 ** 3);
  tt.equal(huge.status, 0, 'cut off');
  // Just over the limit, through the CLI: the agent drops the rest of the upload and answers why.
  const big = path.join(scratch, 'big.apk');
  await writeFile(big, Buffer.alloc(MAX_UPLOAD + 1));
  const refused = await cli(['add-app', big, '--service', SERVICE, '--name', 'Big', '--cloudlet', cloudlet, '--json']);
  tt.equal(refused.code, 1);
  tt.equal(refused.json.error.code, 'PAYLOAD_TOO_LARGE');

  tt.equal((await agent.get('/v1/apps')).json.apps.length, before, 'no refused app is listed');
  tt.same(await leftovers(), [], 'no staging leftovers');
  tt.equal((await readdir(path.join(agent.dataDir, 'apps'))).length, before, 'no app directory appeared');
});

t.test('apps survive an agent restart; remove-app takes one away for good', async (tt) => {
  await agent.stop();
  await agent.launch();
  tt.equal((await agent.get(`/v1/apps/${apk.id}`)).json.sha256, sha256(apk.bytes), 'reloaded from disk');

  const removed = await cli(['remove-app', oldApk.id, '--cloudlet', cloudlet, '--json']);
  tt.equal(removed.code, 0, removed.stderr);
  tt.same(removed.json, { removed: oldApk.id });
  const gone = await agent.get(`/v1/apps/${oldApk.id}/file`);
  tt.equal(gone.status, 404);
  tt.equal(gone.json.code, 'APP_NOT_FOUND');
  const again = await cli(['remove-app', oldApk.id, '--cloudlet', cloudlet]);
  tt.equal(again.code, 3, 'not found is exit status 3');
  tt.match(again.stderr, /no app with id/);
  tt.notOk((await readdir(path.join(agent.dataDir, 'apps'))).includes(oldApk.id), 'its files are gone');
});

t.test('every verb answers --help; usage errors exit 2; an unreachable cloudlet exits 4', async (tt) => {
  const main = await cli(['--help']);
  tt.equal(main.code, 0);
  const verbList = main.stdout.slice(main.stdout.indexOf('Verbs:'), main.stdout.indexOf('Common options:'));
  const verbs = [...verbList.matchAll(/^ {2}([a-z-]+) {2,}/gm)].map((m) => m[1]!);
  tt.same(verbs, [
    'discover',
    'system',
    'health',
    'services',
    'service',
    'apps',
    'instances',
    'top',
    'start',
    'stop',
    'handoff',
    'console',
    'recipe',
    'package',
    'download',
    'add-app',
    'synthesize',
    'base',
    'remove-app',
    'pair',
    'devices',
    'peer',
  ]);
  for (const verb of verbs) {
    const help = await cli([verb, '--help']);
    tt.equal(help.code, 0, `${verb} --help`);
    tt.match(help.stdout, new RegExp(`^usage: cloudlet ${verb}`), `${verb} --help shows its usage`);
  }
  tt.equal((await cli([])).code, 2, 'no verb');
  tt.equal((await cli(['fly'])).code, 2, 'an unknown verb');
  tt.equal((await cli(['stop', '--cloudlet', cloudlet])).code, 2, 'a missing argument');
  tt.equal((await cli(['services', '--frobnicate', '--cloudlet', cloudlet])).code, 2, 'an unknown option');
  const unreachable = await cli(['services', '--cloudlet', '127.0.0.1:1', '--json']);
  tt.equal(unreachable.code, 4);
  tt.equal(unreachable.json.error.code, 'UNREACHABLE');
});

t.test('system, services and instances show the cloudlet to people and scripts', async (tt) => {
  const system = await cli(['system', '--cloudlet', cloudlet, '--json']);
  tt.equal(system.code, 0, system.stderr);
  tt.match(system.json, { cloudlet, hostname: os.hostname(), cpu: { cores: Number }, instances: 0 });
  const services = await cli(['services', '--cloudlet', cloudlet]);
  tt.match(services.stdout, new RegExp(`^SERVICE\\s+VERSION\\s+SHAREABLE\\s+WARM\\s+DESCRIPTION\\n${SERVICE.replace(/\./g, '\\.')}\\s+1\\s+yes`));
  const instances = await cli(['instances', '--cloudlet', cloudlet, '--json']);
  tt.same(instances.json, { instances: [] });
  const unknownStart = await cli(['start', 'no.such.service', '--cloudlet', cloudlet, '--json']);
  tt.equal(unknownStart.code, 3);
  tt.equal(unknownStart.json.error.code, 'SERVICE_NOT_FOUND');
  const unknownStop = await cli(['stop', 'no-such-instance', '--cloudlet', cloudlet]);
  tt.equal(unknownStop.code, 3);
});
