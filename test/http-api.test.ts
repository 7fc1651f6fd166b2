/**
 * The two HTTP faces over a real uWS server, against an in-test CloudletApi. Requests go through node:http so the raw
 * framing can be checked: every response must carry Content-Length and never be chunked (the KD Android client reads
 * exactly Content-Length bytes and gives up without it).
 */
import http from 'node:http';
import t, { type Test } from 'tap';
import { startHttpServer, type HttpServer } from '../agent/src/api/http-server';
import type { AccessGate } from '../agent/src/trust/access';
import type {
  Package,
  App,
  CloudletApi,
  Endpoint,
  HealthReport,
  Instance,
  Peer,
  Service,
  StartRequest,
  StartResult,
  StopResult,
  SystemInfo,
} from '../agent/src/core/types';
import { EventBus, type EventListener } from '../agent/src/core/events';
import { CloudletError } from '../agent/src/errors';
import { EventsSocket } from './support/listeners';

const SPEECH = 'edu.cmu.sei.ams.speech_rec_service';
const ECHO = 'org.example.echo';
const MAX_BODY_BYTES = 1024;

function makeService(id: string, shareable: boolean): Service {
  return {
    id,
    dir: `/var/lib/cloudlet/services/${id}`,
    importedAt: '2026-01-02T03:04:05.000Z',
    manifest: {
      format: 1,
      service_id: id,
      version: '1.0',
      description: `The ${id} service`,
      tags: ['demo'],
      port: 10000,
      memory_mib: 256,
      vcpus: 1,
      shareable,
      readiness: { type: 'tcp', timeout_ms: 5000 },
      disk: 'disk.qcow2',
      state: null,
      boot: null,
    },
  };
}

/** A CloudletApi held in arrays; each method throws the CloudletError codes the real core uses. */
class FakeCloudlet implements CloudletApi {
  services: Service[] = [makeService(SPEECH, true), makeService(ECHO, false)];
  instances: Instance[] = [];
  healthy = true;
  cores = 4;
  startRequests: StartRequest[] = [];
  /** Set to make the next startInstance fail with it. */
  startFailure: unknown;
  /** While set, startInstance waits for it (a slow VM boot). */
  startGate: Promise<void> | undefined;
  startsCompleted = 0;
  lastServiceLookup = '';
  private nextPort = 20000;

  listServices(): Service[] {
    return this.services;
  }

  getService(id: string): Service {
    this.lastServiceLookup = id;
    const service = this.services.find((candidate) => candidate.id === id);
    if (!service) throw new CloudletError('SERVICE_NOT_FOUND', `Service ${id} not found`);
    return service;
  }

  async importService(dir: string): Promise<Service> {
    const id = dir.split('/').pop()!;
    if (id === 'boom') throw new Error('disk exploded');
    if (this.services.some((service) => service.id === id)) throw new CloudletError('SERVICE_EXISTS', `Service ${id} already exists`);
    const service = makeService(id, false);
    this.services.push(service);
    return service;
  }

  async removeService(id: string): Promise<void> {
    this.getService(id);
    if (this.instances.some((instance) => instance.serviceId === id)) throw new CloudletError('SERVICE_IN_USE', `Service ${id} has instances`);
    this.services = this.services.filter((service) => service.id !== id);
  }

  async captureServiceState(id: string): Promise<Service> {
    const service = this.getService(id);
    service.manifest.state = 'state.save';
    return service;
  }

  // App packages are exercised against the real agent in app-virt.e2e.test.ts; this fake has none.
  listPackages(): Package[] {
    return [];
  }

  getPackage(id: string): Package {
    throw new CloudletError('SERVICE_NOT_FOUND', `no package with app id ${id}`);
  }

  async importPackage(): Promise<Package> {
    throw new CloudletError('INVALID_PACKAGE', 'the fake cloudlet imports no packages');
  }

  async removePackage(id: string): Promise<void> {
    this.getPackage(id);
  }

  listInstances(): Instance[] {
    return this.instances;
  }

  getInstance(id: string): Instance {
    const instance = this.instances.find((candidate) => candidate.id === id);
    if (!instance) throw new CloudletError('INSTANCE_NOT_FOUND', `Instance ${id} not found`);
    return instance;
  }

