/** The verbs of trust: pairing this machine with a cloudlet, and (operator) the paired devices. */
import os from 'node:os';
import { parseCloudlet } from './client';
import { pairWith } from './credentials';
import { CliError } from './errors';
import { shown } from './terminal';
import { listing, type Verb } from './verb';

export const pairVerb: Verb = {
  summary: 'pairing: `pair open` (operator, on the cloudlet) prints a one-time code; `pair CODE` pairs this machine with it',
  usage:
    'cloudlet pair open [--ttl SECONDS] [--expires-in MINUTES] | cloudlet pair close | cloudlet pair CODE --cloudlet HOST[:PORT] [--name NAME] [--device-id ID]',
  options: { ttl: { type: 'string' }, 'expires-in': { type: 'string' }, name: { type: 'string' }, 'device-id': { type: 'string' } },
  optionHelp: [
    'open                the operator opens a pairing window (admin credential, on the cloudlet) and reads the code out',
    '--ttl SECONDS       how long the window stays open (default 300)',
    'close               the operator closes the open pairing window before its time (its code stops working)',
    "--expires-in MIN    the paired device's authorization ends after this many minutes (default: until revoked)",
    "CODE                pair this machine: its token and the cloudlet's pinned certificate are stored in",
    "                    ~/.config/cloudlet/credentials.json; compare the fingerprint printed with the operator's",
    '--name NAME         how the device is listed (default: this host name)',
    '--device-id ID      the id to pair under (default: one the cloudlet picks)',
  ],
  args: [1, 1],
  acts: true,
  run: async ({ cloudlet, args, values }) => {
    const number = (option: string) => (typeof values[option] === 'string' ? Number(values[option]) : undefined);
    if (args[0] === 'open') {
      const window = await (
        await cloudlet()
      ).call<{ code: string; expires_at: string; tls_fingerprint: string; tls_port: number }>('POST', '/v1/pairing', {
        ...(number('ttl') !== undefined ? { ttl_seconds: number('ttl') } : {}),
        ...(number('expires-in') !== undefined ? { expires_in_minutes: number('expires-in') } : {}),
      });
      return {
        json: window,
        text: [shown`pairing code: ${window.code} (until ${window.expires_at})`, shown`certificate SHA-256: ${window.tls_fingerprint}`].join('\n'),
      };
    }
    if (args[0] === 'close') {
      await (await cloudlet()).call('DELETE', '/v1/pairing');
      return { json: { closed: true }, text: 'the pairing window is closed' };
    }
    const named = typeof values.cloudlet === 'string' ? values.cloudlet : process.env.CLOUDLET;
    if (!named) throw new CliError('USAGE', 'pair CODE needs --cloudlet HOST[:PORT] (the cloudlet whose operator gave the code)');
    const { host, port } = parseCloudlet(named);
    const paired = await pairWith(host, port, args[0]!, {
      name: typeof values.name === 'string' ? values.name : os.hostname(),
      ...(typeof values['device-id'] === 'string' ? { id: values['device-id'] } : {}),
    });
    const { token: _token, certificate: _certificate, ...kept } = paired;
    return {
      json: kept,
      text: [
        shown`paired with ${paired.cloudlet} as ${paired.device_id}`,
        shown`certificate SHA-256: ${paired.tls_fingerprint}`,
        'compare it with the one the operator sees; later calls use HTTPS pinned to it',
      ].join('\n'),
    };
  },
};

export const devicesVerb: Verb = {
  summary: 'paired devices (operator, on the cloudlet): list, `revoke ID` (its instances are released) or `remove ID`',
  usage: 'cloudlet devices [revoke ID | remove ID]',
  args: [0, 2],
  acts: true,
  run: async ({ cloudlet, args }) => {
    const client = await cloudlet();
    const [action, id] = args;
    if (action === undefined) {
      const { devices } = await client.call<{ devices: Array<{ id: string; name: string; paired_at: string; expires_at: string | null; standing: string }> }>(
        'GET',
        '/v1/devices',
      );
      return listing('devices', devices, ['DEVICE', 'NAME', 'STANDING', 'PAIRED', 'EXPIRES'], (d) => [
        d.id,
        d.name,
        d.standing,
        d.paired_at,
        d.expires_at ?? 'never',
      ]);
    }
    if (action === 'revoke' && id) {
      const device = await client.call<{ id: string }>('POST', `/v1/devices/${encodeURIComponent(id)}/revoke`);
      return { json: device, text: shown`revoked ${id}` };
    }
    if (action === 'remove' && id) {
      await client.call('DELETE', `/v1/devices/${encodeURIComponent(id)}`);
      return { json: { removed: id }, text: shown`removed ${id}` };
    }
    throw new CliError('USAGE', 'usage: cloudlet devices [revoke ID | remove ID]');
  },
};

