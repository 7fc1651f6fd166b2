/**
 * Cloudlet Push on our own face: the app catalog under /v1/apps, with SHA-256 and resumable (Range) downloads.
 * Adding and removing apps is for the operator on the box (admin access); the catalog and downloads are open.
 */
import { APP_KINDS } from '../core/apps';
import type { App, AppKind, CloudletApi } from '../core/types';
import { CloudletError } from '../errors';
import { emptyReply, fileReply, jsonReply, type ApiRequest, type Route } from './routing';

export function appRoutes(api: CloudletApi): Route[] {
  return [
    { method: 'GET', path: '/v1/apps', access: 'open', handle: ({ query }) => jsonReply(200, { apps: api.listApps(appFilter(query)).map(appJson) }) },
    { method: 'GET', path: '/v1/apps/:id', access: 'open', handle: ({ params }) => jsonReply(200, appJson(api.getApp(params.id!))) },
    { method: 'GET', path: '/v1/apps/:id/file', access: 'open', handle: ({ params }) => appDownload(api, params.id!) },
    { method: 'POST', path: '/v1/apps', access: 'admin', streamBody: true, handle: (request) => addApp(api, request) },
    {
      method: 'DELETE',
      path: '/v1/apps/:id',
      access: 'admin',
      handle: async ({ params }) => {
        await api.removeApp(params.id!);
        return emptyReply(204);
      },
    },
  ];
}

function appDownload(api: CloudletApi, id: string) {
  const { app, path } = api.appFile(id);
  return fileReply(
    path,
    {
      'Content-Type': APP_KINDS[app.kind].contentType,
      'Content-Disposition': `attachment; filename="${app.fileName}"`,
      // The content never changes under an id: its SHA-256 is its validator, and a resumed download can be checked.
      ETag: `"${app.sha256}"`,
      'Cache-Control': 'public, max-age=31536000, immutable',
    },
    true,
  );
}

/** The file is the request body; what describes it comes in the query, so the body stays the raw bytes. */
async function addApp(api: CloudletApi, request: ApiRequest) {
  const q = request.query;
  const required = (name: string) => {
    const value = q.get(name);
    if (!value) throw new CloudletError('MISSING_PARAMETER', `Missing required parameter "${name}"`, { details: { parameter: name } });
    return value;
  };
  const app = await api.addApp(
    {
      kind: (q.get('kind') ?? 'android') as AppKind,
      serviceId: required('service_id'),
      name: required('name'),
      fileName: required('file_name'),
      description: q.get('description') ?? '',
      packageName: q.get('package_name') ?? '',
      version: q.get('version') ?? '',
      minOsVersion: q.get('min_os_version') ?? '',
      tags: splitTags(q.get('tags')),
      ...(q.get('sha256') ? { sha256: q.get('sha256')! } : {}),
    },
    request.bodyStream!.stream,
    request.bodyStream!.length,
  );
  return jsonReply(201, appJson(app));
}

export function splitTags(tags: string | null): string[] {
  return (tags ?? '')
    .split(',')
    .map((tag) => tag.trim())
    .filter((tag) => tag !== '');
}

function appFilter(query: URLSearchParams) {
  const filter: { serviceId?: string; osName?: string; osVersion?: string; tags?: string[] } = {};
  if (query.get('service_id')) filter.serviceId = query.get('service_id')!;
  if (query.get('os_name')) filter.osName = query.get('os_name')!;
  if (query.get('os_version')) filter.osVersion = query.get('os_version')!;
  if (query.get('tags')) filter.tags = splitTags(query.get('tags'));
  return filter;
}

export function appJson(app: App) {
  return {
    id: app.id,
    kind: app.kind,
    os_name: APP_KINDS[app.kind].osName,
    service_id: app.serviceId,
    name: app.name,
    description: app.description,
    package_name: app.packageName,
    version: app.version,
    min_os_version: app.minOsVersion,
    tags: app.tags,
    file_name: app.fileName,
    size: app.size,
    md5: app.md5,
    sha256: app.sha256,
    added_at: app.addedAt,
    download: `/v1/apps/${app.id}/file`,
  };
}
