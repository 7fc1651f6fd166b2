// Trust, end to end, the credentials: pairing, device tokens and their revocation, the admin token, HTTPS with a pinned
// certificate, the /v1/events WebSocket's credentials, the CLI's pairing, and secrets only inside TLS from another
// address. What each credential may reach is test/trust-access.e2e.test.ts. Forward ports 22630-22669.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { chmod, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { promisify } from 'node:util';
import t from 'tap';
import WebSocket from 'ws';
import { isLoopback } from '../agent/src/trust/access';
import { AGENT_MAIN, AgentProcess, ROOT, destroyDomainsUnder, request } from './support/agent';
import { cli } from './support/cli';
import { EventsSocket } from './support/listeners';
import { NONE, as, expectError, pairDevice } from './support/pairing';
import { selfSignedCertificate } from './support/self-signed';

const run = promisify(execFile);

let agent: AgentProcess;

t.before(async () => {
  // The pairing tests send refused requests from one address: keep them clear of the default rate limit.
  agent = await AgentProcess.start({ portRange: '22630-22649', env: { CLOUDLET_RATE_PER_SECOND: '10000', CLOUDLET_RATE_BURST: '10000' } });
});
t.teardown(async () => {
  await agent.dispose();
});

const pair = (name: string) => pairDevice(agent, name);

t.test("the trust files on disk are the owner's only, and tokens are stored hashed", async (tt) => {
  const trustDir = path.join(agent.dataDir, 'trust');
  const device = await pair('disk phone');
  tt.equal((await stat(trustDir)).mode & 0o777, 0o700);
  for (const file of ['admin-token', 'devices.json', 'tls/key.pem']) tt.equal((await stat(path.join(trustDir, file))).mode & 0o777, 0o600, `${file} is 0600`);
  const stored = await readFile(path.join(trustDir, 'devices.json'), 'utf8');
  tt.notOk(stored.includes(device.token), 'the token itself is not stored');
  tt.ok(stored.includes(device.id));
});

t.test('pairing', async (tt) => {
  tt.test('an operator opens a window, a phone claims its code and gets its own working credential', async (t2) => {
    const window = await agent.post('/v1/pairing', { ttl_seconds: 120 });
    t2.equal(window.status, 201, window.body);
    t2.match(window.json.code, /^[2-9A-HJKMNP-Z]{8}$/, 'an 8-character code from an unambiguous alphabet');
    const system = await request(agent.apiPort, 'GET', '/v1/system', undefined, NONE);
    t2.equal(window.json.tls_fingerprint, system.json.tls_fingerprint, '/v1/system shows the same fingerprint, openly');
    // Read aloud as "ABCD-EFGH", typed in lower case: still the code.
    const typed = `${window.json.code.slice(0, 4)}-${window.json.code.slice(4)}`.toLowerCase();
    const claim = await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: typed, name: "Alice's phone", device_id: 'android-42' }, NONE);
    t2.equal(claim.status, 201, claim.body);
    t2.equal(claim.json.device_id, 'android-42');
    t2.match(claim.json.token, /^cld_[A-Za-z0-9_-]{43}$/);
    t2.match(claim.json.legacy_password, /^[0-9a-f]{64}$/);
    t2.equal(claim.json.tls_fingerprint, window.json.tls_fingerprint);
    t2.equal((await request(agent.apiPort, 'GET', '/v1/instances', undefined, as(claim.json.token))).status, 200, 'the token works');
    const again = await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: window.json.code, name: 'Mallory' }, NONE);
    expectError(t2, again, 403, 'PAIRING_CLOSED', 'the code a second time');
    const listed = (await agent.get('/v1/devices')).json.devices.find((d: { id: string }) => d.id === 'android-42');
    t2.match(listed, { name: "Alice's phone", standing: 'active', revoked_at: null, expires_at: null });
  });

  tt.test('an address that sends 3 wrong codes is refused for the rest of the window', async (t2) => {
    const window = await agent.post('/v1/pairing', {});
    for (let attempt = 1; attempt <= 3; attempt++) {
      const wrong = await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: 'WRONG234', name: 'guesser' }, NONE);
      expectError(t2, wrong, 403, 'PAIRING_CODE_INVALID', `wrong code #${attempt}`);
      t2.equal(wrong.json.details.attempts_left, 3 - attempt);
    }
    const right = await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: window.json.code, name: 'late' }, NONE);
    expectError(t2, right, 403, 'PAIRING_CLOSED', 'even the right code, from that address');
    // (Other addresses keep the window; many wrong codes slow it down but never close it: test/trust-units.test.ts.)
  });

  tt.test('a window that timed out refuses its code', async (t2) => {
    const window = await agent.post('/v1/pairing', { ttl_seconds: 1 });
    await new Promise((r) => setTimeout(r, 1200));
    expectError(
      t2,
      await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: window.json.code, name: 'slow' }, NONE),
      403,
      'PAIRING_CLOSED',
      'after its time',
    );
  });

  tt.test('a taken or malformed device id does not use the code up', async (t2) => {
    const window = await agent.post('/v1/pairing', {});
    expectError(
      t2,
      await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: window.json.code, name: 'x', device_id: 'android-42' }, NONE),
      409,
      'CONFLICT',
      'a paired id',
    );
    expectError(
      t2,
      await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: window.json.code, name: 'x', device_id: 'a b' }, NONE),
      400,
      'INVALID_PARAMETER',
      'a bad id',
    );
    t2.equal((await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: window.json.code, name: 'x' }, NONE)).status, 201, 'the code still works');
  });

  tt.test('tokens are random per device: nothing is derived from a shared secret', async (t2) => {
    const [a, b] = [await pair('a'), await pair('b')];
    t2.not(a.token, b.token);
    t2.not(a.json.legacy_password, b.json.legacy_password);
    t2.not(a.id, b.id);
  });
});

