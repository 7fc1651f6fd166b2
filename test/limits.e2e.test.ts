// Limits everywhere, end to end on one real agent configured with small limits: request body and upload sizes,
// launches in flight (real QEMU guests), per-client request rates, and clients that stall mid-request. The test
// helper's requests carry the admin token, which is not rate limited; the rate subtests send as anonymous clients
// and as a paired device.
import { readdir } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import t from 'tap';
import WebSocket from 'ws';
import { AgentProcess, adminHeaders, domainsUnder, request, testGuestDir, type HttpResult } from './support/agent';

const SERVICE = 'org.cloudlet.demo.http';
const BODY_LIMIT = 2048;
const PACKAGE_LIMIT = 4096;
const APP_LIMIT = 4096;
const BURST = 5;
const BODY_IDLE_MS = 1000;

let agent: AgentProcess;

t.before(async () => {
  agent = await AgentProcess.start({
    portRange: '22700-22739',
    env: {
      CLOUDLET_MAX_BODY_BYTES: String(BODY_LIMIT),
      CLOUDLET_PACKAGE_MAX_BYTES: String(PACKAGE_LIMIT),
      CLOUDLET_APP_MAX_BYTES: String(APP_LIMIT),
      CLOUDLET_MAX_LAUNCHES: '1',
      CLOUDLET_LAUNCH_QUEUE: '1',
      CLOUDLET_RATE_PER_SECOND: '1',
      CLOUDLET_RATE_BURST: String(BURST),
      CLOUDLET_BODY_IDLE_MS: String(BODY_IDLE_MS),
    },
  });
  const imported = await agent.post('/v1/services', { path: testGuestDir() });
  if (imported.status !== 201) throw new Error(`import failed: ${imported.body}`);
});
t.teardown(() => agent?.dispose());

const staging = () => readdir(path.join(agent.dataDir, 'tmp')).catch(() => []);
const anonymous = { authorization: '' };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

t.test('bodies and uploads over their limits are refused with 413 PAYLOAD_TOO_LARGE before they are stored', async (tt) => {
  const json = await agent.post('/v1/instances', { service_id: SERVICE, padding: 'x'.repeat(BODY_LIMIT) });
  tt.equal(json.status, 413, 'a JSON body over limits.jsonBodyBytes');
  tt.match(json.json, { code: 'PAYLOAD_TOO_LARGE', details: { limit: BODY_LIMIT } });

  const tarball = await request(agent.apiPort, 'POST', '/v1/packages', Buffer.alloc(PACKAGE_LIMIT + 1), { 'content-type': 'application/gzip' });
  tt.equal(tarball.status, 413, 'a package over packages.maxUploadBytes');
  tt.match(tarball.json, { code: 'PAYLOAD_TOO_LARGE', details: { limit: PACKAGE_LIMIT } });

  const app = await request(agent.apiPort, 'POST', `/v1/apps?service_id=${SERVICE}&name=Big&file_name=big.apk`, Buffer.alloc(APP_LIMIT + 1), {
    'content-type': 'application/octet-stream',
  });
  tt.equal(app.status, 413, 'an app over apps.maxUploadBytes');
  tt.match(app.json, { code: 'PAYLOAD_TOO_LARGE', details: { limit: APP_LIMIT } });

  const overlay = await agent.post('/v1/synthesis/uploads', { bytes: 2 ** 50 });
  tt.equal(overlay.status, 413, 'an overlay upload announcing more than the overlay limit');
  tt.same(await staging(), [], 'nothing was written to the staging area');
});

t.test('launches beyond limits.concurrentLaunches wait in order; beyond the queue they get 503 BUSY with Retry-After', async (tt) => {
  const start = () => agent.post('/v1/instances', { service_id: SERVICE, join: false });
  const first = start();
  await sleep(100);
  const second = start();
  await sleep(100);
  const third = await start();
  tt.equal(third.status, 503, 'one running, one waiting: the third is refused at once');
  tt.match(third.json, { code: 'BUSY', details: { retry_after_s: Number } });
  tt.equal(third.headers['retry-after'], String(third.json.details.retry_after_s), 'Retry-After says when to come back');

  const [a, b] = await Promise.all([first, second]);
  tt.equal(a.status, 201, 'the first started');
  tt.equal(b.status, 201, 'the waiting one started after it');
  tt.ok(Date.parse(b.json.instance.created_at) >= Date.parse(a.json.instance.ready_at), 'the second launch began only when the first was ready');
  for (const started of [a, b]) await agent.delete(`/v1/instances/${started.json.instance.id}`);
  tt.same(await domainsUnder(agent.dataDir), [], 'both are stopped');
});

async function drain(send: () => Promise<HttpResult>): Promise<HttpResult[]> {
  const replies: HttpResult[] = [];
  for (let i = 0; i < BURST + 1; i++) replies.push(await send());
  return replies;
}

