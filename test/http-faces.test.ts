/**
 * The two HTTP faces over a real uWS server, against an in-test CloudletApi (test/support/http-fixture.ts): the
 * KD-Cloudlet face's pycloud shapes and texts, and the /v1 face's JSON, each with the framing every response must have.
 */
import t from 'tap';
import { CloudletError } from '../agent/src/errors';
import { ECHO, FakeServer, MAX_BODY_BYTES, SPEECH, expectStatus, json, sorted, text, webob } from './support/http-fixture';

const fake = new FakeServer();
const { cloudlet, logLines } = fake;
t.before(() => fake.start());
t.teardown(() => fake.server.close());
const send = fake.send.bind(fake);

t.test('KD-Cloudlet face', async (t) => {
  t.test('GET /api/services wraps the service list with exactly the five pycloud keys', async (t) => {
    const body = json(t, await send('GET', '/api/services', { headers: { 'X-Device-ID': 'android-1' } }), 200);
    t.same(sorted(body), ['services']);
    t.equal(body.services.length, 2);
    t.same(body.services[0], { _id: SPEECH, service_id: SPEECH, description: `The ${SPEECH} service`, version: '1.0', tags: ['demo'] });
  });

  t.test('GET /api/services/get finds one service or answers the pycloud 404 text', async (t) => {
    const found = json(t, await send('GET', `/api/services/get?serviceId=${ECHO}`), 200);
    t.same(sorted(found), ['_id', 'description', 'service_id', 'tags', 'version']);
    t.equal(found.service_id, ECHO);
    text(t, await send('GET', '/api/services/get?serviceId=nope'), 404, webob('404 Not Found', '404 Not Found - service for nope not found'));
    text(t, await send('GET', '/api/services/get'), 404, webob('404 Not Found', '404 Not Found - service for None not found'));
  });

  t.test('GET /api/servicevm/start returns the ServiceVM object at the address the client used', async (t) => {
    const res = await send('GET', `/api/servicevm/start?serviceId=${SPEECH}&join=false`, {
      headers: { Host: '192.0.2.7:9999', 'X-Device-ID': 'android-42' },
    });
    const svm = json(t, res, 200);
    t.same(sorted(svm), ['_id', 'fqdn', 'ip_address', 'port', 'running', 'service_id', 'ssh_port', 'vnc_address']);
    t.match(svm, { service_id: SPEECH, running: true, ip_address: '192.0.2.7', vnc_address: null, ssh_port: null, fqdn: null });
    t.ok(Number.isInteger(svm.port) && svm.port > 0, 'port is an integer');
    t.equal(svm._id, cloudlet.instances.at(-1)!.id);
    t.match(cloudlet.startRequests.at(-1), { serviceId: SPEECH, join: false, clientHost: '192.0.2.7' });
    t.equal(cloudlet.startRequests.at(-1)!.deviceId, undefined, 'an unauthenticated X-Device-ID names no owner');

    await send('GET', `/api/servicevm/start?serviceId=${SPEECH}`, { headers: { Host: '[fe80::1]:9999' } });
    t.equal(cloudlet.startRequests.at(-1)!.clientHost, 'fe80::1', 'IPv6 Host header');
  });

  t.test('join is true for T, TRUE, Y, YES in any case and false otherwise', async (t) => {
    const cases: [string | null, boolean][] = [
      ['true', true],
      ['TRUE', true],
      ['tRuE', true],
      ['T', true],
      ['t', true],
      ['Y', true],
      ['yes', true],
      ['YES', true],
      ['false', false],
      ['1', false],
      ['on', false],
      ['', false],
      [null, false],
    ];
    for (const [value, expected] of cases) {
      const query = value === null ? `serviceId=${SPEECH}` : `serviceId=${SPEECH}&join=${value}`;
      json(t, await send('GET', `/api/servicevm/start?${query}`), 200);
      t.equal(cloudlet.startRequests.at(-1)!.join, expected, `join=${value}`);
    }
  });

  t.test('start errors keep pycloud statuses and texts', async (t) => {
    text(t, await send('GET', '/api/servicevm/start'), 400, webob('400 Bad Request', '400 Bad Request - must provide service id'));
    text(t, await send('GET', '/api/servicevm/start?serviceId=&join=true'), 400, webob('400 Bad Request', '400 Bad Request - must provide service id'));
    // 400, not 404, for an unknown service: a pycloud quirk clients may depend on.
    text(t, await send('GET', '/api/servicevm/start?serviceId=nope'), 400, webob('400 Bad Request', '404 Not Found - service vm for nope not found'));
    cloudlet.startFailure = new CloudletError('READINESS_TIMEOUT', 'Service did not answer on port 10000 within 5000 ms');
    text(
      t,
      await send('GET', `/api/servicevm/start?serviceId=${SPEECH}`),
      500,
      webob('500 Internal Server Error', '500 Internal Server Error - Service did not answer on port 10000 within 5000 ms'),
    );
  });

  t.test('GET /api/servicevm/stop answers an empty body with Content-Length: 0', async (t) => {
    const svm = json(t, await send('GET', `/api/servicevm/start?serviceId=${ECHO}`), 200);
    const res = await send('GET', `/api/servicevm/stop?instanceId=${svm._id}`);
    expectStatus(t, res, 200);
    t.equal(res.headers['content-length'], '0');
    t.equal(res.body, '');
    t.notOk(
      cloudlet.instances.some((instance) => instance.id === svm._id),
      'instance stopped',
    );
    text(t, await send('GET', '/api/servicevm/stop'), 400, webob('400 Bad Request', '400 Bad Request - must provide instance id'));
    text(t, await send('GET', `/api/servicevm/stop?instanceId=${svm._id}`), 404, webob('404 Not Found', `404 Not Found - service vm for ${svm._id} not found`));
  });

  t.test('GET /api/system gives memory_info and cpu_info, plus services and apps on request', async (t) => {
    const plain = json(t, await send('GET', '/api/system'), 200);
    t.same(plain, {
      memory_info: { max_memory: 8_000_000_000, free_memory: 6_000_000_000 },
      cpu_info: { max_cores: 4, usage: 12.5, speed: '2400.000', cache: 8192 },
    });
    const full = json(t, await send('GET', '/api/system?services=true&apps=YES'), 200);
    t.same(sorted(full), ['apps', 'cpu_info', 'memory_info', 'services']);
    t.same(full.apps, []);
    t.same(
      full.services.map((service: { service_id: string }) => service.service_id),
      [SPEECH, ECHO],
    );
    t.same(sorted(json(t, await send('GET', '/api/system?services=false'), 200)), ['cpu_info', 'memory_info']);

    cloudlet.cores = 0;
    t.teardown(() => {
      cloudlet.cores = 4;
    });
    t.equal(json(t, await send('GET', '/api/system'), 200).cpu_info.max_cores, 1, 'max_cores stays > 0 so clients can rank');
  });

  t.test('messages and apps are empty lists for now', async (t) => {
    t.same(json(t, await send('GET', `/api/system/get_messages?serviceId=${SPEECH}`, { headers: { 'X-Device-ID': 'android-1' } }), 200), { messages: [] });
    t.same(json(t, await send('GET', '/api/apps?osName=Android&osVersion=8.1&tags=a,b'), 200), { apps: [] });
  });

  t.test('HEAD is answered like GET without a body', async (t) => {
    const get = await send('GET', '/api/services');
    const head = await send('HEAD', '/api/services');
    t.equal(head.status, 200);
    t.equal(head.headers['content-length'], String(Buffer.byteLength(get.body)));
    t.equal(head.headers['transfer-encoding'], undefined);
    t.equal(head.body, '');
    // The connection must still be usable: no stray body bytes after the HEAD response.
    json(t, await send('GET', '/api/apps'), 200);
  });

  t.test('unknown routes and other methods answer 404 text, as Pylons does', async (t) => {
    const unknown = await send('GET', '/api/nope');
    text(t, unknown, 404, webob('404 Not Found', '404 Not Found - No route for /api/nope'));
    expectStatus(t, await send('POST', '/api/services', { body: '{}' }), 404);
    expectStatus(t, await send('DELETE', '/api/servicevm/stop?instanceId=x'), 404);
  });
});

