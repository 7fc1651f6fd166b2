/**
 * The /v1 operations as data, for openapi.ts, keyed `METHOD /v1/path/{param}`: a route of the route tables with its
 * path in OpenAPI's form (openApiPath). `errors` are the route's own codes (checked by the compiler against ErrorCode);
 * the access, body and common errors are added by openapi.ts. docs/api.md says the same in prose.
 */
import type { ErrorCode } from '../errors';
import type { Access } from '../trust/access';
import { ref } from './openapi-schemas';

export type Schema = Record<string, unknown>;

export interface Operation {
  id: string;
  tag: string;
  summary: string;
  description?: string;
  access: Access;
  query?: Record<string, { description: string; required?: boolean; schema?: Schema }>;
  /** `json`: a route with `jsonBody`; `stream`: a route with `streamBody` (Content-Length required). */
  body?: { kind: 'json' | 'stream'; schema: Schema; description?: string; mediaType?: string; required?: boolean };
  /** The success answers by status. */
  ok: Record<number, { description: string; schema?: Schema; mediaType?: string }>;
  errors: ErrorCode[];
}

export const list = (key: string, item: string): Schema => ({ type: 'object', properties: { [key]: { type: 'array', items: ref(item) } }, required: [key] });
export const body = (properties: Record<string, Schema>, required: string[]): Schema => ({ type: 'object', properties, required });
export const str: Schema = { type: 'string' };
export const binary: Schema = { type: 'string', contentMediaType: 'application/octet-stream' };
export const noContent = { 204: { description: 'Done; empty body.' } };
export const fileAnswers = {
  200: { description: 'The file, streamed, with `ETag: "<sha256>"` and `Accept-Ranges: bytes`.', schema: binary, mediaType: 'application/octet-stream' },
  206: {
    description: 'The part a `Range` asked for (`If-Range` naming another ETag gets the whole file).',
    schema: binary,
    mediaType: 'application/octet-stream',
  },
  416: { description: 'The range lies outside the file.' },
};
export const LAUNCH_ERRORS: ErrorCode[] = [
  'NO_FREE_PORT',
  'PORT_TAKEN',
  'BUSY',
  'LAUNCH_FAILED',
  'READINESS_TIMEOUT',
  'HYPERVISOR_ERROR',
  'HYPERVISOR_UNAVAILABLE',
  'NO_SPACE',
];

