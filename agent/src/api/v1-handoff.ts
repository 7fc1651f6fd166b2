/**
 * The handoff routes (docs/handoff.md): `POST /v1/instances/:id/handoff` for the operator or the device that uses the
 * instance; and what a paired cloudlet may ask of this one when it hands an instance over (the offer, its completion
 * or abandonment, and the WebSocket channels the migration travels on), each on the deliberate list of
 * docs/security.md and refused to any other caller.
 */
import type { CloudletApi } from '../core/types';
import { CloudletError } from '../errors';
import type { OutgoingHandoffs } from '../fleet/handoff-source';
import type { IncomingHandoffs } from '../fleet/handoff-target';
import { HANDOFF_CHANNELS, type HandoffChannel } from '../fleet/handoff-relay';
import { bearerToken, type AccessGate, type Caller, type Transport } from '../trust/access';
import type { RateLimiter } from '../trust/rate-limit';
import { jsonObject, requiredString } from './json-fields';
import { authorizeWithinRate } from './request-pipeline';
import { emptyReply, jsonReply, type Route } from './routing';
import type { UpgradeRequest } from './socket-endpoint';
import type { StreamEndpoint } from './stream-socket';
import { InstanceView, movedToJson } from './wire-shapes';

export interface Handoffs {
  outgoing: OutgoingHandoffs;
  incoming: IncomingHandoffs;
}

/** The largest offer: the domain XML (MAX_OFFERED_XML_BYTES) and a few fields. */
const MAX_OFFER_BODY_BYTES = 80 * 1024;

/** The paired cloudlet calling, or PEER_NOT_ALLOWED for anyone else (a phone's credential is no cloudlet's). */
function peerDevice(caller: Caller): string {
  if (caller.kind === 'device' && caller.device.kind === 'cloudlet') return caller.device.id;
  throw new CloudletError('PEER_NOT_ALLOWED', 'only a paired cloudlet hands an instance over to this one');
}

export function handoffRoutes(api: CloudletApi, handoffs: Handoffs): Route[] {
  return [
    {
      method: 'POST',
      path: '/v1/instances/:id/handoff',
      access: 'device',
      jsonBody: true,
      handle: async ({ params, caller, body }) => {
        // The operator, or a device that uses the instance: another device's is one that does not exist.
        const instance = InstanceView.of(caller).one(api.getInstance(params.id!));
        const target = requiredString(jsonObject(body), 'target');
        if (target.length > 100) throw new CloudletError('INVALID_PARAMETER', 'Field "target" is a peer id or "auto"', { details: { parameter: 'target' } });
        const movedTo = await handoffs.outgoing.handOff(instance.id, target);
        return jsonReply(200, { instance_id: instance.id, state: 'moved', moved_to: movedToJson(movedTo) });
      },
    },
    {
      method: 'POST',
      path: '/v1/handoffs',
      access: 'device',
      peers: true,
      jsonBody: true,
      maxBodyBytes: MAX_OFFER_BODY_BYTES,
      handle: async ({ caller, body }) => {
        const deviceId = peerDevice(caller);
        const fields = jsonObject(body);
        const issued = await handoffs.incoming.offer(deviceId, {
          instanceId: requiredString(fields, 'instance_id'),
          serviceId: requiredString(fields, 'service_id'),
          diskSha256: requiredString(fields, 'disk_sha256'),
          domainXml: requiredString(fields, 'domain_xml'),
        });
        return jsonReply(201, {
          handoff_id: issued.handoffId,
          port: issued.port,
          destination_xml: issued.destXml,
          migrate_uri: issued.migrateUri,
          disks_uri: issued.disksUri,
        });
      },
    },
    {
      method: 'POST',
      path: '/v1/handoffs/:id/complete',
      access: 'device',
      peers: true,
      handle: async ({ caller, params }) => jsonReply(200, await handoffs.incoming.complete(peerDevice(caller), params.id!)),
    },
    {
      method: 'DELETE',
      path: '/v1/handoffs/:id',
      access: 'device',
      peers: true,
      handle: async ({ caller, params }) => {
        await handoffs.incoming.abandon(peerDevice(caller), params.id!);
        return emptyReply(204);
      },
    },
  ];
}

/** `GET /v1/handoff-channel?handoff=ID&channel=NAME` (WebSocket, TLS only): one channel of a handoff this cloudlet was offered. */
export function handoffChannelEndpoint(incoming: IncomingHandoffs, gate: AccessGate, limiter: RateLimiter | null): StreamEndpoint {
  const resolve = (transport: Transport, request: UpgradeRequest, limited: boolean): { deviceId: string; handoff: string; channel: HandoffChannel } => {
    if (!transport.secure) throw new CloudletError('TLS_REQUIRED', 'a handoff channel is opened over HTTPS only');
    const caller = authorizeWithinRate(gate, limited ? limiter : null, 'device', bearerToken(request.header('authorization')), transport, true);
    const deviceId = peerDevice(caller);
    const handoff = request.query.get('handoff') ?? '';
    const channel = request.query.get('channel') as HandoffChannel;
    if (!HANDOFF_CHANNELS.includes(channel))
      throw new CloudletError('INVALID_PARAMETER', 'channel must be libvirt, memory or disk', { details: { parameter: 'channel' } });
    incoming.checkChannel(deviceId, handoff);
    return { deviceId, handoff, channel };
  };
  return {
    path: '/v1/handoff-channel',
    protocol: '',
    admit: (transport, request) => {
      resolve(transport, request, true);
      return () => {};
    },
    accept: (stream, transport, request) => {
      try {
        const { deviceId, handoff, channel } = resolve(transport, request, false);
        incoming.connectChannel(deviceId, handoff, channel, stream);
      } catch {
        // The handoff ended between the upgrade and now.
        stream.destroy();
      }
    },
  };
}
