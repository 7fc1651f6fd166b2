/**
 * The OpenAPI 3.1 document of /v1, served at GET /v1/openapi.json (open: it holds no secret, only the API's shape).
 * The operations are data, keyed `METHOD /v1/path/{param}` (a route's path with openApiPath); test/openapi.test.ts
 * fails when a route of the tables is missing here or this lists one that does not exist, or when an operation's
 * access or body disagrees with its route. Error answers are made from each operation's codes: their statuses and
 * the `code` enum come from errors.ts.
 */
import { createHash } from 'node:crypto';
import { AGENT_VERSION } from '../core/host-status';
import { statusOfCode, type ErrorCode } from '../errors';
import type { Access } from '../trust/access';
import { FLEET_OPERATIONS } from './openapi-fleet';
import { CORE_OPERATIONS, type Operation } from './openapi-operations';
import { PROVISIONING_OPERATIONS } from './openapi-provisioning';
import { ref, SCHEMAS } from './openapi-schemas';

/** Every /v1 operation, keyed `METHOD /v1/path/{param}`. */
export const OPERATIONS: Record<string, Operation> = { ...CORE_OPERATIONS, ...PROVISIONING_OPERATIONS, ...FLEET_OPERATIONS };

const JSON_TYPE = 'application/json';

/** The errors any route of that access level may answer besides its own (docs/api.md#access). */
const ACCESS_ERRORS: Record<Access, ErrorCode[]> = {
  // PEER_NOT_ALLOWED: a paired cloudlet's credential, on a route that is not on the list of what cloudlets may ask.
  open: ['PEER_NOT_ALLOWED'],
  services: ['UNAUTHENTICATED', 'DEVICE_REVOKED', 'DEVICE_EXPIRED', 'TLS_REQUIRED', 'PEER_NOT_ALLOWED'],
  device: ['UNAUTHENTICATED', 'DEVICE_REVOKED', 'DEVICE_EXPIRED', 'TLS_REQUIRED', 'PEER_NOT_ALLOWED'],
  admin: ['UNAUTHENTICATED', 'DEVICE_REVOKED', 'DEVICE_EXPIRED', 'ADMIN_ONLY', 'TLS_REQUIRED', 'PEER_NOT_ALLOWED'],
};
/** What every route may answer: a bad path, a client over its rate, a bug. */
const COMMON_ERRORS: ErrorCode[] = ['BAD_REQUEST', 'RATE_LIMITED', 'INTERNAL'];
/** What reading a request body may answer. */
const BODY_ERRORS: Record<'json' | 'stream', ErrorCode[]> = {
  json: ['PAYLOAD_TOO_LARGE', 'REQUEST_TIMEOUT'],
  stream: ['LENGTH_REQUIRED', 'PAYLOAD_TOO_LARGE', 'REQUEST_TIMEOUT'],
};

const SECURITY: Record<Access, Record<string, string[]>[]> = {
  // A credential on an open route is still recognised (the operator is not rate-limited), never required.
  open: [{}, { device: [] }, { operator: [] }],
  // Without a credential too where the access policy lets unpaired clients start services (the plain KD face's default).
  services: [{}, { device: [] }, { operator: [] }],
  device: [{ device: [] }, { operator: [] }],
  admin: [{ operator: [] }],
};

/** `/v1/services/:id` → `/v1/services/{id}` */
export function openApiPath(routePath: string): string {
  return routePath.replace(/:([A-Za-z_]+)/g, '{$1}');
}

function errorResponses(codes: ErrorCode[]) {
  const byStatus = new Map<number, ErrorCode[]>();
  for (const code of new Set(codes)) byStatus.set(statusOfCode(code), [...(byStatus.get(statusOfCode(code)) ?? []), code]);
  const responses: Record<string, unknown> = {};
  for (const [status, statusCodes] of [...byStatus].sort(([a], [b]) => a - b)) {
    responses[String(status)] = {
      description: statusCodes.join(', '),
      content: { [JSON_TYPE]: { schema: { ...ref('Error'), properties: { code: { enum: statusCodes } } } } },
    };
  }
  return responses;
}

function operationObject(key: string, op: Operation) {
  const [, path] = key.split(' ') as [string, string];
  const pathParams = [...path.matchAll(/\{([A-Za-z_]+)\}/g)].map((m) => ({ name: m[1], in: 'path', required: true, schema: { type: 'string' } }));
  const queryParams = Object.entries(op.query ?? {}).map(([name, q]) => ({
    name,
    in: 'query',
    required: q.required ?? false,
    description: q.description,
    schema: q.schema ?? { type: 'string' },
  }));
  const responses: Record<string, unknown> = {};
  for (const [status, answer] of Object.entries(op.ok)) {
    responses[status] = {
      description: answer.description,
      ...(answer.schema ? { content: { [answer.mediaType ?? JSON_TYPE]: { schema: answer.schema } } } : {}),
    };
  }
  const errors = [...op.errors, ...ACCESS_ERRORS[op.access], ...(op.body ? BODY_ERRORS[op.body.kind] : []), ...COMMON_ERRORS];
  return {
    operationId: op.id,
    summary: op.summary,
    ...(op.description ? { description: op.description } : {}),
    tags: [op.tag],
    'x-access': op.access,
    security: SECURITY[op.access],
    ...(pathParams.length + queryParams.length ? { parameters: [...pathParams, ...queryParams] } : {}),
    ...(op.body
      ? {
          requestBody: {
            required: op.body.required ?? true,
            description: op.body.description,
            content: { [op.body.mediaType ?? JSON_TYPE]: { schema: op.body.schema } },
          },
        }
      : {}),
    responses: { ...responses, ...errorResponses(errors) },
  };
}

function buildDocument() {
  const paths: Record<string, Record<string, unknown>> = {};
  for (const [key, op] of Object.entries(OPERATIONS)) {
    const [method, path] = key.split(' ') as [string, string];
    (paths[path] ??= {})[method.toLowerCase()] = operationObject(key, op);
  }
  return {
    openapi: '3.1.0',
    info: {
      title: 'Cloudlet agent API (/v1)',
      version: AGENT_VERSION,
      description:
        'The cloudlet’s own JSON API: services, instances, apps, app packages, On-Demand provisioning, VM Synthesis, pairing. ' +
        'snake_case keys; errors are `{code, message, details?}` with a stable `code`. The KD-Cloudlet face (/api) is described in docs/api.md.',
      license: { name: 'Apache-2.0', identifier: 'Apache-2.0' },
    },
    servers: [{ url: '/' }],
    paths,
    components: {
      schemas: SCHEMAS,
      securitySchemes: {
        device: { type: 'http', scheme: 'bearer', description: 'A paired device’s token (from POST /v1/pairing/claim), over HTTPS.' },
        operator: { type: 'http', scheme: 'bearer', description: 'The admin token (<dataDir>/trust/admin-token), accepted from loopback only.' },
      },
    },
  };
}

/** The document, built once: it is the same for every caller and for the life of the process. */
export const OPENAPI_JSON = JSON.stringify(buildDocument());
export const OPENAPI_ETAG = `"${createHash('sha256').update(OPENAPI_JSON).digest('hex').slice(0, 32)}"`;
