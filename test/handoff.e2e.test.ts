// Handoff, end to end (docs/handoff.md): three whole cloudlets side by side (support/fleet.ts). A holds the service
// and runs the phone's Service VM; B holds the same service; C does not. A is paired to B and to C (A may ask them);
// nobody is paired to C's asks. The subtests run in order; the last one tears the fleet down and checks nothing is left.
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { ROOT, testGuestDir } from './support/agent';
import { API_PORT, MQTT_PORT, TLS_PORT, type CloudletBox } from './support/cloudlet-box';
import { cli } from './support/cli';
import { Fleet, type Phone } from './support/fleet';
import { until } from './support/poll';

const SERVICE = 'org.cloudlet.demo.http';
const GUEST_CONTENT = /hello from the cloudlet demo service/;

let fleet: Fleet;
let phone: Phone;
let a: CloudletBox;
let b: CloudletBox;
let c: CloudletBox;
/** The phone's credential at A. */
let phoneToken: string;

function operatorCli(box: CloudletBox, ...args: string[]) {
  return cli([...args, '--cloudlet', `127.0.0.1:${API_PORT}`, '--json'], {
    via: box.enter(),
    env: { CLOUDLET_DATA_DIR: box.dataDir, CLOUDLET_PORT: String(API_PORT) },
  });
}

/** The phone calling A's /v1 over HTTPS with its credential. */
function phoneAtA(method: string, route: string, body?: unknown) {
  return phone.http(method, `https://${a.address}:${TLS_PORT}${route}`, {
    headers: { authorization: `Bearer ${phoneToken}` },
    ...(body === undefined ? {} : { body }),
    timeoutSeconds: 300,
  });
}

/** A's peer id of a paired cloudlet. */
async function peerId(name: string): Promise<string> {
  const peers = (await a.operator('GET', '/v1/peers')).json.peers as Array<{ name: string; paired: { id: string } | null }>;
  return peers.find((p) => p.name === name && p.paired)!.paired!.id;
}

/** What a cloudlet has left of handoffs and instances on disk: its instance directories and handoff sockets. */
async function filesOf(box: CloudletBox): Promise<{ instances: string[]; sockets: string[] }> {
  const holder = box.enter()[1]!.replace('--target=', '');
  return {
    instances: await readdir(path.join(box.dataDir, 'instances')).catch(() => []),
    sockets: await readdir(`/proc/${holder}/root/run/cloudlet-handoff`).catch(() => []),
  };
}

async function instancesOf(box: CloudletBox): Promise<Array<{ id: string; state: string; launch: string; host_port: number }>> {
  return (await box.operator('GET', '/v1/instances')).json.instances;
}

async function startAtA(): Promise<{ id: string; port: number }> {
  const started = await phoneAtA('POST', '/v1/instances', { service_id: SERVICE });
  if (started.status !== 201 && started.status !== 200) throw new Error(`start: ${started.status} ${started.body}`);
  return { id: started.json.instance.id, port: started.json.instance.host_port };
}

/** A subscriber to `topic` on a cloudlet's MQTT broker, as its operator (inside the box); reads what it received. */
async function mqttTail(tt: Test, box: CloudletBox, topic: string): Promise<() => Array<{ topic: string; json: any }>> {
  const [nsenter, ...enter] = box.enter();
  const argv = [...enter, process.execPath, path.join(ROOT, 'dist/test/support/mqtt-tail.js'), `mqtt://127.0.0.1:${MQTT_PORT}`, topic, 'admin'];
  const tail = spawn(nsenter!, [...argv, await box.adminToken()], { stdio: ['pipe', 'pipe', 'inherit'] });
  tt.teardown(() => {
    tail.kill();
  });
  let output = '';
  tail.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
  await until(
    async () => output,
    (text) => text.startsWith('subscribed\n'),
    30000,
  );
  return () =>
    output
      .split('\n')
      .slice(1)
      .filter(Boolean)
      .map((line) => JSON.parse(line));
}

