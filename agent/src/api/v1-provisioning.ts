/**
 * The /v1 routes of On-Demand VM Provisioning: Base VMs, recipes, provisioning and caching a recipe's result, and
 * an instance's console. Same conventions as v1.ts (snake_case JSON, `{code, message, details?}` errors).
 */
import { deviceIdOf, type Caller } from '../trust/access';
import type { BaseVm } from '../core/bases';
import { RECIPE_LIMITS, recipeDigest, recipeJson, type Recipe } from '../core/recipe';
import type { ProvisioningApi } from '../core/types';
import { CloudletError } from '../errors';
import { emptyReply, fileReply, hostOf, jsonReply, textReply, type ApiRequest, type Route } from './routing';
import { jsonObject, optionalBoolean, requiredString } from './json-fields';
import { hostDir, serviceJson, startResultJson } from './wire-shapes';

const CONSOLE_DEFAULT_BYTES = 64 << 10;
const CONSOLE_MAX_BYTES = 1 << 20;

export function provisioningRoutes(api: ProvisioningApi): Route[] {
  return [
    { method: 'GET', path: '/v1/bases', access: 'device', handle: ({ caller }) => jsonReply(200, { bases: api.listBases().map((b) => baseJson(b, caller)) }) },
    { method: 'GET', path: '/v1/bases/:ref', access: 'device', handle: ({ params, caller }) => jsonReply(200, baseJson(api.getBase(params.ref!), caller)) },
    { method: 'GET', path: '/v1/bases/:ref/files/:name', access: 'device', handle: ({ params }) => baseFileDownload(api, params.ref!, params.name!) },
    {
      method: 'POST',
      path: '/v1/bases',
      access: 'admin',
      jsonBody: true,
      handle: async ({ body, caller }) => {
        const fields = jsonObject(body);
        return jsonReply(201, baseJson(await api.importBase(requiredString(fields, 'path'), requiredString(fields, 'name')), caller));
      },
    },
    { method: 'GET', path: '/v1/recipes', access: 'device', handle: () => jsonReply(200, { recipes: api.listRecipes().map(recipeSummaryJson) }) },
    {
      method: 'GET',
      path: '/v1/recipes/:id',
      access: 'device',
      handle: ({ params }) => jsonReply(200, { ...recipeSummaryJson(api.getRecipe(params.id!)), recipe: recipeJson(api.getRecipe(params.id!)) }),
    },
    {
      method: 'POST',
      path: '/v1/recipes',
      access: 'admin',
      jsonBody: true,
      maxBodyBytes: RECIPE_LIMITS.bodyBytes,
      handle: async ({ body }) => jsonReply(201, recipeSummaryJson(await api.storeRecipe(body))),
    },
    {
      method: 'DELETE',
      path: '/v1/recipes/:id',
      access: 'admin',
      handle: async ({ params }) => {
        await api.removeRecipe(params.id!);
        return emptyReply(204);
      },
    },
    { method: 'POST', path: '/v1/recipes/:id/instances', access: 'device', jsonBody: true, handle: (request) => provision(api, request) },
    {
      method: 'POST',
      path: '/v1/recipes/:id/cache',
      access: 'admin',
      handle: async ({ params, caller }) => jsonReply(200, serviceJson(await api.cacheRecipe(params.id!), caller)),
    },
    {
      method: 'GET',
      path: '/v1/instances/:id/console',
      access: 'admin',
      handle: async ({ params, query }) => textReply(200, await api.consoleTail(params.id!, consoleBytes(query.get('bytes')))),
    },
  ];
}

async function provision(api: ProvisioningApi, request: ApiRequest) {
  const body = request.body === undefined ? {} : jsonObject(request.body);
  const result = await api.provision(request.params.id!, {
    join: optionalBoolean(body, 'join') ?? false,
    clientHost: hostOf(request.header('host')),
    deviceId: deviceIdOf(request.caller),
  });
  return jsonReply(201, startResultJson(result));
}

function consoleBytes(value: string | null): number {
  if (value === null) return CONSOLE_DEFAULT_BYTES;
  const n = /^\d+$/.test(value) ? Number(value) : NaN;
  if (!(n >= 1 && n <= CONSOLE_MAX_BYTES)) {
    throw new CloudletError('INVALID_PARAMETER', `bytes must be an integer from 1 to ${CONSOLE_MAX_BYTES}`, { details: { parameter: 'bytes' } });
  }
  return n;
}

function baseJson(base: BaseVm, caller: Caller) {
  const m = base.manifest;
  return {
    digest: base.digest,
    name: base.name,
    ...hostDir(caller, base.dir),
    memory_mib: m.memory_mib,
    vcpus: m.vcpus,
    disk: m.disk,
    state: m.state,
    boot: m.boot,
    manifest: m,
    files: base.files.map((f) => ({
      name: f.name,
      bytes: f.bytes,
      sha256: f.sha256,
      download: `/v1/bases/${base.digest}/files/${encodeURIComponent(f.name)}`,
    })),
  };
}

/** A base's file for an export: resumable (Range), its SHA-256 as the ETag so a resumed download can be checked. */
function baseFileDownload(api: ProvisioningApi, ref: string, name: string) {
  const { file, path } = api.baseFile(ref, name);
  return fileReply(
    path,
    {
      'Content-Type': 'application/octet-stream',
      'Content-Disposition': `attachment; filename="${file.name}"`,
      ETag: `"${file.sha256}"`,
      'Cache-Control': 'public, max-age=31536000, immutable',
    },
    true,
  );
}

function recipeSummaryJson(recipe: Recipe) {
  return {
    id: recipe.service_id,
    version: recipe.version,
    description: recipe.description,
    base: recipe.base,
    digest: recipeDigest(recipe),
    port: recipe.port,
    files: recipe.files.length,
    packages: recipe.packages,
    cache: recipe.cache,
  };
}