t.test('each client has its own request bucket: past the burst, 429 RATE_LIMITED with Retry-After', async (tt) => {
  await sleep(BURST * 1000); // any bucket a former subtest used is full again
  const open = await drain(() => agent.get('/v1/health', anonymous));
  tt.same(
    open.slice(0, BURST).map((r) => r.status),
    Array(BURST).fill(200),
    'an anonymous client gets its burst',
  );
  tt.equal(open[BURST]!.status, 429, 'then 429');
  tt.match(open[BURST]!.json, { code: 'RATE_LIMITED', details: { retry_after_s: Number } });
  tt.ok(Number(open[BURST]!.headers['retry-after']) >= 1, 'with Retry-After');

  const kd = await agent.get('/api/services', anonymous);
  tt.equal(kd.status, 429, "the KD face shares the address's bucket");
  tt.match(kd.body, /^429 Too Many Requests/, "answered in the KD face's text form");
  const guessed = await agent.get('/v1/instances', { authorization: 'Bearer cld_guessed' });
  tt.equal(guessed.status, 429, "a failing credential draws on the address's bucket too (guessing tokens is throttled)");
  tt.equal(await upgradeStatus('/v1/events', { authorization: 'Bearer cld_guessed' }), 429, 'so does a /v1/events WebSocket upgrade');
  tt.equal(await upgradeStatus('/mqtt', {}, 'mqtt'), 429, 'and an MQTT-over-WebSocket upgrade');
  tt.equal(await tcpFate(agent.mqttPort), 'dropped', 'and an MQTT connection over TCP, which is dropped unanswered');

  const window = await agent.post('/v1/pairing', {});
  const claim = await agent.post('/v1/pairing/claim', { code: window.json.code, device_id: 'phone-rate', name: 'Rate phone' });
  const device = { authorization: `Bearer ${claim.json.token}` };
  const own = await drain(() => agent.get('/v1/instances', device));
  tt.same(
    own.slice(0, BURST).map((r) => r.status),
    Array(BURST).fill(200),
    "a paired device has its own bucket, apart from its address's",
  );
  tt.equal(own[BURST]!.status, 429);

  const admin = await Promise.all(Array.from({ length: 3 * BURST }, () => agent.get('/v1/health', adminHeaders(agent.apiPort))));
  tt.same(
    admin.map((r) => r.status),
    Array(3 * BURST).fill(200),
    'the operator (admin token) is not limited',
  );

  await sleep(1100);
  tt.equal((await agent.get('/v1/health', anonymous)).status, 200, 'a token comes back each second');
});

/** The HTTP status a WebSocket upgrade on `path` is answered with (101 when it opens). */
function upgradeStatus(path: string, headers: Record<string, string>, protocol?: string): Promise<number> {
  return new Promise((resolve) => {
    const socket = new WebSocket(`ws://127.0.0.1:${agent.apiPort}${path}`, protocol ? [protocol] : [], { headers });
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
}

/** Whether a TCP connection to `port` is dropped at once or still open after 2 s. */
function tcpFate(port: number): Promise<'dropped' | 'open'> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    const timer = setTimeout(() => {
      resolve('open');
      socket.destroy();
    }, 2000);
    socket.on('error', () => {});
    socket.on('close', () => {
      clearTimeout(timer);
      resolve('dropped');
    });
  });
}

/** Opens a raw connection, sends `head` and part of a body, then nothing; resolves with what came back and when. */
function stall(head: string, partialBody: Buffer): Promise<{ reply: string; closedAfterMs: number }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(agent.apiPort, '127.0.0.1');
    const started = Date.now();
    let reply = '';
    socket.on('connect', () => socket.write(Buffer.concat([Buffer.from(head), partialBody])));
    socket.on('data', (chunk) => (reply += chunk.toString()));
    socket.on('error', () => {});
    socket.on('close', () => resolve({ reply, closedAfterMs: Date.now() - started }));
    setTimeout(() => reject(new Error(`the agent kept a stalled connection open for 20 s; got ${JSON.stringify(reply)}`)), 20000).unref();
  });
}

t.test('a request whose body stalls is answered 408 and closed, its partial upload discarded; others are served meanwhile', async (tt) => {
  const auth = adminHeaders(agent.apiPort).authorization!;
  const upload = stall(
    `POST /v1/packages HTTP/1.1\r\nHost: x\r\nAuthorization: ${auth}\r\nContent-Type: application/gzip\r\nContent-Length: ${PACKAGE_LIMIT}\r\n\r\n`,
    Buffer.alloc(1000),
  );
  const json = stall(
    `POST /v1/instances HTTP/1.1\r\nHost: x\r\nAuthorization: ${auth}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n`,
    Buffer.from('{"service_id":'),
  );
  // Headers that never end: uWS's own idle timeout (about 10 s) closes those; the agent never sees a request.
  const headers = stall('GET /v1/health HTTP/1.1\r\nHost: x\r\n', Buffer.alloc(0));
  await sleep(200);
  tt.ok((await staging()).length > 0, 'the upload is being received into the staging area');
  tt.equal((await agent.get('/v1/health')).status, 200, 'the agent answers others while they stall');

  const [stalledUpload, stalledJson] = await Promise.all([upload, json]);
  for (const [what, stalled] of [
    ['the upload', stalledUpload],
    ['the JSON body', stalledJson],
  ] as const) {
    tt.match(stalled.reply, /^HTTP\/1\.1 408 /, `${what}: 408`);
    tt.match(stalled.reply, /"code":"REQUEST_TIMEOUT"/, `${what}: REQUEST_TIMEOUT`);
    tt.ok(
      stalled.closedAfterMs >= BODY_IDLE_MS && stalled.closedAfterMs < BODY_IDLE_MS + 3000,
      `${what}: cut after about limits.bodyIdleMs (${stalled.closedAfterMs} ms)`,
    );
  }
  tt.same(await staging(), [], 'the partial upload is gone from the staging area');
  const unfinished = await headers;
  tt.equal(unfinished.reply, '', 'unfinished headers get no answer');
  tt.ok(unfinished.closedAfterMs < 16000, `and are cut by uWS (${unfinished.closedAfterMs} ms)`);
  tt.equal((await agent.get('/v1/health')).status, 200, 'the agent still serves');
});
