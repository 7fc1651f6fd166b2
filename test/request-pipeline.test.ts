// The request pipeline on its own, without uWS: plain Incoming requests through faces built for the test, answered
// into a recording Exchange (the transport's side), with the real access gate over a real device registry and the
// real rate limiter on a clock the test moves. What each request resolves to, who may call, one credential check
// per request, the rate, and how a file reply's Range is settled.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import t from 'tap';
import { RequestPipeline, type Exchange, type Incoming, type OpenedFile } from '../agent/src/api/request-pipeline';
import { fileReply, jsonReply, textReply, type Face, type Reply } from '../agent/src/api/routing';
import { TokenGate, type AccessGate } from '../agent/src/trust/access';
import { DeviceRegistry } from '../agent/src/trust/devices';
import { RateLimiter } from '../agent/src/trust/rate-limit';

const ADMIN_TOKEN = 'admin-token-for-the-pipeline-test';
const FILE_BYTES = '0123456789';
const ETAG = '"v1"';

let dataDir: string;
let devices: DeviceRegistry;
let deviceToken: string;
let filePath: string;
let emptyPath: string;

t.before(async () => {
  dataDir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-request-pipeline-'));
  devices = await DeviceRegistry.open(dataDir);
  ({ token: deviceToken } = await devices.add({ name: 'phone', id: 'phone-1' }));
  filePath = path.join(dataDir, 'ten-bytes');
  emptyPath = path.join(dataDir, 'empty');
  await writeFile(filePath, FILE_BYTES);
  await writeFile(emptyPath, '');
});
t.teardown(() => rm(dataDir, { recursive: true, force: true }));

/** The real gate, counting the calls made on it. */
class CountingGate implements AccessGate {
  calls = 0;
  private readonly gate = new TokenGate(devices, ADMIN_TOKEN);

  identify(...args: Parameters<AccessGate['identify']>) {
    this.calls++;
    return this.gate.identify(...args);
  }
}

/** A route answers with who called it and what it was given, so tests can see what the pipeline resolved. */
const echo =
  (name: string) =>
  (request: { caller: unknown; params: unknown; body: unknown; method: string }): Reply =>
    jsonReply(200, { route: name, caller: request.caller, params: request.params, body: request.body, method: request.method });

const ownFace: Face = {
  prefix: '/v1',
  headAsGet: false,
  wrongMethod: 'method-not-allowed',
  routes: [
    { method: 'GET', path: '/v1/open', access: 'open', handle: echo('open') },
    { method: 'GET', path: '/v1/mine', access: 'device', handle: echo('mine') },
    { method: 'POST', path: '/v1/admin', access: 'admin', jsonBody: true, handle: echo('admin') },
    { method: 'GET', path: '/v1/things/:id', access: 'open', handle: echo('thing') },
    { method: 'DELETE', path: '/v1/things/:id', access: 'open', handle: echo('thing deleted') },
    { method: 'GET', path: '/v1/file', access: 'open', handle: () => fileReply(filePath, { ETag: ETAG }, true) },
    { method: 'GET', path: '/v1/empty', access: 'open', handle: () => fileReply(emptyPath, {}, true) },
    { method: 'GET', path: '/v1/whole-file', access: 'open', handle: () => fileReply(filePath, {}, false) },
  ],
  errorReply: (error) => jsonReply(error.status, error.toJSON()),
};
const kdFace: Face = {
  prefix: '/api',
  headAsGet: true,
  wrongMethod: 'not-found',
  routes: [{ method: 'GET', path: '/api/services', access: 'open', handle: echo('kd services') }],
  errorReply: (error) => textReply(error.status, `kd: ${error.message}`),
};
const pageFace: Face = {
  prefix: '/ui',
  headAsGet: false,
  wrongMethod: 'not-found',
  routes: [{ method: 'GET', path: '/', access: 'open', handle: () => textReply(200, 'the page') }],
  errorReply: (error) => textReply(error.status, `page: ${error.message}`),
};

interface Answer {
  status: number | 'aborted';
  reply: Reply;
  /** A file reply's bytes, as the transport would stream them. */
  sent?: string;
}

/** The transport's side of one request, recording the answer. */
class RecordingExchange implements Exchange {
  reply: Reply | undefined;
  sent: string | undefined;

  constructor(private readonly body: string) {}

  async readBody(): Promise<Buffer> {
    return Buffer.from(this.body);
  }

  streamBody(): { stream: Readable; length: number } {
    return { stream: Readable.from([Buffer.from(this.body)]), length: Buffer.byteLength(this.body) };
  }

  send(reply: Reply): boolean {
    this.reply = reply;
    return true;
  }

