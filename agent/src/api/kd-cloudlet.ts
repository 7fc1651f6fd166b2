/**
 * The KD-Cloudlet face: SEI pycloud's plain-mode API under /api, as the Android client-lib in the field reads it
 * (routes, JSON keys and wrappers, statuses, WebOb text error bodies). docs/api.md lists the quirks kept on purpose.
 */
import { addressKey, deviceIdOf, stopperOf } from '../trust/access';
import { APP_KINDS } from '../core/apps';
import type { App, CloudletApi, Endpoint, Instance, Package, Service } from '../core/types';
import { asCloudletError, CloudletError, type ErrorCode } from '../errors';
import { KdMailbox } from './kd-messages';
import { splitTags } from './v1-apps';
import { emptyReply, fileReply, hostOf, jsonReply, keptWhile, textReply, type ApiRequest, type Face, type Reply, type Route } from './routing';

export function kdCloudletFace(api: CloudletApi): Face {
  // The list every client polls, serialized once per change of the services and packages.
  const servicesReply = keptWhile(
    () => api.catalogRevision(),
    () => jsonReply(200, { services: startableServices(api).map(serviceJson) }),
  );
  const mailbox = new KdMailbox(api);
  const routes: Route[] = [
    { method: 'GET', path: '/api/services', access: 'services', handle: servicesReply },
    { method: 'GET', path: '/api/services/get', access: 'services', handle: (request) => findService(api, request) },
    { method: 'GET', path: '/api/servicevm/start', access: 'services', handle: (request) => startServiceVm(api, request) },
    { method: 'GET', path: '/api/servicevm/stop', access: 'services', handle: (request) => stopServiceVm(api, request) },
    { method: 'GET', path: '/api/system', access: 'open', handle: (request) => systemMetadata(api, request) },
    // KD answers a missing X-Device-ID with a 500 (a KeyError); no device, no mailbox, here.
    {
      method: 'GET',
      path: '/api/system/get_messages',
      access: 'open',
      handle: (request) => {
        const deviceId = request.header('x-device-id')?.slice(0, 200);
        const serviceId = request.query.get('serviceId')?.slice(0, 200);
        return jsonReply(200, { messages: deviceId && serviceId ? mailbox.take(deviceId, serviceId) : [] });
      },
    },
    { method: 'GET', path: '/api/apps', access: 'open', handle: ({ query }) => jsonReply(200, { apps: androidApps(api, query).map(appJson) }) },
    { method: 'GET', path: '/api/apps/get', access: 'open', handle: (request) => getApp(api, request) },
  ];
  return {
    prefix: '/api',
    routes,
    headAsGet: true,
    wrongMethod: 'not-found',
    errorReply: (error) => {
      const status = error.status in WEBOB_ERRORS ? error.status : 500;
      // client-lib reads a 401/403 body as "<anything>#<message>" (a CredentialsException); KD's security errors say so.
      if (status === 401 || status === 403) return webobError(status, `#${error.message}`);
      return webobError(status, `${status} ${WEBOB_ERRORS[status]!.title} - ${error.message}`);
    },
  };
}

function findService(api: CloudletApi, request: ApiRequest): Reply {
  // Python formats a missing parameter as None.
  const serviceId = request.query.get('serviceId') ?? 'None';
  try {
    return jsonReply(200, serviceJson(api.listPackages().find((p) => p.id === serviceId) ?? api.getService(serviceId)));
  } catch (err) {
    return failureReply(err, { code: 'SERVICE_NOT_FOUND', status: 404, detail: `404 Not Found - service for ${serviceId} not found` });
  }
}

