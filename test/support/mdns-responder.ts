// A DNS-SD responder for tests, run inside a network namespace the test made: it answers `_cloudlet._tcp` queries
// the way Avahi answers for a published agent (PTR, then SRV, TXT `encryption=disabled` and A as additionals).
// Usage: node mdns-responder.js INTERFACE_ADDRESS NAME HOST ADDRESS PORT [NAME HOST ADDRESS PORT]...
import multicastDns = require('multicast-dns');

const [interfaceAddress, ...rest] = process.argv.slice(2);
const SERVICE = '_cloudlet._tcp.local';
const cloudlets: Array<{ name: string; host: string; address: string; port: number }> = [];
for (let i = 0; i + 3 < rest.length; i += 4) cloudlets.push({ name: rest[i]!, host: rest[i + 1]!, address: rest[i + 2]!, port: Number(rest[i + 3]) });

const mdns = multicastDns({ interface: interfaceAddress!, bind: '0.0.0.0', reuseAddr: true });
mdns.on('ready', () => process.stdout.write('ready\n'));
mdns.on('query', (query) => {
  for (const question of query.questions ?? []) {
    if (question.name.toLowerCase() !== SERVICE) continue;
    mdns.respond({
      answers: cloudlets.map((c) => ({ name: SERVICE, type: 'PTR', ttl: 120, data: `${c.name}.${SERVICE}` })),
      additionals: cloudlets.flatMap((c) => [
        { name: `${c.name}.${SERVICE}`, type: 'SRV', ttl: 120, data: { target: c.host, port: c.port, priority: 0, weight: 0 } },
        { name: `${c.name}.${SERVICE}`, type: 'TXT', ttl: 4500, data: ['encryption=disabled'] },
        { name: c.host, type: 'A', ttl: 120, data: c.address },
      ]),
    });
  }
});
process.on('SIGTERM', () => mdns.destroy(() => process.exit(0)));
