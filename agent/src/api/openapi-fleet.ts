/**
 * The /v1 operations between cloudlets (v1-fleet.ts, docs/fleet.md "Between cloudlets") as data, for openapi.ts:
 * the placement facts a paired cloudlet asks for, the peers this one knows, and the operator's pairing with another.
 */
import { ref } from './openapi-schemas';
import { body, list, noContent, str, type Operation } from './openapi-operations';

const PEER_ERRORS = ['PEER_NOT_ALLOWED', 'HANDOFF_NOT_FOUND'] as const;

export const FLEET_OPERATIONS: Record<string, Operation> = {
  'GET /v1/placement': {
    id: 'getPlacement',
    tag: 'fleet',
    summary: 'What placement needs of this cloudlet: services held (with disk digests), memory, CPU, load, running instances',
    description: 'The one route a paired cloudlet’s credential opens (a phone’s opens it too); docs/fleet.md lists what cloudlets may ask.',
    access: 'device',
    ok: { 200: { description: 'The placement facts.', schema: ref('Placement') } },
    errors: [],
  },
  'GET /v1/peers': {
    id: 'listPeers',
    tag: 'fleet',
    summary: 'Other cloudlets: those seen on the local network (mDNS) and those paired with, with their placement facts',
    access: 'device',
    ok: { 200: { description: 'The peers.', schema: list('peers', 'Peer') } },
    errors: [],
  },
  'POST /v1/peers': {
    id: 'pairPeer',
    tag: 'fleet',
    summary: 'Pair this cloudlet with another, with that cloudlet’s one-time code and certificate fingerprint',
    access: 'admin',
    body: {
      kind: 'json',
      schema: body({ address: str, port: { type: 'integer', minimum: 1, maximum: 65535, default: 9999 }, code: str, fingerprint: str }, [
        'address',
        'code',
        'fingerprint',
      ]),
    },
    ok: { 201: { description: 'The paired cloudlet.', schema: ref('Peer') } },
    errors: ['MISSING_PARAMETER', 'INVALID_PARAMETER', 'PEER_UNREACHABLE', 'PEER_REFUSED', 'CONFLICT'],
  },
  'DELETE /v1/peers/{id}': {
    id: 'forgetPeer',
    tag: 'fleet',
    summary: 'Forget a cloudlet this one paired with (its credential is dropped here; the other’s operator revokes it there)',
    access: 'admin',
    ok: noContent,
    errors: ['PEER_NOT_FOUND'],
  },
  'POST /v1/instances/{id}/handoff': {
    id: 'handOffInstance',
    tag: 'fleet',
    summary: 'Move a running instance, live, to a paired cloudlet that holds its service (docs/handoff.md)',
    description:
      'The operator, or a device that uses the instance. `target`: a paired cloudlet’s peer id (GET /v1/peers), or `auto` for the best-ranked one holding the ' +
      'service with the same image. Answers once it runs there: its new endpoint. On failure it runs on here. /v1/events says `moved` too.',
    access: 'device',
    body: { kind: 'json', schema: body({ target: str }, ['target']) },
    ok: {
      200: {
        description: 'It runs at the other cloudlet now.',
        schema: body({ instance_id: str, state: { const: 'moved' }, moved_to: ref('MovedTo') }, ['instance_id', 'state', 'moved_to']),
      },
    },
    errors: [
      'INSTANCE_NOT_FOUND',
      'MISSING_PARAMETER',
      'INVALID_PARAMETER',
      'HANDOFF_TARGET_UNKNOWN',
      'HANDOFF_TARGET_LACKS_SERVICE',
      'HANDOFF_IN_PROGRESS',
      'HANDOFF_REFUSED',
      'HANDOFF_FAILED',
      'PEER_UNREACHABLE',
      'PEER_REFUSED',
    ],
  },
  'POST /v1/handoffs': {
    id: 'offerHandoff',
    tag: 'fleet',
    summary: 'A paired cloudlet offers one of its instances (peer only): this one prepares for it and issues a handoff',
    access: 'device',
    body: {
      kind: 'json',
      schema: body({ instance_id: str, service_id: str, disk_sha256: str, domain_xml: str }, ['instance_id', 'service_id', 'disk_sha256', 'domain_xml']),
    },
    ok: {
      201: {
        description: 'The handoff issued: its id, the instance’s port here, the domain XML it runs as here, the socket URIs.',
        schema: body({ handoff_id: str, port: { type: 'integer' }, destination_xml: str, migrate_uri: str, disks_uri: str }, [
          'handoff_id',
          'port',
          'destination_xml',
          'migrate_uri',
          'disks_uri',
        ]),
      },
    },
    errors: [
      'MISSING_PARAMETER',
      'INVALID_PARAMETER',
      'PEER_NOT_ALLOWED',
      'HANDOFF_TARGET_LACKS_SERVICE',
      'HANDOFF_IN_PROGRESS',
      'HANDOFF_REFUSED',
      'NO_FREE_PORT',
    ],
  },
  'POST /v1/handoffs/{id}/complete': {
    id: 'completeHandoff',
    tag: 'fleet',
    summary: 'The source says the VM runs here (peer only): this cloudlet proves it serves and lists it',
    access: 'device',
    ok: {
      200: {
        description: 'Listed here; `ready`: it answered its readiness probe.',
        schema: body({ ready: { type: 'boolean' }, port: { type: 'integer' } }, ['ready', 'port']),
      },
    },
    errors: [...PEER_ERRORS, 'HANDOFF_FAILED'],
  },
  'DELETE /v1/handoffs/{id}': {
    id: 'abandonHandoff',
    tag: 'fleet',
    summary: 'The source gave up (peer only): what this cloudlet made for the handoff goes',
    access: 'device',
    ok: noContent,
    errors: [...PEER_ERRORS],
  },
};
