// The OpenAPI document of /v1 is kept true: it lists exactly the routes of the agent's route tables (and the
// /v1/events socket), each with the access and the request body its route has, and it is a valid OpenAPI 3.1 document
// by a well-kept validator. What a real agent answers is checked against it in test/openapi.e2e.test.ts.
import t from 'tap';
import { EventsSocket, type EventsSocketOptions } from '../agent/src/api/events-socket';
import { OPENAPI_JSON, OPERATIONS, openApiPath } from '../agent/src/api/openapi';
import { v1Face } from '../agent/src/api/v1';
import type { TrustView } from '../agent/src/api/v1-trust';
import type { FleetView } from '../agent/src/api/v1-fleet';
import type { CloudletApi, ProvisioningApi } from '../agent/src/core/types';
import { ERROR_CODES, statusOfCode } from '../agent/src/errors';

/** Every /v1 route of the tables as `METHOD /v1/path/{param}`, with what the document must agree with. */
function tableRoutes() {
  const nothing = {} as CloudletApi & ProvisioningApi;
  const routes = v1Face(nothing, nothing, {} as TrustView, {} as FleetView).routes.map((r) => ({
    key: `${r.method} ${openApiPath(r.path)}`,
    access: r.access,
    body: r.jsonBody ? 'json' : r.streamBody ? 'stream' : undefined,
  }));
  const events = new EventsSocket({} as EventsSocketOptions);
  return [...routes, { key: `GET ${events.path}`, access: 'device', body: undefined }];
}

const document = JSON.parse(OPENAPI_JSON);

t.test('the document lists exactly the routes of the route tables', async (tt) => {
  const routes = tableRoutes();
  const documented = Object.keys(OPERATIONS);
  const keys = routes.map((r) => r.key);
  tt.same(
    keys.filter((key) => !documented.includes(key)),
    [],
    'every route is documented (a new route needs its operation in agent/src/api/openapi-operations.ts)',
  );
  tt.same(
    documented.filter((key) => !keys.includes(key)),
    [],
    'every documented operation is a route',
  );
  for (const route of routes) {
    const op = OPERATIONS[route.key];
    if (!op) continue;
    tt.equal(op.access, route.access, `${route.key}: the access the route enforces`);
    tt.equal(op.body?.kind, route.body, `${route.key}: the request body the route reads`);
  }
  const served = Object.entries(document.paths as Record<string, Record<string, unknown>>).flatMap(([path, methods]) =>
    Object.keys(methods).map((method) => `${method.toUpperCase()} ${path}`),
  );
  tt.same(served.sort(), [...documented].sort(), 'the document has them all');
});

t.test('the document is valid OpenAPI 3.1', async (tt) => {
  const { Validator } = (await import('@seriousme/openapi-schema-validator')) as typeof import('@seriousme/openapi-schema-validator');
  const validator = new Validator();
  const result = await validator.validate(structuredClone(document));
  tt.same(result.errors ?? [], [], 'no validation errors');
  tt.ok(result.valid, 'valid');
  tt.equal(validator.version, '3.1', 'OpenAPI 3.1');
});

t.test('its error answers are made from errors.ts: every code, each under its status', async (tt) => {
  tt.same(document.components.schemas.Error.properties.code.enum, ERROR_CODES, 'the code enum is every ErrorCode');
  for (const [path, methods] of Object.entries(document.paths as Record<string, Record<string, any>>)) {
    for (const [method, op] of Object.entries(methods)) {
      for (const [status, response] of Object.entries(op.responses as Record<string, any>)) {
        const codes: string[] | undefined = response.content?.['application/json']?.schema?.properties?.code?.enum;
        if (!codes) continue;
        for (const code of codes) tt.equal(String(statusOfCode(code as never)), status, `${method} ${path}: ${code} under ${status}`);
      }
      tt.ok(op.responses['500'], `${method} ${path}: documents INTERNAL`);
    }
  }
});
