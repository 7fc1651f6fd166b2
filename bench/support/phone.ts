// The phone of bench/synthesis-link.ts: run inside the benchmark's phone network namespace, it uploads an overlay
// over the shaped link, takes the endpoint from the answer, and asks the Service VM for its page there. Its job comes
// as JSON on stdin (the device token is a secret: not on the command line); it prints one JSON line of
// process.hrtime.bigint() stamps (CLOCK_MONOTONIC: the same clock as the benchmark's) in nanoseconds, as strings.
//
//   ours:   POST https://<host>:<port>/v1/synthesis/uploads {bytes}, then POST …/uploads/<id>?offset=0 the whole file
//           (the agent's own API, over HTTPS with a paired device's token, its certificate pinned by fingerprint)
//   elijah: POST http://<host>:<port>/<i> each file in turn; the last answer names the endpoint
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import http from 'node:http';
import https from 'node:https';
import type { TLSSocket } from 'node:tls';
import { httpGet } from './http-get';

export interface PhoneJob {
  mode: 'ours' | 'elijah';
  host: string;
  port: number;
  files: string[];
  /** ours: the device's token and the agent's certificate's SHA-256 fingerprint (as /v1/system shows it). */
  token?: string;
  fingerprint?: string;
  /** What the Service VM's `GET /` must answer. */
  page: string;
}

export interface PhoneStamps {
  /** Before the first byte of the first request. */
  first_ns: string;
  /** The answer to the last upload (the one naming the endpoint) arrived. */
  response_ns: string;
  /** The Service VM's page arrived from its endpoint. */
  answer_ns: string;
  /** The instance the endpoint belongs to, and the agent's timings of its launch. */
  instance_id: string;
  timings: { total_ms: number; libvirt_ms: number; guest_ms: number; agent_ms: number };
}

const now = () => process.hrtime.bigint().toString();

interface Reply {
  status: number;
  json: any;
}

/** One request; the body is a JSON value or a file streamed from disk. */
function send(job: PhoneJob, agent: http.Agent, method: string, urlPath: string, body: { json: unknown } | { file: string; bytes: number }): Promise<Reply> {
  const secure = job.mode === 'ours';
  const payload = 'json' in body ? Buffer.from(JSON.stringify(body.json)) : null;
  const headers: http.OutgoingHttpHeaders = {
    'content-type': payload ? 'application/json' : 'application/octet-stream',
    'content-length': payload ? payload.length : (body as { bytes: number }).bytes,
    ...(job.token ? { authorization: `Bearer ${job.token}` } : {}),
  };
  return new Promise((resolve, reject) => {
    const req = (secure ? https : http).request({ host: job.host, port: job.port, method, path: urlPath, agent, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString();
        try {
          resolve({ status: res.statusCode ?? 0, json: JSON.parse(text) });
        } catch {
          reject(new Error(`${method} ${urlPath}: ${res.statusCode} ${text.slice(0, 200)}`));
        }
      });
    });
    req.on('error', reject);
    if (secure) {
      // Trust on first use, checked against what pairing named: the certificate is self-signed.
      req.on('socket', (socket) =>
        socket.once('secureConnect', () => {
          const seen = (socket as TLSSocket).getPeerCertificate().fingerprint256;
          if (seen !== job.fingerprint) req.destroy(new Error(`the agent's certificate ${seen} is not the paired one`));
        }),
      );
    }
    if (payload) req.end(payload);
    else createReadStream((body as { file: string }).file).pipe(req);
  });
}

async function upload(job: PhoneJob): Promise<PhoneStamps> {
  const sizes = await Promise.all(job.files.map(async (f) => (await stat(f)).size));
  // One connection for the whole upload, as a phone keeps it (a TLS handshake per request would cost a round trip).
  const agent =
    job.mode === 'ours' ? new https.Agent({ keepAlive: true, maxSockets: 1, rejectUnauthorized: false }) : new http.Agent({ keepAlive: true, maxSockets: 1 });
  const first_ns = now();
  let last: Reply;
  if (job.mode === 'ours') {
    const created = await send(job, agent, 'POST', '/v1/synthesis/uploads', { json: { bytes: sizes[0] } });
    if (created.status !== 201) throw new Error(`creating the upload: ${created.status} ${JSON.stringify(created.json)}`);
    last = await send(job, agent, 'POST', `/v1/synthesis/uploads/${created.json.id}?offset=0`, { file: job.files[0]!, bytes: sizes[0]! });
  } else {
    last = { status: 0, json: null };
    for (const [i, file] of job.files.entries()) last = await send(job, agent, 'POST', `/${i}`, { file, bytes: sizes[i]! });
  }
  const response_ns = now();
  agent.destroy();
  if (last.status !== 201) throw new Error(`the upload's answer: ${last.status} ${JSON.stringify(last.json)}`);
  const page = (await httpGet(job.host, last.json.endpoint.port)).body;
  const answer_ns = now();
  if (page.trim() !== job.page) throw new Error(`the Service VM answered ${JSON.stringify(page.slice(0, 200))}`);
  return { first_ns, response_ns, answer_ns, instance_id: last.json.instance.id, timings: last.json.timings };
}

async function main() {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  const job = JSON.parse(Buffer.concat(chunks).toString()) as PhoneJob;
  process.stdout.write(`${JSON.stringify(await upload(job))}\n`);
}

main().catch((err) => {
  process.stderr.write(`phone: ${(err as Error).stack}\n`);
  process.exit(1);
});
