// Starts the real agent as a child process on loopback, with its own data directory and forward port range,
// and talks to it over real sockets. Every test that starts one stops it (and whatever VMs it left) in teardown.
import { ChildProcess, execFile, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm, chmod } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { Connection } from '../../native/libvirt';

export const ROOT = path.resolve(__dirname, '../../..');
export const AGENT_MAIN = path.join(ROOT, 'dist', 'agent', 'src', 'main.js');
const AGENT_UNIT = readFileSync(path.join(ROOT, 'systemd', 'cloudlet-agent.service'), 'utf8');
/** The Node and V8 flags the appliance's unit runs the agent with: the tests and benchmarks run it the same way. */
export const AGENT_NODE_FLAGS: string[] = (() => {
  const unit = AGENT_UNIT;
  const exec = /^ExecStart=\S+\/node((?: --\S+)*) \S+\/main\.js$/m.exec(unit);
  if (!exec) throw new Error('systemd/cloudlet-agent.service: no ExecStart line that runs main.js with node');
  return exec[1]!.split(' ').filter((flag) => flag !== '');
})();
/** The environment the unit gives the agent (its Environment= lines), which the tests and benchmarks give it too. */
export const AGENT_UNIT_ENV: Record<string, string> = Object.fromEntries(
  [...AGENT_UNIT.matchAll(/^Environment=([A-Z_]+)=(\S*)$/gm)].map((m) => [m[1]!, m[2]!]),
);
export const METADATA_URI = 'urn:cloudlet:agent:instance:1';

export function testGuestDir(): string {
  const dir = process.env.CLOUDLET_TEST_GUEST;
  if (!dir) throw new Error('CLOUDLET_TEST_GUEST is not set: run the suite with ./build.sh test');
  return dir;
}

export interface HttpResult {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
  json: any;
}

/** The data directory of each agent the tests started, by API port: where its admin token is. */
const agentDataDirs = new Map<number, string>();

/** Requests to this port carry the admin token of the agent using `dataDir` (read afresh: a restart may make one). */
export function registerAgent(port: number, dataDir: string): void {
  agentDataDirs.set(port, dataDir);
}

/** The data directory of the agent the tests started on `port`, if any. */
export function agentDataDir(port: number): string | undefined {
  return agentDataDirs.get(port);
}

/** `Authorization: Bearer <admin token>` of the agent on `port`, if the tests started one there; else nothing. */
export function adminHeaders(port: number): Record<string, string> {
  const dataDir = agentDataDirs.get(port);
  if (!dataDir) return {};
  try {
    return { authorization: `Bearer ${readFileSync(path.join(dataDir, 'trust', 'admin-token'), 'utf8').trim()}` };
  } catch {
    return {};
  }
}

/**
 * An HTTP request to 127.0.0.1:port. To an agent the tests started it carries that agent's admin token unless the
 * caller passes its own `authorization` header; `authorization: ''` sends none.
 */
export function request(port: number, method: string, urlPath: string, body?: unknown, headers: Record<string, string> = {}): Promise<HttpResult> {
  const explicit = Object.keys(headers).find((name) => name.toLowerCase() === 'authorization');
  if (explicit === undefined) headers = { ...adminHeaders(port), ...headers };
  else if (headers[explicit] === '') headers = Object.fromEntries(Object.entries(headers).filter(([name]) => name !== explicit));
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : typeof body === 'string' || Buffer.isBuffer(body) ? body : JSON.stringify(body);
    const req = http.request(
      {
        host: '127.0.0.1',
        port,
        method,
        path: urlPath,
        agent: false,
        headers: {
          ...(payload !== undefined ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {}),
          ...headers,
        },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString();
          let json: unknown;
          try {
            json = text ? JSON.parse(text) : undefined;
          } catch {
            json = undefined;
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text, json });
        });
      },
    );
    req.on('error', reject);
    if (payload !== undefined) req.write(payload);
    req.end();
  });
}