  async startInstance(req: StartRequest): Promise<StartResult> {
    this.startRequests.push(req);
    const service = this.getService(req.serviceId);
    if (this.startGate) await this.startGate;
    if (this.startFailure) {
      const failure = this.startFailure;
      this.startFailure = undefined;
      throw failure;
    }
    const joinable = req.join && service.manifest.shareable && this.instances.find((instance) => instance.serviceId === service.id);
    if (joinable) {
      joinable.users++;
      this.startsCompleted++;
      return { instance: joinable, joined: true, endpoint: this.endpointFor(joinable, req.clientHost) };
    }
    const instance: Instance = {
      id: `00000000-0000-4000-8000-${String(this.instances.length + 1).padStart(12, '0')}`,
      serviceId: service.id,
      mechanism: 'cached-vm',
      state: 'ready',
      bindAddress: '0.0.0.0',
      hostPort: this.nextPort++,
      guestPort: service.manifest.port,
      shareable: service.manifest.shareable,
      users: 1,
      owners: [],
      launch: 'memory-state',
      createdAt: '2026-01-02T03:04:05.000Z',
      readyAt: '2026-01-02T03:04:06.000Z',
    };
    this.instances.push(instance);
    this.startsCompleted++;
    return { instance, joined: false, endpoint: this.endpointFor(instance, req.clientHost) };
  }

  async stopInstance(id: string): Promise<StopResult> {
    const instance = this.getInstance(id);
    instance.users--;
    if (instance.users > 0) return { destroyed: false, users: instance.users };
    this.instances = this.instances.filter((candidate) => candidate !== instance);
    return { destroyed: true, users: 0 };
  }

  endpointFor(instance: Instance, clientHost?: string): Endpoint {
    return { address: clientHost ?? '10.0.0.1', port: instance.hostPort };
  }

  async systemInfo(): Promise<SystemInfo> {
    return {
      hostname: 'cloudlet-1',
      agentVersion: '0.1.0',
      cpu: { cores: this.cores, usagePercent: 12.5, speedMhz: '2400.000', cacheKb: 8192 },
      memory: { totalBytes: 8_000_000_000, freeBytes: 6_000_000_000 },
      hypervisor: { uri: 'qemu:///system', domainType: 'kvm', libvirtVersion: '9.0.0' },
      instances: this.instances.length,
      discovery: { state: 'published', name: 'cloudlet-1 #2' },
    };
  }

  readonly events = new EventBus();

  subscribe(listener: EventListener): () => void {
    return this.events.subscribe(listener);
  }

  peers(): Peer[] {
    return [{ name: 'cloudlet-2', host: 'cloudlet-2.local', address: '10.0.0.2', port: 9999, txt: { encryption: 'disabled' }, interface: 'wlan0', seenAt: '2026-01-02T03:04:05.000Z' }];
  }

  // The app catalog is exercised against the real agent (app-catalog.test.ts); this cloudlet has no apps.
  listApps(): App[] {
    return [];
  }

  getApp(id: string): App {
    throw new CloudletError('APP_NOT_FOUND', `no app with id ${id}`);
  }

  appFile(id: string): { app: App; path: string } {
    return { app: this.getApp(id), path: '' };
  }

  async addApp(): Promise<App> {
    throw new CloudletError('FORBIDDEN', 'this cloudlet takes no apps');
  }

  async removeApp(id: string): Promise<void> {
    this.getApp(id);
  }

  async health(): Promise<HealthReport> {
    return this.healthy
      ? { ok: true, checks: [{ name: 'hypervisor', ok: true }] }
      : { ok: false, checks: [{ name: 'hypervisor', ok: false, detail: 'libvirtd is not running' }] };
  }
}

interface RawResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

let server: HttpServer;
let cloudlet: FakeCloudlet;
/** This file tests the HTTP layer alone: every caller is the operator (access control is test/trust.e2e.test.ts). */
const OPERATOR: AccessGate = { authorize: () => ({ kind: 'admin' }) };
const logLines: string[] = [];

t.before(async () => {
  cloudlet = new FakeCloudlet();
  server = await startHttpServer({ api: cloudlet, gate: OPERATOR, host: '127.0.0.1', port: 0, logger: (line) => logLines.push(line), maxBodyBytes: MAX_BODY_BYTES });
});
t.teardown(() => server.close());

function send(method: string, path: string, options: { headers?: Record<string, string>; body?: string } = {}): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port: server.port, method, path, headers: options.headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('error', reject);
    req.end(options.body);
  });
}

/** Status plus the framing every response must have. */
function expectStatus(t: Test, res: RawResponse, status: number): void {
  t.equal(res.status, status, `status ${status}`);
  t.equal(res.headers['transfer-encoding'], undefined, 'not chunked');
  t.equal(res.headers['content-length'], String(Buffer.byteLength(res.body)), 'Content-Length matches the body');
}