t.test('revoking and removing devices', async (tt) => {
  const device = await pair('soon revoked');
  tt.equal((await request(agent.apiPort, 'GET', '/v1/services', undefined, as(device.token))).status, 200);
  const revoked = await agent.post(`/v1/devices/${device.id}/revoke`);
  tt.equal(revoked.status, 200, revoked.body);
  tt.equal(revoked.json.standing, 'revoked');
  const refused = await request(agent.apiPort, 'GET', '/v1/services', undefined, as(device.token));
  expectError(tt, refused, 401, 'DEVICE_REVOKED', "the revoked device's next request");
  tt.match(refused.headers['www-authenticate'], /error="invalid_token"/);
  tt.equal((await agent.delete(`/v1/devices/${device.id}`)).status, 204);
  expectError(tt, await request(agent.apiPort, 'GET', '/v1/services', undefined, as(device.token)), 401, 'UNAUTHENTICATED', 'a removed device');
  expectError(tt, await agent.delete(`/v1/devices/${device.id}`), 404, 'DEVICE_NOT_FOUND', 'removing it again');
  expectError(tt, await agent.post('/v1/devices/nobody/revoke'), 404, 'DEVICE_NOT_FOUND', 'revoking an unknown device');
});

t.test("a revoked device's open /v1/events socket is closed at once; other devices' stay open", async (tt) => {
  const [doomed, other] = [await pair('events doomed'), await pair('events other')];
  const [watching, staying] = [
    await EventsSocket.connect(agent.apiPort, { headers: as(doomed.token) }),
    await EventsSocket.connect(agent.apiPort, { headers: as(other.token) }),
  ];
  await watching.next((e) => e.type === 'snapshot');
  await staying.next((e) => e.type === 'snapshot');
  const closed = new Promise<number>((resolve) => watching.socket.once('close', (code) => resolve(code)));
  tt.equal((await agent.post(`/v1/devices/${doomed.id}/revoke`)).status, 200);
  const timeout = new Promise<string>((resolve) => setTimeout(() => resolve('still open after 5 s'), 5000).unref());
  tt.equal(await Promise.race([closed, timeout]), 1008, 'closed with 1008 (policy violation)');
  tt.equal(staying.socket.readyState, WebSocket.OPEN, "another device's socket stays open");
  await staying.close();
});

t.test("a token sent as ?access_token= never reaches the agent's log", async (tt) => {
  const device = await pair('query token');
  const asQuery = await request(agent.apiPort, 'GET', `/v1/instances?access_token=${encodeURIComponent(device.token)}`, undefined, NONE);
  tt.equal(asQuery.status, 401, 'a plain request does not take the query credential');
  const events = await EventsSocket.connect(agent.apiPort, { headers: {}, query: `?access_token=${encodeURIComponent(device.token)}` });
  await events.close();
  await new Promise((r) => setTimeout(r, 200)); // the agent's log lines reach us through a pipe
  tt.match(agent.log, /GET \/v1\/instances\?access_token=REDACTED 401/, 'the request is logged, its token redacted');
  tt.notOk(agent.log.includes(device.token), 'the token appears nowhere in the log');
});

