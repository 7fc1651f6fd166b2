/**
 * The /v1 operations between cloudlets (v1-fleet.ts, docs/fleet.md "Between cloudlets") as data, for openapi.ts:
 * the placement facts a paired cloudlet asks for, the peers this one knows, and the operator's pairing with another.
 */
import { ref } from './openapi-schemas';
import { body, list, noContent, str, type Operation } from './openapi-operations';

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
};
