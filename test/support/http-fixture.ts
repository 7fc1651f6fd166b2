// The HTTP layer over a real uWS server, for its tests: an in-test CloudletApi held in arrays, a gate that lets every
// caller in as the operator (access control is test/trust-access.e2e.test.ts), and node:http requests whose raw framing can
// be checked: every response must carry Content-Length and never be chunked (the KD Android client reads exactly
// Content-Length bytes and gives up without it).
import http from 'node:http';
import type { Test } from 'tap';
import { startHttpServer, type HttpServer } from '../../agent/src/api/http-server';
import type { AccessGate } from '../../agent/src/trust/access';
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
} from '../../agent/src/core/types';
import { EventBus, type EventListener } from '../../agent/src/core/events';
import { CloudletError } from '../../agent/src/errors';

export const SPEECH = 'edu.cmu.sei.ams.speech_rec_service';
export const ECHO = 'org.example.echo';
export const MAX_BODY_BYTES = 1024;

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
export class FakeCloudlet implements CloudletApi {
  services: Service[] = [makeService(SPEECH, true), makeService(ECHO, false)];
  instances: Instance[] = [];
  healthy = true;
  cores = 4;
  startRequests: StartRequest[] = [];
  /** Set to make the next startInstance fail with it. */
  startFailure: Error | undefined;
  /** While set, startInstance waits for it (a slow VM boot). */
  startGate: Promise<void> | undefined;
  startsCompleted = 0;
  lastServiceLookup = '';
  private nextPort = 20000;

  listServices(): Service[] {
    return this.services;
  }

  /** A new one every time: the tests change `services` in place, so nothing built from it may be kept. */
  private revisions = 0;
  catalogRevision(): string {
    return String(this.revisions++);
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
    return [
      {
        name: 'cloudlet-2',
        host: 'cloudlet-2.local',
        address: '10.0.0.2',
        port: 9999,
        txt: { encryption: 'disabled' },
        interface: 'wlan0',
        seenAt: '2026-01-02T03:04:05.000Z',
      },
    ];
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

export interface RawResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

/** Every caller is the operator: these tests are about the HTTP layer, not who may call what. */
export const OPERATOR: AccessGate = { identify: () => ({ kind: 'admin' }) };

/** A server over a FakeCloudlet on a free loopback port, logging into `logLines`; start() it before a file's tests. */
export class FakeServer {
  readonly cloudlet = new FakeCloudlet();
  readonly logLines: string[] = [];
  private started: HttpServer | undefined;

  get server(): HttpServer {
    if (!this.started) throw new Error('the fake server is not started');
    return this.started;
  }

  async start(): Promise<void> {
    this.started = await startHttpServer({
      api: this.cloudlet,
      gate: OPERATOR,
      host: '127.0.0.1',
      port: 0,
      logger: (line) => this.logLines.push(line),
      maxBodyBytes: MAX_BODY_BYTES,
    });
  }

  send(method: string, path: string, options?: { headers?: Record<string, string>; body?: string }): Promise<RawResponse> {
    return request(this.server.port, method, path, options);
  }
}

export function request(port: number, method: string, path: string, options: { headers?: Record<string, string>; body?: string } = {}): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path, headers: options.headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('error', reject);
    req.end(options.body);
  });
}

/** Status plus the framing every response must have. */
export function expectStatus(t: Test, res: RawResponse, status: number): void {
  t.equal(res.status, status, `status ${status}`);
  t.equal(res.headers['transfer-encoding'], undefined, 'not chunked');
  t.equal(res.headers['content-length'], String(Buffer.byteLength(res.body)), 'Content-Length matches the body');
}

export function json(t: Test, res: RawResponse, status: number): any {
  expectStatus(t, res, status);
  t.match(res.headers['content-type'], /^application\/json/);
  return JSON.parse(res.body);
}

/** The text/plain body Pylons/WebOb 1.3 produces for abort(status, detail). */
export function webob(status: '400 Bad Request' | '404 Not Found' | '500 Internal Server Error', detail: string): string {
  const explanation = {
    '400 Bad Request': 'The server could not comply with the request since it is either malformed or otherwise incorrect. ',
    '404 Not Found': 'The resource could not be found.',
    '500 Internal Server Error': 'The server has either erred or is incapable of performing the requested operation. ',
  }[status];
  return `${status}\n\n${explanation}\n\n ${detail}  `;
}

export function text(t: Test, res: RawResponse, status: number, body: string): void {
  expectStatus(t, res, status);
  t.match(res.headers['content-type'], /^text\/plain/);
  t.equal(res.body, body);
}

export function sorted(object: object): string[] {
  return Object.keys(object).sort();
}

/** Polls `condition` every 10 ms for up to 3 s. */
export async function until(condition: () => boolean): Promise<void> {
  for (let i = 0; i < 300; i++) {
    if (condition()) return;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new Error('condition not met in time');
}
