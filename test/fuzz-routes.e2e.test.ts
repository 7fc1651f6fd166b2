// Every route of the real route tables (the /v1 face with provisioning and synthesis, the KD-Cloudlet face, the phone
// page), the WebSocket endpoints and unknown paths, each fuzzed with FUZZ_REQUESTS (default 1000) malformed requests
// over raw keep-alive sockets: the agent never answers 5xx, every /v1 error is `{code, message}` with a known code,
// it stays up, and afterwards it holds no more descriptors, files, VMs or child processes than before.
// A failure names the seed, the target and the request index: FUZZ_SEED=<seed> replays the same requests.
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import { kdCloudletFace } from '../agent/src/api/kd-cloudlet';
import { v1Face } from '../agent/src/api/v1';
import { webFace } from '../agent/src/api/web';
import type { CloudletApi, ProvisioningApi } from '../agent/src/core/types';
import { CloudletError, type ErrorCode } from '../agent/src/errors';
import { AgentProcess, domainsUnder } from './support/agent';
import { fuzzRequest, plainRequest, type FuzzRequest, type FuzzTarget } from './support/http-fuzz';
import { RawConnection } from './support/raw-connection';

const SEED = Number(process.env.FUZZ_SEED ?? Math.floor(Math.random() * 2 ** 31));
const PER_TARGET = Number(process.env.FUZZ_REQUESTS ?? 1000);
/**
 * Connections sending at once. Much of a run is waiting (requests uWS sits on are given up after GIVE_UP_MS), so more
 * connections go faster: measured here 8: ~900/s, 24: ~2400/s, 48: ~4300/s, 96: ~6400/s on an idle 2-core box.
 */
const CONCURRENCY = Number(process.env.FUZZ_CONCURRENCY ?? 48);
/**
 * A body shorter than its Content-Length is waited for, and uWS may sit on a request line it cannot parse until its
 * idle timeout: after this long the client gives up (both are fine: nothing is answered wrongly, nothing crashes).
 */
const GIVE_UP_MS = 200;
const ANSWER_TIMEOUT_MS = 20_000;

/**
 * The route tables as the server builds them; a stub core is enough to read them (no handler runs here). A face may
 * subscribe to the core's events as it is built (the KD face's mailboxes do): that alone is answered, with nothing.
 */
function targets(): FuzzTarget[] {
  const stub = new Proxy(
    {},
    {
      get: (_, name) =>
        name === 'subscribe'
          ? () => () => undefined
          : () => {
              throw new Error('route tables only');
            },
    },
  ) as unknown as CloudletApi & ProvisioningApi;
  const routes = [v1Face(stub, stub), kdCloudletFace(stub), webFace()].flatMap((face) => face.routes);
  const fromTables: FuzzTarget[] = routes.map((route) => ({
    method: route.method,
    path: route.path,
    body: route.jsonBody ? 'json' : route.streamBody ? 'stream' : 'none',
  }));
  const sockets: FuzzTarget[] = ['/v1/events', '/mqtt'].map((p) => ({ method: 'GET', path: p, body: 'none', upgrade: true }));
  const unknown: FuzzTarget[] = ['/nope', '/v1', '/v1/', '/v1/nope/deeper', '/api', '/api/nope', '/ui', '/v2/services', '/favicon.ico'].map((p) => ({
    method: 'GET',
    path: p,
    body: 'none',
  }));
  return [...fromTables, ...sockets, ...unknown];
}

/** Requests that once got a 5xx or took the agent down, as found by earlier runs (fixed since). */
function regressions(auth: [string, string][]): FuzzRequest[] {
  const json = (body: unknown): [[string, string][], string] => [[...auth, ['Content-Type', 'application/json']], JSON.stringify(body)];
  return [
    // A directory or a device as the overlay file: EISDIR (500), or an endless read.
    plainRequest('POST', '/v1/synthesis', ...json({ path: '/' })),
    plainRequest('POST', '/v1/synthesis', ...json({ path: '/dev/zero' })),
    // Inherited Object properties taken for page assets (app kinds: test/app-catalog.test.ts, it needs a service).
    plainRequest('GET', '/ui/toString', auth),
    plainRequest('GET', '/ui/constructor', auth),
  ];
}