t.test('/v1/events WebSocket: refused without a device credential, accepted with each of its three forms', async (tt) => {
  const device = await pair('watcher');
  const refused = await new Promise<number>((resolve) => {
    const socket = new WebSocket(`ws://127.0.0.1:${agent.apiPort}/v1/events`);
    socket.on('unexpected-response', (_req, res) => {
      resolve(res.statusCode ?? 0);
      socket.terminate();
    });
    socket.on('open', () => {
      resolve(101);
      socket.close();
    });
    socket.on('error', () => {});
  });
  tt.equal(refused, 401, 'no credential: 401 at the upgrade');
  const forms: Array<[string, Parameters<typeof EventsSocket.connect>[1]]> = [
    ['Authorization header', { headers: as(device.token) }],
    ['?access_token=', { headers: {}, query: `?access_token=${encodeURIComponent(device.token)}` }],
    ['bearer.<token> subprotocol', { headers: {}, protocols: ['cloudlet.events', `bearer.${device.token}`] }],
  ];
  for (const [form, options] of forms) {
    const events = await EventsSocket.connect(agent.apiPort, options);
    tt.equal((await events.next((e) => e.type === 'snapshot')).value.type, 'snapshot', `${form}: the snapshot arrives`);
    await events.close();
  }
});

t.test('HTTPS: the certificate is the one pairing names, and a client pinning it connects', async (tt) => {
  const system = (await agent.get('/v1/system')).json;
  const port = system.tls_port as number;
  tt.type(port, 'number');
  // What a phone sees at its first connection (trust on first use, checked against what the operator reads out).
  const seen = await new Promise<tls.PeerCertificate>((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false }, () => {
      resolve(socket.getPeerCertificate());
      socket.end();
    });
    socket.on('error', reject);
  });
  tt.equal(seen.fingerprint256, system.tls_fingerprint, 'the served certificate has the fingerprint pairing hands out');
  const pem = `-----BEGIN CERTIFICATE-----\n${seen.raw.toString('base64').replace(/.{64}/g, '$&\n')}\n-----END CERTIFICATE-----\n`;
  tt.equal(new X509Certificate(pem).fingerprint256, system.tls_fingerprint);
  const device = await pair('pinning phone');

  const pinned = (pin: string) =>
    new Promise<number>((resolve, reject) => {
      const req = https.request(
        {
          host: '127.0.0.1',
          port,
          path: '/v1/instances',
          headers: as(device.token),
          agent: false,
          ca: pem,
          // The pin replaces the host name check: the phone may reach the cloudlet by any address.
          checkServerIdentity: (_host, cert) =>
            cert.fingerprint256 === pin ? undefined : new Error(`certificate ${cert.fingerprint256} is not the pinned ${pin}`),
        },
        (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        },
      );
      req.on('error', reject);
      req.end();
    });
  tt.equal(await pinned(system.tls_fingerprint), 200, 'pinned to the right fingerprint: connected and authenticated');
  await tt.rejects(
    pinned(system.tls_fingerprint.replace(/^../, '00')),
    /is not the pinned/,
    'pinned to another fingerprint: refused before any request is sent',
  );
  // A client trusting only some other certificate does not connect either.
  const other = await selfSignedCertificate('other', '/dev/null');
  await tt.rejects(
    new Promise((resolve, reject) => {
      https.get({ host: '127.0.0.1', port, path: '/v1/health', agent: false, ca: other }, resolve).on('error', reject);
    }),
    'a different certificate authority: refused',
  );
});

