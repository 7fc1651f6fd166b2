/**
 * Finding cloudlets on the LAN: DNS-SD over multicast DNS (`_cloudlet._tcp`, what the agent publishes through Avahi
 * and pycloud published from a static Avahi file), with the pure-JS multicast-dns library. The only module of the
 * CLI that does mDNS. The interface it multicasts on can be chosen, so a test (or a laptop with several networks)
 * keeps its queries to one network.
 */
import { CliError } from './errors';

const SERVICE_TYPE = '_cloudlet._tcp.local';

export interface DiscoveredCloudlet {
  /** The DNS-SD instance name, e.g. `cloudlet-a` (Avahi may have renamed it `cloudlet-a #2`). */
  name: string;
  host: string;
  address: string;
  port: number;
  /** TXT entries; `encryption` is `disabled` for the plain KD API. */
  txt: Record<string, string>;
}

export interface DiscoverOptions {
  /** IPv4 address of the interface to query on; all interfaces when absent. */
  interfaceAddress?: string;
  timeoutMs: number;
}

interface Sighting {
  host?: string;
  port?: number;
  txt: Record<string, string>;
}

export async function discoverCloudlets(options: DiscoverOptions): Promise<DiscoveredCloudlet[]> {
  let multicastDns: typeof import('multicast-dns');
  try {
    multicastDns = require('multicast-dns') as typeof import('multicast-dns');
  } catch {
    throw new CliError('UNAVAILABLE', 'mDNS discovery needs the multicast-dns package; name a cloudlet with --cloudlet instead');
  }
  // Bound to the wildcard: a socket bound to a unicast address never receives the multicast answers.
  const mdns = multicastDns({ ...(options.interfaceAddress ? { interface: options.interfaceAddress } : {}), bind: '0.0.0.0', reuseAddr: true });
  const instances = new Map<string, Sighting>();
  const addresses = new Map<string, string>();
  let failure: Error | undefined;
  mdns.on('error', (err) => {
    failure = err;
  });
  mdns.on('response', (packet) => {
    for (const record of [...(packet.answers ?? []), ...(packet.additionals ?? [])]) {
      const name = record.name.toLowerCase();
      if (record.type === 'PTR' && name === SERVICE_TYPE) {
        const instance = String(record.data);
        if (!instances.has(instance)) {
          instances.set(instance, { txt: {} });
          // Ask for what the answer did not carry along (Avahi usually sends SRV, TXT and A as additionals).
          mdns.query({
            questions: [
              { name: instance, type: 'SRV' },
              { name: instance, type: 'TXT' },
            ],
          });
        }
      } else if (record.type === 'SRV' && name.endsWith(`.${SERVICE_TYPE}`)) {
        const srv = record.data as { target: string; port: number };
        const entry = instances.get(record.name) ?? { txt: {} };
        instances.set(record.name, { ...entry, host: srv.target, port: srv.port });
        if (!addresses.has(srv.target.toLowerCase())) mdns.query({ questions: [{ name: srv.target, type: 'A' }] });
      } else if (record.type === 'TXT' && name.endsWith(`.${SERVICE_TYPE}`)) {
        const entry = instances.get(record.name) ?? { txt: {} };
        for (const item of record.data as Buffer[]) {
          const text = item.toString();
          const eq = text.indexOf('=');
          if (eq > 0) entry.txt[text.slice(0, eq)] = text.slice(eq + 1);
        }
        instances.set(record.name, entry);
      } else if (record.type === 'A') {
        addresses.set(name, String(record.data));
      }
    }
  });
  const ask = () => mdns.query({ questions: [{ name: SERVICE_TYPE, type: 'PTR' }] });
  try {
    ask();
    // Asked again once: a single lost datagram should not hide a cloudlet.
    const retry = setTimeout(ask, Math.min(500, options.timeoutMs / 3));
    await new Promise((resolve) => setTimeout(resolve, options.timeoutMs));
    clearTimeout(retry);
  } finally {
    await new Promise<void>((resolve) => mdns.destroy(resolve));
  }
  if (failure) throw new CliError('UNAVAILABLE', `mDNS discovery failed: ${failure.message}`);
  const found: DiscoveredCloudlet[] = [];
  for (const [fullName, entry] of instances) {
    const address = entry.host && addresses.get(entry.host.toLowerCase());
    if (!entry.host || !entry.port || !address) continue;
    found.push({ name: fullName.slice(0, -(SERVICE_TYPE.length + 1)), host: entry.host, address, port: entry.port, txt: entry.txt });
  }
  return found.sort((a, b) => a.name.localeCompare(b.name));
}