/** GET through a forwarded port: what a phone's app would see. */
export function fetchText(port: number, urlPath = '/'): Promise<string> {
  return request(port, 'GET', urlPath).then((r) => r.body);
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

export interface AgentOptions {
  dataDir?: string;
  portRange: string;
  env?: Record<string, string>;
}

export class AgentProcess {
  private proc: ChildProcess | undefined;
  log = '';

  constructor(
    readonly apiPort: number,
    readonly dataDir: string,
    private readonly options: AgentOptions,
    readonly mqttPort: number,
  ) {}

  static async start(options: AgentOptions): Promise<AgentProcess> {
    const dataDir = options.dataDir ?? (await mkdtemp(path.join(os.tmpdir(), 'cloudlet-test-')));
    await chmod(dataDir, 0o755);
    const agent = new AgentProcess(await freePort(), dataDir, options, await freePort());
    registerAgent(agent.apiPort, dataDir);
    await agent.launch();
    return agent;
  }

  /** Start (or restart) the agent process and wait until its API answers; `env` adds to (or overrides) the options' env. */
  async launch(env: Record<string, string> = {}): Promise<void> {
    // Without tap's NODE_OPTIONS preload: it would run before the agent sizes libuv's thread pool (main.ts).
    const { NODE_OPTIONS: _preload, ...inherited } = process.env;
    this.proc = spawn(process.execPath, [...AGENT_NODE_FLAGS, AGENT_MAIN], {
      env: {
        ...inherited,
        ...AGENT_UNIT_ENV,
        CLOUDLET_PORT: String(this.apiPort),
        CLOUDLET_API_HOST: '127.0.0.1',
        CLOUDLET_DATA_DIR: this.dataDir,
        CLOUDLET_FORWARD_ADDRESS: '127.0.0.1',
        CLOUDLET_PORT_RANGE: this.options.portRange,
        CLOUDLET_SEED_DIR: '',
        CLOUDLET_CONFIG: path.join(ROOT, 'test', 'support', 'no-config.json'),
        // Tests never publish on the host's networks: a test that wants discovery points it at its own namespace.
        CLOUDLET_DISCOVERY: 'off',
        CLOUDLET_MQTT_HOST: '127.0.0.1',
        CLOUDLET_MQTT_PORT: String(this.mqttPort),
        // HTTPS on a free port (tests read it from /v1/system's tls_port).
        CLOUDLET_TLS_PORT: '0',
        // No warm pool unless a test asks for one (CLOUDLET_POOL_BUDGET_MIB): with it, every service with a memory
        // state would keep one more VM running, which doubles the VMs of a 2-core CI machine and changes what the
        // tests of everything else observe (domains, ports, memory). test/warm-pool.e2e.test.ts turns it on.
        CLOUDLET_POOL_BUDGET_MIB: '0',
        ...this.options.env,
        ...env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const collect = (c: Buffer) => {
      this.log += c.toString();
    };
    this.proc.stdout?.on('data', collect);
    this.proc.stderr?.on('data', collect);
    const deadline = Date.now() + 20000;
    while (Date.now() < deadline) {
      if (this.proc.exitCode !== null) throw new Error(`agent exited with ${this.proc.exitCode}: ${this.log}`);
      try {
        const r = await request(this.apiPort, 'GET', '/v1/health');
        if (r.status === 200) return;
      } catch {
        /* not listening yet */
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`agent did not answer within 20 s: ${this.log}`);
  }

  get pid(): number | undefined {
    return this.proc?.pid;
  }

  /** Resolves with the signal that ended the agent process (null when it exited by itself), or rejects after timeoutMs. */
  exited(timeoutMs: number): Promise<NodeJS.Signals | null> {
    const proc = this.proc;
    if (!proc) return Promise.resolve(null);
    if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve(proc.signalCode);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the agent did not exit within ${timeoutMs} ms`)), timeoutMs);
      proc.once('exit', (_code, signal) => {
        clearTimeout(timer);
        resolve(signal);
      });
    });
  }

  get(urlPath: string, headers?: Record<string, string>) {
    return request(this.apiPort, 'GET', urlPath, undefined, headers);
  }
  post(urlPath: string, body?: unknown) {
    return request(this.apiPort, 'POST', urlPath, body ?? {});
  }
  delete(urlPath: string) {
    return request(this.apiPort, 'DELETE', urlPath);
  }

  /** SIGKILL: the agent gets no chance to clean anything up, as in a crash or power loss of the process. */
  async kill(): Promise<void> {
    await this.signal('SIGKILL');
  }

  async stop(): Promise<void> {
    await this.signal('SIGTERM');
  }

  private async signal(sig: NodeJS.Signals): Promise<void> {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
    proc.kill(sig);
    await exited;
  }

  /** Stop the agent, destroy every domain it owned, and delete its data directory. */
  async dispose(): Promise<void> {
    await this.stop();
    await destroyDomainsUnder(this.dataDir);
    await rm(this.dataDir, { recursive: true, force: true });
  }
}

/** The running domains whose instance files live under `dataDir`: how a test checks that nothing was left behind. */
export async function domainsUnder(dataDir: string): Promise<string[]> {
  const conn = await Connection.open('qemu:///system');
  try {
    const owned: string[] = [];
    for (const d of await conn.listDomains()) {
      const meta = await conn.getMetadata(d.uuid, METADATA_URI).catch(() => null);
      if (meta && meta.includes(dataDir)) owned.push(d.uuid);
    }
    return owned;
  } finally {
    await conn.close();
  }
}

export async function destroyDomainsUnder(dataDir: string): Promise<void> {
  const conn = await Connection.open('qemu:///system');
  try {
    for (const uuid of await domainsUnder(dataDir)) await conn.destroyDomain(uuid).catch(() => {});
  } finally {
    await conn.close();
  }
}

/** Kill a Service VM's QEMU from outside libvirt, as a crash would. */
export async function killQemuOf(uuid: string): Promise<void> {
  await promisify(execFile)('pkill', ['-9', '-f', `uuid ${uuid}`]);
}