t.test('the CLI: the operator opens a window, a laptop pairs, pins the certificate and is revoked', async (tt) => {
  const cloudlet = `127.0.0.1:${agent.apiPort}`;
  const home = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-cli-home-'));
  tt.teardown(() => rm(home, { recursive: true, force: true }));
  // The laptop: its own config directory, and no access to the agent's data directory (so no admin token).
  const laptop = { env: { XDG_CONFIG_HOME: home, CLOUDLET_DATA_DIR: path.join(home, 'no-data-dir') } };

  const window = await cli(['pair', 'open', '--ttl', '60', '--cloudlet', cloudlet, '--json']);
  tt.equal(window.code, 0, window.stderr);
  const system = (await agent.get('/v1/system')).json;
  tt.equal(window.json.tls_fingerprint, system.tls_fingerprint, 'the operator sees the fingerprint to compare');
  const paired = await cli(['pair', window.json.code, '--name', 'laptop', '--cloudlet', cloudlet, '--json'], laptop);
  tt.equal(paired.code, 0, paired.stderr);
  tt.equal(paired.json.tls_fingerprint, system.tls_fingerprint, 'the laptop pinned the same certificate');
  tt.notOk('token' in paired.json, 'the token is not printed');
  const file = path.join(home, 'cloudlet', 'credentials.json');
  tt.equal((await stat(file)).mode & 0o777, 0o600, 'credentials.json is 0600');

  const listed = await cli(['instances', '--cloudlet', cloudlet, '--json'], laptop);
  tt.equal(listed.code, 0, `a device route over pinned HTTPS: ${listed.stderr}`);
  const refused = await cli(['devices', '--cloudlet', cloudlet, '--json'], laptop);
  tt.equal(refused.json.error.code, 'ADMIN_ONLY', 'the laptop is no operator');

  const credentials = JSON.parse(await readFile(file, 'utf8'));
  const stored = credentials[cloudlet];
  await writeFile(file, JSON.stringify({ [cloudlet]: { ...stored, tls_fingerprint: stored.tls_fingerprint.replace(/^../, '00') } }));
  const mispinned = await cli(['instances', '--cloudlet', cloudlet, '--json'], laptop);
  tt.equal(mispinned.code, 4, 'a certificate other than the pinned one: no connection');
  tt.match(mispinned.stderr, /pinned/);
  await writeFile(file, JSON.stringify(credentials));

  const devices = await cli(['devices', '--cloudlet', cloudlet, '--json']);
  tt.equal(devices.code, 0, devices.stderr);
  tt.ok(
    devices.json.devices.some((d: { id: string; name: string }) => d.id === paired.json.device_id && d.name === 'laptop'),
    'the operator lists the laptop',
  );
  tt.equal((await cli(['devices', 'revoke', paired.json.device_id, '--cloudlet', cloudlet])).code, 0);
  const revoked = await cli(['instances', '--cloudlet', cloudlet, '--json'], laptop);
  tt.equal(revoked.json.error.code, 'DEVICE_REVOKED', 'revoked at once');
  tt.equal((await cli(['devices', 'remove', 'no-such-device', '--cloudlet', cloudlet])).code, 3, 'an unknown device: exit 3');
});

t.test('an agent whose HTTPS port is taken still serves, and says it has no HTTPS', async (tt) => {
  const squatter = net.createServer();
  await new Promise<void>((resolve) => squatter.listen(0, '127.0.0.1', resolve));
  tt.teardown(() => new Promise<void>((resolve) => squatter.close(() => resolve())));
  const taken = (squatter.address() as net.AddressInfo).port;
  const other = await AgentProcess.start({ portRange: '22660-22669', env: { CLOUDLET_TLS_PORT: String(taken) } });
  tt.teardown(() => other.dispose());
  const system = await other.get('/v1/system');
  tt.equal(system.status, 200);
  tt.equal(system.json.tls_port, null, '/v1/system shows no HTTPS port');
  tt.match(other.log, /no HTTPS listener/, 'the log says why');
  tt.equal((await other.get('/v1/instances')).status, 200, 'the operator on the box is served');
});

t.test('loopback is 127.0.0.0/8 and ::1 in any spelling, nothing else', async (tt) => {
  for (const address of [
    '127.0.0.1',
    '127.0.0.2',
    '::1',
    '0000:0000:0000:0000:0000:0000:0000:0001',
    '::ffff:127.0.0.1',
    '0000:0000:0000:0000:0000:ffff:7f00:0001',
  ]) {
    tt.ok(isLoopback(address), address);
  }
  for (const address of ['10.0.0.1', '192.168.1.2', 'fe80::1', '::ffff:10.0.0.1', '', 'localhost', '::']) tt.notOk(isLoopback(address), address || '(empty)');
});

