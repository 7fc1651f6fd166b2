/**
 * Which cloudlet a verb talks to, and with what credential. Named (--cloudlet, $CLOUDLET) it is trusted as named.
 * Otherwise mDNS finds candidates and client-lib's ranking orders them, but ranking is not trust: anyone on the LAN can
 * advertise a cloudlet and report 9999 idle cores. So a discovered cloudlet never gets the admin token, and a verb
 * that acts (starts, uploads, changes the cloudlet) only goes to one this machine paired with, whose device token
 * travels over HTTPS pinned to the certificate stored at pairing (docs/cli.md).
 */
import { CloudletClient, parseCloudlet } from './client';
import { authFor } from './credentials';
import { discoverCloudlets, type DiscoveredCloudlet } from './discovery';
import { CliError } from './errors';
import { rankCloudlets, type Ranked } from './ranking';

type Values = Record<string, string | boolean | undefined>;

export async function discoverRanked(values: Values): Promise<Ranked<DiscoveredCloudlet>[]> {
  const timeoutMs = typeof values.timeout === 'string' ? Number(values.timeout) : 1500;
  if (!(timeoutMs > 0)) throw new CliError('USAGE', '--timeout must be a number of milliseconds');
  const found = await discoverCloudlets({ timeoutMs, ...(typeof values.interface === 'string' ? { interfaceAddress: values.interface } : {}) });
  return rankCloudlets(found, (c) => new CloudletClient(c.address, c.port, timeoutMs * 2).kdSystem(timeoutMs * 2));
}

/**
 * --cloudlet, then $CLOUDLET, then the best-ranked cloudlet on the LAN (what a KD app does); for a verb that `acts`,
 * the best-ranked one among those this machine paired with.
 */
export async function chooseCloudlet(values: Values, verb: string, acts: boolean): Promise<CloudletClient> {
  const named = typeof values.cloudlet === 'string' ? values.cloudlet : process.env.CLOUDLET;
  if (named) {
    const { host, port } = parseCloudlet(named);
    return new CloudletClient(host, port, undefined, await authFor({ host, port, named: true }));
  }
  const eligible = (await discoverRanked(values)).filter((r) => r.eligible);
  if (eligible.length === 0) throw new CliError('NO_CLOUDLET', 'no cloudlet found on the network; name one with --cloudlet HOST[:PORT]');
  for (const { cloudlet } of eligible) {
    const auth = await authFor({ host: cloudlet.address, port: cloudlet.port, named: false, names: [cloudlet.host] });
    if (!acts || auth?.tls) return new CloudletClient(cloudlet.address, cloudlet.port, undefined, auth);
  }
  const best = eligible[0]!.cloudlet;
  throw new CliError(
    'UNTRUSTED_CLOUDLET',
    `${verb} acts on a cloudlet, and discovery found none this machine paired with (best ranked: ${best.name} at ${best.address}:${best.port}); name one with --cloudlet HOST[:PORT] or pair with it first`,
  );
}
