// A plain GET from a benchmark, at any address (a Service VM's endpoint may be on a benchmark's own veth rather than
// loopback). No dependency beyond node:http, so that bench/support/phone.ts, run in a namespace, stays light.
import http from 'node:http';

export function httpGet(host: string, port: number, urlPath = '/'): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    http
      .get({ host, port, path: urlPath, agent: false }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }));
      })
      .on('error', reject);
  });
}