  async sendFile(reply: Reply, file: OpenedFile): Promise<boolean> {
    const bytes = Buffer.alloc(file.length);
    await file.handle.read(bytes, 0, file.length, file.start);
    await file.handle.close();
    this.reply = reply;
    this.sent = bytes.toString();
    return true;
  }
}

interface Request {
  method?: string;
  url: string;
  headers?: Record<string, string>;
  token?: string;
  body?: string;
  remoteAddress?: string;
  secure?: boolean;
}

function pipelineWith(gate: AccessGate, limiter: RateLimiter | null = null, kd: Face | null = kdFace): RequestPipeline {
  return new RequestPipeline({ kd, page: pageFace, own: ownFace }, { gate, limiter, maxBodyBytes: 1024, log: () => {} });
}

async function serve(pipeline: RequestPipeline, request: Request): Promise<Answer> {
  const [urlPath, query = ''] = request.url.split('?');
  const headers = new Map(Object.entries(request.headers ?? {}).map(([name, value]) => [name.toLowerCase(), value]));
  if (request.token !== undefined) headers.set('authorization', `Bearer ${request.token}`);
  const incoming: Incoming = {
    method: request.method ?? 'GET',
    url: request.url,
    path: urlPath!,
    query,
    headers,
    remoteAddress: request.remoteAddress ?? '127.0.0.1',
    secure: request.secure ?? false,
  };
  const exchange = new RecordingExchange(request.body ?? '');
  const status = await pipeline.serve(incoming, exchange);
  return { status, reply: exchange.reply!, ...(exchange.sent === undefined ? {} : { sent: exchange.sent }) };
}

const bodyOf = (answer: Answer) => JSON.parse(answer.reply.body);

t.test('route resolution', async (t) => {
  const pipeline = pipelineWith(new CountingGate());

  t.test('a route of the face that owns the path answers, with its path parameters decoded', async (t) => {
    const answer = await serve(pipeline, { url: '/v1/things/a%20b' });
    t.equal(answer.status, 200);
    t.match(bodyOf(answer), { route: 'thing', params: { id: 'a b' } });
    t.match(bodyOf(await serve(pipeline, { method: 'DELETE', url: '/v1/things/x' })), { route: 'thing deleted' });
  });

  t.test('an unknown path is 404 NOT_FOUND, and a known path with another method 405 naming the allowed ones', async (t) => {
    const unknown = await serve(pipeline, { url: '/v1/nope' });
    t.equal(unknown.status, 404);
    t.equal(bodyOf(unknown).code, 'NOT_FOUND');
    const wrong = await serve(pipeline, { method: 'POST', url: '/v1/things/x' });
    t.equal(wrong.status, 405);
    t.match(bodyOf(wrong), { code: 'METHOD_NOT_ALLOWED', details: { allowed: ['GET', 'DELETE'] } });
  });

  t.test('malformed percent-encoding in a parameter is 400 BAD_REQUEST', async (t) => {
    t.equal((await serve(pipeline, { url: '/v1/things/%E0%A4%A' })).status, 400);
  });

  t.test('the KD face answers HEAD with its GET route and a wrong method 404, in its own error format', async (t) => {
    t.match(bodyOf(await serve(pipeline, { method: 'HEAD', url: '/api/services' })), { route: 'kd services', method: 'HEAD' });
    const wrong = await serve(pipeline, { method: 'POST', url: '/api/services' });
    t.equal(wrong.status, 404);
    t.match(wrong.reply.body, /^kd: /);
  });

  t.test('with the KD face off, /api paths are unknown paths of our own face', async (t) => {
    const answer = await serve(pipelineWith(new CountingGate(), null, null), { url: '/api/services' });
    t.equal(answer.status, 404);
    t.equal(bodyOf(answer).code, 'NOT_FOUND');
  });

  t.test('the page owns `/` and its prefix; a path under no prefix gets our own face JSON 404', async (t) => {
    t.equal((await serve(pipeline, { url: '/' })).reply.body, 'the page');
    t.match((await serve(pipeline, { url: '/ui/missing' })).reply.body, /^page: /);
    t.equal(bodyOf(await serve(pipeline, { url: '/elsewhere' })).code, 'NOT_FOUND');
  });

  t.test('a malformed JSON body is 400 BAD_REQUEST', async (t) => {
    const answer = await serve(pipeline, { method: 'POST', url: '/v1/admin', token: ADMIN_TOKEN, body: '{"no' });
    t.equal(answer.status, 400);
    t.match(bodyOf(answer), { code: 'BAD_REQUEST', message: /^Malformed JSON body/ });
  });
});