interface PeerJson {
  name: string;
  address: string;
  port: number;
  seen_at: string | null;
  paired: { id: string; tls_fingerprint: string } | null;
  placement: { instances: { running: number }; memory: { free_bytes: number }; services: unknown[] } | null;
  placement_error: string | null;
}

export const peerVerb: Verb = {
  summary: 'cloudlets pairing with each other (operator, on the box): `peer open` here, `peer pair CODE` on the other; list, forget',
  usage:
    'cloudlet peer [list] | cloudlet peer open [--ttl SECONDS] | cloudlet peer pair CODE --peer HOST[:PORT] --fingerprint SHA256 | cloudlet peer forget PEER_ID',
  options: { ttl: { type: 'string' }, peer: { type: 'string' }, fingerprint: { type: 'string' } },
  optionHelp: [
    'open                on the cloudlet to be asked: opens a pairing window for a cloudlet; prints the code and fingerprint',
    'pair CODE           on the cloudlet that will ask: pairs it with the one at --peer, whose certificate must have',
    '                    the --fingerprint its operator read out with the code',
    'list                the peers: seen over mDNS, paired, and the placement facts each paired one last gave',
    'forget PEER_ID      drop the pairing here (revoke it on the other cloudlet with `cloudlet devices revoke`)',
  ],
  args: [0, 2],
  acts: (args) => args[0] !== undefined && args[0] !== 'list',
  run: async ({ cloudlet, args, values }) => {
    const client = await cloudlet();
    const [action = 'list', operand] = args;
    if (action === 'list' && operand === undefined) {
      const { peers } = await client.call<{ peers: PeerJson[] }>('GET', '/v1/peers');
      return listing('peers', peers, ['NAME', 'ADDRESS', 'PAIRED', 'INSTANCES', 'FREE MEMORY', 'SERVICES'], (p) => [
        p.name,
        `${p.address}:${p.port}`,
        p.paired?.id ?? 'no',
        p.placement ? String(p.placement.instances.running) : (p.placement_error ?? '-'),
        p.placement ? `${Math.round(p.placement.memory.free_bytes / 2 ** 20)} MiB` : '-',
        p.placement ? String(p.placement.services.length) : '-',
      ]);
    }
    if (action === 'open' && operand === undefined) {
      const window = await client.call<{ code: string; expires_at: string; tls_fingerprint: string }>('POST', '/v1/pairing', {
        kind: 'cloudlet',
        ...(typeof values.ttl === 'string' ? { ttl_seconds: Number(values.ttl) } : {}),
      });
      return {
        json: window,
        text: [
          shown`pairing code for a cloudlet: ${window.code} (until ${window.expires_at})`,
          shown`on the other cloudlet: cloudlet peer pair ${window.code} --peer <this cloudlet's address> --fingerprint ${window.tls_fingerprint}`,
        ].join('\n'),
      };
    }
    if (action === 'pair' && operand !== undefined) {
      if (typeof values.peer !== 'string' || typeof values.fingerprint !== 'string') {
        throw new CliError('USAGE', "peer pair CODE needs --peer HOST[:PORT] and --fingerprint (both from the other cloudlet's operator)");
      }
      const { host, port } = parseCloudlet(values.peer);
      const peer = await client.call<PeerJson>('POST', '/v1/peers', { address: host, port, code: operand, fingerprint: values.fingerprint });
      return { json: peer, text: shown`paired with ${peer.name} at ${peer.address}:${peer.port} as ${peer.paired!.id}` };
    }
    if (action === 'forget' && operand !== undefined) {
      await client.call('DELETE', `/v1/peers/${encodeURIComponent(operand)}`);
      return { json: { forgotten: operand }, text: shown`forgot ${operand}` };
    }
    throw new CliError('USAGE', 'usage: cloudlet peer [list | open | pair CODE --peer HOST[:PORT] --fingerprint SHA256 | forget PEER_ID]');
  },
};
