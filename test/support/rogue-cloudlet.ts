// A rogue cloudlet for the CLI's trust tests: it answers the routes the CLI uses the way an attacker on the LAN would
// (9999 idle cores to win the ranking, file names that are paths, control sequences in every string, answers larger
// than any real one) and records every request it gets, with the credential it carried. In-process
// (`startRogueCloudlet`), or as its own process in a test's network namespace:
//   node rogue-cloudlet.js PORT [TLS_PORT CERT KEY] — prints `ready`, then one JSON line per request.
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';

/** A string meant to reach the terminal raw: an OSC 52 clipboard write, a window title, a CSI and an 8-bit CSI. */
export const HOSTILE = 'ok\x1b]52;c;cm0gLXJmIH4K\x07\x1b]0;owned\x07\x1b[2J\x9b31m\u202eevil';

export interface RogueRequest {
  method: string;
  url: string;
  authorization?: string;
  secure: boolean;
}

/** The payload every app and base file serves, and what the rogue claims as its SHA-256. */
export const PAYLOAD = Buffer.from('rogue payload\n');
const SHA256 = createHash('sha256').update(PAYLOAD).digest('hex');

/** Apps by id: the file name each one claims. `oversized` serves more bytes than it announces. */
export const ROGUE_APPS: Record<string, string> = {
  absolute: '/tmp/cloudlet-rogue-target',
  dotdot: '../escaped.apk',
  slash: 'sub/nested.apk',
  dotfile: '.bashrc',
  plain: 'plain.apk',
  oversized: 'oversized.apk',
};

/** Bases by name: the file names each one lists. */
export const ROGUE_BASES: Record<string, string[]> = {
  escaping: ['disk.qcow2', '../../escaped-disk'],
  absolute: ['/tmp/cloudlet-rogue-base-file'],
  hidden: ['.profile'],
  'manifest-clash': ['manifest.json'],
  plain: ['disk.qcow2', 'chunk-index.bin'],
};

function json(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function answer(req: http.IncomingMessage, res: http.ServerResponse): void {
  const url = new URL(req.url ?? '/', 'http://rogue');
  const parts = url.pathname.split('/').map(decodeURIComponent);
  if (url.pathname === '/api/system') {
    return json(res, 200, { cpu_info: { max_cores: 9999, usage: 0, speed: '9999', cache: 1 }, memory_info: { max_memory: 1e12, free_memory: 1e12 } });
  }
  if (url.pathname === '/v1/system') {
    return json(res, 200, {
      hostname: HOSTILE,
      agent_version: HOSTILE,
      cpu: { cores: 9999, usage_percent: 0 },
      memory: { total_bytes: 1, free_bytes: 1 },
      instances: 0,
      tls_port: null,
    });
  }
  if (url.pathname === '/v1/services') {
    return json(res, 200, { services: [{ id: HOSTILE, manifest: { version: HOSTILE, description: HOSTILE, shareable: true } }] });
  }
  if (url.pathname === '/v1/instances' && req.method === 'GET') {
    // Valid JSON, but 64 MiB of it: no real listing is that large.
    res.writeHead(200, { 'content-type': 'application/json' });
    res.write('{"instances": [], "padding": "');
    const mib = Buffer.alloc(1024 * 1024, 'x');
    for (let i = 0; i < 64; i++) res.write(mib);
    res.end('"}');
    return;
  }
  if (url.pathname === '/v1/instances' && req.method === 'POST') {
    return json(res, 200, { instance: { id: 'i-rogue' }, endpoint: { address: '127.0.0.1', port: 1 }, joined: false });
  }
  if (parts[1] === 'v1' && parts[2] === 'instances' && req.method === 'DELETE') {
    return json(res, 404, { code: 'INSTANCE_NOT_FOUND', message: HOSTILE });
  }
  if (url.pathname === '/v1/devices')
    return json(res, 200, { devices: [{ id: 'phone-1', name: HOSTILE, standing: 'paired', paired_at: HOSTILE, expires_at: null }] });
  if (parts[2] === 'devices' && parts[4] === 'revoke') return json(res, 200, { id: parts[3] });
  if (parts[2] === 'apps' && parts.length === 4 && ROGUE_APPS[parts[3]!]) {
    const id = parts[3]!;
    return json(res, 200, {
      id,
      name: HOSTILE,
      kind: 'android',
      version: '1',
      size: PAYLOAD.length,
      sha256: SHA256,
      service_id: 'svc',
      file_name: ROGUE_APPS[id],
      download: `/v1/apps/${id}/file`,
    });
  }
  if (parts[2] === 'apps' && parts[4] === 'file') {
    res.writeHead(200, { 'content-type': 'application/octet-stream' });
    if (parts[3] !== 'oversized') return void res.end(PAYLOAD);
    // Announced PAYLOAD.length bytes; sends 64 MiB.
    const mib = Buffer.alloc(1024 * 1024, 'y');
    for (let i = 0; i < 64; i++) res.write(mib);
    return void res.end();
  }
  if (parts[2] === 'bases' && parts.length === 4 && ROGUE_BASES[parts[3]!]) {
    const name = parts[3]!;
    return json(res, 200, {
      digest: 'f'.repeat(64),
      name,
      memory_mib: 64,
      disk: 'disk.qcow2',
      state: null,
      manifest: {},
      files: ROGUE_BASES[name]!.map((file) => ({
        name: file,
        bytes: PAYLOAD.length,
        sha256: SHA256,
        download: `/v1/bases/${name}/files/${encodeURIComponent(file)}`,
      })),
    });
  }
  if (parts[2] === 'bases' && parts[4] === 'files') return void res.end(PAYLOAD);
  return json(res, 404, { code: 'NOT_FOUND', message: `no route ${url.pathname}` });
}

export interface RogueCloudlet {
  port: number;
  requests: RogueRequest[];
  close(): Promise<void>;
}

/** A rogue cloudlet on 127.0.0.1 (port 0: a free one), in this process. */
export async function startRogueCloudlet(port = 0, host = '127.0.0.1'): Promise<RogueCloudlet> {
  const requests: RogueRequest[] = [];
  const server = http.createServer((req, res) => {
    requests.push({
      method: req.method ?? '',
      url: req.url ?? '',
      ...(req.headers.authorization ? { authorization: req.headers.authorization } : {}),
      secure: false,
    });
    answer(req, res);
  });
  await new Promise<void>((resolve) => server.listen(port, host, resolve));
  return {
    port: (server.address() as AddressInfo).port,
    requests,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

if (require.main === module) {
  const [port, tlsPort, cert, key] = process.argv.slice(2);
  const log = (secure: boolean) => (req: http.IncomingMessage, res: http.ServerResponse) => {
    const record: RogueRequest = {
      method: req.method ?? '',
      url: req.url ?? '',
      ...(req.headers.authorization ? { authorization: req.headers.authorization } : {}),
      secure,
    };
    process.stdout.write(`${JSON.stringify(record)}\n`);
    answer(req, res);
  };
  const servers = [http.createServer(log(false))];
  if (tlsPort && cert && key) servers.push(https.createServer({ cert: readFileSync(cert), key: readFileSync(key) }, log(true)));
  void Promise.all(servers.map((server, i) => new Promise<void>((resolve) => server.listen(Number(i === 0 ? port : tlsPort), '0.0.0.0', resolve)))).then(() =>
    process.stdout.write('ready\n'),
  );
  process.on('SIGTERM', () => process.exit(0));
}
