/**
 * The /v1 routes between cloudlets (docs/fleet.md, "Between cloudlets"): what this cloudlet tells a paired cloudlet
 * for placement (`GET /v1/placement`, one of the few routes a cloudlet's credential opens), the peers it knows
 * (`GET /v1/peers`), and the operator's pairing of this cloudlet to another (`POST /v1/peers`, `DELETE /v1/peers/:id`).
 */
import os from 'node:os';
import path from 'node:path';
import type { CloudletApi } from '../core/types';
import type { PeerLinks } from '../fleet/peer-links';
import type { PlacementFacts } from '../fleet/placement';
import { CloudletError } from '../errors';
import { jsonObject, requiredString } from './json-fields';
import { emptyReply, jsonReply, type Route } from './routing';
import { handoffRoutes, type Handoffs } from './v1-handoff';
import { peerJson } from './wire-shapes';

/** What the fleet routes need besides the core: the paired cloudlets, and the digests of the images held. */
export interface FleetView {
  links: Pick<PeerLinks, 'pair' | 'forget' | 'peers'>;
  sha256(file: string): Promise<string>;
  /** Handing instances to and from paired cloudlets (docs/handoff.md). */
  handoffs: Handoffs;
}

const DEFAULT_API_PORT = 9999;

export function fleetRoutes(api: CloudletApi, fleet?: FleetView): Route[] {
  return [
    { method: 'GET', path: '/v1/placement', access: 'device', peers: true, handle: async () => jsonReply(200, await placement(api, fleet)) },
    {
      method: 'GET',
      path: '/v1/peers',
      access: 'device',
      handle: () => jsonReply(200, { peers: (fleet?.links.peers() ?? api.peers().map((discovered) => ({ discovered, link: null }))).map(peerJson) }),
    },
    ...(fleet
      ? [
          {
            method: 'POST',
            path: '/v1/peers',
            access: 'admin',
            jsonBody: true,
            handle: async ({ body }) => {
              const fields = jsonObject(body);
              const port = fields.port === undefined ? DEFAULT_API_PORT : fields.port;
              if (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535) {
                throw new CloudletError('INVALID_PARAMETER', 'Field "port" must be a port number', { details: { parameter: 'port' } });
              }
              const link = await fleet.links.pair({
                address: requiredString(fields, 'address'),
                port,
                code: requiredString(fields, 'code'),
                fingerprint: requiredString(fields, 'fingerprint'),
              });
              return jsonReply(201, peerJson({ discovered: null, link }));
            },
          } satisfies Route,
          ...handoffRoutes(api, fleet.handoffs),
          {
            method: 'DELETE',
            path: '/v1/peers/:id',
            access: 'admin',
            handle: async ({ params }) => {
              await fleet.links.forget(params.id!);
              return emptyReply(204);
            },
          } satisfies Route,
        ]
      : []),
  ];
}

/** This cloudlet's placement facts: a service's digest is its disk image's (null while it cannot be read). */
async function placement(api: CloudletApi, fleet?: FleetView): Promise<PlacementFacts> {
  const info = await api.systemInfo();
  const services = await Promise.all(
    api.listServices().map(async (s) => ({
      service_id: s.id,
      version: s.manifest.version,
      disk_sha256: fleet ? await fleet.sha256(path.join(s.dir, s.manifest.disk)).catch(() => null) : null,
      memory_mib: s.manifest.memory_mib,
      vcpus: s.manifest.vcpus,
      has_state: s.manifest.state !== null,
    })),
  );
  const [one, five, fifteen] = os.loadavg() as [number, number, number];
  return {
    name: info.hostname,
    agent_version: info.agentVersion,
    services,
    packages: api.listPackages().map((p) => ({ app_id: p.id, version: p.manifest.version, sha256: p.sha256 })),
    memory: { total_bytes: info.memory.totalBytes, free_bytes: info.memory.freeBytes },
    cpu: { cores: info.cpu.cores, usage_percent: info.cpu.usagePercent },
    load_average: [one, five, fifteen],
    instances: { running: info.instances },
  };
}
