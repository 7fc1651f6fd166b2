// The trust module's parts on their own: the device registry's persistence, expiry timers and events, and how
// credentials are read from a request, pairing's wrong-code limits, and how clients are counted (rate limits).
// (test/trust.e2e.test.ts drives the same through the real agent.)
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { RateLimiter } from '../agent/src/api/rate-limit';
import { addressKey, bearerToken } from '../agent/src/trust/access';
import { DeviceRegistry, type DeviceEndReason, type PairedDevice } from '../agent/src/trust/devices';
import { MAX_WRONG_CODES, MAX_WRONG_CODES_PER_ADDRESS, Pairing } from '../agent/src/trust/pairing';

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

t.test('a revocation or removal that cannot be saved changes nothing, and can be retried', async (tt) => {
  const registry = await DeviceRegistry.open(dataDir);
  const seen = endings(registry);
  const { token } = await registry.add({ name: 'phone', id: 'p' });
  // devices.json becomes a non-empty directory: the new file cannot be renamed over it (not even by root).
  const file = path.join(dataDir, 'trust', 'devices.json');
  await rm(file);
  await mkdir(path.join(file, 'in-the-way'), { recursive: true });
  await tt.rejects(registry.revoke('p'), 'the failed save reaches the caller');
  tt.equal(registry.authenticate(token).id, 'p', 'the device is still active');
  await tt.rejects(registry.remove('p'));
  tt.ok(registry.get('p'), 'and still paired');
  tt.same(seen, [], 'nothing ended');
  await rm(file, { recursive: true });
  await registry.revoke('p');
  tt.throws(() => registry.authenticate(token), { code: 'DEVICE_REVOKED' });
  tt.same(seen, [['p', 'revoked']], 'the retry revokes it');
  tt.equal((await DeviceRegistry.open(dataDir)).standing('p'), 'revoked', 'on disk too');
});

t.test('pairing: each address gets a few wrong codes; the window closes for all after MAX_WRONG_CODES', async (tt) => {
  const registry = await DeviceRegistry.open(dataDir);
  const pairing = new Pairing(registry);
  const { code } = pairing.open({ ttlSeconds: 60 });
  const wrong = code === '22222222' ? '33333333' : '22222222';
  for (let i = 1; i <= MAX_WRONG_CODES_PER_ADDRESS; i++) {
    await tt.rejects(pairing.claim(wrong, { name: 'x', remoteAddress: '192.0.2.1' }), { code: 'PAIRING_CODE_INVALID' });
  }
  await tt.rejects(pairing.claim(code, { name: 'x', remoteAddress: '192.0.2.1' }), { code: 'PAIRING_CLOSED' }, 'that address is cut off');
  await tt.rejects(pairing.claim(wrong, { name: 'x', remoteAddress: '2001:db8:1:2::7' }), { code: 'PAIRING_CODE_INVALID' });
  await tt.rejects(pairing.claim(wrong, { name: 'x', remoteAddress: '2001:db8:1:2::8' }), { code: 'PAIRING_CODE_INVALID' });
  await tt.rejects(pairing.claim(wrong, { name: 'x', remoteAddress: '2001:db8:1:2:ffff::9' }), { code: 'PAIRING_CODE_INVALID', details: { attempts_left: 0 } },
    'an IPv6 /64 counts as one address');
  // Many addresses, each under its own limit, until the ceiling.
  let sent = 2 * MAX_WRONG_CODES_PER_ADDRESS;
  for (let host = 1; sent < MAX_WRONG_CODES - 1; host++) {
    for (let i = 0; i < MAX_WRONG_CODES_PER_ADDRESS && sent < MAX_WRONG_CODES - 1; i++, sent++) {
      await tt.rejects(pairing.claim(wrong, { name: 'x', remoteAddress: `198.51.100.${host}` }), { code: 'PAIRING_CODE_INVALID' });
    }
  }
  await tt.rejects(pairing.claim(wrong, { name: 'x', remoteAddress: '203.0.113.1' }), { code: 'PAIRING_CODE_INVALID', message: /now closed/ },
    `wrong code #${MAX_WRONG_CODES} closes the window`);
  await tt.rejects(pairing.claim(code, { name: 'x', remoteAddress: '203.0.113.2' }), { code: 'PAIRING_CLOSED' }, 'for everyone');
  const next = pairing.open({ ttlSeconds: 60 });
  tt.equal((await pairing.claim(next.code, { name: 'phone', remoteAddress: '192.0.2.1' })).device.name, 'phone', 'a new window forgets the counts');
});

t.test('clients are counted by IPv4 address, IPv4-mapped as IPv4, and IPv6 by /64', async (tt) => {
  tt.equal(addressKey('192.0.2.7'), '192.0.2.7');
  tt.equal(addressKey('::ffff:192.0.2.7'), '192.0.2.7');
  tt.equal(addressKey('0000:0000:0000:0000:0000:ffff:c000:0207'), '192.0.2.7');
  tt.equal(addressKey('2001:db8:0:1::1'), '2001:db8:0:1::/64');
  tt.equal(addressKey('2001:0db8:0000:0001:abcd:ef01:2345:6789'), '2001:db8:0:1::/64');
  tt.equal(addressKey('::1'), '0:0:0:0::/64');
  tt.not(addressKey('2001:db8:0:2::1'), addressKey('2001:db8:0:1::1'));
});

t.test('the rate limiter tracks a bounded number of clients: when full, idle ones make room, else new ones wait', async (tt) => {
  let now = 0;
  const limiter = new RateLimiter({ perSecond: 1, burst: 2 }, () => now, 3);
  for (const key of ['a', 'b', 'c']) limiter.take(key);
  tt.throws(() => limiter.take('d'), { code: 'RATE_LIMITED', details: { retry_after_s: 1 } }, 'a fourth client while three are active');
  limiter.take('a');
  now = 1000;
  limiter.take('c'); // still active
  now = 2000; // 'a' and 'b' (last seen at 0) are full again
  limiter.take('d');
  limiter.take('e');
  tt.throws(() => limiter.take('f'), { code: 'RATE_LIMITED' }, 'full again: c, d, e are active');
});
