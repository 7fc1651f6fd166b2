// Between cloudlets, unit by unit: pairing a cloudlet (a device of kind cloudlet), what its credential opens, and
// how a cloudlet reads another's placement facts (hostile until checked). The fleet itself: fleet.e2e.test.ts.
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { admit } from '../agent/src/trust/access';
import { DeviceRegistry } from '../agent/src/trust/devices';
import { Pairing } from '../agent/src/trust/pairing';
import { checkPlacement } from '../agent/src/fleet/placement';
import { MAX_PEER_REPLY_BYTES, normalizeFingerprint, peerSystem } from '../agent/src/fleet/peer-client';

let dataDir: string;
t.beforeEach(async () => {
  dataDir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-fleet-units-'));
});
t.afterEach(() => rm(dataDir, { recursive: true, force: true }));

const DIGEST = 'a'.repeat(64);
const PLACEMENT = {
  name: 'cloudlet-a',
  agent_version: '1.0.0',
  services: [{ service_id: 'org.cloudlet.demo.http', version: '1', disk_sha256: DIGEST, memory_mib: 128, vcpus: 1, has_state: false }],
  packages: [{ app_id: 'org.example.echo', version: '1', sha256: DIGEST }],
  memory: { total_bytes: 8e9, free_bytes: 4e9 },
  cpu: { cores: 2, usage_percent: 12.5 },
  load_average: [0.5, 0.25, 0.125],
  instances: { running: 1 },
};

t.test('a window opened for a cloudlet pairs a device of kind cloudlet; a claim of the other kind does not use the code up', async (tt) => {
  const registry = await DeviceRegistry.open(dataDir);
  const pairing = new Pairing(registry);
  const { code, kind } = pairing.open({ ttlSeconds: 60, kind: 'cloudlet' });
  tt.equal(kind, 'cloudlet');
  await tt.rejects(
    pairing.claim(code, { name: 'phone', remoteAddress: '192.0.2.1', kind: 'device' }),
    { code: 'CONFLICT' },
    'a phone is not paired as a cloudlet',
  );
  const { device } = await pairing.claim(code, { name: 'cloudlet-b', remoteAddress: '192.0.2.2', kind: 'cloudlet' });
  tt.equal(device.kind, 'cloudlet');
  tt.equal((await DeviceRegistry.open(dataDir)).get(device.id)?.kind, 'cloudlet', 'the kind is kept');

  const phones = pairing.open({ ttlSeconds: 60 });
  await tt.rejects(pairing.claim(phones.code, { name: 'cloudlet-c', remoteAddress: '192.0.2.3', kind: 'cloudlet' }), { code: 'CONFLICT' });
  tt.equal((await pairing.claim(phones.code, { name: 'phone', remoteAddress: '192.0.2.1' })).device.kind, 'device');
});

t.test('devices paired before kinds existed are devices', async (tt) => {
  await mkdir(path.join(dataDir, 'trust'));
  const stored = {
    id: 'old-phone',
    name: 'p',
    pairedAt: '2026-01-01T00:00:00.000Z',
    expiresAt: null,
    revokedAt: null,
    tokenSha256: '0'.repeat(64),
    legacyPassword: 'x',
  };
  await writeFile(path.join(dataDir, 'trust', 'devices.json'), JSON.stringify({ version: 1, devices: [stored] }));
  tt.equal((await DeviceRegistry.open(dataDir)).get('old-phone')?.kind, 'device');
});

t.test("a paired cloudlet's credential opens only the routes marked for cloudlets, open ones included", async (tt) => {
  const registry = await DeviceRegistry.open(dataDir);
  const cloudlet = (await registry.add({ name: 'cloudlet-b', kind: 'cloudlet' })).device;
  const phone = (await registry.add({ name: 'phone' })).device;
  for (const access of ['open', 'device'] as const) {
    tt.throws(() => admit(access, { kind: 'device', device: cloudlet }), { code: 'PEER_NOT_ALLOWED' }, `${access} route`);
    tt.same(admit(access, { kind: 'device', device: phone }), { kind: 'device', device: phone }, `a phone on a ${access} route`);
  }
  tt.same(admit('device', { kind: 'device', device: cloudlet }, undefined, true), { kind: 'device', device: cloudlet }, 'a route for cloudlets');
  tt.throws(() => admit('admin', { kind: 'device', device: cloudlet }, undefined, true), { code: 'ADMIN_ONLY' });
});

t.test("another cloudlet's placement is read field by field; anything malformed is refused", async (tt) => {
  tt.same(checkPlacement(PLACEMENT), PLACEMENT);
  tt.notOk('extra' in checkPlacement({ ...PLACEMENT, extra: 'x'.repeat(1000) }), 'unknown fields are dropped');
  const bad: Array<[string, unknown]> = [
    ['not an object', []],
    ['a digest that is not hex', { ...PLACEMENT, services: [{ ...PLACEMENT.services[0], disk_sha256: '../../etc/passwd' }] }],
    ['a negative amount', { ...PLACEMENT, memory: { total_bytes: 1, free_bytes: -1 } }],
    ['not a number', { ...PLACEMENT, instances: { running: '1' } }],
    ['a long name', { ...PLACEMENT, name: 'x'.repeat(201) }],
    ['too many services', { ...PLACEMENT, services: Array(2001).fill(PLACEMENT.services[0]) }],
    ['two load figures', { ...PLACEMENT, load_average: [1, 2] }],
  ];
  for (const [what, value] of bad) tt.throws(() => checkPlacement(value), { code: 'PEER_REFUSED' }, what);
});

t.test('a fingerprint is read however the operator typed it', async (tt) => {
  const canonical = Array(32).fill('AB').join(':');
  tt.equal(normalizeFingerprint(canonical.toLowerCase()), canonical);
  tt.equal(normalizeFingerprint('AB'.repeat(32)), canonical);
  tt.equal(normalizeFingerprint('AB'.repeat(31)), null);
  tt.equal(normalizeFingerprint('ZZ'.repeat(32)), null);
});

/** A cloudlet on loopback whose /v1/system answers as `answer` says; closed when the test ends. */
async function hostilePeer(tt: Test, answer: (res: http.ServerResponse) => void): Promise<number> {
  const server = http.createServer((_req, res) => answer(res));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  tt.teardown(() => {
    server.closeAllConnections();
    server.close();
  });
  return (server.address() as AddressInfo).port;
}

t.test("another cloudlet's answer is bounded in size and in time, however it sends it", async (tt) => {
  const huge = await hostilePeer(tt, (res) => res.end(Buffer.alloc(MAX_PEER_REPLY_BYTES + 1, 0x20)));
  await tt.rejects(peerSystem('127.0.0.1', huge), { code: 'PEER_UNREACHABLE', message: /exceeds/ }, 'an answer over the bound is cut');
  // One byte every 2 s never leaves the socket idle for the request's own timeout: only a deadline on the whole cuts it.
  const drip = await hostilePeer(tt, (res) => {
    res.writeHead(200, { 'content-type': 'application/json' });
    const timer = setInterval(() => res.write(' '), 2000);
    res.on('close', () => clearInterval(timer));
  });
  await tt.rejects(peerSystem('127.0.0.1', drip), { code: 'PEER_UNREACHABLE', message: /no whole answer/ }, 'a dripped answer is cut at the deadline');
});
