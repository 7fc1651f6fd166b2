// The legacy encrypted KD-Cloudlet API (kdApi: encrypted), end to end: the real agent, a real QEMU (TCG) guest, and
// a client that speaks exactly what SEI's client-lib speaks: POST /api/command with the form field `command` =
// base64(IV || AES-256-CBC(PKCS#7(`/<controller>/<action>&k=v...`))), key SHA-256(the device's legacy password),
// header X-Device-ID; a 200 body is decrypted the same way, errors come in clear.
import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { chmod, mkdir, mkdtemp, readdir, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { AgentProcess, domainsUnder, fetchText, request, testGuestDir, type HttpResult } from './support/agent';
import { AvahiNetwork } from './support/avahi-netns';
import { until } from './support/poll';

const SERVICE = 'org.cloudlet.demo.http';
const GUEST_CONTENT = /hello from the cloudlet demo service/;
const APK = randomBytes(300_000);

let agent: AgentProcess;

/** Devices stored before the agent starts: authorizations that have already ended. */
const ENDED = [
  { id: 'phone-expired', name: 'Expired phone', expiresAt: '2020-01-01T00:00:00.000Z', revokedAt: null, password: 'expired-password' },
  { id: 'phone-revoked-long-ago', name: 'Revoked phone', expiresAt: null, revokedAt: '2020-01-01T00:00:00.000Z', password: 'revoked-password' },
];

t.before(async () => {
  const dataDir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-kd-encrypted-'));
  await mkdir(path.join(dataDir, 'trust'), { recursive: true, mode: 0o700 });
  const stored = ENDED.map(({ password, ...device }) => ({
    ...device,
    pairedAt: '2019-12-01T00:00:00.000Z',
    tokenSha256: createHash('sha256').update(`unused-${device.id}`).digest('hex'),
    legacyPassword: password,
  }));
  await writeFile(path.join(dataDir, 'trust', 'devices.json'), JSON.stringify({ version: 1, devices: stored }), { mode: 0o600 });
  await chmod(dataDir, 0o755);
  agent = await AgentProcess.start({
    dataDir,
    portRange: '22750-22799',
    env: { CLOUDLET_KD_API: 'encrypted', CLOUDLET_RATE_PER_SECOND: '1000', CLOUDLET_RATE_BURST: '1000' },
  });
  const imported = await agent.post('/v1/services', { path: testGuestDir() });
  if (imported.status !== 201) throw new Error(`import failed: ${imported.body}`);
  const app = await request(agent.apiPort, 'POST', `/v1/apps?service_id=${SERVICE}&name=Demo&file_name=demo.apk&kind=android&package_name=org.demo`, APK, {
    'content-type': 'application/vnd.android.package-archive',
  });
  if (app.status !== 201) throw new Error(`app upload failed: ${app.body}`);
});
t.teardown(() => agent?.dispose());

// ---- the SEI client ----------------------------------------------------------------------------------------------

const keyOf = (password: string) => createHash('sha256').update(password, 'utf8').digest();

function encrypt(plaintext: string, password: string): string {
  const iv = randomBytes(16);
  const cipher = createCipheriv('aes-256-cbc', keyOf(password), iv);
  return Buffer.concat([iv, cipher.update(plaintext, 'utf8'), cipher.final()]).toString('base64');
}

function decrypt(body: string, password: string): Buffer {
  const raw = Buffer.from(body, 'base64');
  const decipher = createDecipheriv('aes-256-cbc', keyOf(password), raw.subarray(0, 16));
  return Buffer.concat([decipher.update(raw.subarray(16)), decipher.final()]);
}

/** POST /api/command as client-lib sends it (UrlEncodedFormEntity, X-Device-ID), with the raw form field value. */
function postCommand(deviceId: string, formValue: string): Promise<HttpResult> {
  return request(agent.apiPort, 'POST', '/api/command', `command=${encodeURIComponent(formValue)}`, {
    'content-type': 'application/x-www-form-urlencoded',
    'x-device-id': deviceId,
    authorization: '',
  });
}

interface Device {
  id: string;
  password: string;
}

/** One command, encrypted with the device's password; a 200 body is decrypted. */
async function command(device: Device, text: string): Promise<HttpResult & { plain?: Buffer }> {
  const reply = await postCommand(device.id, encrypt(text, device.password));
  if (reply.status !== 200) return reply;
  return { ...reply, plain: decrypt(reply.body, device.password) };
}

const json = (reply: { plain?: Buffer }) => JSON.parse(reply.plain!.toString('utf8'));

/** Pairs a device through the operator's window and the one-time code, as the pairing routes do it. */
async function pair(id: string): Promise<Device> {
  const window = await agent.post('/v1/pairing', {});
  if (window.status !== 201) throw new Error(`pairing window: ${window.body}`);
  const claim = await agent.post('/v1/pairing/claim', { code: window.json.code, device_id: id, name: `Phone ${id}` });
  if (claim.status !== 201) throw new Error(`claim: ${claim.body}`);
  return { id, password: claim.json.legacy_password };
}

// ---- the specification ---------------------------------------------------------------------------------------------

t.test('in encrypted mode /api has only POST /api/command: the plain routes are gone', async (tt) => {
  tt.equal((await agent.get('/api/services')).status, 404);
  tt.equal((await agent.get(`/api/servicevm/start?serviceId=${SERVICE}`)).status, 404, 'no VM can be started in clear');
  tt.equal((await agent.get('/api/command')).status, 404, 'GET is not a command');
});

t.test('with kdApi off there is no /api at all: its paths are unknown paths (the /v1 JSON 404)', async (tt) => {
  const bare = await AgentProcess.start({ portRange: '22790-22799', env: { CLOUDLET_KD_API: 'off' } });
  tt.teardown(() => bare.dispose());
  for (const [method, url] of [
    ['GET', '/api/services'],
    ['POST', '/api/command'],
  ] as const) {
    const reply = await request(bare.apiPort, method, url, method === 'POST' ? 'command=x' : undefined);
    tt.equal(reply.status, 404, `${method} ${url}`);
    tt.equal(reply.json?.code, 'NOT_FOUND');
  }
});

t.test('mDNS: the _cloudlet._tcp TXT record says encryption=enabled', async (tt) => {
  // A second agent, publishing through an Avahi in a network namespace of the test's own (as discovery.e2e does).
  const network = await AvahiNetwork.create();
  tt.teardown(() => network.dispose());
  const published = await AgentProcess.start({
    portRange: '22790-22799',
    env: { CLOUDLET_KD_API: 'encrypted', CLOUDLET_DISCOVERY: 'on', DBUS_SYSTEM_BUS_ADDRESS: network.busAddress('a') },
  });
  tt.teardown(() => published.dispose());
  const [found] = await network.browseUntil('b', '_cloudlet._tcp', (s) => s.length > 0);
  tt.equal(found!.port, published.apiPort);
  tt.same(found!.txt, ['encryption=enabled'], 'the single entry client-lib reads to encrypt its calls');
});

t.test('a paired device lists services, reads the metadata, lists apps and downloads one, all encrypted', async (tt) => {
  const phone = await pair('phone-reader');
  const services = await command(phone, '/services');
  tt.equal(services.status, 200, 'services answers 200', { body: services.body });
  tt.notMatch(services.body, /service_id/, 'the body on the wire is ciphertext');
  tt.same(
    json(services).services.map((s: { service_id: string }) => s.service_id),
    [SERVICE],
  );

  const system = await command(phone, '/system&services=true');
  tt.ok(json(system).cpu_info.max_cores > 0, 'cpu_info for the client ranking');
  tt.equal(json(system).services.length, 1);

  const apps = await command(phone, '/apps&osName=Android&osVersion=14&tags=');
  const [app] = json(apps).apps;
  tt.equal(app.name, 'Demo');
  tt.equal(app.md5sum, null, 'no md5sum: client-lib would check it against the ciphertext it receives');

  const file = await command(phone, `/apps/get&appId=${app._id}`);
  tt.equal(file.status, 200);
  tt.ok(file.plain!.equals(APK), 'the APK decrypts to the uploaded bytes');

  const messages = await command(phone, `/system/get_messages&serviceId=${SERVICE}`);
  tt.same(json(messages), { messages: [] });
});

t.test('a paired device starts a Cached VM (it owns it), reaches the guest, and stops it', async (tt) => {
  const phone = await pair('phone-starter');
  const start = await command(phone, `/servicevm/start&serviceId=${SERVICE}&join=false`);
  tt.equal(start.status, 200, 'start answers 200', { body: start.body });
  const vm = json(start);
  tt.equal(vm.service_id, SERVICE);
  tt.match(await fetchText(vm.port), GUEST_CONTENT, 'the guest answers on the returned port');
  tt.same((await agent.get(`/v1/instances/${vm._id}`)).json.owners, [phone.id], 'the instance is bound to the device');

  const other = await command(await pair('phone-other'), `/servicevm/stop&instanceId=${vm._id}`);
  tt.equal(other.status, 404, 'another device cannot stop it: to that device it does not exist');
  tt.equal((await agent.get(`/v1/instances/${vm._id}`)).json.state, 'ready', 'and it keeps running');

  const stop = await command(phone, `/servicevm/stop&instanceId=${vm._id}`);
  tt.equal(stop.status, 200, 'stop answers 200 (pycloud answered 500 after stopping)');
  tt.equal(stop.plain!.length, 0, 'with an encrypted empty body');
  tt.same(await domainsUnder(agent.dataDir), [], 'the VM is gone');
  tt.same(await readdir(path.join(agent.dataDir, 'instances')), [], 'and its files');
});

t.test('revoking a device stops the VM it started and refuses it with 403 #Authorization has been revoked', async (tt) => {
  const phone = await pair('phone-revoked');
  const start = await command(phone, `/servicevm/start&serviceId=${SERVICE}&join=false`);
  tt.equal(start.status, 200, 'the device started a VM', { body: start.body });
  const revoke = await agent.post(`/v1/devices/${phone.id}/revoke`);
  tt.equal(revoke.status, 200, 'the operator revokes the device', { body: revoke.body });
  const left = await until(
    () => agent.get('/v1/instances'),
    (r) => r.json.instances.length === 0,
  );
  tt.same(left.json.instances, [], "the device's instance was stopped");
  tt.same(await domainsUnder(agent.dataDir), [], 'no domain is left');

  const refused = await command(phone, '/services');
  tt.equal(refused.status, 403, 'the revoked device is refused with 403');
  tt.equal(refused.body.split('#')[1]!.trim(), `Authorization has been revoked for device with id ${phone.id}`, 'client-lib reads the text after "#"');
  tt.notMatch(refused.body, /service_id/, 'and gets nothing of the answer');
});

t.test('a device revoked while its VM launches gets 403 #Authorization has been revoked, and the VM does not outlive it', async (tt) => {
  const phone = await pair('phone-revoked-mid-start');
  const pending = command(phone, `/servicevm/start&serviceId=${SERVICE}&join=false`);
  // The instance's directory is made before the VM is launched: the revocation lands while it starts.
  await until(
    () => readdir(path.join(agent.dataDir, 'instances')).catch(() => []),
    (entries) => entries.length > 0,
  );
  tt.equal((await agent.post(`/v1/devices/${phone.id}/revoke`)).status, 200, 'the operator revokes the device mid-start');
  const start = await pending;
  tt.equal(start.status, 403, 'the start is refused', { body: start.body });
  tt.equal(start.body.split('#')[1]!.trim(), `Authorization has been revoked for device with id ${phone.id}`);
  const left = await until(
    () => agent.get('/v1/instances'),
    (r) => r.json.instances.length === 0,
  );
  tt.same(left.json.instances, [], 'no instance is left');
  tt.same(await domainsUnder(agent.dataDir), [], 'no domain is left');
});

t.test('security errors are cleartext with KD statuses: not paired 401, revoked 403, expired 403', async (tt) => {
  const stranger = await command({ id: 'phone-unknown', password: 'whatever' }, '/services');
  tt.equal(stranger.status, 401);
  tt.match(stranger.body, /#Device with id phone-unknown is not paired to this cloudlet/);
  const noHeader = await request(agent.apiPort, 'POST', '/api/command', `command=${encodeURIComponent(encrypt('/services', 'x'))}`, {
    'content-type': 'application/x-www-form-urlencoded',
    authorization: '',
  });
  tt.equal(noHeader.status, 401, 'no X-Device-ID: not paired (pycloud answered 500)');

  const [expired, revoked] = ENDED;
  const late = await command({ id: expired!.id, password: expired!.password }, '/services');
  tt.equal(late.status, 403);
  tt.match(late.body, `#Authorization has expired for device with id ${expired!.id}`);
  const gone = await command({ id: revoked!.id, password: revoked!.password }, '/services');
  tt.equal(gone.status, 403);
  tt.match(gone.body, `#Authorization has been revoked for device with id ${revoked!.id}`);
});

/** `blocks` encrypted as they are, without PKCS#7 padding (the caller pads, or pads wrongly on purpose). */
function encryptRaw(blocks: Buffer, password: string): string {
  const iv = randomBytes(16);
  const cipher = createCipheriv('aes-256-cbc', keyOf(password), iv).setAutoPadding(false);
  return Buffer.concat([iv, cipher.update(blocks), cipher.final()]).toString('base64');
}

t.test('no padding oracle: whatever does not decrypt or is no known command gets one byte-identical 404, never a 500', async (tt) => {
  const phone = await pair('phone-garbage');
  const reference = await command(phone, '/servicevm/migration_svm_resume&id=x');
  tt.equal(reference.status, 404, 'an unknown command: 404');
  tt.equal(reference.body.split('#')[1]!.trim(), 'Command not found', 'which echoes nothing of the command');
  const cases: [string, string][] = [
    ['unknown controller', encrypt('/nothing', phone.password)],
    ['unknown action', encrypt('/services/delete&serviceId=x', phone.password)],
    ['no leading slash', encrypt('services', phone.password)],
    ['bad padding (last byte 0)', encryptRaw(Buffer.alloc(16, 0), phone.password)],
    ['bad padding (last byte 17)', encryptRaw(Buffer.concat([Buffer.from('/services'), Buffer.alloc(7, 17)]), phone.password)],
    ['well padded garbage', encryptRaw(Buffer.concat([randomBytes(15), Buffer.from([1])]), phone.password)],
    ['well padded, not UTF-8', encryptRaw(Buffer.concat([Buffer.from('/services&x='), Buffer.from([0xff, 0xfe]), Buffer.alloc(2, 2)]), phone.password)],
    ['not base64', 'this is not base64 at all!'],
    ['not IV + whole blocks', randomBytes(20).toString('base64')],
  ];
  for (const [what, formValue] of cases) {
    const reply = await postCommand(phone.id, formValue);
    tt.equal(reply.status, reference.status, `${what}: the same status`);
    tt.equal(reply.body, reference.body, `${what}: the same body`);
  }
  // The IV's last byte walks the first block's last plaintext byte through every value: valid padding or not, the
  // answer is the same.
  const raw = Buffer.from(encrypt('/servicevm/nothing', phone.password), 'base64').subarray(0, 32);
  const answers = new Set<string>();
  for (let b = 0; b < 256; b += 1) {
    const forged = Buffer.from(raw);
    forged[15] = b;
    const reply = await postCommand(phone.id, forged.toString('base64'));
    answers.add(`${reply.status} ${reply.body}`);
  }
  tt.same([...answers], [`${reference.status} ${reference.body}`], 'all 256 IV variants get the one answer');
  for (let i = 0; i < 5; i++) {
    const wrongKey = await command({ id: phone.id, password: `not-${phone.password}` }, '/services');
    tt.equal(wrongKey.body, reference.body, 'a wrong key: the same answer');
  }
  const empty = await request(agent.apiPort, 'POST', '/api/command', '', {
    'content-type': 'application/x-www-form-urlencoded',
    'x-device-id': phone.id,
    authorization: '',
  });
  tt.equal(empty.status, 400, 'no command field: 400');
  tt.equal((await agent.get('/v1/health')).status, 200, 'the agent still serves');
});