/** Restart a cloudlet's agent, with a fault point armed or none. */
async function restartAgent(box: CloudletBox, faultPoint: string | null, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  await box.stopAgent(signal);
  const env = box.options.env ?? {};
  if (faultPoint) env.CLOUDLET_FAULT_POINT = faultPoint;
  else delete env.CLOUDLET_FAULT_POINT;
  Object.assign(box.options, { env });
  await box.startAgent();
}

t.before(async () => {
  fleet = await Fleet.start({ cloudlets: ['cloudlet-a', 'cloudlet-b', 'cloudlet-c'], env: () => ({ CLOUDLET_PEERS_POLL_MS: '1000' }) });
  phone = await fleet.addPhone();
  [a, b, c] = fleet.cloudlets as [CloudletBox, CloudletBox, CloudletBox];
  for (const box of [a, b]) {
    const imported = await box.operator('POST', '/v1/services', { path: testGuestDir() });
    if (imported.status !== 201) throw new Error(`${box.name}: import ${imported.status}`);
  }
  for (const target of [b, c]) {
    const window = await operatorCli(target, 'peer', 'open');
    const paired = await operatorCli(
      a,
      'peer',
      'pair',
      window.json.code,
      '--peer',
      `${target.address}:${API_PORT}`,
      '--fingerprint',
      window.json.tls_fingerprint,
    );
    if (paired.code !== 0) throw new Error(`pairing A to ${target.name}: ${paired.stderr}`);
  }
  const window = await a.operator('POST', '/v1/pairing', {});
  const claimed = await phone.http('POST', `https://${a.address}:${TLS_PORT}/v1/pairing/claim`, { body: { code: window.json.code, name: 'phone' } });
  phoneToken = claimed.json.token;
  // A knows what B holds (its placement facts) before "auto" picks among its peers.
  await until(
    () => a.operator('GET', '/v1/peers'),
    (r) => (r.json.peers as Array<{ name: string; placement: unknown }>).some((p) => p.name === 'cloudlet-b' && p.placement !== null),
  );
});
t.teardown(async () => {
  await fleet?.stop();
});

t.test('a target that lacks the service refuses before anything moves: nothing is left on either side', async (tt) => {
  const { id, port } = await startAtA();
  const refused = await phoneAtA('POST', `/v1/instances/${id}/handoff`, { target: await peerId('cloudlet-c') });
  tt.match({ status: refused.status, code: refused.json?.code }, { status: 409, code: 'HANDOFF_TARGET_LACKS_SERVICE' }, refused.body);
  tt.equal((await a.domains()).length, 1, 'the VM runs on at A');
  tt.match(
    (await instancesOf(a)).find((i) => i.id === id),
    { state: 'ready', host_port: port },
    'A lists it as before',
  );
  tt.same(await c.domains(), [], 'C runs nothing');
  tt.same(await filesOf(c), { instances: [], sockets: [] }, 'C made no file or socket');
  tt.same((await filesOf(a)).sockets, [], 'A opened no socket');
  const unknown = await phoneAtA('POST', `/v1/instances/${id}/handoff`, { target: 'peer-000000000000' });
  tt.match({ status: unknown.status, code: unknown.json?.code }, { status: 404, code: 'HANDOFF_TARGET_UNKNOWN' }, 'an unknown peer');
});

