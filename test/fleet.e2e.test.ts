// A fleet, end to end: three whole cloudlets side by side (each in its own network, mount and UTS namespaces, with
// its own libvirtd, D-Bus, Avahi and agent: support/fleet.ts) on a test bridge, and a phone on that bridge. The
// subtests run in order; the last one tears the fleet down and checks nothing is left.
import t from 'tap';
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { testGuestDir } from './support/agent';
import { API_PORT, type CloudletBox } from './support/cloudlet-box';
import { cli } from './support/cli';
import { Fleet, type Phone } from './support/fleet';
import { until } from './support/poll';

const NAMES = ['cloudlet-a', 'cloudlet-b', 'cloudlet-c'];
const SERVICE = 'org.cloudlet.demo.http';
const GUEST_CONTENT = /hello from the cloudlet demo service/;

let fleet: Fleet;
let phone: Phone;

t.before(async () => {
  // Paired cloudlets ask each other for placement facts every second here (10 s on a box).
  fleet = await Fleet.start({ cloudlets: NAMES, env: () => ({ CLOUDLET_PEERS_POLL_MS: '1000' }) });
  phone = await fleet.addPhone();
});
t.teardown(async () => {
  await fleet?.stop();
});

/** The operator at a cloudlet's own console: the CLI on the box, aimed at its agent on loopback. */
function operatorCli(box: CloudletBox, ...args: string[]) {
  return cli([...args, '--cloudlet', `127.0.0.1:${API_PORT}`, '--json'], {
    via: box.enter(),
    env: { CLOUDLET_DATA_DIR: box.dataDir, CLOUDLET_PORT: String(API_PORT) },
  });
}