async function fdCount(pid: number): Promise<number> {
  return (await readdir(`/proc/${pid}/fd`)).length;
}

async function rssBytes(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) * 1024;
}

/** Child processes of the agent (zstd, tar helpers, sandboxes...) still alive. */
async function childrenOf(pid: number): Promise<string[]> {
  const children: string[] = [];
  for (const task of await readdir(`/proc/${pid}/task`)) {
    const ids = (await readFile(`/proc/${pid}/task/${task}/children`, 'utf8').catch(() => '')).trim();
    for (const id of ids ? ids.split(/\s+/) : []) children.push(`${id} ${(await readFile(`/proc/${id}/comm`, 'utf8').catch(() => '?')).trim()}`);
  }
  return children;
}

/** The error codes the agent knows: a CloudletError with any other code has no HTTP status. */
function knownCode(code: unknown, status: number): boolean {
  return typeof code === 'string' && new CloudletError(code as ErrorCode, '').status === status;
}

t.test(`every route survives ${PER_TARGET} malformed requests (seed ${SEED})`, async (tt) => {
  tt.comment(`fuzz seed ${SEED}: replay with FUZZ_SEED=${SEED}`);
  // Generous rate limits: the point is to reach the handlers, not the limiter (which answers 429, also accepted).
  const agent = await AgentProcess.start({ portRange: '25000-25049', env: { CLOUDLET_RATE_PER_SECOND: '1000000', CLOUDLET_RATE_BURST: '1000000' } });
  tt.teardown(() => agent.dispose());
  const pid = agent.pid!;
  const adminToken = await readFile(path.join(agent.dataDir, 'trust', 'admin-token'), 'utf8').then(
    (s) => s.trim(),
    () => null,
  );
  const host = `127.0.0.1:${agent.apiPort}`;
  const list = targets();

  // Warm up (lazy modules, first libvirt calls), then take the baseline.
  for (let i = 0; i < 20; i++) await agent.get('/v1/health');
  const baseline = { fds: await fdCount(pid), rss: await rssBytes(pid) };

  const failures: string[] = [];
  const counts = { sent: 0, answered: 0, closed: 0, waited: 0, rateLimited: 0, busy: 0 };
  const statuses = new Map<number, number>();
  /** Milliseconds spent per target and kind of request: where the run's time goes. */
  const timeSpent = new Map<string, number>();
  const fail = (what: string, label: string, bytes: Buffer) => {
    if (failures.length < 40) failures.push(`${what} — ${label}: ${JSON.stringify(bytes.subarray(0, 300).toString('latin1'))}`);
    else failures.push('');
  };

  // What earlier runs found, always sent first; then the seeded requests, index by index across all targets.
  const auth: [string, string][] = [['Host', host], ...(adminToken ? [['Authorization', `Bearer ${adminToken}`] as [string, string]] : [])];
  const jobs: { label: string; request: () => FuzzRequest }[] = regressions(auth).map((request, i) => ({ label: `regression #${i}`, request: () => request }));
  for (let i = 0; i < PER_TARGET; i++) {
    for (let target = 0; target < list.length; target++) {
      jobs.push({
        label: `${list[target]!.method} ${list[target]!.path} #${i} (seed ${SEED})`,
        request: () => fuzzRequest(SEED, target, list[target]!, i, host, adminToken),
      });
    }
  }
  let next = 0;
  const started = Date.now();
  const worker = async () => {
    const connection = new RawConnection(agent.apiPort);
    while (next < jobs.length) {
      const job = jobs[next++]!;
      const request = job.request();
      counts.sent++;
      const expectsAnswer = request.wellFramed && !request.waits;
      const sentAt = Date.now();
      const outcome = await connection
        .send(request.bytes, request.head, expectsAnswer ? ANSWER_TIMEOUT_MS : GIVE_UP_MS, expectsAnswer)
        .catch((err: Error) => err);
      if (outcome instanceof Error) {
        fail(`cannot connect (${outcome.message}): the agent is down`, job.label, request.bytes);
        next = jobs.length;
        break;
      }
      const spent = `${job.label.replace(/ #.*/, '')} ${request.kind}`;
      timeSpent.set(spent, (timeSpent.get(spent) ?? 0) + Date.now() - sentAt);
      if ('timedOut' in outcome) {
        if (!expectsAnswer) counts.waited++;
        else fail(`no answer within ${ANSWER_TIMEOUT_MS} ms`, job.label, request.bytes);
        continue;
      }
      if ('closed' in outcome) {
        counts.closed++;
        if (expectsAnswer) fail('connection closed without an answer', job.label, request.bytes);
        continue;
      }
      const { status, body, headers } = outcome.answer;
      counts.answered++;
      statuses.set(status, (statuses.get(status) ?? 0) + 1);
      if (status === 429) counts.rateLimited++;
      let json: { code?: unknown; message?: unknown } | undefined;
      try {
        json = JSON.parse(body.toString('utf8'));
      } catch {
        json = undefined;
      }
      if (status === 503 && json?.code === 'BUSY') {
        counts.busy++;
        continue;
      }
      if (status >= 500) {
        fail(`answered ${status} ${body.toString('utf8').slice(0, 300)}`, job.label, request.bytes);
      } else if (status >= 400 && request.path.startsWith('/v1/') && status !== 429 && !request.head && !request.kind.startsWith('upgrade')) {
        const typed = headers['content-type']?.startsWith('application/json') && typeof json?.message === 'string' && knownCode(json.code, status);
        if (!typed) fail(`a /v1 ${status} without a {code, message} of a known code: ${body.toString('utf8').slice(0, 200)}`, job.label, request.bytes);
      }
    }
    connection.close();
  };
  await Promise.all(Array.from({ length: CONCURRENCY }, worker));
  const seconds = (Date.now() - started) / 1000;
  tt.comment(
    `${counts.sent} requests to ${list.length} targets in ${seconds.toFixed(1)} s (${Math.round(counts.sent / seconds)}/s): ` +
      `${counts.answered} answered, ${counts.closed} closed by the server (broken framing), ${counts.waited} not answered in ${GIVE_UP_MS} ms (short body, broken framing), ` +
      `${counts.rateLimited} rate-limited, ${counts.busy} busy; statuses ${JSON.stringify(Object.fromEntries([...statuses].sort(([a], [b]) => a - b)))}`,
  );

  tt.comment(
    `slowest: ${[...timeSpent]
      .sort(([, a], [, b]) => b - a)
      .slice(0, 8)
      .map(([k, ms]) => `${k} ${ms} ms`)
      .join('; ')}`,
  );
  tt.equal(failures.length, 0, `no 5xx, hang, dropped answer or untyped /v1 error (${failures.length} found)`);
  for (const failure of failures.filter(Boolean)) tt.comment(failure);
  if (failures.length) tt.comment(`agent log tail:\n${agent.log.slice(-3000)}`);
  tt.equal(
    agent.pid !== undefined &&
      (await fdCount(pid).then(
        () => true,
        () => false,
      )),
    true,
    'the agent process is alive',
  );
  tt.equal((await agent.get('/v1/health')).status, 200, 'and still answers /v1/health');

  // Resources settle once the last connections are gone.
  let fds = 0;
  for (let i = 0; i < 50; i++) {
    fds = await fdCount(pid);
    if (fds <= baseline.fds + 8) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  tt.ok(fds <= baseline.fds + 8, `open descriptors back near the baseline (${baseline.fds} before, ${fds} after)`);
  tt.same(await readdir(path.join(agent.dataDir, 'tmp')), [], 'nothing left in the staging directory');
  tt.same(await readdir(path.join(agent.dataDir, 'instances')).catch(() => []), [], 'no instance or sandbox directories');
  tt.same(await domainsUnder(agent.dataDir), [], 'no domains');
  tt.same(await childrenOf(pid), [], 'no child processes left running');
  const rss = await rssBytes(pid);
  tt.ok(rss < baseline.rss + 256 * 2 ** 20, `RSS did not balloon (${Math.round(baseline.rss / 2 ** 20)} MiB before, ${Math.round(rss / 2 ** 20)} MiB after)`);
});