t.test('/v1 face', async (t) => {
  t.test('GET /v1/health is 200 when healthy and 503 otherwise, with the report as body', async (t) => {
    t.same(json(t, await send('GET', '/v1/health'), 200), { ok: true, checks: [{ name: 'hypervisor', ok: true }] });
    cloudlet.healthy = false;
    t.teardown(() => {
      cloudlet.healthy = true;
    });
    t.same(json(t, await send('GET', '/v1/health'), 503), { ok: false, checks: [{ name: 'hypervisor', ok: false, detail: 'libvirtd is not running' }] });
  });

  t.test('GET /v1/system uses snake_case keys', async (t) => {
    t.same(json(t, await send('GET', '/v1/system'), 200), {
      hostname: 'cloudlet-1',
      agent_version: '0.1.0',
      cpu: { cores: 4, usage_percent: 12.5, speed_mhz: '2400.000', cache_kb: 8192 },
      memory: { total_bytes: 8_000_000_000, free_bytes: 6_000_000_000 },
      hypervisor: { uri: 'qemu:///system', domain_type: 'kvm', libvirt_version: '9.0.0' },
      discovery: { state: 'published', name: 'cloudlet-1 #2' },
      instances: cloudlet.instances.length,
    });
  });

  t.test('services: list, get, import, capture, remove', async (t) => {
    const list = json(t, await send('GET', '/v1/services'), 200);
    t.same(sorted(list), ['services']);
    t.same(sorted(list.services[0]), ['dir', 'id', 'imported_at', 'manifest']);

    const one = json(t, await send('GET', `/v1/services/${ECHO}`), 200);
    t.match(one, { id: ECHO, imported_at: '2026-01-02T03:04:05.000Z', manifest: { service_id: ECHO, memory_mib: 256 } });

    const imported = json(t, await send('POST', '/v1/services', { body: JSON.stringify({ path: '/srv/import/org.example.new' }) }), 201);
    t.equal(imported.id, 'org.example.new');
    t.same(json(t, await send('POST', '/v1/services', { body: JSON.stringify({ path: '/srv/import/org.example.new' }) }), 409), {
      code: 'SERVICE_EXISTS',
      message: 'Service org.example.new already exists',
    });

    const captured = json(t, await send('POST', '/v1/services/org.example.new/state'), 200);
    t.equal(captured.manifest.state, 'state.save');

    const removed = await send('DELETE', '/v1/services/org.example.new');
    expectStatus(t, removed, 204);
    t.equal(removed.body, '');
    t.same(json(t, await send('DELETE', '/v1/services/org.example.new'), 404), { code: 'SERVICE_NOT_FOUND', message: 'Service org.example.new not found' });
  });

  t.test('path parameters are percent-decoded', async (t) => {
    json(t, await send('GET', '/v1/services/a%2Fb%20c'), 404);
    t.equal(cloudlet.lastServiceLookup, 'a/b c');
    t.match(json(t, await send('GET', '/v1/services/%zz'), 400), { code: 'BAD_REQUEST' });
  });

  t.test('instances: start, list, get, stop', async (t) => {
    cloudlet.instances = [];
    const started = json(
      t,
      await send('POST', '/v1/instances', {
        headers: { Host: '198.51.100.3:9999', 'X-Device-ID': 'cli' },
        body: JSON.stringify({ service_id: SPEECH, join: false }),
      }),
      201,
    );
    t.same(sorted(started), ['endpoint', 'instance', 'joined']);
    t.equal(started.joined, false);
    t.same(started.endpoint, { address: '198.51.100.3', port: started.instance.host_port });
    t.same(sorted(started.instance), [
      'bind_address',
      'created_at',
      'guest_port',
      'host_port',
      'id',
      'launch',
      'mechanism',
      'owners',
      'ready_at',
      'service_id',
      'shareable',
      'state',
      'users',
    ]);
    t.match(cloudlet.startRequests.at(-1), { serviceId: SPEECH, join: false, clientHost: '198.51.100.3' });
    t.equal(cloudlet.startRequests.at(-1)!.deviceId, undefined, 'the owner comes from the credential, never from X-Device-ID');

    const joined = json(t, await send('POST', '/v1/instances', { body: JSON.stringify({ service_id: SPEECH, join: true }) }), 201);
    t.equal(joined.joined, true);
    t.equal(joined.instance.users, 2);

    const list = json(t, await send('GET', '/v1/instances'), 200);
    t.ok(list.instances.some((instance: { id: string }) => instance.id === started.instance.id));
    t.equal(json(t, await send('GET', `/v1/instances/${started.instance.id}`), 200).service_id, SPEECH);

    t.same(json(t, await send('DELETE', `/v1/instances/${started.instance.id}`), 200), { destroyed: false, users: 1 });
    t.same(json(t, await send('DELETE', `/v1/instances/${started.instance.id}`), 200), { destroyed: true, users: 0 });
    t.same(json(t, await send('GET', `/v1/instances/${started.instance.id}`), 404), {
      code: 'INSTANCE_NOT_FOUND',
      message: `Instance ${started.instance.id} not found`,
    });
    t.match(json(t, await send('POST', '/v1/instances', { body: JSON.stringify({ service_id: 'nope' }) }), 404), { code: 'SERVICE_NOT_FOUND' });
  });

  t.test('bad request bodies name the problem', async (t) => {
    const post = (path: string, body: string) => send('POST', path, { body, headers: { 'Content-Type': 'application/json' } });
    t.same(json(t, await post('/v1/instances', '{}'), 400), {
      code: 'MISSING_PARAMETER',
      message: 'Missing required field "service_id"',
      details: { parameter: 'service_id' },
    });
    t.same(json(t, await post('/v1/services', '{"path": 42}'), 400), {
      code: 'INVALID_PARAMETER',
      message: 'Field "path" must be a non-empty string',
      details: { parameter: 'path' },
    });
    t.match(json(t, await post('/v1/instances', JSON.stringify({ service_id: SPEECH, join: 'yes' })), 400), {
      code: 'INVALID_PARAMETER',
      details: { parameter: 'join' },
    });
    t.match(json(t, await post('/v1/services', '{"path": '), 400), { code: 'BAD_REQUEST', message: /^Malformed JSON body/ });
    t.match(json(t, await post('/v1/services', '["/srv/x"]'), 400), { code: 'BAD_REQUEST', message: 'The request body must be a JSON object' });
    t.match(json(t, await post('/v1/services', ''), 400), { code: 'BAD_REQUEST' });
    const chunked = await send('POST', '/v1/services', { headers: { 'Transfer-Encoding': 'chunked' }, body: '{"path": "/srv/x"}' });
    t.match(json(t, chunked, 400), { code: 'BAD_REQUEST', message: /Content-Length/ });
    t.same(json(t, await post('/v1/services', JSON.stringify({ path: 'x'.repeat(MAX_BODY_BYTES) })), 413), {
      code: 'PAYLOAD_TOO_LARGE',
      message: `The request body exceeds ${MAX_BODY_BYTES} bytes`,
      details: { limit: MAX_BODY_BYTES },
    });
  });

  t.test('unknown routes are 404 NOT_FOUND and wrong methods 405 METHOD_NOT_ALLOWED', async (t) => {
    t.match(json(t, await send('GET', '/v1/nope'), 404), { code: 'NOT_FOUND' });
    t.match(json(t, await send('GET', '/nope'), 404), { code: 'NOT_FOUND' });
    // `/` is the phone page (web-page.e2e.test.ts), not a route of either face.
    t.match((await send('GET', '/')).headers['content-type'], /^text\/html/);
    t.match(json(t, await send('GET', '/v1/services/x/state'), 405), { code: 'METHOD_NOT_ALLOWED', details: { allowed: ['POST'] } });
    const put = await send('PUT', '/v1/services', { body: '{}' });
    t.match(json(t, put, 405), { code: 'METHOD_NOT_ALLOWED', details: { allowed: ['GET', 'POST'] } });
    t.equal(put.headers.allow, 'GET, POST');
  });

  t.test('an unexpected error is 500 INTERNAL without a stack trace', async (t) => {
    const body = json(t, await send('POST', '/v1/services', { body: JSON.stringify({ path: '/srv/boom' }) }), 500);
    t.same(body, { code: 'INTERNAL', message: 'disk exploded' });
    t.ok(
      logLines.some((line) => line.includes('disk exploded') && line.includes(' at ')),
      'the stack goes to the log',
    );
  });
});
