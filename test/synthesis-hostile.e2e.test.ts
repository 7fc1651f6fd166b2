// A synthesized VM runs with the definition the cloudlet gives it, never the one a phone wrote. A paired phone (no
// admin rights) uploads unsigned overlays made with the developer's CLI from a memory state whose header XML it
// edited: each hostile element is refused as OVERLAY_INVALID and leaves no file, domain or port behind, while the
// same overlay with the XML as saved synthesizes (so the refusals are the edits', not the path's). A phone's /v1
// answers carry no host path it could aim such an edit at.
import t, { Test } from 'tap';
import { copyFile, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { encodeSaveImageHeader, readSaveImageHeader } from '../agent/src/vm/save-image';
import { AgentProcess, domainsUnder, fetchText, request } from './support/agent';
import { portIsFree } from './support/invariants';
import { createOverlay, prepareSynthesis, type SynthesisFixture } from './support/synthesis-fixture';

const SERVICE = 'org.cloudlet.test.hostile';
const CONTENT = 'hello from a synthesized service, as saved';
const PORTS: [number, number] = [26300, 26349];

let agent: AgentProcess;
let scratch: string;
let fixture: SynthesisFixture;
let phone: Record<string, string>;

t.before(async () => {
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-synthesis-hostile-'));
  agent = await AgentProcess.start({ portRange: PORTS.join('-') });
  fixture = await prepareSynthesis(agent, scratch, { baseName: 'hostile-base', serviceId: SERVICE, content: CONTENT });
  const window = await agent.post('/v1/pairing', {});
  const claim = await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: window.json.code, name: 'phone' }, { authorization: '' });
  if (claim.status !== 201) throw new Error(claim.body);
  phone = { authorization: `Bearer ${claim.json.token}` };
});

t.teardown(async () => {
  await agent?.dispose();
  await rm(scratch, { recursive: true, force: true });
});

/** The customized VM's memory state with `edit` applied to the domain XML in its header. */
async function editedState(edit: (xml: string) => string): Promise<string> {
  const vm = fixture.customizedVm;
  const state = path.join(vm, JSON.parse(await readFile(path.join(vm, 'manifest.json'), 'utf8')).state);
  const header = await readSaveImageHeader(state);
  const edited = edit(header.xml);
  if (edited === header.xml) throw new Error('the edit changed nothing');
  const out = path.join(scratch, 'edited.sav');
  await writeFile(out, Buffer.concat([encodeSaveImageHeader({ ...header, xml: edited }), (await readFile(state)).subarray(header.streamOffset)]));
  return out;
}

/** An unsigned overlay made with `cloudlet-overlay create`, uploaded by the phone; the final answer. */
async function synthesizeAsPhone(state?: string) {
  const file = path.join(scratch, 'overlay.bin');
  await createOverlay(fixture, fixture.baseDir, file, null, state);
  const overlay = await readFile(file);
  const created = await request(agent.apiPort, 'POST', '/v1/synthesis/uploads', { bytes: overlay.length }, phone);
  if (created.status !== 201) throw new Error(created.body);
  return request(agent.apiPort, 'POST', `/v1/synthesis/uploads/${created.json.id}?offset=0`, overlay, { ...phone, 'content-type': 'application/octet-stream' });
}

async function assertNothingLeft(tt: Test, what: string) {
  tt.same(await domainsUnder(agent.dataDir), [], `${what}: no domain left in libvirt`);
  tt.same(await readdir(path.join(agent.dataDir, 'instances')), [], `${what}: no instance files left`);
  tt.same(await readdir(path.join(agent.dataDir, 'tmp')).catch(() => []), [], `${what}: nothing left in the staging area`);
  tt.same((await agent.get('/v1/instances')).json.instances, [], `${what}: no instance left`);
  const taken: number[] = [];
  for (let port = PORTS[0]; port <= PORTS[1]; port++) if (!(await portIsFree(port))) taken.push(port);
  tt.same(taken, [], `${what}: every forward port is free`);
}

t.test("a phone's /v1 answers name no host path; the operator's still do", async (tt) => {
  for (const route of ['/v1/bases', '/v1/services', '/v1/packages', '/v1/instances']) {
    const r = await request(agent.apiPort, 'GET', route, undefined, phone);
    tt.equal(r.status, 200, r.body);
    tt.notMatch(r.body, agent.dataDir, `${route} does not tell the phone where the data directory is`);
    tt.notMatch(r.body, /"dir"/, `${route} has no dir`);
  }
  tt.equal((await request(agent.apiPort, 'GET', '/v1/bases', undefined, phone)).json.bases.length, 1, 'the phone still sees the base');
  tt.equal((await agent.get('/v1/bases')).json.bases[0].dir, fixture.baseDir, 'the operator sees where it is');
});

t.test('the overlay with the memory state as saved synthesizes for the phone (the control)', async (tt) => {
  const r = await synthesizeAsPhone();
  tt.equal(r.status, 201, r.body);
  tt.match(r.json.instance, { service_id: SERVICE, mechanism: 'synthesis', launch: 'memory-state', state: 'ready' });
  tt.match(await fetchText(r.json.endpoint.port), CONTENT);
  tt.equal((await agent.delete(`/v1/instances/${r.json.instance.id}`)).status, 200);
  await assertNothingLeft(tt, 'after stop');
});

