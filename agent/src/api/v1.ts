/**
 * Our own versioned JSON API under /v1. Keys are snake_case on the wire; the mapping from the camelCase core types
 * lives in wire-shapes.ts and nowhere else. Errors are `{code, message, details?}` with the CloudletError's status.
 */
import { jsonObject, optionalBoolean, requiredString } from './json-fields';
import { addressKey, deviceIdOf, stopperOf } from '../trust/access';
import type { CloudletApi, PackageSource, ProvisioningApi } from '../core/types';
import { CloudletError } from '../errors';
import { emptyReply, hostOf, jsonReply, type ApiRequest, type Face, type Route } from './routing';
import { appRoutes } from './v1-apps';
import { provisioningRoutes } from './v1-provisioning';
import { synthesisRoutes } from './v1-synthesis';
import { tlsJson, trustRoutes, type TrustView } from './v1-trust';
import { healthJson, instanceJson, InstanceView, packageJson, serviceJson, startResultJson, stopResultJson, systemJson } from './wire-shapes';
import { fleetRoutes, type FleetView } from './v1-fleet';

/** The OpenAPI document is built when first asked for (about 1 MB of the idle agent's memory otherwise). */
const openApi = () => require('./openapi') as typeof import('./openapi');

export function v1Face(api: CloudletApi, provisioning?: ProvisioningApi, trust?: TrustView, fleet?: FleetView): Face {
  const routes: Route[] = [
    ...(provisioning ? [...provisioningRoutes(provisioning), ...synthesisRoutes(provisioning)] : []),
    ...(trust ? trustRoutes(trust) : []),
    {
      method: 'GET',
      path: '/v1/health',
      access: 'open',
      handle: async () => {
        const report = await api.health();
        return jsonReply(report.ok ? 200 : 503, healthJson(report));
      },
    },
    // The API's shape, no secret: open and cacheable; the ETag changes only with the document (an agent upgrade).
    {
      method: 'GET',
      path: '/v1/openapi.json',
      access: 'open',
      handle: (request) => {
        const { OPENAPI_ETAG, OPENAPI_JSON } = openApi();
        const cache = { ETag: OPENAPI_ETAG, 'Cache-Control': 'public, max-age=3600, must-revalidate' };
        if (request.header('if-none-match') === OPENAPI_ETAG) return { status: 304, headers: cache, body: '' };
        return { status: 200, headers: { 'Content-Type': 'application/json; charset=utf-8', ...cache }, body: OPENAPI_JSON };
      },
    },
    {
      method: 'GET',
      path: '/v1/system',
      access: 'open',
      handle: async () => jsonReply(200, { ...systemJson(await api.systemInfo()), ...(trust ? tlsJson(trust) : {}) }),
    },
    {
      method: 'GET',
      path: '/v1/services',
      access: 'services',
      handle: ({ caller }) => jsonReply(200, { services: api.listServices().map((s) => serviceJson(s, caller)) }),
    },
    {
      method: 'GET',
      path: '/v1/services/:id',
      access: 'services',
      handle: ({ params, caller }) => jsonReply(200, serviceJson(api.getService(params.id!), caller)),
    },
    {
      method: 'POST',
      path: '/v1/services',
      access: 'admin',
      jsonBody: true,
      handle: async ({ body, caller }) => jsonReply(201, serviceJson(await api.importService(requiredString(jsonObject(body), 'path')), caller)),
    },
    {
      method: 'DELETE',
      path: '/v1/services/:id',
      access: 'admin',
      handle: async ({ params }) => {
        await api.removeService(params.id!);
        return emptyReply(204);
      },
    },
    {
      method: 'POST',
      path: '/v1/services/:id/state',
      access: 'admin',
      handle: async ({ params, caller }) => jsonReply(200, serviceJson(await api.captureServiceState(params.id!), caller)),
    },
    {
      method: 'GET',
      path: '/v1/packages',
      access: 'device',
      handle: ({ caller }) => jsonReply(200, { packages: api.listPackages().map((p) => packageJson(p, caller)) }),
    },
    {
      method: 'GET',
      path: '/v1/packages/:id',
      access: 'device',
      handle: ({ params, caller }) => jsonReply(200, packageJson(api.getPackage(params.id!), caller)),
    },
    {
      method: 'POST',
      path: '/v1/packages',
      access: 'admin',
      streamBody: true,
      handle: async (request) => jsonReply(201, packageJson(await api.importPackage(await packageSource(request)), request.caller)),
    },
    {
      method: 'DELETE',
      path: '/v1/packages/:id',
      access: 'admin',
      handle: async ({ params }) => {
        await api.removePackage(params.id!);
        return emptyReply(204);
      },
    },
    ...fleetRoutes(api, fleet),
    ...appRoutes(api),
    // A device sees only its own instances (InstanceView); the operator all.
    {
      method: 'GET',
      path: '/v1/instances',
      access: 'device',
      handle: ({ caller }) => jsonReply(200, { instances: InstanceView.of(caller).list(api.listInstances()).map(instanceJson) }),
    },
    {
      method: 'GET',
      path: '/v1/instances/:id',
      access: 'device',
      handle: ({ params, caller }) => jsonReply(200, instanceJson(InstanceView.of(caller).one(api.getInstance(params.id!)))),
    },
    { method: 'POST', path: '/v1/instances', access: 'services', jsonBody: true, handle: (request) => startInstance(api, request) },
    {
      method: 'DELETE',
      path: '/v1/instances/:id',
      access: 'services',
      handle: async ({ params, caller, remoteAddress }) => jsonReply(200, stopResultJson(await api.stopInstance(params.id!, stopperOf(caller, remoteAddress)))),
    },
  ];
  return {
    prefix: '/v1',
    routes,
    headAsGet: false,
    wrongMethod: 'method-not-allowed',
    errorReply: (error) => {
      const reply = jsonReply(error.status, error.toJSON());
      const allowed = error.details?.allowed;
      if (error.code === 'METHOD_NOT_ALLOWED' && Array.isArray(allowed)) reply.headers.Allow = allowed.join(', ');
      return reply;
    },
  };
}

