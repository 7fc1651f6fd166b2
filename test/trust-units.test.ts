// The trust module's parts on their own: the device registry's persistence, expiry timers and events, and how
// credentials are read from a request. (test/trust.e2e.test.ts drives the same through the real agent.)
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { bearerToken } from '../agent/src/trust/access';
import { DeviceRegistry, type DeviceEndReason, type PairedDevice } from '../agent/src/trust/devices';

let dataDir: string;
t.beforeEach(async () => {
  dataDir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-trust-units-'));
});
t.afterEach(() => rm(dataDir, { recursive: true, force: true }));

function endings(registry: DeviceRegistry): Array<[string, DeviceEndReason]> {
  const seen: Array<[string, DeviceEndReason]> = [];
  registry.on('device-ended', (device: PairedDevice, reason) => seen.push([device.id, reason]));
  return seen;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

t.test('a paired device is found by its token only, and survives a reopen', async (tt) => {
  const registry = await DeviceRegistry.open(dataDir);
  const { device, token } = await registry.add({ name: 'phone', id: 'phone-1' });
  tt.equal(registry.authenticate(token).id, 'phone-1');
  tt.throws(() => registry.authenticate(`${token}x`), { code: 'UNAUTHENTICATED' });
  tt.equal(registry.standing('phone-1'), null);
  tt.equal(registry.standing('nobody'), 'not-paired');
  tt.throws(() => registry.legacyPassword('nobody'), { code: 'DEVICE_NOT_FOUND' });
  const reopened = await DeviceRegistry.open(dataDir);
  tt.same(reopened.get('phone-1'), device);
  tt.equal(reopened.authenticate(token).id, 'phone-1');
  tt.equal(reopened.legacyPassword('phone-1'), registry.legacyPassword('phone-1'));
});

t.test('revoke ends a device once; removing a revoked device does not end it again', async (tt) => {
  const registry = await DeviceRegistry.open(dataDir);
  const seen = endings(registry);
  const { token } = await registry.add({ name: 'phone', id: 'p' });
  await registry.revoke('p');
  await registry.revoke('p');
  tt.throws(() => registry.authenticate(token), { code: 'DEVICE_REVOKED' });
  await registry.remove('p');
  tt.same(seen, [['p', 'revoked']]);
  const other = await registry.add({ name: 'other', id: 'q' });
  await registry.remove('q');
  tt.same(seen.at(-1), ['q', 'removed']);
  tt.throws(() => registry.authenticate(other.token), { code: 'UNAUTHENTICATED' });
});

t.test('expiry: refused at once when due, ended by its timer, and re-armed from disk by a new registry', async (tt) => {
  const registry = await DeviceRegistry.open(dataDir);
  const seen = endings(registry);
  registry.startExpiryTimers();
  const soon = await registry.add({ name: 'soon', id: 'soon', expiresInMinutes: 0.3 / 60 });
  const later = await registry.add({ name: 'later', id: 'later', expiresInMinutes: 0.6 / 60 });
  // A date beyond setTimeout's 24.8-day limit: armed in steps, never fired early.
  await registry.add({ name: 'far', id: 'far', expiresInMinutes: 60 * 24 * 40 });
  await sleep(400);
  tt.same(seen, [['soon', 'expired']], 'the first ended on time');
  tt.throws(() => registry.authenticate(soon.token), { code: 'DEVICE_EXPIRED' });
  registry.close();

  // The agent stops before `later` is due and a new one starts after: the new registry ends it from the stored date.
  await sleep(300);
  const restarted = await DeviceRegistry.open(dataDir);
  const seenAfter = endings(restarted);
  tt.throws(() => restarted.authenticate(later.token), { code: 'DEVICE_EXPIRED' }, 'refused even before any timer');
  restarted.startExpiryTimers();
  await sleep(50);
  tt.same(seenAfter.map(([id]) => id).sort(), ['later', 'soon'], 'what expired while it was down ends at start (again, harmlessly)');
  tt.equal(restarted.standing('far'), null);
  restarted.close();
});

t.test('a bearer token is read from "Bearer <token>" only', async (tt) => {
  tt.equal(bearerToken('Bearer cld_abc'), 'cld_abc');
  tt.equal(bearerToken('bearer \tcld_abc '), 'cld_abc', 'the scheme in any case, spaces around');
  for (const header of [undefined, '', 'Bearer', 'Bearer a b', 'Basic dXNlcjpwYXNz', 'cld_abc']) tt.equal(bearerToken(header), undefined, JSON.stringify(header));
});