t.test('a phone polling its Service VM every 10 ms during a handoff follows `moved` to B and sees the same content after', async (tt) => {
  const [instance] = await instancesOf(a);
  const id = instance!.id;
  const poller = spawn(
    'nsenter',
    [
      `--net=/run/netns/${phone.namespace}`,
      process.execPath,
      path.join(ROOT, 'dist/test/support/handoff-poller.js'),
      `${a.address}:${instance!.host_port}`,
      `wss://${a.address}:${TLS_PORT}/v1/events`,
      phoneToken,
      id,
    ],
    { stdio: ['pipe', 'pipe', 'inherit'] },
  );
  tt.teardown(() => {
    poller.kill();
  });
  let output = '';
  poller.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
  await until(
    async () => output,
    (text) => text.includes('polling'),
    30000,
  );
  // An SEI client polls its mailbox on the KD face, as client-lib does every 10 s.
  const mailbox = () =>
    phone.http('GET', `http://${a.address}:${API_PORT}/api/system/get_messages?serviceId=${SERVICE}`, { headers: { 'x-device-id': 'sei-phone' } });
  tt.same((await mailbox()).json, { messages: [] }, 'an SEI client has no message before');
  const mqttAtA = await mqttTail(tt, a, `cloudlet/cloudlet-a/instances/${id}`);
  const mqttAtB = await mqttTail(tt, b, `cloudlet/cloudlet-b/instances/${id}`);
  const moved = await phoneAtA('POST', `/v1/instances/${id}/handoff`, { target: 'auto' });
  tt.equal(moved.status, 200, moved.body);
  tt.match(moved.json, {
    instance_id: id,
    state: 'moved',
    moved_to: { name: 'cloudlet-b', address: b.address, api_port: API_PORT, cloudlet_id: await peerId('cloudlet-b') },
  });
  const port = moved.json.moved_to.port as number;
  // The client followed it and reaches it there: 20 polls in a row succeeded at the new endpoint.
  await until(
    async () => output,
    (text) => text.includes('settled'),
    60000,
  );
  const ended = new Promise((resolve) => poller.once('exit', resolve));
  poller.stdin.write('stop\n');
  await ended;
  const seen = JSON.parse(output.split('\n').filter(Boolean).at(-1)!);
  tt.comment(`the client polled ${seen.polls} times; ${seen.failed} failed; its longest gap: ${seen.longestGapMs} ms`);
  for (const [box, mark] of [
    [a, ': done in '],
    [b, ' arrived and serves '],
  ] as const)
    tt.comment(box.agentLog.split('\n').find((line) => line.includes(mark)) ?? `${box.name} logged no time of the handoff`);
  tt.match(seen.moved, { type: 'instance', state: 'moved', instance: { id }, moved_to: { address: b.address, port } }, '/v1/events said `moved`');
  tt.equal(seen.target, `${b.address}:${port}`, 'the client follows it to B');
  tt.ok(seen.tailAllOk, 'no lasting failure: its last polls all succeeded');
  tt.ok(seen.bodies.length >= 1 && seen.bodies.every((body: string) => GUEST_CONTENT.test(body)), 'the same content, before and after');

  tt.match(
    (await mailbox()).json.messages,
    [
      {
        device_id: 'sei-phone',
        service_id: SERVICE,
        message: 'move-to-new-cloudlet-network',
        params: { cloudlet_name: 'cloudlet-b', cloudlet_ip: b.address, cloudlet_port: API_PORT, cloudlet_encryption_enabled: false },
      },
    ],
    "the SEI client is told to move to B's network, name, address and port",
  );
  tt.same((await mailbox()).json, { messages: [] }, 'once');

  const movedAtA = await until(
    async () => mqttAtA(),
    (messages) => messages.some((m) => m.json?.state === 'moved'),
  );
  tt.match(
    movedAtA.find((m) => m.json?.state === 'moved')?.json,
    { id, state: 'moved', reason: 'handed-off', moved_to: { name: 'cloudlet-b', address: b.address, port, api_port: API_PORT } },
    "A's MQTT says it moved, and where to",
  );
  const readyAtB = await until(
    async () => mqttAtB(),
    (messages) => messages.some((m) => m.json?.state === 'ready'),
  );
  tt.match(readyAtB.find((m) => m.json?.state === 'ready')?.json, { id, state: 'ready', host_port: port }, "B's MQTT says it is ready there, with the same id");

  tt.same(await a.domains(), [], 'A runs nothing any more');
  tt.notOk(
    (await instancesOf(a)).some((i) => i.id === id),
    'A lists it no more',
  );
  tt.same(await filesOf(a), { instances: [], sockets: [] }, 'and keeps no file or socket of it');
  tt.equal((await b.domains()).length, 1, 'B runs it');
  tt.match(
    (await instancesOf(b)).find((i) => i.id === id),
    { state: 'ready', launch: 'handoff', host_port: port },
    'B lists it, with the same id',
  );
  tt.same(await filesOf(b), { instances: [id], sockets: [] }, 'B keeps its directory, no socket');
});

