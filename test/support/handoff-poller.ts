// A phone's client of its Service VM during a handoff, run on the phone (in its namespace) as a process of its own:
// it asks the VM for its page every 10 ms and follows the instance's `moved` event on /v1/events to the new endpoint,
// as an app would. On a line on stdin it prints what it saw (one JSON line) and exits. No timing is judged here.
import http from 'node:http';
import WebSocket from 'ws';

const [endpoint, eventsUrl, token, instanceId] = process.argv.slice(2) as [string, string, string, string];
let target = endpoint;
let moved: unknown = null;
const results: Array<{ at: number; ok: boolean; body: string }> = [];

const socket = new WebSocket(eventsUrl, { headers: { authorization: `Bearer ${token}` }, rejectUnauthorized: false });
socket.on('message', (data) => {
  const event = JSON.parse((data as Buffer).toString()) as {
    type: string;
    state?: string;
    instance?: { id: string };
    moved_to?: { address: string; port: number };
  };
  if (event.type === 'instance' && event.state === 'moved' && event.instance?.id === instanceId && event.moved_to) {
    moved = event;
    target = `${event.moved_to.address}:${event.moved_to.port}`;
  }
});
socket.on('error', () => {});

function poll(): void {
  const [host, port] = target.split(':') as [string, string];
  const req = http.get({ host, port: Number(port), path: '/', timeout: 1000, agent: false }, (res) => {
    let body = '';
    res.on('data', (chunk: Buffer) => (body += chunk.toString()));
    res.on('end', () => done(res.statusCode === 200, body));
  });
  req.on('timeout', () => req.destroy(new Error('timeout')));
  req.on('error', () => done(false, ''));
}
let announced = false;
/** Polls in a row that succeeded at the endpoint it was moved to. */
let okAfterMove = 0;
function done(ok: boolean, body: string): void {
  results.push({ at: Date.now(), ok, body });
  okAfterMove = moved && ok ? okAfterMove + 1 : 0;
  if (okAfterMove === 20) process.stdout.write('settled\n');
  // Ready once it reaches the VM and follows the events.
  if (ok && !announced && socket.readyState === WebSocket.OPEN) {
    announced = true;
    process.stdout.write('polling\n');
  }
  setTimeout(poll, 10);
}
poll();

// Its test gone (stdin closed) or never asking: it ends, whatever happens.
process.stdin.once('end', () => process.exit(1));
setTimeout(() => process.exit(1), 10 * 60_000).unref();

process.stdin.once('data', () => {
  let longestGapMs = 0;
  let lastOk: number | null = null;
  for (const r of results) {
    if (!r.ok) continue;
    if (lastOk !== null) longestGapMs = Math.max(longestGapMs, r.at - lastOk);
    lastOk = r.at;
  }
  const tail = results.slice(-20);
  process.stdout.write(
    JSON.stringify({
      polls: results.length,
      failed: results.filter((r) => !r.ok).length,
      longestGapMs,
      moved,
      target,
      bodies: [...new Set(results.filter((r) => r.ok).map((r) => r.body))],
      tailAllOk: tail.length === 20 && tail.every((r) => r.ok),
    }) + '\n',
  );
  process.exit(0);
});
