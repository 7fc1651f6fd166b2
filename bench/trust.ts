// What trust costs a request: the same small device route (GET /v1/instances) on the plain listener from loopback, over
// HTTPS on a kept-alive connection, and over HTTPS with a new TLS handshake per request (a phone waking up), with
// 1 and with BENCH_DEVICES paired devices (the token check compares against every stored hash), against the open
// GET /v1/apps (an empty list too, no credential) in the same run. One JSON line.
import https from 'node:https';
import http from 'node:http';
import { performance } from 'node:perf_hooks';
import tls from 'node:tls';
import { AgentProcess, request } from '../test/support/agent';
import { median, round, sized } from './support/measure';

const REQUESTS = Number(process.env.BENCH_REQUESTS ?? sized(300, 30));
const DEVICES = Number(process.env.BENCH_DEVICES ?? sized(200, 10));

async function pair(agent: AgentProcess, name: string): Promise<string> {
  const window = await agent.post('/v1/pairing', {});
  const claim = await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: window.json.code, name }, { authorization: '' });
  if (claim.status !== 201) throw new Error(`pairing: ${claim.body}`);
  return claim.json.token as string;
}

/** Milliseconds per request, one after another on `agent` (keep-alive or not). */
async function timeRequests(send: () => Promise<number>): Promise<number[]> {
  const times: number[] = [];
  for (let i = 0; i < REQUESTS; i++) {
    const started = performance.now();
    const status = await send();
    times.push(performance.now() - started);
    if (status !== 200) throw new Error(`answered ${status}`);
  }
  return times;
}

function get(module: typeof http | typeof https, options: https.RequestOptions): Promise<number> {
  return new Promise((resolve, reject) => {
    module
      .get(options, (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      })
      .on('error', reject);
  });
}

async function main() {
  const agent = await AgentProcess.start({ portRange: '24010-24019', env: { CLOUDLET_RATE_PER_SECOND: '100000', CLOUDLET_RATE_BURST: '100000' } });
  try {
    const system = (await agent.get('/v1/system')).json;
    const pem = await new Promise<string>((resolve, reject) => {
      const socket = tls.connect({ host: '127.0.0.1', port: system.tls_port, rejectUnauthorized: false }, () => {
        resolve(`-----BEGIN CERTIFICATE-----\n${socket.getPeerCertificate().raw.toString('base64')}\n-----END CERTIFICATE-----\n`);
        socket.end();
      });
      socket.on('error', reject);
    });
    const pinned = (cert: tls.PeerCertificate) => (cert.fingerprint256 === system.tls_fingerprint ? undefined : new Error('not the pinned certificate'));
    const run = async () => {
      const token = await pair(agent, 'bench phone');
      const headers = { authorization: `Bearer ${token}` };
      const plainAgent = new http.Agent({ keepAlive: true, maxSockets: 1 });
      const tlsAgent = new https.Agent({ keepAlive: true, maxSockets: 1 });
      const base = { host: '127.0.0.1', path: '/v1/instances', headers };
      const secure = { ...base, port: system.tls_port, ca: pem, checkServerIdentity: (_h: string, c: tls.PeerCertificate) => pinned(c) };
      // The baseline: an open route doing the same work (an empty list from memory) with no credential to check.
      const open = await timeRequests(() => get(http, { host: '127.0.0.1', port: agent.apiPort, path: '/v1/apps', agent: plainAgent }));
      const plain = await timeRequests(() => get(http, { ...base, port: agent.apiPort, agent: plainAgent }));
      const kept = await timeRequests(() => get(https, { ...secure, agent: tlsAgent }));
      const fresh = await timeRequests(() => get(https, { ...secure, agent: false }));
      plainAgent.destroy();
      tlsAgent.destroy();
      return { open: median(open), plain: median(plain), kept: median(kept), fresh: median(fresh) };
    };
    const one = await run();
    for (let i = 0; i < DEVICES; i++) await pair(agent, `device ${i}`);
    const many = await run();
    const result = {
      bench: 'trust',
      requests: REQUESTS,
      devices: DEVICES + 2,
      open_plain_ms: round(one.open, 3),
      device_plain_ms: round(one.plain, 3),
      device_https_keepalive_ms: round(one.kept, 3),
      device_https_handshake_ms: round(one.fresh, 3),
      many_devices_plain_ms: round(many.plain, 3),
      many_devices_https_keepalive_ms: round(many.kept, 3),
      // Against the open (unauthenticated) request of the same run: what authentication and TLS cost.
      device_vs_open: round(one.plain / one.open, 2),
      https_keepalive_vs_open: round(one.kept / one.open, 2),
      many_devices_vs_open: round(many.plain / one.open, 2),
    };
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    await agent.dispose();
  }
}

main().catch((err) => {
  process.stderr.write(`${(err as Error).stack}\n`);
  process.exit(1);
});