t.test("the target's agent killed midway: the migration is cancelled and the source keeps serving; nothing is left at the target", async (tt) => {
  const before = await b.domains();
  await restartAgent(b, 'handoff:target-mid-migrate');
  const { id, port } = await startAtA();
  const failed = await phoneAtA('POST', `/v1/instances/${id}/handoff`, { target: await peerId('cloudlet-b') });
  tt.match({ status: failed.status, code: failed.json?.code }, { status: 502, code: 'HANDOFF_FAILED' }, failed.body);
  tt.match(
    (await instancesOf(a)).find((i) => i.id === id),
    { state: 'ready', host_port: port },
    'A lists it, ready',
  );
  const page = await phone.http('GET', `http://${a.address}:${port}/`);
  tt.match({ status: page.status, body: page.body }, { status: 200, body: GUEST_CONTENT }, 'and it serves at A');
  await restartAgent(b, null);
  tt.same(
    await until(
      () => b.domains(),
      (names) => names.length === before.length,
    ),
    before,
    'B runs only what it ran before',
  );
  tt.equal((await filesOf(b)).instances.length, before.length, 'no directory left at B');
  tt.same((await filesOf(b)).sockets, [], 'no socket left at B');
  tt.same((await filesOf(a)).sockets, [], 'none at A');
});

t.test('the source agent SIGKILLed midway: afterwards the VM runs in exactly one place, serving, adopted there, nothing orphaned', async (tt) => {
  const [instance] = await instancesOf(a);
  const { id, host_port: port } = instance!;
  const bBefore = (await instancesOf(b)).length;
  await restartAgent(a, 'handoff:mid-migrate');
  const cut = await phoneAtA('POST', `/v1/instances/${id}/handoff`, { target: await peerId('cloudlet-b') });
  tt.not(cut.status, 200, 'the handoff was cut with its agent');
  await restartAgent(a, null, 'SIGKILL');
  const atA = await until(
    () => instancesOf(a),
    (list) => list.some((i) => i.id === id && i.state === 'ready'),
    30000,
  );
  const atB = await until(
    () => instancesOf(b),
    (list) => list.length === bBefore,
  );
  const here = atA.some((i) => i.id === id);
  const there = atB.some((i) => i.id === id);
  tt.ok(here !== there, `it is listed at exactly one of A (${here}) and B (${there})`);
  const [box, endpoint] = here ? [a, port] : [b, atB.find((i) => i.id === id)!.host_port];
  const page = await phone.http('GET', `http://${box.address}:${endpoint}/`);
  tt.match({ status: page.status, body: page.body }, { status: 200, body: GUEST_CONTENT }, `it serves at ${box.name}`);
  const other = here ? b : a;
  // The other settles it when the control channel closes (the target) or at its start (the source).
  const left = await until(
    async () => [await filesOf(other), await filesOf(box)],
    ([o, x]) => !o!.instances.includes(id) && o!.sockets.length === 0 && x!.sockets.length === 0,
    30000,
  );
  tt.notOk(left[0]!.instances.includes(id), `no directory of it at ${other.name}`);
  tt.same([left[0]!.sockets, left[1]!.sockets], [[], []], 'no socket at either');
  if (!tt.passing())
    tt.comment(
      b.agentLog
        .split('\n')
        .filter((line) => line.includes('handoff'))
        .join('\n'),
    );
});

