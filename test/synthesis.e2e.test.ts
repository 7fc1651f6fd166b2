// VM Synthesis, end to end: a Base VM and a customized VM (another www disk, each with a captured memory state) made
// by the real agent, an overlay made by the developer's CLI, synthesized by the agent from an HTTP upload (also one
// cut in the middle and resumed) and from a file; bad overlays are refused and leave nothing behind.
import t, { Test } from 'tap';
import { createPrivateKey, sign } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile, copyFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { compressFrame } from '../agent/src/images/zstd';
import { decodeHeader, encodeHeader, encodeRecord, HEADER_BYTES, OVERLAY_FORMAT, sha256, Source, Target } from '../agent/src/synthesis/overlay-format';
import { AgentProcess, domainsUnder, fetchText, request } from './support/agent';
import { rssMb } from '../bench/support/measure';
import { EventsSocket } from './support/listeners';
import { until } from './support/poll';
import { createOverlay, OVERLAY_CLI, prepareSynthesis, run, sendUploadBytes, type SynthesisFixture } from './support/synthesis-fixture';

const SERVICE = 'org.cloudlet.test.synthesized';
const CONTENT = 'hello from a synthesized service';

let agent: AgentProcess;
let scratch: string;
let overlay: Buffer;
let fixture: SynthesisFixture;
let baseDisk: string;
/** A signing key the agent trusts, and one it does not. */
let trustedKey: string;
let strangerKey: string;

t.before(async () => {
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-synthesis-'));
  agent = await AgentProcess.start({ portRange: '22400-22449' });
  const keys = path.join(scratch, 'keys');
  await mkdir(keys);
  for (const name of ['trusted', 'stranger']) await run('node', [OVERLAY_CLI, 'keygen', path.join(keys, `${name}.key`), path.join(keys, `${name}.pem`)]);
  trustedKey = path.join(keys, 'trusted.key');
  strangerKey = path.join(keys, 'stranger.key');
  await mkdir(path.join(agent.dataDir, 'overlay-keys'));
  await copyFile(path.join(keys, 'trusted.pem'), path.join(agent.dataDir, 'overlay-keys', 'developer.pem'));

  fixture = await prepareSynthesis(agent, scratch, { baseName: 'test-base', serviceId: SERVICE, content: CONTENT });
  baseDisk = fixture.baseDisk;
});

t.teardown(async () => {
  await agent.dispose();
  await rm(scratch, { recursive: true, force: true });
});

async function assertNothingLeft(tt: Test, what: string) {
  tt.same(await domainsUnder(agent.dataDir), [], `${what}: no domain left in libvirt`);
  tt.same(await readdir(path.join(agent.dataDir, 'instances')), [], `${what}: no instance files left`);
  tt.same(await readdir(path.join(agent.dataDir, 'tmp')).catch(() => []), [], `${what}: nothing left in the staging area`);
  tt.same((await agent.get('/v1/instances')).json.instances, [], `${what}: no instance (and so no port) left`);
}

async function stopAndCheck(tt: Test, id: string) {
  const stop = await agent.delete(`/v1/instances/${id}`);
  tt.equal(stop.status, 200, stop.body);
  await assertNothingLeft(tt, 'after stop');
}

const sendBytes = (id: string, offset: number, bytes: Buffer, cutAfter?: number) => sendUploadBytes(agent.apiPort, id, offset, bytes, cutAfter);

t.test('the overlay CLI writes a signed overlay far smaller than the VM and says what it saved', async (tt) => {
  const out = path.join(scratch, 'overlay.bin');
  const stats = await createOverlay(fixture, fixture.baseDir, out, trustedKey);
  overlay = await readFile(out);
  tt.equal(stats.overlay_bytes, overlay.length);
  tt.ok(stats.disk_changed_blocks! > 256, 'the data file is among the changed disk blocks');
  tt.ok(stats.from_base_memory! > 1000, "most of the memory state is the base's memory");
  tt.ok(stats.from_overlay! >= 200, "the data file's pages in the page cache are copies of its disk blocks");
  const vm = fixture.customizedVm;
  const manifest = JSON.parse(await readFile(path.join(vm, 'manifest.json'), 'utf8'));
  const vmBytes = (await readFile(path.join(vm, manifest.state))).length;
  tt.ok(overlay.length < vmBytes / 4, `overlay ${overlay.length} B vs a ${vmBytes} B memory state alone`);
});