t.test('access levels', async (t) => {
  const pipeline = pipelineWith(new CountingGate());
  const callerOf = async (request: Request) => bodyOf(await serve(pipeline, request)).caller;

  t.test('open: anyone, named by a valid credential, anonymous with none or a wrong one', async (t) => {
    t.same(await callerOf({ url: '/v1/open' }), { kind: 'anonymous' });
    t.same(await callerOf({ url: '/v1/open', token: 'wrong' }), { kind: 'anonymous' });
    t.match(await callerOf({ url: '/v1/open', token: deviceToken }), { kind: 'device', device: { id: 'phone-1' } });
    t.same(await callerOf({ url: '/v1/open', token: ADMIN_TOKEN }), { kind: 'admin' });
  });

  t.test('open: a credential sent in clear from another machine is refused all the same (TLS_REQUIRED)', async (t) => {
    const answer = await serve(pipeline, { url: '/v1/open', token: deviceToken, remoteAddress: '192.0.2.9' });
    t.equal(answer.status, 403);
    t.equal(bodyOf(answer).code, 'TLS_REQUIRED');
    t.match(await callerOf({ url: '/v1/open', token: deviceToken, remoteAddress: '192.0.2.9', secure: true }), { kind: 'device' });
  });

  t.test('device: a paired device or the admin; none is 401 with how to authenticate', async (t) => {
    t.match(await callerOf({ url: '/v1/mine', token: deviceToken }), { kind: 'device' });
    t.same(await callerOf({ url: '/v1/mine', token: ADMIN_TOKEN }), { kind: 'admin' });
    const none = await serve(pipeline, { url: '/v1/mine' });
    t.equal(none.status, 401);
    t.equal(none.reply.headers['WWW-Authenticate'], 'Bearer realm="cloudlet"');
    const wrong = await serve(pipeline, { url: '/v1/mine', token: 'wrong' });
    t.equal(wrong.status, 401);
    t.equal(bodyOf(wrong).code, 'UNAUTHENTICATED');
  });

  t.test('admin: the admin credential from loopback only; a device is 403 ADMIN_ONLY', async (t) => {
    const admin = await serve(pipeline, { method: 'POST', url: '/v1/admin', token: ADMIN_TOKEN, body: '{"a":1}' });
    t.match(bodyOf(admin), { caller: { kind: 'admin' }, body: { a: 1 } });
    const device = await serve(pipeline, { method: 'POST', url: '/v1/admin', token: deviceToken, body: '{}' });
    t.equal(device.status, 403);
    t.equal(bodyOf(device).code, 'ADMIN_ONLY');
    const remote = await serve(pipeline, { method: 'POST', url: '/v1/admin', token: ADMIN_TOKEN, body: '{}', remoteAddress: '192.0.2.9', secure: true });
    t.equal(bodyOf(remote).code, 'ADMIN_ONLY');
    t.equal(bodyOf(await serve(pipeline, { method: 'POST', url: '/v1/admin', body: '{}' })).code, 'UNAUTHENTICATED');
  });
});

t.test('each request is one call on the gate, whatever its route, credential and outcome', async (t) => {
  const gate = new CountingGate();
  const limiter = new RateLimiter({ perSecond: 1000, burst: 1000 });
  const pipeline = pipelineWith(gate, limiter);
  const requests: Request[] = [
    { url: '/v1/open' },
    { url: '/v1/open', token: deviceToken },
    { url: '/v1/open', token: 'wrong' },
    { url: '/v1/mine' },
    { url: '/v1/mine', token: deviceToken },
    { url: '/v1/mine', token: 'wrong' },
    { method: 'POST', url: '/v1/admin', token: ADMIN_TOKEN, body: '{}' },
    { method: 'POST', url: '/v1/admin', token: deviceToken, body: '{}' },
    { url: '/v1/open', token: deviceToken, remoteAddress: '192.0.2.9' },
  ];
  for (const request of requests) {
    const before = gate.calls;
    await serve(pipeline, request);
    t.equal(gate.calls - before, 1, `${request.method ?? 'GET'} ${request.url} with ${request.token === undefined ? 'no credential' : 'a credential'}`);
  }
  const before = gate.calls;
  await serve(pipeline, { url: '/v1/nope', token: deviceToken });
  t.equal(gate.calls, before, 'an unknown route asks no one');
});

