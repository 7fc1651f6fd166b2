/**
 * The /v1 routes of pairing and device management (docs/security.md): the operator opens a pairing window and lists,
 * revokes or removes devices (admin); a phone claims the window's code for its own credential (open, but only over
 * TLS or loopback, as the code is a secret). Same conventions as v1.ts.
 */
import { CloudletError } from '../errors';
import { requireConfidential } from '../trust/access';
import type { DeviceKind, DeviceRegistry, PairedDevice } from '../trust/devices';
import { MAX_WINDOW_SECONDS, type Pairing } from '../trust/pairing';
import { emptyReply, jsonReply, type Route } from './routing';
import { jsonObject, requiredString } from './json-fields';

/** What the trust routes (and /v1/system) need to know of the agent's trust setup. */
export interface TrustView {
  devices: DeviceRegistry;
  pairing: Pairing;
  /** The certificate phones pin, and the HTTPS port (known once it listens). */
  /** fingerprint null: the agent has no usable certificate (then no HTTPS either). */
  tls: { fingerprint: string | null; port(): number | null };
}

const DEFAULT_WINDOW_SECONDS = 300;
/** A paired device's authorization may last up to a year; longer means "until revoked" (leave it out). */
const MAX_DEVICE_MINUTES = 366 * 24 * 60;
const MAX_NAME_LENGTH = 100;

export function trustRoutes(trust: TrustView): Route[] {
  return [
    {
      method: 'POST',
      path: '/v1/pairing',
      access: 'admin',
      jsonBody: true,
      handle: ({ body }) => {
        const fields = jsonObject(body);
        const ttlSeconds = optionalNumber(fields, 'ttl_seconds', 1, MAX_WINDOW_SECONDS, true) ?? DEFAULT_WINDOW_SECONDS;
        const expiresInMinutes = optionalNumber(fields, 'expires_in_minutes', 0.05, MAX_DEVICE_MINUTES, false);
        const kind = fields.kind === undefined ? 'device' : deviceKind(fields.kind);
        const window = trust.pairing.open({ ttlSeconds, kind, ...(expiresInMinutes !== undefined ? { expiresInMinutes } : {}) });
        return jsonReply(201, {
          code: window.code,
          kind: window.kind,
          expires_at: window.expiresAt,
          device_expires_in_minutes: window.deviceExpiresInMinutes,
          ...tlsJson(trust),
        });
      },
    },
    {
      method: 'DELETE',
      path: '/v1/pairing',
      access: 'admin',
      handle: () => {
        trust.pairing.close();
        return emptyReply(204);
      },
    },
    {
      method: 'POST',
      path: '/v1/pairing/claim',
      access: 'open',
      jsonBody: true,
      handle: async (request) => {
        requireConfidential(request);
        const fields = jsonObject(request.body);
        const name = requiredString(fields, 'name');
        if (name.length > MAX_NAME_LENGTH) {
          throw new CloudletError('INVALID_PARAMETER', `name must be at most ${MAX_NAME_LENGTH} characters`, { details: { parameter: 'name' } });
        }
        const deviceId = fields.device_id === undefined ? undefined : requiredString(fields, 'device_id');
        const kind = fields.kind === undefined ? undefined : deviceKind(fields.kind);
        const { device, token } = await trust.pairing.claim(requiredString(fields, 'code'), {
          name,
          remoteAddress: request.remoteAddress,
          ...(kind !== undefined ? { kind } : {}),
          ...(deviceId !== undefined ? { deviceId } : {}),
        });
        return jsonReply(201, {
          device_id: device.id,
          name: device.name,
          kind: device.kind,
          paired_at: device.pairedAt,
          expires_at: device.expiresAt,
          token,
          // The KD face's key is for phones; a cloudlet never uses it (PEER_NOT_ALLOWED there too).
          legacy_password: device.kind === 'device' ? trust.devices.legacyPassword(device.id) : null,
          ...tlsJson(trust),
        });
      },
    },
    { method: 'GET', path: '/v1/devices', access: 'admin', handle: () => jsonReply(200, { devices: trust.devices.list().map((d) => deviceJson(trust, d)) }) },
    { method: 'GET', path: '/v1/devices/:id', access: 'admin', handle: ({ params }) => jsonReply(200, deviceJson(trust, device(trust, params.id!))) },
    {
      method: 'POST',
      path: '/v1/devices/:id/revoke',
      access: 'admin',
      handle: async ({ params }) => {
        await trust.devices.revoke(params.id!);
        return jsonReply(200, deviceJson(trust, device(trust, params.id!)));
      },
    },
    {
      method: 'DELETE',
      path: '/v1/devices/:id',
      access: 'admin',
      handle: async ({ params }) => {
        await trust.devices.remove(params.id!);
        return emptyReply(204);
      },
    },
  ];
}

/** The TLS facts a client pins: also part of /v1/system (discovery-level, open). */
export function tlsJson(trust: TrustView) {
  return { tls_fingerprint: trust.tls.fingerprint, tls_port: trust.tls.port() };
}

function device(trust: TrustView, id: string): PairedDevice {
  const found = trust.devices.get(id);
  if (!found) throw new CloudletError('DEVICE_NOT_FOUND', `no paired device ${id}`, { details: { device_id: id } });
  return found;
}

function deviceJson(trust: TrustView, device: PairedDevice) {
  return {
    id: device.id,
    name: device.name,
    kind: device.kind,
    paired_at: device.pairedAt,
    expires_at: device.expiresAt,
    revoked_at: device.revokedAt,
    standing: trust.devices.standing(device.id) ?? 'active',
  };
}

function deviceKind(value: unknown): DeviceKind {
  if (value === 'device' || value === 'cloudlet') return value;
  throw new CloudletError('INVALID_PARAMETER', 'Field "kind" must be "device" or "cloudlet"', { details: { parameter: 'kind' } });
}

function optionalNumber(body: Record<string, unknown>, field: string, min: number, max: number, integer: boolean): number | undefined {
  const value = body[field];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'number' || !(value >= min && value <= max) || (integer && !Number.isInteger(value))) {
    throw new CloudletError('INVALID_PARAMETER', `Field "${field}" must be ${integer ? 'an integer' : 'a number'} from ${min} to ${max}`, {
      details: { parameter: field },
    });
  }
  return value;
}