async function startServiceVm(api: CloudletApi, request: ApiRequest): Promise<Reply> {
  const serviceId = request.query.get('serviceId');
  if (!serviceId) return webobError(400, '400 Bad Request - must provide service id');
  try {
    const { instance, endpoint } = await api.startInstance({
      serviceId,
      join: parseFlag(request.query.get('join')),
      clientHost: hostOf(request.header('host')),
      // The owner is an authenticated device (the encrypted face's caller); plain mode's X-Device-ID proves nothing.
      deviceId: deviceIdOf(request.caller),
      // Anyone may start through the plain face: such uses are bounded per address and in all, and kept apart.
      ...(request.caller.kind === 'anonymous' ? { anonymousFrom: addressKey(request.remoteAddress) } : {}),
    });
    return jsonReply(200, serviceVmJson(instance, endpoint));
  } catch (err) {
    // pycloud answers an unknown service with status 400 and a "404 Not Found" text.
    return failureReply(err, { code: 'SERVICE_NOT_FOUND', status: 400, detail: `404 Not Found - service vm for ${serviceId} not found` });
  }
}

async function stopServiceVm(api: CloudletApi, request: ApiRequest): Promise<Reply> {
  const instanceId = request.query.get('instanceId');
  if (!instanceId) return webobError(400, '400 Bad Request - must provide instance id');
  try {
    // A device of the encrypted face stops only its own uses; plain mode's caller is anonymous and stops only a use
    // an anonymous caller holds (never the operator's, never a paired device's).
    await api.stopInstance(instanceId, stopperOf(request.caller, request.remoteAddress));
    // pycloud's stop handler has no JSON serializer and returns {} as an empty WSGI body.
    return emptyReply(200);
  } catch (err) {
    // Another device's instance is, to this device, one that does not exist.
    const error = asCloudletError(err);
    const unknown = error.code === 'FORBIDDEN' ? new CloudletError('INSTANCE_NOT_FOUND', error.message) : error;
    return failureReply(unknown, { code: 'INSTANCE_NOT_FOUND', status: 404, detail: `404 Not Found - service vm for ${instanceId} not found` });
  }
}

async function systemMetadata(api: CloudletApi, request: ApiRequest): Promise<Reply> {
  const info = await api.systemInfo();
  const metadata: Record<string, unknown> = {
    memory_info: { max_memory: info.memory.totalBytes, free_memory: info.memory.freeBytes },
    cpu_info: {
      // Clients rank cloudlets by 100*max_cores - usage and never pick a rank <= 0.
      max_cores: Math.max(1, info.cpu.cores),
      usage: info.cpu.usagePercent,
      speed: info.cpu.speedMhz,
      cache: info.cpu.cacheKb,
    },
  };
  if (parseFlag(request.query.get('services'))) metadata.services = startableServices(api).map(serviceJson);
  if (parseFlag(request.query.get('apps'))) metadata.apps = androidApps(api, new URLSearchParams()).map(appJson);
  return jsonReply(200, metadata);
}

/** What a KD client can start: the cached services and the app packages, whose app ids act as service ids. */
function startableServices(api: CloudletApi): (Service | Package)[] {
  return [...api.listServices(), ...api.listPackages()].sort((a, b) => a.id.localeCompare(b.id));
}

/**
 * The apps a KD client may install: Android ones only (client-lib saves every download as an .apk and opens the
 * installer). osName, osVersion (the app's minimum must not exceed it) and tags (any one) filter, where pycloud
 * ignored the first two.
 */
function androidApps(api: CloudletApi, query: URLSearchParams): App[] {
  const osName = query.get('osName');
  if (osName && osName.toLowerCase() !== 'android') return [];
  return api.listApps({ osName: 'Android', ...(query.get('osVersion') ? { osVersion: query.get('osVersion')! } : {}), tags: splitTags(query.get('tags')) });
}

function getApp(api: CloudletApi, request: ApiRequest): Reply {
  // client-lib sends appId; pycloud's handler read app_id. Either is accepted.
  const appId = request.query.get('appId') || request.query.get('app_id');
  if (!appId) return webobError(400, '400 Bad Request - must provide app_id');
  const notFound = { code: 'APP_NOT_FOUND' as const, status: 404, detail: `404 Not Found - app with id "${appId}" was not found` };
  try {
    const { app, path } = api.appFile(appId);
    if (app.kind !== 'android') return webobError(notFound.status, notFound.detail);
    // pycloud's header spelling; the file name is "<app id>-<original name>" as pycloud stored it.
    return fileReply(path, { 'Content-type': APP_KINDS.android.contentType, 'Content-disposition': `attachment; filename="${app.id}-${app.fileName}"` }, false);
  } catch (err) {
    return failureReply(err, notFound);
  }
}