t.test('an overlay uploaded over HTTP becomes a ready instance with the customized content, on a disk backed by the base', async (tt) => {
  const events = await EventsSocket.connect(agent.apiPort);
  tt.teardown(() => events.close());
  const upload = await agent.post('/v1/synthesis/uploads', { bytes: overlay.length });
  tt.equal(upload.status, 201, upload.body);
  tt.match(upload.json, { bytes: overlay.length, received: 0, state: 'receiving' });
  const done = await sendBytes(upload.json.id, 0, overlay);
  tt.equal(done?.status, 201, JSON.stringify(done?.json));
  const instance = done!.json.instance;
  tt.match(instance, { service_id: SERVICE, mechanism: 'synthesis', launch: 'memory-state', state: 'ready' });
  tt.equal((await fetchText(done!.json.endpoint.port)).trim(), CONTENT, 'the synthesized VM serves the customized page');
  tt.ok((await fetchText(done!.json.endpoint.port, '/data.bin')).length > 0, 'and its data file');

  const info = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', path.join(agent.dataDir, 'instances', instance.id, 'disk.qcow2')])).stdout);
  tt.equal(info['full-backing-filename'], baseDisk, 'the disk is a qcow2 overlay on the base disk');
  tt.ok(info['actual-size'] < 8 << 20, 'holding only the changed blocks');
  const phases = events.inbox.items.filter((i) => i.value.type === 'progress' && i.value.instance_id === instance.id);
  tt.ok(
    phases.some((i) => i.value.phase === 'synthesizing' && i.value.bytes_done === overlay.length && i.value.bytes_total === overlay.length),
    'progress reports the overlay bytes applied',
  );
  tt.same((await agent.get(`/v1/synthesis/uploads/${upload.json.id}`)).json.state, 'done');
  await stopAndCheck(tt, instance.id);
});

t.test('a cut upload resumes from the last byte the cloudlet received', async (tt) => {
  const upload = await agent.post('/v1/synthesis/uploads', { bytes: overlay.length });
  const id = upload.json.id;
  await sendBytes(id, 0, overlay, Math.floor(overlay.length / 2));
  let status = (await agent.get(`/v1/synthesis/uploads/${id}`)).json;
  for (let i = 0; i < 50 && status.received === 0; i++) {
    await new Promise((r) => setTimeout(r, 50));
    status = (await agent.get(`/v1/synthesis/uploads/${id}`)).json;
  }
  tt.ok(status.received > 0 && status.received <= overlay.length / 2, `received ${status.received} bytes before the cut`);
  tt.equal(status.state, 'receiving');
  // While no request sends bytes the upload holds nothing: its synthesis stopped, and its launch was cleaned up.
  const paused = await until(
    async () => agent.log,
    (log) => log.includes(`upload ${id} paused at byte`),
    30_000,
  );
  tt.ok(paused.includes(`upload ${id} paused at byte`), 'the synthesis of the cut upload was stopped');
  await assertNothingLeft(tt, 'while the cut upload waits');
  const wrongOffset = await sendBytes(id, status.received + 1, overlay.subarray(status.received + 1));
  tt.equal(wrongOffset?.status, 409, 'bytes from any other offset are refused');
  tt.equal(wrongOffset?.json.details.received, status.received, 'with where to continue');
  const done = await sendBytes(id, status.received, overlay.subarray(status.received));
  tt.equal(done?.status, 201, JSON.stringify(done?.json));
  tt.equal((await fetchText(done!.json.endpoint.port)).trim(), CONTENT);
  await stopAndCheck(tt, done!.json.instance.id);
});

t.test('a synthesized instance survives an agent restart like any other', async (tt) => {
  const file = path.join(scratch, 'good.bin');
  await writeFile(file, overlay);
  const started = await agent.post('/v1/synthesis', { path: file });
  tt.equal(started.status, 201, started.body);
  await agent.kill();
  await agent.launch();
  const listed = (await agent.get('/v1/instances')).json.instances;
  tt.match(listed, [{ id: started.json.instance.id, mechanism: 'synthesis', state: 'ready' }]);
  tt.equal((await fetchText(started.json.endpoint.port)).trim(), CONTENT);
  await stopAndCheck(tt, started.json.instance.id);
});

/** The overlay with its manifest changed by `edit` and signed again by `key` (or unsigned). */
async function remade(edit: (manifest: any) => void, key: string | null): Promise<Buffer> {
  const header = decodeHeader(overlay.subarray(0, HEADER_BYTES));
  const manifest = JSON.parse(overlay.subarray(HEADER_BYTES, HEADER_BYTES + header.manifestBytes).toString());
  edit(manifest);
  const manifestBytes = Buffer.from(JSON.stringify(manifest));
  const signature = key ? sign(null, manifestBytes, createPrivateKey(await readFile(key))) : null;
  return Buffer.concat([encodeHeader(manifestBytes, signature), overlay.subarray(HEADER_BYTES + header.manifestBytes + header.signatureBytes)]);
}