async function startInstance(api: CloudletApi, request: ApiRequest) {
  const body = jsonObject(request.body);
  const deviceId = deviceIdOf(request.caller);
  // A device whose authorization ends while its VM launches gets an error, its use given back (the core's start).
  const result = await api.startInstance({
    serviceId: requiredString(body, 'service_id'),
    join: optionalBoolean(body, 'join') ?? false,
    clientHost: hostOf(request.header('host')),
    ...(deviceId !== undefined ? { deviceId } : {}),
    // Without a credential (the access policy allows it): an anonymous use, bounded and kept apart as on the KD face.
    ...(request.caller.kind === 'anonymous' ? { anonymousFrom: addressKey(request.remoteAddress) } : {}),
  });
  // A device (or an anonymous caller) that joined a shared instance learns nothing of its other users' ids.
  return jsonReply(201, startResultJson({ ...result, instance: InstanceView.of(request.caller).redacted(result.instance) }));
}

// ---- request bodies --------------------------------------------------------------------------------------------

const PATH_BODY_MAX_BYTES = 64 * 1024;

/** POST /v1/packages: a JSON `{path}` of a tarball on this machine, or (any other Content-Type) the tarball itself. */
async function packageSource(request: ApiRequest): Promise<PackageSource> {
  const upload = request.bodyStream;
  if (!upload) throw new CloudletError('BAD_REQUEST', 'POST a package tarball, or JSON {"path": ...} naming one on the cloudlet');
  if (!request.header('content-type')?.startsWith('application/json')) return { stream: upload.stream, length: upload.length };
  if (upload.length > PATH_BODY_MAX_BYTES) throw new CloudletError('PAYLOAD_TOO_LARGE', `a JSON body must be at most ${PATH_BODY_MAX_BYTES} bytes`);
  const chunks: Buffer[] = [];
  for await (const chunk of upload.stream) chunks.push(chunk as Buffer);
  let body: unknown;
  try {
    body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch (err) {
    throw new CloudletError('BAD_REQUEST', `Malformed JSON body: ${(err as Error).message}`);
  }
  return { path: requiredString(jsonObject(body), 'path') };
}