/** pycloud's app document; md5sum is the real MD5 of the file (pycloud left it null), which client-lib then checks. */
function appJson(app: App) {
  return {
    _id: app.id,
    name: app.name,
    service_id: app.serviceId,
    description: app.description,
    package_name: app.packageName,
    min_android_version: app.minOsVersion,
    md5sum: app.md5,
    app_version: app.version,
    tags: app.tags,
  };
}

function serviceJson(service: Service | Package) {
  const { version, description, tags } = service.manifest;
  return { _id: service.id, service_id: service.id, description, version, tags };
}

function serviceVmJson(instance: Instance, endpoint: Endpoint) {
  return {
    _id: instance.id,
    service_id: instance.serviceId,
    running: true,
    port: endpoint.port,
    ip_address: endpoint.address,
    // No VNC console, no forwarded SSH and no DNS names: client-lib falls back to ip_address when fqdn is null.
    vnc_address: null,
    ssh_port: null,
    fqdn: null,
  };
}

/** pycloud's boolean parameters: T, TRUE, Y or YES in any case; anything else (or absent) is false. */
function parseFlag(value: string | null): boolean {
  return value !== null && ['T', 'TRUE', 'Y', 'YES'].includes(value.toUpperCase());
}

/**
 * A failed core call, answered as pycloud does: the not-found case with its own status and text, anything else 500;
 * but what pycloud never had to say, that the cloudlet is at a limit (BUSY, QUOTA_EXCEEDED, ...), is a 503 in KD's
 * form, with Retry-After when the limit says when to come back.
 */
function failureReply(err: unknown, notFound: { code: ErrorCode; status: number; detail: string }): Reply {
  const error = asCloudletError(err);
  if (error.code === notFound.code) return webobError(notFound.status, notFound.detail);
  if (error.status !== 503) return webobError(500, `500 Internal Server Error - ${error.message}`);
  const reply = webobError(503, `503 Service Unavailable - ${error.message}`);
  const retryAfter = error.details?.retry_after_s;
  if (typeof retryAfter === 'number') reply.headers['Retry-After'] = String(retryAfter);
  return reply;
}

/** WebOb 1.3's explanations, after its HTML-to-text pass (which leaves the trailing spaces). */
const WEBOB_ERRORS: Record<number, { title: string; explanation: string }> = {
  400: { title: 'Bad Request', explanation: 'The server could not comply with the request since it is either malformed or otherwise incorrect. ' },
  401: {
    title: 'Unauthorized',
    explanation:
      'This server could not verify that you are authorized to access the document you requested.  Either you supplied the wrong credentials (e.g., bad password), or your browser does not understand how to supply the credentials required.',
  },
  403: { title: 'Forbidden', explanation: 'Access was denied to this resource.' },
  404: { title: 'Not Found', explanation: 'The resource could not be found.' },
  408: { title: 'Request Timeout', explanation: 'The server has waited too long for the request to be sent by the client.' },
  413: { title: 'Request Entity Too Large', explanation: 'The body of your request was too large for this server.' },
  429: { title: 'Too Many Requests', explanation: 'The client has sent too many requests in a given amount of time.' },
  503: { title: 'Service Unavailable', explanation: 'The server is currently unavailable. Please try again at a later time.' },
  500: { title: 'Internal Server Error', explanation: 'The server has either erred or is incapable of performing the requested operation. ' },
};

/**
 * The text/plain body Pylons' abort(status, detail) produces through WebOb 1.3: status line, explanation, detail.
 * WebOb renders an HTML template and strips the tags, which is where the stray spaces and the flattened newlines come
 * from; client-lib shows the whole body as the error message.
 */
export function webobError(status: number, detail: string): Reply {
  const { title, explanation } = WEBOB_ERRORS[status] ?? WEBOB_ERRORS[500]!;
  const flatDetail = detail.replace(/\r/g, '').replace(/\n/g, ' ');
  return textReply(status, `${status} ${title}\n\n${explanation}\n\n ${flatDetail}  `);
}