const BAD_OVERLAYS: { name: string; status: number; code: string; make: () => Promise<Buffer> }[] = [
  { name: 'truncated', status: 422, code: 'OVERLAY_INVALID', make: async () => overlay.subarray(0, overlay.length - 1000) },
  {
    name: 'bit-flipped inside a frame',
    status: 422,
    code: 'OVERLAY_INVALID',
    make: async () => {
      const flipped = Buffer.from(overlay);
      flipped[flipped.length - 5000]! ^= 0x10;
      return flipped;
    },
  },
  {
    name: 'for a base this cloudlet lacks',
    status: 404,
    code: 'BASE_NOT_FOUND',
    make: () =>
      remade((m) => {
        m.base = 'f'.repeat(64);
      }, trustedKey),
  },
  {
    name: 'oversized',
    status: 413,
    code: 'OVERLAY_TOO_LARGE',
    make: () =>
      remade((m) => {
        m.disk.virtual_size = 2 ** 50;
      }, trustedKey),
  },
  {
    name: 'of another format version',
    status: 422,
    code: 'OVERLAY_UNSUPPORTED',
    make: async () => {
      const other = Buffer.from(overlay);
      other.writeUInt32BE(OVERLAY_FORMAT + 1, 8);
      return other;
    },
  },
  { name: 'signed by a key this cloudlet does not trust', status: 403, code: 'OVERLAY_UNTRUSTED', make: () => remade(() => {}, strangerKey) },
  { name: 'unsigned, while this cloudlet trusts keys', status: 403, code: 'OVERLAY_UNTRUSTED', make: () => remade(() => {}, null) },
];

for (const bad of BAD_OVERLAYS) {
  t.test(`an overlay ${bad.name} is refused (${bad.code}) and leaves nothing behind`, async (tt) => {
    const file = path.join(scratch, 'bad.bin');
    await writeFile(file, await bad.make());
    const r = await agent.post('/v1/synthesis', { path: file });
    tt.equal(r.status, bad.status, r.body);
    tt.equal(r.json.code, bad.code, r.json.message);
    await assertNothingLeft(tt, bad.name);
  });
}

t.test('a few-KB overlay that claims a 1 TiB disk is refused at once for want of room, and the agent memory stays flat', async (tt) => {
  // One frame of zero records over the whole terabyte, 4 GiB each: what a few KB can claim to expand to.
  const claim = 2 ** 40;
  const step = 2 ** 32 - 4096;
  const records: Buffer[] = [];
  for (let at = 0; at < claim; at += step)
    records.push(encodeRecord({ target: Target.Disk, source: Source.Zero, offset: at, length: Math.min(step, claim - at), sourceOffset: 0 }));
  const raw = Buffer.concat(records);
  const frame = await compressFrame(raw, 19);
  const header = decodeHeader(overlay.subarray(0, HEADER_BYTES));
  const manifest = JSON.parse(overlay.subarray(HEADER_BYTES, HEADER_BYTES + header.manifestBytes).toString());
  manifest.disk.virtual_size = claim;
  manifest.frames = [{ bytes: frame.length, raw_bytes: raw.length, sha256: sha256(frame) }];
  const manifestBytes = Buffer.from(JSON.stringify(manifest));
  const signature = sign(null, manifestBytes, createPrivateKey(await readFile(trustedKey)));
  const claiming = Buffer.concat([encodeHeader(manifestBytes, signature), frame]);
  tt.ok(claiming.length < 8192, `the overlay is ${claiming.length} bytes`);
  const file = path.join(scratch, 'terabyte.bin');
  await writeFile(file, claiming);
  const rssBefore = await rssMb(agent.pid!);
  const r = await agent.post('/v1/synthesis', { path: file });
  tt.equal(r.status, 507, r.body);
  tt.equal(r.json.code, 'NO_SPACE');
  tt.ok(r.json.details.needed_bytes > claim, 'the room needed is what the overlay expands to, not its size');
  tt.ok((await rssMb(agent.pid!)) - rssBefore < 50, 'the agent allocated nothing for the claim');
  await assertNothingLeft(tt, 'after the terabyte claim');
});

t.test('a bad overlay refused during an upload ends the upload and leaves nothing behind', async (tt) => {
  const flipped = Buffer.from(overlay);
  flipped[flipped.length - 5000]! ^= 0x10;
  const upload = await agent.post('/v1/synthesis/uploads', { bytes: flipped.length });
  const r = await sendBytes(upload.json.id, 0, flipped);
  tt.equal(r?.status, 422);
  tt.equal(r?.json.code, 'OVERLAY_INVALID');
  tt.equal((await agent.get(`/v1/synthesis/uploads/${upload.json.id}`)).json.state, 'failed');
  await assertNothingLeft(tt, 'after the failed upload');
});

t.test('an upload must announce a positive size, and an unknown upload is not found', async (tt) => {
  const r = await request(agent.apiPort, 'POST', '/v1/synthesis/uploads', { bytes: 0 });
  tt.equal(r.status, 400);
  tt.equal(r.json.code, 'INVALID_PARAMETER');
  tt.equal((await agent.get('/v1/synthesis/uploads/nope')).json.code, 'NOT_FOUND');
});
