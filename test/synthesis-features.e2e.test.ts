// VM Synthesis as a developer and an operator use it, end to end with the real agent and the real `cloudlet` CLI:
// a base exported (resumably) with its chunk index and an overlay made against the export; overlays uploaded by the
// CLI, through a cut connection and across an agent restart; a synthesized VM kept as a Cached VM service.
import t from 'tap';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { readChunkIndex } from '../agent/src/vm/chunk-index';
import { AgentProcess, domainsUnder, fetchText, registerAgent, request } from './support/agent';
import { cli } from './support/cli';
import { createOverlay, prepareSynthesis, run, sendUploadBytes, type SynthesisFixture } from './support/synthesis-fixture';

const SERVICE = 'org.cloudlet.test.featured';
const KEPT = 'org.cloudlet.test.kept';
const CONTENT = 'hello from a synthesized service, with features';

let agent: AgentProcess;
let scratch: string;
let fixture: SynthesisFixture;
/** The overlay, made against the base as `cloudlet base export` fetched it. */
let overlayFile: string;
let overlay: Buffer;

t.before(async () => {
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-synthesis-features-'));
  agent = await AgentProcess.start({ portRange: '25100-25199' });
  fixture = await prepareSynthesis(agent, scratch, { baseName: 'feature-base', serviceId: SERVICE, content: CONTENT });
});

t.teardown(async () => {
  await agent.dispose();
  await rm(scratch, { recursive: true, force: true });
});

const cloudlet = () => ['--cloudlet', `127.0.0.1:${agent.apiPort}`];

async function stopAll(): Promise<void> {
  for (const instance of (await agent.get('/v1/instances')).json.instances) await agent.delete(`/v1/instances/${instance.id}`);
}

t.test('cloudlet base list shows the imported base and its files, chunk index included', async (tt) => {
  const r = await cli(['base', 'list', '--json', ...cloudlet()]);
  tt.equal(r.code, 0, r.stderr);
  const base = r.json.bases.find((b: any) => b.name === 'feature-base');
  tt.ok(base, 'the base is listed');
  tt.same(base.files.map((f: any) => f.name).sort(), [base.disk, base.state, base.boot.kernel, base.boot.initrd, 'chunk-index.bin'].filter(Boolean).sort());
  const text = await cli(['base', 'list', ...cloudlet()]);
  tt.match(text.stdout.trim(), /^BASE +DIGEST +MEMORY +STATE +SIZE\nfeature-base +[0-9a-f]{12} +\d+ MiB +yes +[\d.]+ MiB$/);
});

t.test("the chunk index holds the hash of every RAM page of the base's memory state and of its non-zero disk blocks", async (tt) => {
  const index = await readChunkIndex(path.join(fixture.baseDir, 'chunk-index.bin'));
  const state = JSON.parse(await readFile(path.join(fixture.baseDir, 'manifest.json'), 'utf8')).manifest.state;
  const memory = await readFile(path.join(fixture.baseDir, state));
  const raw = path.join(scratch, 'base.raw');
  await run('qemu-img', ['convert', '-O', 'raw', fixture.baseDisk, raw]);
  const disk = await readFile(raw);
  await rm(raw);
  const md5 = (bytes: Buffer) => createHash('md5').update(bytes).digest();
  const nonZero = [];
  for (let offset = 0; offset < disk.length; offset += 4096) if (disk.subarray(offset, offset + 4096).some((b) => b !== 0)) nonZero.push(offset);
  tt.same(
    index.disk.map((c) => c.offset),
    nonZero,
    'every non-zero 4 KiB block of the disk, at its offset',
  );
  tt.ok(
    index.disk.every((c) => md5(disk.subarray(c.offset, c.offset + 4096)).equals(c.hash)),
    'with its MD5',
  );
  tt.ok(index.memory!.length > 1000, `${index.memory!.length} RAM pages`);
  tt.ok(
    index.memory!.every((c) => md5(memory.subarray(c.offset, c.offset + 4096)).equals(c.hash)),
    'every RAM page with its MD5',
  );
  tt.match(index.memory![0]!.guestAddress, /^pc\.ram@\d+$/, 'pages carry their guest address');
});

