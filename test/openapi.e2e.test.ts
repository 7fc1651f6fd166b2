// The OpenAPI document as a real agent serves it (open, cacheable, no secret), and what that agent answers matches
// the schemas the document gives (test/openapi.test.ts checks the document against the route tables). Forward ports
// 27400-27409 (no VM is started).
import { createRequire } from 'node:module';
import t from 'tap';
import { OPENAPI_JSON } from '../agent/src/api/openapi';
import { AgentProcess, request } from './support/agent';

// The JSON Schema 2020-12 validator the OpenAPI validator itself is built on, resolved from it.
const fromValidator = createRequire(require.resolve('@seriousme/openapi-schema-validator/package.json'));
const { default: Ajv2020 } = fromValidator('ajv/dist/2020') as { default: new (options: object) => any };
const { default: addFormats } = fromValidator('ajv-formats') as { default: (ajv: unknown) => void };

let agent: AgentProcess;
let document: any;

t.before(async () => {
  agent = await AgentProcess.start({ portRange: '27400-27409' });
  const served = await request(agent.apiPort, 'GET', '/v1/openapi.json', undefined, { authorization: '' });
  document = served.json;
});
t.teardown(async () => {
  await agent.dispose();
});

t.test('the document is open, holds no secret and is cacheable', async (tt) => {
  const served = await request(agent.apiPort, 'GET', '/v1/openapi.json', undefined, { authorization: '' });
  tt.equal(served.status, 200);
  tt.same(document, JSON.parse(OPENAPI_JSON), 'the document of agent/src/api/openapi.ts');
  tt.match(served.headers['cache-control'], /public/);
  const etag = served.headers.etag!;
  tt.ok(etag, 'an ETag');
  const again = await request(agent.apiPort, 'GET', '/v1/openapi.json', undefined, { authorization: '', 'if-none-match': etag });
  tt.equal(again.status, 304, 'revalidated, not sent again');
  tt.equal(again.body, '');
  const code = (await request(agent.apiPort, 'POST', '/v1/pairing', {})).json.code as string;
  tt.notOk(served.body.includes(code), 'no pairing code');
  tt.notOk(served.body.includes(agent.dataDir), 'no host path');
});

t.test("a live agent's answers match their documented schemas", async (tt) => {
  const ajv = new Ajv2020({ strict: false, allErrors: true });
  addFormats(ajv);
  // The document's components, addressable as the document addresses them.
  ajv.addSchema({ $id: 'cloudlet:openapi', components: document.components }, 'cloudlet:openapi');
  const check = async (method: string, path: string, template: string, body?: unknown, headers?: Record<string, string>) => {
    const answer = await request(agent.apiPort, method, path, body, headers);
    const response = document.paths[template]?.[method.toLowerCase()]?.responses?.[String(answer.status)];
    tt.ok(response, `${method} ${path}: status ${answer.status} is documented`);
    const schema = response?.content?.['application/json']?.schema;
    if (!schema) return;
    const validate = ajv.compile(JSON.parse(JSON.stringify(schema).replaceAll('"#/components/', '"cloudlet:openapi#/components/')));
    tt.ok(validate(answer.json), `${method} ${path} (${answer.status}) matches: ${ajv.errorsText(validate.errors)}`);
  };
  await check('GET', '/v1/health', '/v1/health');
  await check('GET', '/v1/system', '/v1/system');
  await check('GET', '/v1/services', '/v1/services');
  await check('GET', '/v1/packages', '/v1/packages');
  await check('GET', '/v1/apps', '/v1/apps');
  await check('GET', '/v1/bases', '/v1/bases');
  await check('GET', '/v1/recipes', '/v1/recipes');
  await check('GET', '/v1/instances', '/v1/instances');
  await check('GET', '/v1/peers', '/v1/peers');
  await check('POST', '/v1/pairing', '/v1/pairing', { ttl_seconds: 60 });
  await check('GET', '/v1/devices', '/v1/devices');
  // Errors: the shape and the code each status documents.
  await check('GET', '/v1/services/no-such-service', '/v1/services/{id}');
  await check('GET', '/v1/instances', '/v1/instances', undefined, { authorization: '' });
  await check('POST', '/v1/instances', '/v1/instances', { join: true });
  await check('POST', '/v1/synthesis/uploads', '/v1/synthesis/uploads', { bytes: -1 });
  await check('GET', '/v1/recipes/none', '/v1/recipes/{id}');
});