function json(t: Test, res: RawResponse, status: number): any {
  expectStatus(t, res, status);
  t.match(res.headers['content-type'], /^application\/json/);
  return JSON.parse(res.body);
}

/** The text/plain body Pylons/WebOb 1.3 produces for abort(status, detail). */
function webob(status: '400 Bad Request' | '404 Not Found' | '500 Internal Server Error', detail: string): string {
  const explanation = {
    '400 Bad Request': 'The server could not comply with the request since it is either malformed or otherwise incorrect. ',
    '404 Not Found': 'The resource could not be found.',
    '500 Internal Server Error': 'The server has either erred or is incapable of performing the requested operation. ',
  }[status];
  return `${status}\n\n${explanation}\n\n ${detail}  `;
}

function text(t: Test, res: RawResponse, status: number, body: string): void {
  expectStatus(t, res, status);
  t.match(res.headers['content-type'], /^text\/plain/);
  t.equal(res.body, body);
}

function sorted(object: object): string[] {
  return Object.keys(object).sort();
}

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
      ['true', true], ['TRUE', true], ['tRuE', true], ['T', true], ['t', true], ['Y', true], ['yes', true], ['YES', true],
      ['false', false], ['1', false], ['on', false], ['', false], [null, false],
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
    t.notOk(cloudlet.instances.some((instance) => instance.id === svm._id), 'instance stopped');
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
    t.same(full.services.map((service: { service_id: string }) => service.service_id), [SPEECH, ECHO]);
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
      await send('POST', '/v1/instances', { headers: { Host: '198.51.100.3:9999', 'X-Device-ID': 'cli' }, body: JSON.stringify({ service_id: SPEECH, join: false }) }),
      201,
    );
    t.same(sorted(started), ['endpoint', 'instance', 'joined']);
    t.equal(started.joined, false);
    t.same(started.endpoint, { address: '198.51.100.3', port: started.instance.host_port });
    t.same(sorted(started.instance), [
      'bind_address', 'created_at', 'guest_port', 'host_port', 'id', 'launch', 'mechanism', 'owners', 'ready_at', 'service_id', 'shareable', 'state', 'users',
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
    t.ok(logLines.some((line) => line.includes('disk exploded') && line.includes(' at ')), 'the stack goes to the log');
  });
});

t.test('/v1/events WebSocket', async (t) => {
  const instance: Instance = {
    id: '3f0c1c52-8a0e-4a59-9a57-0c7e52f3f1a4', serviceId: ECHO, mechanism: 'cached-vm', state: 'starting', bindAddress: '0.0.0.0',
    hostPort: 20001, guestPort: 10000, shareable: false, users: 1, owners: [], launch: 'cold-boot', createdAt: '2026-01-02T03:04:05.000Z', readyAt: null,
  };

  t.test('opens with a snapshot of the instances, then sends each event as one JSON message', async (t) => {
    const events = await EventsSocket.connect(server.port);
    t.teardown(() => events.close());
    t.same((await events.next(() => true)).value, { type: 'snapshot', instances: [] });
    cloudlet.events.emit({ type: 'progress', instanceId: instance.id, serviceId: ECHO, phase: 'restoring', percent: 40, bytes: { done: 5, total: 10 }, at: 'T1' });
    cloudlet.events.emit({ type: 'instance', state: 'crashed', reason: 'failed', instance: { ...instance, state: 'ready' }, at: 'T2' });
    t.same((await events.next((e) => e.type === 'progress')).value,
      { type: 'progress', instance_id: instance.id, service_id: ECHO, phase: 'restoring', percent: 40, bytes_done: 5, bytes_total: 10, at: 'T1' });
    const crashed = (await events.next((e) => e.type === 'instance')).value;
    t.match(crashed, { type: 'instance', state: 'crashed', reason: 'failed', at: 'T2', instance: { id: instance.id, service_id: ECHO, host_port: 20001, state: 'crashed' } });
  });

  t.test('a client that stops reading is closed (1013) instead of having events queued for it without bound', async (t) => {
    const events = await EventsSocket.connect(server.port);
    const closed = new Promise<number>((resolve) => events.socket.once('close', (code) => resolve(code)));
    const socket = (events.socket as unknown as { _socket: import('node:net').Socket })._socket;
    socket.pause();
    const big = { ...instance, serviceId: 'x'.repeat(4000) };
    let sentBytes = 0;
    // Far more than the kernel's socket buffers and the 256 KiB limit together.
    while (sentBytes < 64 * 1024 * 1024 && !logLines.some((line) => line.includes('does not keep up'))) {
      for (let i = 0; i < 200; i++) cloudlet.events.emit({ type: 'instance', state: 'ready', instance: big, at: 'T' });
      sentBytes += 200 * 4200;
      await new Promise((resolve) => setImmediate(resolve));
    }
    socket.resume();
    t.equal(await closed, 1013, 'closed with "try again later"');
    t.ok(sentBytes < 64 * 1024 * 1024, 'the server gave up on the client before the test did');
  });
});