t.test('cloudlet base export fetches the base resumably, and an overlay made against the export synthesizes', async (tt) => {
  // An earlier export that broke off half-way through the disk.
  const out = path.join(scratch, 'exported-base');
  await mkdir(out);
  const disk = await readFile(fixture.baseDisk);
  await writeFile(path.join(out, `${path.basename(fixture.baseDisk)}.part`), disk.subarray(0, disk.length >> 1));
  const r = await cli(['base', 'export', 'feature-base', out, '--json', ...cloudlet()]);
  tt.equal(r.code, 0, r.stderr);
  tt.equal(r.json.resumed_from, disk.length >> 1, 'the disk continued from the partial file (HTTP Range)');
  for (const name of await readdir(fixture.baseDir)) {
    if (name === 'manifest.json') continue;
    tt.ok((await readFile(path.join(out, name))).equals(await readFile(path.join(fixture.baseDir, name))), `${name} is the base's own`);
  }
  tt.match(JSON.parse(await readFile(path.join(out, 'manifest.json'), 'utf8')), { name: 'feature-base', digest: r.json.base });
  const again = await cli(['base', 'export', 'feature-base', out, '--json', ...cloudlet()]);
  tt.equal(again.json.fetched, 0, 'a second export into the same directory fetches nothing');
  const reimported = await cli(['base', 'import', out, '--name', 'feature-base', '--json', ...cloudlet()]);
  tt.equal(reimported.code, 0, reimported.stderr);
  tt.equal(reimported.json.digest, r.json.base, 'the export imports back as the very same base (same digest)');

  overlayFile = path.join(scratch, 'app.overlay');
  await createOverlay(fixture, out, overlayFile);
  overlay = await readFile(overlayFile);
  const started = await agent.post('/v1/synthesis', { path: overlayFile });
  tt.equal(started.status, 201, started.body);
  tt.equal((await fetchText(started.json.endpoint.port)).trim(), CONTENT, 'the overlay made against the export synthesizes on the cloudlet');
  await stopAll();
});

t.test("a phone's synthesis is its own: another phone neither sees nor continues its upload, nor stops its VM", async (tt) => {
  const pair = async (name: string) => {
    const window = await agent.post('/v1/pairing', {});
    const claim = await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: window.json.code, name }, { authorization: '' });
    tt.equal(claim.status, 201, claim.body);
    return { id: claim.json.device_id as string, as: { authorization: `Bearer ${claim.json.token}` } };
  };
  const alice = await pair('alice');
  const bob = await pair('bob');
  const created = await request(agent.apiPort, 'POST', '/v1/synthesis/uploads', { bytes: overlay.length }, alice.as);
  tt.equal(created.status, 201, created.body);
  const upload = `/v1/synthesis/uploads/${created.json.id}`;
  tt.equal((await request(agent.apiPort, 'GET', upload, undefined, bob.as)).json?.code, 'NOT_FOUND', "bob does not see alice's upload");
  const bobSends = await request(agent.apiPort, 'POST', `${upload}?offset=0`, overlay.subarray(0, 4096), {
    ...bob.as,
    'content-type': 'application/octet-stream',
  });
  tt.equal(bobSends.json?.code, 'NOT_FOUND', 'nor can he add bytes to it');
  const done = await request(agent.apiPort, 'POST', `${upload}?offset=0`, overlay, { ...alice.as, 'content-type': 'application/octet-stream' });
  tt.equal(done.status, 201, done.body);
  tt.same(done.json.instance.owners, [alice.id], "the synthesized instance is alice's");
  const instance = `/v1/instances/${done.json.instance.id}`;
  tt.equal((await request(agent.apiPort, 'DELETE', instance, undefined, bob.as)).json?.code, 'FORBIDDEN', 'bob cannot stop it');
  tt.equal((await request(agent.apiPort, 'DELETE', instance, undefined, alice.as)).status, 200, 'alice can');
  await stopAll();

  // A phone may have two unfinished uploads at a time; a third is refused, another phone's is not.
  const create = (who: { as: Record<string, string> }) => request(agent.apiPort, 'POST', '/v1/synthesis/uploads', { bytes: 10 }, who.as);
  const open = [await create(alice), await create(alice)];
  tt.same(
    open.map((r) => r.status),
    [201, 201],
  );
  const third = await create(alice);
  tt.equal(third.status, 429, third.body);
  tt.equal(third.json.code, 'TOO_MANY_UPLOADS');
  const bobs = await create(bob);
  tt.equal(bobs.status, 201, 'bob still may');
  // Once one of them ends (here: ten bytes that are no overlay), alice may create another.
  const end = (who: { as: Record<string, string> }, id: string) =>
    request(agent.apiPort, 'POST', `/v1/synthesis/uploads/${id}?offset=0`, Buffer.alloc(10), { ...who.as, 'content-type': 'application/octet-stream' });
  tt.equal((await end(alice, open[0]!.json.id)).json.code, 'OVERLAY_INVALID');
  const again = await create(alice);
  tt.equal(again.status, 201, again.body);
  for (const [who, id] of [
    [alice, open[1]!.json.id],
    [alice, again.json.id],
    [bob, bobs.json.id],
  ] as const)
    await end(who, id);
});