t.test('from another address, secrets travel only inside TLS', async (tt) => {
  // A namespace of the test's own with an address that is not loopback (on a veth made inside it): the agent listens
  // on all its interfaces, and clients in the same namespace reach it from 10.66.0.1, as a phone on the LAN would.
  const ns = `h1trust-${process.pid}`;
  const address = '10.66.0.1';
  const dataDir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-trust-ns-'));
  await chmod(dataDir, 0o755);
  let child: ChildProcess | undefined;
  tt.teardown(async () => {
    if (child && child.exitCode === null) {
      child.kill('SIGTERM');
      await new Promise((r) => child!.once('exit', r));
    }
    await run('ip', ['netns', 'del', ns]).catch(() => {});
    await destroyDomainsUnder(dataDir);
    await rm(dataDir, { recursive: true, force: true });
  });
  await run('ip', ['netns', 'add', ns]);
  await run('ip', ['-n', ns, 'link', 'add', 'h1a', 'type', 'veth', 'peer', 'name', 'h1b']);
  await run('ip', ['-n', ns, 'addr', 'add', `${address}/24`, 'dev', 'h1a']);
  for (const link of ['lo', 'h1a', 'h1b']) await run('ip', ['-n', ns, 'link', 'set', link, 'up']);
  child = spawn('nsenter', [`--net=/run/netns/${ns}`, process.execPath, AGENT_MAIN], {
    env: {
      ...process.env,
      CLOUDLET_PORT: '9999',
      CLOUDLET_TLS_PORT: '9443',
      CLOUDLET_API_HOST: '0.0.0.0',
      CLOUDLET_DATA_DIR: dataDir,
      CLOUDLET_FORWARD_ADDRESS: '127.0.0.1',
      CLOUDLET_PORT_RANGE: '22650-22659',
      CLOUDLET_SEED_DIR: '',
      CLOUDLET_DISCOVERY: 'off',
      CLOUDLET_CONFIG: path.join(ROOT, 'test', 'support', 'no-config.json'),
      CLOUDLET_MQTT_HOST: '127.0.0.1',
      CLOUDLET_MQTT_PORT: '0',
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the agent did not start: ${log}`)), 20_000);
    const collect = (chunk: Buffer) => {
      log += chunk.toString();
      if (/listening on \S+ after/.test(log)) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout!.on('data', collect);
    child.stderr!.on('data', collect);
    child.once('exit', (code) => reject(new Error(`the agent exited with ${code}: ${log}`)));
  });
  const adminToken = (await readFile(path.join(dataDir, 'trust', 'admin-token'), 'utf8')).trim();
  /** curl in the namespace: `http://host:9999` or (-k: pinning is tested above) `https://host:9443`. */
  const curl = async (url: string, options: { token?: string; body?: unknown } = {}) => {
    const args = [
      '--net=/run/netns/' + ns,
      'curl',
      '-sk',
      '-o',
      '-',
      '-w',
      '\n%{http_code}',
      url,
      ...(options.token ? ['-H', `Authorization: Bearer ${options.token}`] : []),
      ...(options.body ? ['-H', 'Content-Type: application/json', '--data', JSON.stringify(options.body)] : []),
    ];
    const { stdout } = await run('nsenter', args);
    const at = stdout.lastIndexOf('\n');
    const text = stdout.slice(0, at);
    return { status: Number(stdout.slice(at + 1)), json: text ? JSON.parse(text) : undefined };
  };
  const plain = `http://${address}:9999`;
  const secure = `https://${address}:9443`;

  tt.equal((await curl(`${plain}/v1/health`)).status, 200, 'open routes answer over plain HTTP');
  const window = await curl('http://127.0.0.1:9999/v1/pairing', { token: adminToken, body: {} });
  tt.equal(window.status, 201, 'the operator opens a window on the box (loopback, plain)');
  const overPlain = await curl(`${plain}/v1/pairing/claim`, { body: { code: window.json.code, name: 'lan phone' } });
  tt.match(overPlain, { status: 403, json: { code: 'TLS_REQUIRED' } }, 'a pairing code over plain HTTP from the LAN is refused');
  const claim = await curl(`${secure}/v1/pairing/claim`, { body: { code: window.json.code, name: 'lan phone' } });
  tt.equal(claim.status, 201, 'the same code over HTTPS pairs (refusing it in clear did not use it up)');
  const token = claim.json.token as string;
  tt.match(await curl(`${plain}/v1/instances`, { token }), { status: 403, json: { code: 'TLS_REQUIRED' } }, 'a device token over plain HTTP from the LAN');
  tt.equal((await curl(`${secure}/v1/instances`, { token })).status, 200, 'the device token over HTTPS');
  tt.match(
    await curl(`${secure}/v1/devices`, { token: adminToken }),
    { status: 403, json: { code: 'ADMIN_ONLY' } },
    'the admin token from another address, even over HTTPS',
  );
  tt.match(await curl(`${secure}/v1/instances`), { status: 401, json: { code: 'UNAUTHENTICATED' } }, 'no credential over HTTPS');
});
