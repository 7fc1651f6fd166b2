// The trust module's parts on their own: the device registry's persistence, expiry timers and events, and how
// credentials are read from a request, pairing's wrong-code limits, and how clients are counted (rate limits).
// (test/trust-pairing.e2e.test.ts and test/trust-access.e2e.test.ts drive the same through the real agent.)
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { RateLimiter } from '../agent/src/trust/rate-limit';
import { InstanceView } from '../agent/src/api/wire-shapes';
import { CloudletError } from '../agent/src/errors';
import { accessPolicy, addressKey, admit, bearerToken } from '../agent/src/trust/access';
import { DeviceRegistry, type DeviceEndReason, type PairedDevice } from '../agent/src/trust/devices';
import { FREE_WRONG_CODES, MAX_PAUSE_SECONDS, MAX_WRONG_CODES_PER_ADDRESS, Pairing } from '../agent/src/trust/pairing';

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

t.test('a token that authenticated is remembered, yet a revocation, an expiry or a removal is refused at the next request', async (tt) => {
  const registry = await DeviceRegistry.open(dataDir);
  const revoked = await registry.add({ name: 'revoked', id: 'r' });
  const removed = await registry.add({ name: 'removed', id: 'm' });
  const expiring = await registry.add({ name: 'expiring', id: 'e', expiresInMinutes: 0.2 / 60 });
  for (const { token } of [revoked, removed, expiring]) registry.authenticate(token);
  tt.ok(registry.recognizes(revoked.token), 'remembered once it authenticated');
  tt.notOk(registry.recognizes(`${revoked.token}x`), 'a token that never authenticated is not');

  await registry.revoke('r');
  tt.throws(() => registry.authenticate(revoked.token), { code: 'DEVICE_REVOKED' });
  await registry.remove('m');
  tt.throws(() => registry.authenticate(removed.token), { code: 'UNAUTHENTICATED' });
  // The same id paired again holds a new token; the old one names nobody, not the new device.
  const repaired = await registry.add({ name: 'removed, paired again', id: 'm' });
  tt.notOk(registry.recognizes(removed.token));
  tt.throws(() => registry.authenticate(removed.token), { code: 'UNAUTHENTICATED' });
  tt.equal(registry.authenticate(repaired.token).name, 'removed, paired again');
  await sleep(300);
  tt.throws(() => registry.authenticate(expiring.token), { code: 'DEVICE_EXPIRED' }, 'expired without any timer or event');
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
  for (const header of [undefined, '', 'Bearer', 'Bearer a b', 'Basic dXNlcjpwYXNz', 'cld_abc'])
    tt.equal(bearerToken(header), undefined, JSON.stringify(header));
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

t.test('pairing: each address gets a few wrong codes, then is refused for the rest of the window', async (tt) => {
  const registry = await DeviceRegistry.open(dataDir);
  const pairing = new Pairing(registry);
  const { code } = pairing.open({ ttlSeconds: 60 });
  const wrong = wrongCodeFor(code);
  for (let i = 1; i <= MAX_WRONG_CODES_PER_ADDRESS; i++) {
    await tt.rejects(pairing.claim(wrong, { name: 'x', remoteAddress: '192.0.2.1' }), { code: 'PAIRING_CODE_INVALID' });
  }
  await tt.rejects(pairing.claim(code, { name: 'x', remoteAddress: '192.0.2.1' }), { code: 'PAIRING_CLOSED' }, 'that address is cut off');
  await tt.rejects(pairing.claim(wrong, { name: 'x', remoteAddress: '2001:db8:1:2::7' }), { code: 'PAIRING_CODE_INVALID' });
  await tt.rejects(pairing.claim(wrong, { name: 'x', remoteAddress: '2001:db8:1:2::8' }), { code: 'PAIRING_CODE_INVALID' });
  await tt.rejects(
    pairing.claim(wrong, { name: 'x', remoteAddress: '2001:db8:1:2:ffff::9' }),
    { code: 'PAIRING_CODE_INVALID', details: { attempts_left: 0 } },
    'an IPv6 /64 counts as one address',
  );
  const next = pairing.open({ ttlSeconds: 60 });
  tt.equal((await pairing.claim(next.code, { name: 'phone', remoteAddress: '192.0.2.1' })).device.name, 'phone', 'a new window forgets the counts');
});

/** A code that is not `code`. */
const wrongCodeFor = (code: string) => (code === '22222222' ? '33333333' : '22222222');

/** Sends `count` wrong codes from fresh addresses (each within its own tries), as many hosts on the LAN would. */
async function wrongCodesFromMany(pairing: Pairing, wrong: string, count: number, subnet: string): Promise<void> {
  for (let i = 0; i < count; i++) {
    await pairing.claim(wrong, { name: 'x', remoteAddress: `${subnet}.${Math.floor(i / MAX_WRONG_CODES_PER_ADDRESS) + 1}` }).catch((err: { code: string }) => {
      if (err.code !== 'PAIRING_CODE_INVALID') throw err;
    });
  }
}

/** A window on a clock of the test's own that has had its FREE_WRONG_CODES wrong codes, from many addresses. */
async function windowPastFreeWrongCodes(ttlSeconds: number) {
  const clock = { now: Date.parse('2026-01-01T00:00:00Z') };
  const pairing = new Pairing(await DeviceRegistry.open(dataDir), () => clock.now);
  const { code } = pairing.open({ ttlSeconds });
  const wrong = wrongCodeFor(code);
  await wrongCodesFromMany(pairing, wrong, FREE_WRONG_CODES, '198.51.100');
  return { clock, pairing, code, wrong };
}

t.test('pairing: wrong codes from many addresses slow the window down; a burst of guesses is refused unread', async (tt) => {
  const { clock, pairing, code, wrong } = await windowPastFreeWrongCodes(600);
  await tt.rejects(
    pairing.claim(wrong, { name: 'x', remoteAddress: '203.0.113.1' }),
    { code: 'PAIRING_CODE_INVALID' },
    'the first wrong code past the free ones',
  );
  // 200 guesses from 200 more addresses during the pause: none is checked (the right code among them would not pair).
  for (let host = 1; host <= 200; host++) {
    await tt.rejects(pairing.claim(host === 100 ? code : wrong, { name: 'x', remoteAddress: `10.9.${host}.1` }), {
      code: 'RATE_LIMITED',
      details: { retry_after_s: 1 },
    });
  }
  tt.pass('during the pause every claim is refused with the time to wait, the right code too');
  // The pauses grow with each wrong code: 1 s, 2 s, 4 s, ... up to MAX_PAUSE_SECONDS.
  const pauses: number[] = [];
  for (let host = 2; host <= 9; host++) {
    clock.now += 60_000;
    await tt.rejects(pairing.claim(wrong, { name: 'x', remoteAddress: `203.0.113.${host}` }), { code: 'PAIRING_CODE_INVALID' });
    const refused = await pairing.claim(wrong, { name: 'x', remoteAddress: '203.0.113.200' }).catch((err: { details: { retry_after_s: number } }) => err);
    pauses.push((refused as { details: { retry_after_s: number } }).details.retry_after_s);
  }
  tt.same(
    pauses,
    [2, 4, 8, 16, 32, 64, 128, 256].map((s) => Math.min(s, MAX_PAUSE_SECONDS)),
  );
});

t.test('pairing: however many wrong codes from however many addresses, the window stays open and the right code pairs', async (tt) => {
  const { clock, pairing, code, wrong } = await windowPastFreeWrongCodes(3600);
  // Far more wrong codes than the window once closed at (100), from ever more addresses, each sent as a pause ends.
  for (let i = 0; i < 110; i++) {
    clock.now += MAX_PAUSE_SECONDS * 1000;
    await tt.rejects(pairing.claim(wrong, { name: 'x', remoteAddress: `10.0.${i}.1` }), { code: 'PAIRING_CODE_INVALID' });
  }
  const paused = await pairing
    .claim(code, { name: 'phone', remoteAddress: '192.0.2.50' })
    .catch((err: { code: string; details: { retry_after_s: number } }) => err);
  tt.match(paused, { code: 'RATE_LIMITED' }, 'the phone meets a pause');
  clock.now += (paused as { details: { retry_after_s: number } }).details.retry_after_s * 1000;
  const paired = await pairing.claim(code, { name: 'phone', remoteAddress: '192.0.2.50' });
  tt.equal(paired.device.name, 'phone', 'after waiting as told, the phone pairs: the window was never closed');
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

t.test('one access policy: services open to unpaired clients only where it says so, the other levels as they are', async (tt) => {
  const anonymous = { kind: 'anonymous' } as const;
  const open = accessPolicy('plain');
  const closed = accessPolicy('encrypted');
  tt.same(open, { anonymousServices: true }, 'the plain KD face (the default) lets unpaired clients start services');
  tt.same(accessPolicy('off'), { anonymousServices: false });
  tt.same(admit('services', anonymous, open), anonymous, 'admitted without a credential, as anonymous');
  tt.throws(() => admit('services', anonymous, closed), { code: 'UNAUTHENTICATED' }, 'refused where the policy is closed');
  tt.throws(() => admit('services', anonymous, undefined), { code: 'UNAUTHENTICATED' }, 'and without a policy');
  tt.throws(() => admit('device', anonymous, open), { code: 'UNAUTHENTICATED' }, 'device routes still need a device');
  tt.throws(() => admit('admin', { kind: 'device', device: {} as PairedDevice }, open), { code: 'ADMIN_ONLY' });
  const clear = new CloudletError('TLS_REQUIRED', 'in clear');
  tt.throws(() => admit('services', clear, open), { code: 'TLS_REQUIRED' }, 'a secret in clear is refused even where anonymous callers are let in');
  const expired = new CloudletError('DEVICE_EXPIRED', 'expired');
  tt.throws(() => admit('services', expired, open), { code: 'DEVICE_EXPIRED' }, 'a credential that fails is refused, not taken for none');
  tt.same(admit('open', expired, open), anonymous, 'as an open route does');
});

t.test("an anonymous caller's view of an instance shows no owner", async (tt) => {
  const view = InstanceView.of({ kind: 'anonymous' });
  tt.same(view.redacted({ owners: ['dev-alice', 'dev-bob'] }).owners, [], "no device's id");
  tt.same(view.list([{ id: 'i', owners: ['dev-alice'] } as never]), [], 'and no instance to list');
  tt.same(InstanceView.of({ kind: 'admin' }).redacted({ owners: ['dev-alice'] }).owners, ['dev-alice'], 'the operator sees them all');
});