t.test('cloudlet synthesize uploads an overlay and prints the endpoint of the ready VM', async (tt) => {
  const r = await cli(['synthesize', overlayFile, '--json', ...cloudlet()]);
  tt.equal(r.code, 0, r.stderr);
  tt.match(r.json, { instance: { service_id: SERVICE, mechanism: 'synthesis', launch: 'memory-state', state: 'ready' }, reconnects: 0 });
  tt.equal((await fetchText(r.json.endpoint.port)).trim(), CONTENT);
  const text = await cli(['synthesize', overlayFile, ...cloudlet()]);
  tt.match(text.stdout, /^synthesized \S+ \(org\.cloudlet\.test\.featured, memory-state\)\nendpoint 127\.0\.0\.1:\d+$/m);
  await stopAll();
});

/** A loopback TCP proxy to the agent that cuts the first upload connection after `cutAfter` bytes from the client. */
async function cuttingProxy(cutAfter: number): Promise<{ port: number; cuts: () => number; close: () => Promise<void> }> {
  let cuts = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(agent.apiPort, '127.0.0.1');
    sockets.add(client).add(upstream);
    let sent = 0;
    let upload: boolean | null = null;
    client.on('data', (chunk: Buffer) => {
      upload ??= /^POST \/v1\/synthesis\/uploads\/[^ ?]+\?offset=/.test(chunk.toString('latin1', 0, 80));
      sent += chunk.length;
      if (upload && cuts === 0 && sent > cutAfter) {
        cuts++;
        client.destroy();
        upstream.destroy();
        return;
      }
      upstream.write(chunk);
    });
    upstream.on('data', (chunk) => client.write(chunk));
    for (const [a, b] of [
      [client, upstream],
      [upstream, client],
    ] as const) {
      a.on('end', () => b.end());
      a.on('error', () => b.destroy());
      a.on('close', () => sockets.delete(a));
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    cuts: () => cuts,
    close: () =>
      new Promise((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

t.test('a cut connection costs the CLI a reconnect: the upload goes on from the last byte the cloudlet kept', async (tt) => {
  const proxy = await cuttingProxy(overlay.length >> 1);
  tt.teardown(() => proxy.close());
  registerAgent(proxy.port, agent.dataDir); // the CLI acts as the operator on the box, through the proxy too
  const r = await cli(['synthesize', overlayFile, '--json', '--cloudlet', `127.0.0.1:${proxy.port}`]);
  tt.equal(r.code, 0, r.stderr);
  tt.equal(proxy.cuts(), 1, 'the connection was cut mid-upload');
  tt.equal(r.json.reconnects, 1);
  tt.match(r.stderr, /reconnected: the cloudlet has [\d.]+ [KM]iB, continuing/);
  tt.equal((await fetchText(r.json.endpoint.port)).trim(), CONTENT);
  await stopAll();
});

t.test('an upload survives an agent restart: reloaded from disk, it continues from the last committed byte', async (tt) => {
  const created = await agent.post('/v1/synthesis/uploads', { bytes: overlay.length });
  tt.equal(created.status, 201, created.body);
  const id = created.json.id;
  await sendUploadBytes(agent.apiPort, id, 0, overlay, overlay.length >> 1);
  let before = (await agent.get(`/v1/synthesis/uploads/${id}`)).json.received;
  for (let i = 0; i < 50; i++) {
    await new Promise((r) => setTimeout(r, 100));
    const now = (await agent.get(`/v1/synthesis/uploads/${id}`)).json.received;
    if (now === before && now > 0) break;
    before = now;
  }
  // The cut request commits what it received as it ends; then the agent dies without any chance to clean up.
  await new Promise((r) => setTimeout(r, 500));
  await agent.kill();
  // Beside it, what an agent must not resume: an upload idle for an hour, and a directory that is no upload.
  const stale = path.join(agent.dataDir, 'uploads', '00000000-0000-4000-8000-000000000000');
  await mkdir(stale);
  await writeFile(
    path.join(stale, 'session.json'),
    JSON.stringify({ id: path.basename(stale), bytes: 10, received: 5, meta: {}, updated_at: new Date(Date.now() - 3600_000).toISOString() }),
  );
  await writeFile(path.join(stale, 'overlay.part'), 'hello');
  await mkdir(path.join(agent.dataDir, 'uploads', 'junk'));
  await agent.launch();

  const reloaded = (await agent.get(`/v1/synthesis/uploads/${id}`)).json;
  tt.match(reloaded, { id, state: 'receiving', bytes: overlay.length });
  tt.ok(reloaded.received > 0 && reloaded.received <= before, `continues at byte ${reloaded.received} (${before} had arrived before the kill)`);
  tt.same((await readdir(path.join(agent.dataDir, 'uploads'))).sort(), [id], 'the stale upload and the junk were deleted');
  tt.same(await domainsUnder(agent.dataDir), [], 'nothing of the cut synthesis runs');

  const r = await cli(['synthesize', overlayFile, '--resume', id, '--json', ...cloudlet()]);
  tt.equal(r.code, 0, r.stderr);
  tt.equal(r.json.upload_id, id);
  tt.equal((await fetchText(r.json.endpoint.port)).trim(), CONTENT, 'the VM synthesized from the resumed upload serves the customized page');
  tt.match((await agent.get(`/v1/synthesis/uploads/${id}`)).json, { state: 'done', result: { instance: { id: r.json.instance.id } } });
  tt.same(await readdir(path.join(agent.dataDir, 'uploads')), [], 'a finished upload leaves no files');
  await stopAll();
});

t.test('a synthesized VM kept as a Cached VM service keeps serving, and the service then starts from its memory state', async (tt) => {
  const r = await cli(['synthesize', overlayFile, '--keep-as', KEPT, '--json', ...cloudlet()]);
  tt.equal(r.code, 0, r.stderr);
  tt.match(r.json, { instance: { service_id: SERVICE, mechanism: 'synthesis' }, kept_as: { id: KEPT } });
  tt.notOk(r.json.keep_error);
  tt.equal((await fetchText(r.json.endpoint.port)).trim(), CONTENT, 'the synthesized instance keeps serving');
  const service = (await agent.get(`/v1/services/${KEPT}`)).json;
  tt.match(service.manifest, { service_id: KEPT, state: String });

  const started = await agent.post('/v1/instances', { service_id: KEPT });
  tt.equal(started.status, 201, started.body);
  tt.match(started.json.instance, { service_id: KEPT, mechanism: 'cached-vm', launch: 'memory-state', state: 'ready' });
  tt.equal((await fetchText(started.json.endpoint.port)).trim(), CONTENT, 'the kept service answers with the customized content');

  const again = await cli(['synthesize', overlayFile, '--keep-as', KEPT, '--json', ...cloudlet()]);
  tt.equal(again.json.error.code, 'SERVICE_EXISTS', 'keeping as an existing service is refused before any byte is sent');
  await stopAll();
  tt.same(await domainsUnder(agent.dataDir), []);
});

t.test('cloudlet base import --from-service makes a base of a catalog service, with its chunk index', async (tt) => {
  const r = await cli(['base', 'import', '--from-service', KEPT, '--name', 'kept-base', '--json', ...cloudlet()]);
  tt.equal(r.code, 0, r.stderr);
  tt.match(r.json, { name: 'kept-base', state: String, files: [{ name: String }] });
  tt.ok(r.json.files.some((f: any) => f.name === 'chunk-index.bin' && f.bytes > 0));
  const usage = await cli(['base', 'import', '--name', 'nothing-to-import', ...cloudlet()]);
  tt.equal(usage.code, 2, 'import needs DIR or --from-service');
});