/** The routes of v1.ts, v1-apps.ts and v1-trust.ts (and the /v1/events socket); openapi-provisioning.ts has the rest. */
export const CORE_OPERATIONS: Record<string, Operation> = {
  'GET /v1/openapi.json': {
    id: 'getOpenApi',
    tag: 'system',
    summary: 'This document',
    access: 'open',
    ok: {
      200: { description: 'The OpenAPI 3.1 document of /v1 (cacheable; `ETag`, `If-None-Match` answers 304).', schema: { type: 'object' } },
      304: { description: 'Not modified.' },
    },
    errors: [],
  },
  'GET /v1/health': {
    id: 'getHealth',
    tag: 'system',
    summary: 'Health report',
    access: 'open',
    ok: {
      200: { description: 'Healthy (an optional check may still fail).', schema: ref('Health') },
      503: { description: 'Unhealthy.', schema: ref('Health') },
    },
    errors: [],
  },
  'GET /v1/system': {
    id: 'getSystem',
    tag: 'system',
    summary: 'The cloudlet: host, CPU, memory, hypervisor, discovery, the TLS certificate to pin',
    access: 'open',
    ok: { 200: { description: 'System info.', schema: ref('SystemInfo') } },
    errors: ['HYPERVISOR_ERROR', 'HYPERVISOR_UNAVAILABLE'],
  },
  'GET /v1/events': {
    id: 'watchEvents',
    tag: 'instances',
    summary: 'Live events (WebSocket)',
    description:
      'A WebSocket upgrade: a snapshot of the instances, then every instance change and launch progress, one JSON text message (Event) each. ' +
      'The token may also come as `?access_token=` or as a `bearer.<token>` entry of Sec-WebSocket-Protocol (offer `cloudlet.events` next to it). ' +
      'A plain GET without the upgrade answers 404.',
    access: 'device',
    query: { access_token: { description: 'The device token, for clients that cannot set headers.' } },
    ok: { 101: { description: 'Switching to the WebSocket; its messages are Event.', schema: ref('Event') } },
    errors: ['NOT_FOUND', 'TOO_MANY_CONNECTIONS'],
  },

  'GET /v1/services': {
    id: 'listServices',
    tag: 'services',
    summary: 'The Cached VM services',
    access: 'services',
    ok: { 200: { description: 'The catalog.', schema: list('services', 'Service') } },
    errors: [],
  },
  'GET /v1/services/{id}': {
    id: 'getService',
    tag: 'services',
    summary: 'One service',
    access: 'services',
    ok: { 200: { description: 'The service.', schema: ref('Service') } },
    errors: ['SERVICE_NOT_FOUND'],
  },
  'POST /v1/services': {
    id: 'importService',
    tag: 'services',
    summary: 'Import a service directory on the cloudlet',
    access: 'admin',
    body: { kind: 'json', schema: body({ path: str }, ['path']), description: 'An absolute path on the cloudlet.' },
    ok: { 201: { description: 'Imported.', schema: ref('Service') } },
    errors: ['MISSING_PARAMETER', 'INVALID_PARAMETER', 'INVALID_MANIFEST', 'INVALID_IMAGE', 'SERVICE_EXISTS', 'IMAGE_TOOL_FAILED', 'NO_SPACE'],
  },
  'DELETE /v1/services/{id}': {
    id: 'removeService',
    tag: 'services',
    summary: 'Remove a service',
    access: 'admin',
    ok: noContent,
    errors: ['SERVICE_NOT_FOUND', 'SERVICE_IN_USE'],
  },
  'POST /v1/services/{id}/state': {
    id: 'captureServiceState',
    tag: 'services',
    summary: 'Capture a memory state: later starts restore it',
    access: 'admin',
    ok: { 200: { description: 'The service with its new memory state.', schema: ref('Service') } },
    errors: ['SERVICE_NOT_FOUND', 'SERVICE_IN_USE', ...LAUNCH_ERRORS],
  },

  'GET /v1/packages': {
    id: 'listPackages',
    tag: 'packages',
    summary: 'The app packages (Application Virtualization)',
    access: 'device',
    ok: { 200: { description: 'The packages.', schema: list('packages', 'Package') } },
    errors: [],
  },
  'GET /v1/packages/{id}': {
    id: 'getPackage',
    tag: 'packages',
    summary: 'One app package',
    access: 'device',
    ok: { 200: { description: 'The package.', schema: ref('Package') } },
    errors: ['SERVICE_NOT_FOUND'],
  },
  'POST /v1/packages': {
    id: 'importPackage',
    tag: 'packages',
    summary: 'Import an app package: the tarball itself, or JSON naming one on the cloudlet',
    access: 'admin',
    body: {
      kind: 'stream',
      schema: binary,
      mediaType: 'application/octet-stream',
      description: 'A gzip or zstd tarball; or `application/json` `{"path": "/abs/file.tar.gz"}`.',
    },
    ok: { 201: { description: 'Imported.', schema: ref('Package') } },
    errors: ['INVALID_PACKAGE', 'INVALID_MANIFEST', 'MISSING_PARAMETER', 'INVALID_PARAMETER', 'SERVICE_EXISTS', 'NO_SPACE'],
  },
  'DELETE /v1/packages/{id}': {
    id: 'removePackage',
    tag: 'packages',
    summary: 'Remove an app package',
    access: 'admin',
    ok: noContent,
    errors: ['SERVICE_NOT_FOUND', 'SERVICE_IN_USE'],
  },

  'GET /v1/apps': {
    id: 'listApps',
    tag: 'apps',
    summary: 'The apps (Cloudlet Push)',
    access: 'open',
    query: {
      service_id: { description: 'Only the apps of this service.' },
      os_name: { description: 'Only apps for this OS (`Android`, `web`).' },
      os_version: { description: 'Only apps that run on this OS version.' },
      tags: { description: 'Comma-separated: only apps with one of these tags.' },
    },
    ok: { 200: { description: 'The apps.', schema: list('apps', 'App') } },
    errors: [],
  },
  'GET /v1/apps/{id}': {
    id: 'getApp',
    tag: 'apps',
    summary: 'One app',
    access: 'open',
    ok: { 200: { description: 'The app.', schema: ref('App') } },
    errors: ['APP_NOT_FOUND'],
  },
  'GET /v1/apps/{id}/file': {
    id: 'downloadApp',
    tag: 'apps',
    summary: 'Download an app’s file (resumable)',
    access: 'open',
    ok: fileAnswers,
    errors: ['APP_NOT_FOUND'],
  },
  'POST /v1/apps': {
    id: 'addApp',
    tag: 'apps',
    summary: 'Add an app: the body is the file, the query describes it',
    access: 'admin',
    query: {
      service_id: { description: 'The service it goes with (must be in the catalog).', required: true },
      name: { description: 'Its name.', required: true },
      file_name: { description: 'A plain file name.', required: true },
      kind: { description: 'What it is.', schema: { type: 'string', enum: ['android', 'web'], default: 'android' } },
      package_name: { description: 'Android package name.' },
      version: { description: 'Its version.' },
      min_os_version: { description: 'Dotted numbers.' },
      tags: { description: 'Comma-separated.' },
      description: { description: 'Free text.' },
      sha256: { description: 'When given, what arrives must match it.' },
    },
    body: { kind: 'stream', schema: binary, mediaType: 'application/octet-stream' },
    ok: { 201: { description: 'Added.', schema: ref('App') } },
    errors: ['MISSING_PARAMETER', 'INVALID_PARAMETER', 'SERVICE_NOT_FOUND', 'INVALID_APP', 'NO_SPACE'],
  },
  'DELETE /v1/apps/{id}': {
    id: 'removeApp',
    tag: 'apps',
    summary: 'Remove an app',
    access: 'admin',
    ok: noContent,
    errors: ['APP_NOT_FOUND'],
  },

  'GET /v1/instances': {
    id: 'listInstances',
    tag: 'instances',
    summary: 'The running instances (a device sees its own)',
    access: 'device',
    ok: { 200: { description: 'The instances.', schema: list('instances', 'Instance') } },
    errors: [],
  },
  'GET /v1/instances/{id}': {
    id: 'getInstance',
    tag: 'instances',
    summary: 'One instance',
    access: 'device',
    ok: { 200: { description: 'The instance.', schema: ref('Instance') } },
    errors: ['INSTANCE_NOT_FOUND'],
  },
  'POST /v1/instances': {
    id: 'startInstance',
    tag: 'instances',
    summary: 'Start (or join) an instance of a service or app package',
    access: 'services',
    body: { kind: 'json', schema: body({ service_id: str, join: { type: 'boolean', default: false } }, ['service_id']) },
    ok: { 201: { description: 'Ready: the instance and where to reach it.', schema: ref('StartResult') } },
    errors: ['MISSING_PARAMETER', 'INVALID_PARAMETER', 'SERVICE_NOT_FOUND', 'FORBIDDEN', 'SANDBOX_UNAVAILABLE', 'QUOTA_EXCEEDED', ...LAUNCH_ERRORS],
  },
  'DELETE /v1/instances/{id}': {
    id: 'stopInstance',
    tag: 'instances',
    summary: 'Stop (release) an instance',
    access: 'services',
    ok: { 200: { description: 'Released; `destroyed` is false while others still share it.', schema: ref('StopResult') } },
    errors: ['INSTANCE_NOT_FOUND', 'FORBIDDEN', 'HYPERVISOR_ERROR', 'HYPERVISOR_UNAVAILABLE'],
  },
  'POST /v1/pairing': {
    id: 'openPairing',
    tag: 'pairing',
    summary: 'Open a pairing window (replacing any open one)',
    access: 'admin',
    body: {
      kind: 'json',
      schema: body(
        {
          ttl_seconds: { type: 'integer', minimum: 1, maximum: 3600, default: 300 },
          expires_in_minutes: { type: 'number', description: 'The paired device’s authorization; absent: until revoked.' },
          kind: {
            type: 'string',
            enum: ['device', 'cloudlet'],
            default: 'device',
            description: 'Who may claim it: a phone, or another cloudlet (docs/fleet.md).',
          },
        },
        [],
      ),
    },
    ok: { 201: { description: 'The window’s one-time code.', schema: ref('PairingWindow') } },
    errors: ['INVALID_PARAMETER'],
  },
  'DELETE /v1/pairing': { id: 'closePairing', tag: 'pairing', summary: 'Close the pairing window', access: 'admin', ok: noContent, errors: [] },
  'POST /v1/pairing/claim': {
    id: 'claimPairing',
    tag: 'pairing',
    summary: 'Pair a device with the window’s code (TLS or loopback only)',
    access: 'open',
    body: {
      kind: 'json',
      schema: body({ code: str, name: { type: 'string', maxLength: 100 }, device_id: str, kind: { type: 'string', enum: ['device', 'cloudlet'] } }, [
        'code',
        'name',
      ]),
    },
    ok: { 201: { description: 'The device’s credential: it exists nowhere else.', schema: ref('PairedCredential') } },
    errors: ['TLS_REQUIRED', 'PAIRING_CLOSED', 'PAIRING_CODE_INVALID', 'CONFLICT', 'MISSING_PARAMETER', 'INVALID_PARAMETER'],
  },
  'GET /v1/devices': {
    id: 'listDevices',
    tag: 'devices',
    summary: 'The paired devices',
    access: 'admin',
    ok: { 200: { description: 'The devices.', schema: list('devices', 'Device') } },
    errors: [],
  },
  'GET /v1/devices/{id}': {
    id: 'getDevice',
    tag: 'devices',
    summary: 'One paired device',
    access: 'admin',
    ok: { 200: { description: 'The device.', schema: ref('Device') } },
    errors: ['DEVICE_NOT_FOUND'],
  },
  'POST /v1/devices/{id}/revoke': {
    id: 'revokeDevice',
    tag: 'devices',
    summary: 'Revoke a device: its token is refused, its uses of instances released',
    access: 'admin',
    ok: { 200: { description: 'The device, revoked.', schema: ref('Device') } },
    errors: ['DEVICE_NOT_FOUND'],
  },
  'DELETE /v1/devices/{id}': {
    id: 'removeDevice',
    tag: 'devices',
    summary: 'Forget a device (it may pair again)',
    access: 'admin',
    ok: noContent,
    errors: ['DEVICE_NOT_FOUND'],
  },
};
