// The node:http baseline of bench/http.ts, run as a process of its own (as the agent is): it answers each path it
// was given with exactly the status, headers and body the agent sent for it. argv[2]: a JSON file of
// { [path]: { status, headers, body } }. Prints its port on stdout once listening.
import { readFileSync } from 'node:fs';
import http from 'node:http';

interface Canned {
  status: number;
  headers: Record<string, string>;
  body: string;
}

const replies = JSON.parse(readFileSync(process.argv[2]!, 'utf8')) as Record<string, Canned>;
const server = http.createServer((req, res) => {
  const reply = replies[req.url ?? ''];
  if (!reply) {
    res.writeHead(404).end();
    return;
  }
  res.writeHead(reply.status, { ...reply.headers, 'Content-Length': Buffer.byteLength(reply.body) });
  res.end(reply.body);
});
// As the agent's: idle keep-alive connections are kept as long as a load generator needs.
server.keepAliveTimeout = 10_000;
server.listen(0, '127.0.0.1', () => process.stdout.write(`${(server.address() as { port: number }).port}\n`));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