/** What a phone might write into the domain XML of its memory state, one element per case. */
const HOSTILE: { name: string; edit: (xml: string, dataDir: string) => string }[] = [
  {
    name: 'an extra <disk> naming the admin token',
    edit: (xml, dataDir) =>
      xml.replace(
        '</disk>',
        `</disk>\n<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='${dataDir}/trust/admin-token'/><target dev='vdb' bus='virtio'/></disk>`,
      ),
  },
  {
    name: 'an extra <disk> naming a host block device',
    edit: (xml) =>
      xml.replace(
        '</disk>',
        `</disk>\n<disk type='block' device='lun'><driver name='qemu' type='raw'/><source dev='/dev/sda'/><target dev='sdb' bus='scsi'/></disk>`,
      ),
  },
  {
    name: 'a <hostdev>',
    edit: (xml) =>
      xml.replace(
        '</devices>',
        `<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x00' slot='0x01' function='0x0'/></source></hostdev>\n</devices>`,
      ),
  },
  {
    name: "a <filesystem> sharing the host's root",
    edit: (xml) =>
      xml.replace('</devices>', `<filesystem type='mount' accessmode='passthrough'><source dir='/'/><target dir='host'/></filesystem>\n</devices>`),
  },
  { name: 'another <emulator>', edit: (xml) => xml.replace(/<emulator>[^<]*<\/emulator>/, '<emulator>/bin/sh</emulator>') },
  {
    name: 'a second user-mode netdev without restrict=on',
    edit: (xml) =>
      xml.replace(
        '</qemu:commandline>',
        `<qemu:arg value='-netdev'/><qemu:arg value='user,id=cl1,restrict=off,hostfwd=tcp:127.0.0.1:26399-:22'/>` +
          `<qemu:arg value='-device'/><qemu:arg value='virtio-net-pci,netdev=cl1,bus=pci.0,addr=0x11'/></qemu:commandline>`,
      ),
  },
  {
    name: 'a second <metadata>',
    edit: (xml) =>
      xml.replace('<memory', `<metadata><cloudlet:instance xmlns:cloudlet='urn:cloudlet:agent:instance:1'>{}</cloudlet:instance></metadata>\n<memory`),
  },
  { name: 'an entity reference', edit: (xml) => xml.replace('<on_crash>', '<description>&xxe;</description><on_crash>') },
];

for (const hostile of HOSTILE) {
  t.test(`a memory state whose domain XML has ${hostile.name} is refused (OVERLAY_INVALID) and leaves nothing behind`, async (tt) => {
    const r = await synthesizeAsPhone(await editedState((xml) => hostile.edit(xml, agent.dataDir)));
    tt.equal(r.status, 422, r.body);
    tt.equal(r.json.code, 'OVERLAY_INVALID', r.json.message);
    tt.match(r.json.message, /domain XML/, 'the answer says what was wrong');
    await assertNothingLeft(tt, hostile.name);
  });
}

t.test("a launch the hypervisor refuses answers with libvirt's own error, which the agent also logs", async (tt) => {
  // A cached service made by the operator from the base, whose memory state names a file the host does not have:
  // libvirt reads the state's header, then fails to start QEMU, and the stream into it breaks (EPIPE) meanwhile.
  const dir = path.join(scratch, 'broken-service');
  const base = (await agent.get('/v1/bases')).json.bases[0];
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir);
  for (const name of [base.disk, base.boot.kernel, base.boot.initrd]) await copyFile(path.join(fixture.baseDir, name), path.join(dir, name));
  const state = path.join(fixture.baseDir, base.state);
  const header = await readSaveImageHeader(state);
  const missing = '/nonexistent/cloudlet-test-missing.img';
  const xml = header.xml.replace('</disk>', `</disk>\n<disk type='file' device='floppy'><source file='${missing}'/><target dev='fda' bus='fdc'/></disk>`);
  await writeFile(
    path.join(dir, base.state),
    Buffer.concat([encodeSaveImageHeader({ ...header, xml }), (await readFile(state)).subarray(header.streamOffset)]),
  );
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ ...base.manifest, service_id: 'org.cloudlet.test.broken' }));
  tt.equal((await agent.post('/v1/services', { path: dir })).status, 201);

  const r = await agent.post('/v1/instances', { service_id: 'org.cloudlet.test.broken' });
  tt.ok(r.status >= 500, r.body);
  tt.equal(r.json.code, 'HYPERVISOR_ERROR', r.json.message);
  tt.match(r.json.message, missing, 'the answer names what failed');
  tt.notMatch(r.json.message, /EPIPE|restore stream/, 'not the broken stream that followed');
  tt.match(agent.log, new RegExp(`starting org\\.cloudlet\\.test\\.broken \\([^)]*\\) failed: HYPERVISOR_ERROR: .*${missing}`), "the agent's log says it too");
  await assertNothingLeft(tt, 'after the failed launch');
  await agent.delete('/v1/services/org.cloudlet.test.broken');
});