/** Whether anything in the test's own (root) namespace accepts a connection on 127.0.0.1:port. */
function rootListens(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

t.test('discovery from the phone finds all three cloudlets, each with its own name, address and KD TXT, and ranks them', async (tt) => {
  const r = await phone.cli('discover', '--interface', phone.address, '--timeout', '2000', '--json');
  tt.equal(r.code, 0, r.stderr);
  const found = r.json.cloudlets as Array<{ name: string; host: string; address: string; port: number; encryption: string; rank: number; eligible: boolean }>;
  tt.same(found.map((c) => c.name).sort(), NAMES, 'three cloudlets, by their own host names: no "#2" renaming');
  for (const box of fleet.cloudlets) {
    tt.match(
      found.find((c) => c.name === box.name),
      { host: `${box.name}.local`, address: box.address, port: API_PORT, encryption: 'disabled', eligible: true },
      `${box.name} is reached at its own address on the bridge`,
    );
  }
  const ranks = found.map((c) => c.rank);
  tt.same(
    ranks,
    [...ranks].sort((a, b) => b - a),
    'best-ranked first',
  );
});

t.test('a phone starts a service on the best-ranked cloudlet and reaches the Service VM at the address and port returned', async (tt) => {
  for (const box of fleet.cloudlets) {
    const imported = await box.operator('POST', '/v1/services', { path: testGuestDir() });
    tt.equal(imported.status, 201, `${box.name} has the service`);
  }
  const discovered = await phone.cli('discover', '--interface', phone.address, '--timeout', '2000', '--json');
  const best = fleet.cloudlet(discovered.json.cloudlets[0].name);

  // A verb that acts only goes to a cloudlet the phone paired with: the operator of the best one reads out a code.
  const window = await operatorCli(best, 'pair', 'open');
  tt.equal(window.code, 0, window.stderr);
  const paired = await phone.cli('pair', window.json.code, '--cloudlet', `${best.address}:${API_PORT}`, '--name', 'phone', '--json');
  tt.equal(paired.code, 0, paired.stderr);

  // No --cloudlet: the CLI discovers, ranks, and takes the best-ranked cloudlet it paired with, as an app would.
  const started = await phone.cli('start', SERVICE, '--interface', phone.address, '--timeout', '2000', '--json');
  tt.equal(started.code, 0, started.stderr);
  const { address, port } = started.json.endpoint as { address: string; port: number };
  tt.equal(address, best.address, "the endpoint is the cloudlet's address on the phone's network");
  const page = await phone.http('GET', `http://${address}:${port}/`);
  tt.equal(page.status, 200);
  tt.match(page.body, GUEST_CONTENT, 'the phone reaches its Service VM there');
  tt.notOk(await rootListens(port), "the forward lives in the cloudlet's namespace, not in the machine's");
  tt.equal((await best.domains()).length, 1, "the VM runs under the cloudlet's own libvirtd");
  for (const other of fleet.cloudlets.filter((c) => c !== best)) tt.same(await other.domains(), [], `${other.name} runs no VM`);

  const stopped = await phone.cli('stop', started.json.instance.id, '--interface', phone.address, '--timeout', '2000', '--json');
  tt.equal(stopped.code, 0, stopped.stderr);
  tt.same(await best.domains(), [], 'stopping it leaves no domain');
});

interface PeerEntry {
  name: string;
  placement_error: string | null;
  address: string;
  seen_at: string | null;
  paired: { id: string; device_id: string; tls_fingerprint: string } | null;
  placement: {
    name: string;
    services: Array<{ service_id: string; disk_sha256: string | null }>;
    memory: { free_bytes: number };
    instances: { running: number };
    load_average: number[];
  } | null;
}

async function peersSeenBy(box: CloudletBox): Promise<PeerEntry[]> {
  return (await box.operator('GET', '/v1/peers')).json.peers;
}

/** What the cloudlet's /v1/system says of its certificate (open: what any client, or cloudlet, may read). */
async function fingerprintOf(box: CloudletBox): Promise<string> {
  return (await box.http('GET', `http://127.0.0.1:${API_PORT}/v1/system`)).json.tls_fingerprint;
}

t.test("B pairs with A with A's one-time code and fingerprint, and then sees in /v1/peers what placement needs of A", async (tt) => {
  const [a, b] = [fleet.cloudlet('cloudlet-a'), fleet.cloudlet('cloudlet-b')];
  const window = await operatorCli(a, 'peer', 'open');
  tt.equal(window.code, 0, window.stderr || 'peer open');
  tt.equal(window.json.kind, 'cloudlet', "A's operator opens the window for a cloudlet");
  const paired = await operatorCli(b, 'peer', 'pair', window.json.code, '--peer', `${a.address}:${API_PORT}`, '--fingerprint', window.json.tls_fingerprint);
  tt.equal(paired.code, 0, paired.stderr || 'peer pair');
  tt.match(paired.json, { name: 'cloudlet-a', address: a.address, paired: { tls_fingerprint: window.json.tls_fingerprint } });

  // (A may also list the phone, if it was the best-ranked one.)
  const devices = (await a.operator('GET', '/v1/devices')).json.devices as Array<{ id: string; name: string; kind: string }>;
  const bAtA = devices.find((d) => d.kind === 'cloudlet');
  tt.match(bAtA, { name: 'cloudlet-b', kind: 'cloudlet', standing: 'active' }, 'A lists B as a paired device of kind cloudlet');

  const aDisk = path.join(a.dataDir, 'services', SERVICE, 'disk.qcow2');
  const digest = createHash('sha256')
    .update(await readFile(aDisk))
    .digest('hex');
  const peers = await until(
    () => peersSeenBy(b),
    (list) => list.some((p) => p.name === 'cloudlet-a' && p.placement !== null && p.seen_at !== null),
  );
  const seenA = peers.find((p) => p.name === 'cloudlet-a')!;
  tt.match(seenA, { address: a.address, paired: { device_id: bAtA?.id } }, 'the peer mDNS sees and the paired one are one entry');
  tt.match(
    seenA.placement,
    { name: 'cloudlet-a', instances: { running: 0 }, services: [{ service_id: SERVICE, disk_sha256: digest }] },
    'services with image digests',
  );
  tt.ok(seenA.placement!.memory.free_bytes > 0, 'free memory');
  tt.equal(seenA.placement!.load_average.length, 3, 'load');
  tt.match(
    peers.find((p) => p.name === 'cloudlet-c'),
    { paired: null, placement: null },
    'an unpaired peer is only what mDNS says of it',
  );
});

t.test("B's credential opens at A only what a cloudlet may ask", async (tt) => {
  const [a, b] = [fleet.cloudlet('cloudlet-a'), fleet.cloudlet('cloudlet-b')];
  const links = JSON.parse(await readFile(path.join(b.dataDir, 'trust', 'peers.json'), 'utf8')).links as Array<{ token: string; tlsPort: number }>;
  const asB = { authorization: `Bearer ${links[0]!.token}` };
  const base = `https://${a.address}:${links[0]!.tlsPort}`;
  tt.equal((await b.http('GET', `${base}/v1/placement`, { headers: asB })).status, 200, 'placement');
  for (const [method, route, body] of [
    ['GET', '/v1/instances', undefined],
    ['POST', '/v1/instances', { service_id: SERVICE }],
    ['GET', '/v1/services', undefined],
    ['GET', '/api/services', undefined],
  ] as const) {
    const r = await b.http(method, `${base}${route}`, { headers: asB, ...(body ? { body } : {}) });
    tt.equal(r.status, 403, `${method} ${route} is refused`);
    if (route.startsWith('/v1')) tt.equal(r.json.code, 'PEER_NOT_ALLOWED', 'as not for cloudlets');
  }
  tt.same(await a.domains(), [], 'nothing started at A');
});

t.test('an unpaired cloudlet C is refused by both A and B', async (tt) => {
  const c = fleet.cloudlet('cloudlet-c');
  for (const target of [fleet.cloudlet('cloudlet-a'), fleet.cloudlet('cloudlet-b')]) {
    const base = `https://${target.address}:9443`;
    const bare = await c.http('GET', `${base}/v1/placement`);
    tt.match({ status: bare.status, code: bare.json.code }, { status: 401, code: 'UNAUTHENTICATED' }, `${target.name}: no credential`);
    const own = await c.http('GET', `${base}/v1/placement`, { headers: { authorization: `Bearer ${await c.adminToken()}` } });
    tt.match({ status: own.status, code: own.json.code }, { status: 401, code: 'UNAUTHENTICATED' }, `${target.name}: C's own credential is nothing there`);
    const guessed = await operatorCli(c, 'peer', 'pair', 'ABCD2345', '--peer', `${target.address}:${API_PORT}`, '--fingerprint', await fingerprintOf(target));
    tt.not(guessed.code, 0, `${target.name}: pairing without its operator's code fails`);
    tt.match(guessed.json.error, { code: 'PEER_REFUSED', message: /PAIRING_CLOSED/ }, 'the other refused it: no window is open');
  }
  const seenByC = await peersSeenBy(c);
  tt.ok(
    seenByC.every((p) => p.paired === null && p.placement === null),
    'C knows the others only from mDNS',
  );
});

t.test("when A's operator revokes B, B's asks are refused and its /v1/peers says why; B may forget A", async (tt) => {
  const [a, b] = [fleet.cloudlet('cloudlet-a'), fleet.cloudlet('cloudlet-b')];
  const devices = (await a.operator('GET', '/v1/devices')).json.devices as Array<{ id: string; kind: string }>;
  const revoked = await a.operator('POST', `/v1/devices/${devices.find((d) => d.kind === 'cloudlet')!.id}/revoke`);
  tt.equal(revoked.status, 200, 'A revokes B');
  const peers = await until(
    () => peersSeenBy(b),
    (list) => /DEVICE_REVOKED/.test(list.find((p) => p.name === 'cloudlet-a')?.placement_error ?? ''),
  );
  const seenA = peers.find((p) => p.name === 'cloudlet-a')!;
  tt.match(seenA.placement_error, /DEVICE_REVOKED/, "B's next ask is refused");
  tt.not(seenA.placement, null, 'the facts A gave before stay, with their date');
  const forgotten = await operatorCli(b, 'peer', 'forget', seenA.paired!.id);
  tt.equal(forgotten.code, 0, forgotten.stderr || 'peer forget');
  tt.match(
    (await peersSeenBy(b)).find((p) => p.name === 'cloudlet-a'),
    { paired: null, placement: null },
    'A is a mere sighting again',
  );
});

t.test("cutting a cloudlet's uplink takes it off the LAN; restoring it brings it back", async (tt) => {
  const c = fleet.cloudlet('cloudlet-c');
  const health = () => phone.http('GET', `http://${c.address}:${API_PORT}/v1/health`, { timeoutSeconds: 3 });
  tt.equal((await health()).status, 200, 'reachable');
  await fleet.setUplink('cloudlet-c', false);
  tt.equal((await health()).status, 0, 'nothing answers while its uplink is cut');
  await fleet.setUplink('cloudlet-c', true);
  tt.equal((await until(health, (r) => r.status === 200)).status, 200, 'reachable again');
});

t.test('tear-down leaves no namespace, process, domain or file', async (tt) => {
  await fleet.stop();
  tt.same(await fleet.leftovers(), []);
});