t.test('rate limit', async (t) => {
  let now = 0;
  const limiter = new RateLimiter({ perSecond: 1, burst: 2 }, () => now);
  const pipeline = pipelineWith(new CountingGate(), limiter);

  t.test('an address past its bucket is 429 RATE_LIMITED with Retry-After, wrong credentials drawing on it too', async (t) => {
    t.equal((await serve(pipeline, { url: '/v1/open', remoteAddress: '10.0.0.7' })).status, 200);
    t.equal((await serve(pipeline, { url: '/v1/mine', token: 'wrong', remoteAddress: '10.0.0.7', secure: true })).status, 401);
    const limited = await serve(pipeline, { url: '/v1/open', remoteAddress: '10.0.0.7' });
    t.equal(limited.status, 429);
    t.equal(bodyOf(limited).code, 'RATE_LIMITED');
    t.equal(limited.reply.headers['Retry-After'], '1');
    t.equal((await serve(pipeline, { url: '/v1/open', remoteAddress: '10.0.0.8' })).status, 200, 'another address has its own bucket');
    now += 1000;
    t.equal((await serve(pipeline, { url: '/v1/open', remoteAddress: '10.0.0.7' })).status, 200, 'a token is back a second later');
  });

  t.test('a paired device draws on its own bucket, wherever it calls from; the admin on the box is not limited', async (t) => {
    const device = { url: '/v1/mine', token: deviceToken, remoteAddress: '10.0.0.7', secure: true };
    t.equal((await serve(pipeline, device)).status, 200, 'served while its address is out of tokens');
    t.equal((await serve(pipeline, { ...device, remoteAddress: '10.0.0.9' })).status, 200);
    t.equal((await serve(pipeline, device)).status, 429);
    for (let i = 0; i < 5; i++) t.equal((await serve(pipeline, { url: '/v1/mine', token: ADMIN_TOKEN })).status, 200);
  });
});

t.test('Range on a file reply', async (t) => {
  const pipeline = pipelineWith(new CountingGate());
  const get = (range: string | undefined, headers: Record<string, string> = {}, url = '/v1/file') =>
    serve(pipeline, { url, headers: { ...headers, ...(range === undefined ? {} : { Range: range }) } });

  t.test('no Range: the whole file, announcing that ranges are accepted', async (t) => {
    const answer = await get(undefined);
    t.equal(answer.status, 200);
    t.equal(answer.sent, FILE_BYTES);
    t.equal(answer.reply.headers['Accept-Ranges'], 'bytes');
    t.equal(answer.reply.headers.ETag, ETAG);
  });

  t.test('bytes=a-b, a- and -n are 206 with that part and its Content-Range', async (t) => {
    for (const [range, part, contentRange] of [
      ['bytes=2-5', '2345', 'bytes 2-5/10'],
      ['bytes=7-', '789', 'bytes 7-9/10'],
      ['bytes=-3', '789', 'bytes 7-9/10'],
      ['bytes=5-100', '56789', 'bytes 5-9/10'],
      ['bytes=-20', FILE_BYTES, 'bytes 0-9/10'],
      [' bytes=0-0 ', '0', 'bytes 0-0/10'],
    ] as const) {
      const answer = await get(range);
      t.equal(answer.status, 206, range);
      t.equal(answer.sent, part, range);
      t.equal(answer.reply.headers['Content-Range'], contentRange, range);
    }
  });

  t.test('a range outside the file is 416 with the size, and nothing is sent', async (t) => {
    for (const range of ['bytes=10-', 'bytes=5-2', 'bytes=10-20']) {
      const answer = await get(range);
      t.equal(answer.status, 416, range);
      t.equal(answer.sent, undefined);
      t.same(answer.reply.headers, { 'Accept-Ranges': 'bytes', 'Content-Range': 'bytes */10' });
    }
    t.equal((await get('bytes=0-', {}, '/v1/empty')).status, 416, 'any range of an empty file');
  });

  t.test('several ranges, an empty or unreadable one, or a stale If-Range: the whole file (200)', async (t) => {
    for (const [range, headers] of [
      ['bytes=0-1,4-5', {}],
      ['bytes=-', {}],
      ['items=0-1', {}],
      ['bytes=2-5', { 'If-Range': '"v0"' }],
    ] as const) {
      const answer = await get(range, headers);
      t.equal(answer.status, 200, `${range} ${JSON.stringify(headers)}`);
      t.equal(answer.sent, FILE_BYTES);
    }
    t.equal((await get('bytes=2-5', { 'If-Range': ETAG })).status, 206, 'an If-Range naming the ETag keeps the range');
  });

  t.test('a route that does not offer ranges ignores Range and does not announce them', async (t) => {
    const answer = await get('bytes=2-5', {}, '/v1/whole-file');
    t.equal(answer.status, 200);
    t.equal(answer.sent, FILE_BYTES);
    t.equal(answer.reply.headers['Accept-Ranges'], undefined);
  });
});