t.test('a port already in use rejects the start and close() is idempotent', async (t) => {
  await t.rejects(startHttpServer({ api: cloudlet, gate: OPERATOR, host: '127.0.0.1', port: server.port }), { code: 'INTERNAL', message: /Cannot listen/ });
  const other = await startHttpServer({ api: cloudlet, gate: OPERATOR, host: '127.0.0.1', port: 0 });
  t.not(other.port, server.port);
  await other.close();
  await other.close();
});

t.test('a client that aborts never crashes the server', async (t) => {
  t.test('during a slow start: the start completes, nothing is written, the next request works', async (t) => {
    for (const [method, path, body] of [
      ['GET', `/api/servicevm/start?serviceId=${ECHO}`, undefined],
      ['POST', '/v1/instances', JSON.stringify({ service_id: ECHO })],
    ] as const) {
      let releaseStart!: () => void;
      cloudlet.startGate = new Promise((resolve) => (releaseStart = resolve));
      const startsBefore = cloudlet.startsCompleted;
      const requestsBefore = cloudlet.startRequests.length;

      const req = http.request({ host: '127.0.0.1', port: server.port, method, path, agent: false });
      const closed = new Promise((resolve) => req.on('close', resolve));
      req.on('error', () => {});
      req.end(body);
      await until(() => cloudlet.startRequests.length > requestsBefore);
      req.destroy();
      await closed;
      // Client and server share this event loop: give the server a moment to see the disconnect before the VM is up.
      await new Promise((resolve) => setTimeout(resolve, 50));

      cloudlet.startGate = undefined;
      releaseStart();
      await until(() => cloudlet.startsCompleted > startsBefore);
      await until(() => logLines.some((line) => line.startsWith(`${method} ${path} aborted`)));
      t.pass(`${method} ${path}: the start completed and its reply was dropped`);
      json(t, await send('GET', '/api/services'), 200);
    }
  });

  t.test('while sending a body', async (t) => {
    const headers = { 'Content-Length': '100' };
    const req = http.request({ host: '127.0.0.1', port: server.port, method: 'POST', path: '/v1/services', agent: false, headers });
    req.on('error', () => {});
    req.write('{"path": "/srv/');
    await new Promise((resolve) => setTimeout(resolve, 50));
    req.destroy();
    await until(() => logLines.some((line) => line.startsWith('POST /v1/services aborted')));
    json(t, await send('GET', '/v1/health'), 200);
  });

  t.test('while its upload waits for a route that has not started reading the body', async (t) => {
    let release!: () => void;
    const busy = new Promise<void>((resolve) => (release = resolve));
    let called = false;
    cloudlet.importPackage = async () => {
      called = true;
      await busy;
      throw new CloudletError('INVALID_PACKAGE', 'refused after a while');
    };
    t.teardown(() => { delete (cloudlet as Partial<FakeCloudlet>).importPackage; });
    const headers = { 'Content-Length': '1000', 'Content-Type': 'application/gzip' };
    const req = http.request({ host: '127.0.0.1', port: server.port, method: 'POST', path: '/v1/packages', agent: false, headers });
    req.on('error', () => {});
    req.write('x'.repeat(10));
    await until(() => called);
    req.destroy();
    // The abort reaches the server while nothing listens on the body stream yet: it must not be an unhandled 'error'.
    await new Promise((resolve) => setTimeout(resolve, 50));
    release();
    await until(() => logLines.some((line) => line.startsWith('POST /v1/packages aborted')));
    json(t, await send('GET', '/v1/health'), 200);
  });
});

t.test('page assets are looked up by their own names: /ui/toString is 404, not a 500 for a missing file', async (t) => {
  for (const name of ['toString', 'constructor', '__proto__', 'hasOwnProperty']) expectStatus(t, await send('GET', `/ui/${name}`), 404);
});

/** Polls `condition` every 10 ms for up to 3 s. */
async function until(condition: () => boolean): Promise<void> {
  for (let i = 0; i < 300; i++) {
    if (condition()) return;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new Error('condition not met in time');
}
