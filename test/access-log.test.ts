/**
 * What the HTTP access log writes, at which level: at `info` (a box's default, the journal) a request answered is
 * counted, not written; a refusal or failure and a client that left are written one by one (up to a bound per
 * minute, the rest counted); a summary line counts each minute's requests. At `debug` every request is written.
 * Checked through the real uWS server (in-test CloudletApi) and on the AccessLog itself.
 */
import t from 'tap';
import { startHttpServer } from '../agent/src/api/http-server';
import { AccessLog, REFUSAL_LINES } from '../agent/src/api/access-log';
import { FakeCloudlet, OPERATOR, request } from './support/http-fixture';

async function serverLogging(level: 'info' | 'debug' | undefined) {
  const lines: string[] = [];
  const server = await startHttpServer({
    api: new FakeCloudlet(),
    gate: OPERATOR,
    host: '127.0.0.1',
    port: 0,
    logger: (line) => lines.push(line),
    ...(level ? { accessLogLevel: level } : {}),
  });
  return { lines, server };
}

t.test('at info (the default), answered requests are not written one by one; refusals are, with their status', async (t) => {
  const { lines, server } = await serverLogging(undefined);
  t.teardown(() => server.close());
  t.equal((await request(server.port, 'GET', '/api/services')).status, 200);
  t.equal((await request(server.port, 'GET', '/v1/nothing-here')).status, 404);
  // The refusal's line is written when its answer is, so it is there once the client has the answer.
  t.ok(
    lines.some((line) => /^GET \/v1\/nothing-here 404 \d+ms$/.test(line)),
    'the refusal is written',
  );
  t.notOk(
    lines.some((line) => line.startsWith('GET /api/services')),
    'the answered request is not',
  );
});

t.test('at debug, every request is written', async (t) => {
  const { lines, server } = await serverLogging('debug');
  t.teardown(() => server.close());
  t.equal((await request(server.port, 'GET', '/api/services')).status, 200);
  t.ok(
    lines.some((line) => /^GET \/api\/services 200 \d+ms$/.test(line)),
    'the answered request is written',
  );
});

t.test('the summary counts what was served; refusals past the bound are counted, not written', async (t) => {
  const lines: string[] = [];
  const log = new AccessLog((line) => lines.push(line), 'info');
  t.teardown(() => log.close());
  for (let i = 0; i < 5; i++) log.record('GET', '/v1/instances', 200, 1);
  for (let i = 0; i < REFUSAL_LINES + 20; i++) log.record('GET', '/v1/instances', 429, 0);
  log.record('GET', '/v1/system', 500, 3);
  log.record('POST', '/v1/services', 'aborted', 9);
  t.equal(lines.length, REFUSAL_LINES, 'only the first refusals of the window are written');
  log.summarize();
  t.equal(
    lines.at(-1),
    `${5 + REFUSAL_LINES + 22} requests in the last 60 s: 5 answered, ${REFUSAL_LINES + 20} refused (4xx), 1 failed (5xx), 1 left before the answer; 22 refusals not written one by one`,
  );
  log.summarize();
  t.equal(lines.length, REFUSAL_LINES + 1, 'a window with no request writes nothing');
  log.record('GET', '/v1/system', 503, 2);
  t.match(lines.at(-1), /^GET \/v1\/system 503 2ms$/, 'a new window writes refusals again');
});