t.test('the source agent SIGKILLed after libvirt moved the VM, before it told the target: B adopts it, A lets it go, nothing orphaned', async (tt) => {
  const { id } = await startAtA();
  await restartAgent(a, 'handoff:after-migrate');
  const cut = await phoneAtA('POST', `/v1/instances/${id}/handoff`, { target: await peerId('cloudlet-b') });
  tt.not(cut.status, 200, 'the handoff was cut with its agent');
  await restartAgent(a, null, 'SIGKILL');
  // Nobody told B it is complete: it adopts the VM when the control channel closes.
  const atB = await until(
    () => instancesOf(b),
    (list) => list.some((i) => i.id === id && i.state === 'ready'),
    60000,
  );
  const adopted = atB.find((i) => i.id === id);
  tt.match(adopted, { state: 'ready', launch: 'handoff' }, 'B lists it, ready, with the same id');
  const page = await phone.http('GET', `http://${b.address}:${adopted?.host_port}/`);
  tt.match({ status: page.status, body: page.body }, { status: 200, body: GUEST_CONTENT }, 'it serves at B');
  // A's restarted agent finds no domain of it and lets the record go.
  const atA = await until(
    () => instancesOf(a),
    (list) => !list.some((i) => i.id === id),
    30000,
  );
  tt.notOk(
    atA.some((i) => i.id === id),
    'A lists it no more',
  );
  tt.notOk(
    (await a.domains()).some((name) => name.endsWith(id.slice(0, 8))),
    'A runs no domain of it',
  );
  const left = await until(
    async () => [await filesOf(a), await filesOf(b)],
    ([x, y]) => !x!.instances.includes(id) && x!.sockets.length === 0 && y!.sockets.length === 0,
    30000,
  );
  tt.notOk(left[0]!.instances.includes(id), 'no directory of it at A');
  tt.same([left[0]!.sockets, left[1]!.sockets], [[], []], 'no socket at either');
  tt.equal((await b.domains()).filter((name) => name.endsWith(id.slice(0, 8))).length, 1, 'B runs it once');
});

t.test('an unpaired cloudlet cannot push a VM; a paired one cannot pull one; a phone is no cloudlet', async (tt) => {
  const atB = `https://${b.address}:${TLS_PORT}`;
  const offer = { instance_id: '00000000-0000-4000-8000-000000000000', service_id: SERVICE, disk_sha256: '0'.repeat(64), domain_xml: '<domain/>' };
  const bare = await c.http('POST', `${atB}/v1/handoffs`, { body: offer });
  tt.match({ status: bare.status, code: bare.json?.code }, { status: 401, code: 'UNAUTHENTICATED' }, 'C without a credential');
  const own = await c.http('POST', `${atB}/v1/handoffs`, { body: offer, headers: { authorization: `Bearer ${await c.adminToken()}` } });
  tt.match({ status: own.status, code: own.json?.code }, { status: 401, code: 'UNAUTHENTICATED' }, "C's own credential is nothing at B");
  const channel = await c.http('GET', `${atB}/v1/handoff-channel?handoff=ho-000000000000000000000000&channel=libvirt`, {
    headers: { connection: 'Upgrade', upgrade: 'websocket', 'sec-websocket-version': '13', 'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==' },
    timeoutSeconds: 10,
  });
  tt.equal(channel.status, 401, 'C cannot open a channel');
  const [atBInstance] = await instancesOf(b);
  const links = (await import('node:fs/promises')).readFile(path.join(a.dataDir, 'trust', 'peers.json'), 'utf8');
  const aAtB = (JSON.parse(await links).links as Array<{ token: string; address: string }>).find((l) => l.address === b.address)!;
  const pull = await a.http('POST', `${atB}/v1/instances/${atBInstance?.id ?? offer.instance_id}/handoff`, {
    body: { target: 'auto' },
    headers: { authorization: `Bearer ${aAtB.token}` },
  });
  tt.match({ status: pull.status, code: pull.json?.code }, { status: 403, code: 'PEER_NOT_ALLOWED' }, "A's credential at B does not move B's VMs");
  const phoneOffer = await phoneAtA('POST', '/v1/handoffs', offer);
  tt.match({ status: phoneOffer.status, code: phoneOffer.json?.code }, { status: 403, code: 'PEER_NOT_ALLOWED' }, 'a phone cannot offer a VM');
  tt.same(await c.domains(), [], 'C runs nothing');
});

t.test('tear-down leaves no namespace, process, domain or file', async (tt) => {
  await fleet.stop();
  tt.same(await fleet.leftovers(), []);
});
