// One whole cloudlet on a shared test machine, as a box in the field would be: its own network namespace (its uplink
// is a veth whose other end the fleet plugs into a test bridge), its own mount and UTS namespaces (a private /run,
// /var/lib/libvirt, /etc/libvirt, and its own host name), its own virtlogd + libvirtd (so the QEMU processes it starts,
// and their forwarded ports, live in the cloudlet's namespaces), its own dbus-daemon and avahi-daemon, and its agent
// on the appliance's default ports. (The recipe of shared/notes/platform.md Q7 and Q9.) Every process is a direct
// child of the test, started in the namespaces with nsenter, and ended by its pid.
import { ChildProcess, execFile, spawn } from 'node:child_process';
import { copyFile, mkdir, readFile, readdir, rm, stat, writeFile, chmod } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { AGENT_MAIN, ROOT } from './agent';
import { AVAHI_CONF, BUS_CONF } from './avahi-netns';

const run = promisify(execFile);

/** The cloudlet's end of its uplink, inside its namespace. */
export const UPLINK = 'up0';
/** The appliance's defaults: the namespace is the cloudlet's own, so they are free. */
export const API_PORT = 9999;
export const TLS_PORT = 9443;
export const MQTT_PORT = 1883;

export interface HttpReply {
  status: number;
  body: string;
  json: any;
}

export interface BoxOptions {
  /** Host name, mDNS instance name and the name its agent reports. */
  name: string;
  namespace: string;
  /** Its address on the test bridge (a /24). */
  address: string;
  /** A directory of its own (0755): configuration, state, sockets, data. */
  dir: string;
  /** Its agent's configuration file (e.g. an MQTT uplink to a fleet broker); none: the appliance defaults. */
  config?: Record<string, unknown>;
  /** Environment for its agent, over the appliance defaults. */
  env?: Record<string, string>;
}

export class CloudletBox {
  private readonly children = new Map<string, ChildProcess>();
  private holder: ChildProcess | undefined;
  agentLog = '';

  constructor(readonly options: BoxOptions) {}

  get name(): string {
    return this.options.name;
  }
  get address(): string {
    return this.options.address;
  }
  get namespace(): string {
    return this.options.namespace;
  }
  get dataDir(): string {
    return path.join(this.options.dir, 'data');
  }
  get busAddress(): string {
    return `unix:path=${path.join(this.options.dir, 'bus.sock')}`;
  }
  /** Every pid the box started (daemons, agent, the namespace holder): tear-down checks each is gone. */
  get pids(): number[] {
    return [this.holder, ...this.children.values()].flatMap((child) => (child?.pid ? [child.pid] : []));
  }

  /** The command prefix that runs a program inside the cloudlet: its network, mount and UTS namespaces. */
  enter(): string[] {
    if (!this.holder?.pid) throw new Error(`${this.name} is not set up`);
    return ['nsenter', `--target=${this.holder.pid}`, '--net', '--mount', '--uts', '--'];
  }

  /** The network namespace and its uplink must exist (the fleet makes them); this starts everything inside. */
  async start(): Promise<void> {
    await this.writeConfiguration();
    await this.startHolder();
    await this.startDaemon('virtlogd', ['virtlogd'], () => this.exists('/run/libvirt/virtlogd-sock'));
    await this.startDaemon('libvirtd', ['libvirtd'], () => this.exists('/run/libvirt/libvirt-sock'));
    await this.startDaemon('dbus', ['dbus-daemon', `--config-file=${path.join(this.options.dir, 'bus.conf')}`, '--nofork'], () =>
      this.exists(path.join(this.options.dir, 'bus.sock')),
    );
    await this.startDaemon(
      'avahi',
      [
        'env',
        `DBUS_SYSTEM_BUS_ADDRESS=${this.busAddress}`,
        'avahi-daemon',
        '-f',
        path.join(this.options.dir, 'avahi.conf'),
        '--no-drop-root',
        '--no-chroot',
        '--no-rlimits',
        '--no-proc-title',
      ],
      () => this.exists('/run/avahi-daemon/socket'),
    );
    await this.startAgent();
  }

  private async writeConfiguration(): Promise<void> {
    const dir = this.options.dir;
    for (const sub of ['etc', 'etc/qemu', 'etc/nwfilter', 'lib', 'cache', 'log', 'data']) await mkdir(path.join(dir, sub), { recursive: true, mode: 0o755 });
    await chmod(dir, 0o755);
    await chmod(path.join(dir, 'data'), 0o755);
    // Only the daemons' own settings: the machine's defined domains and networks (and their autostart) stay its own.
    for (const file of await readdir('/etc/libvirt')) if (file.endsWith('.conf')) await copyFile(path.join('/etc/libvirt', file), path.join(dir, 'etc', file));
    // Two libvirtds on one machine would share cgroup paths; no TCP listener at all (migration comes with TLS).
    await writeFile(path.join(dir, 'etc', 'qemu.conf'), `${await readFile('/etc/libvirt/qemu.conf', 'utf8')}\ncgroup_controllers = [ ]\n`);
    await writeFile(path.join(dir, 'bus.conf'), BUS_CONF(path.join(dir, 'bus.sock')));
    await writeFile(path.join(dir, 'avahi.conf'), AVAHI_CONF(this.name, UPLINK));
    if (this.options.config) await writeFile(path.join(dir, 'agent.json'), JSON.stringify(this.options.config));
  }

  /** A process whose only job is to hold the mount and UTS namespaces, set up once, that everything else enters. */
  private async startHolder(): Promise<void> {
    const dir = this.options.dir;
    const script = [
      'mount -t tmpfs -o mode=0755 none /run',
      'mkdir -p /run/libvirt /run/lock',
      `mount --bind ${dir}/etc /etc/libvirt`,
      `mount --bind ${dir}/lib /var/lib/libvirt`,
      `mount --bind ${dir}/cache /var/cache/libvirt`,
      `mount --bind ${dir}/log /var/log/libvirt`,
      'mount -t tmpfs none /etc/avahi/services',
      `hostname ${this.name}`,
      'echo ready',
      'exec sleep infinity',
    ].join(' && ');
    // nsenter --net (not `ip netns exec`) keeps /sys and the cgroups, which the agent's sandboxes need.
    const holder = spawn('nsenter', [`--net=/run/netns/${this.namespace}`, 'unshare', '--mount', '--uts', '--propagation', 'private', 'sh', '-c', script], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.holder = holder;
    let output = '';
    await new Promise<void>((resolve, reject) => {
      holder.stdout.on('data', (chunk: Buffer) => {
        output += chunk.toString();
        if (output.includes('ready')) resolve();
      });
      holder.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
      holder.once('exit', (code) => reject(new Error(`${this.name}: namespace set-up failed (${code}): ${output}`)));
    });
  }

  /** A path as the cloudlet sees it (through its holder's root, so through its own mounts). */
  private exists(inside: string): Promise<boolean> {
    return stat(path.join(`/proc/${this.holder!.pid}/root`, inside)).then(
      () => true,
      () => false,
    );
  }

  private spawnInside(key: string, argv: string[], env: NodeJS.ProcessEnv = process.env): ChildProcess {
    const child = spawn(this.enter()[0]!, [...this.enter().slice(1), ...argv], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.children.set(key, child);
    return child;
  }

  private async startDaemon(key: string, argv: string[], ready: () => Promise<boolean>): Promise<void> {
    const child = this.spawnInside(key, argv);
    let output = '';
    child.stdout?.on('data', (chunk: Buffer) => (output = (output + chunk.toString()).slice(-4000)));
    child.stderr?.on('data', (chunk: Buffer) => (output = (output + chunk.toString()).slice(-4000)));
    await this.waitFor(ready, `${this.name}: ${argv[0]}`, () => (child.exitCode !== null ? `exited with ${child.exitCode}: ${output}` : null));
  }

  /** Starts (or restarts) the agent and waits until its API answers inside the cloudlet. */
  async startAgent(): Promise<void> {
    // Without tap's NODE_OPTIONS preload: it would run before the agent sizes libuv's thread pool (main.ts).
    const { NODE_OPTIONS: _preload, ...inherited } = process.env;
    const agent = this.spawnInside('agent', [process.execPath, AGENT_MAIN], {
      ...inherited,
      CLOUDLET_DATA_DIR: this.dataDir,
      CLOUDLET_SEED_DIR: '',
      CLOUDLET_CONFIG: this.options.config ? path.join(this.options.dir, 'agent.json') : path.join(ROOT, 'test', 'support', 'no-config.json'),
      CLOUDLET_DISCOVERY: 'on',
      DBUS_SYSTEM_BUS_ADDRESS: this.busAddress,
      ...this.options.env,
    });
    this.agentLog = '';
    const collect = (chunk: Buffer) => (this.agentLog += chunk.toString());
    agent.stdout?.on('data', collect);
    agent.stderr?.on('data', collect);
    await this.waitFor(
      async () => (await this.http('GET', `http://127.0.0.1:${API_PORT}/v1/health`).catch(() => null))?.status === 200,
      `${this.name}: its agent`,
      () => (agent.exitCode !== null ? `exited with ${agent.exitCode}: ${this.agentLog}` : null),
      30000,
    );
  }

  /** Ends the agent (SIGTERM as a service manager stops it, or SIGKILL as a crash). */
  async stopAgent(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    await this.end('agent', signal);
  }

  /** The operator's credential, which the agent accepts from the cloudlet's own loopback only. */
  async adminToken(): Promise<string> {
    return (await readFile(path.join(this.dataDir, 'trust', 'admin-token'), 'utf8')).trim();
  }

  /** The operator on the box: a request to its own agent on loopback with the admin token. */
  async operator(method: string, urlPath: string, body?: unknown): Promise<HttpReply> {
    return this.http(method, `http://127.0.0.1:${API_PORT}${urlPath}`, { body, headers: { authorization: `Bearer ${await this.adminToken()}` } });
  }

  /** An HTTP(S) request made from inside the cloudlet's namespaces (curl: no process of the test's own is there). */
  http(method: string, url: string, options: { body?: unknown; headers?: Record<string, string>; timeoutSeconds?: number } = {}): Promise<HttpReply> {
    return httpFrom(this.enter(), method, url, options);
  }

  /** The domains its libvirtd runs (names). */
  async domains(): Promise<string[]> {
    const { stdout } = await run(this.enter()[0]!, [...this.enter().slice(1), 'virsh', '-c', 'qemu:///system', 'list', '--all', '--name']);
    return stdout.split('\n').filter((line) => line.trim() !== '');
  }

  /** Ends everything in reverse order: the agent, then every domain its libvirtd still runs, then the daemons. */
  async stop(): Promise<void> {
    await this.end('agent', 'SIGTERM');
    if (this.children.get('libvirtd')?.exitCode === null) {
      for (const name of await this.domains().catch(() => [])) {
        await run(this.enter()[0]!, [...this.enter().slice(1), 'virsh', '-c', 'qemu:///system', 'destroy', name]).catch(() => {});
        await run(this.enter()[0]!, [...this.enter().slice(1), 'virsh', '-c', 'qemu:///system', 'undefine', name]).catch(() => {});
      }
    }
    for (const key of ['avahi', 'dbus', 'libvirtd', 'virtlogd']) await this.end(key, 'SIGTERM');
    if (this.holder && this.holder.exitCode === null && this.holder.signalCode === null) {
      const exited = new Promise((resolve) => this.holder!.once('exit', resolve));
      this.holder.kill('SIGKILL');
      await exited;
    }
    await rm(this.options.dir, { recursive: true, force: true });
  }

  private async end(key: string, signal: NodeJS.Signals): Promise<void> {
    const child = this.children.get(key);
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill(signal);
    // A daemon that ignores SIGTERM for 15 s is killed: tear-down must leave nothing.
    const timer = setTimeout(() => child.kill('SIGKILL'), 15000);
    await exited;
    clearTimeout(timer);
  }

  private async waitFor(condition: () => Promise<boolean>, what: string, failed: () => string | null, timeoutMs = 20000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      const failure = failed();
      if (failure) throw new Error(`${what} ${failure}`);
      if (await condition()) return;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`${what} was not ready within ${timeoutMs} ms`);
  }
}

/**
 * An HTTP(S) request with curl run under `via` (a namespace prefix). HTTPS is not verified here: the tests that need
 * a pinned certificate use the agent's or the CLI's own client. No answer at all (status 0) is an answer too.
 */
export async function httpFrom(
  via: string[],
  method: string,
  url: string,
  options: { body?: unknown; headers?: Record<string, string>; timeoutSeconds?: number } = {},
): Promise<HttpReply> {
  const args = ['curl', '--silent', '--show-error', '--insecure', '--max-time', String(options.timeoutSeconds ?? 120), '--request', method];
  args.push('--write-out', '\n%{http_code}');
  for (const [name, value] of Object.entries(options.headers ?? {})) args.push('--header', `${name}: ${value}`);
  if (options.body !== undefined) args.push('--header', 'content-type: application/json', '--data-binary', JSON.stringify(options.body));
  args.push(url);
  // curl fails (exits non-zero) when nothing answers, and still writes the status it got: 000.
  const stdout = await run(via[0]!, [...via.slice(1), ...args], { maxBuffer: 16 << 20 }).then(
    (done) => done.stdout,
    (err: { stdout?: string }) => err.stdout ?? '\n0',
  );
  const cut = stdout.lastIndexOf('\n');
  const body = stdout.slice(0, cut);
  let json: unknown;
  try {
    json = JSON.parse(body);
  } catch {
    json = undefined;
  }
  return { status: Number(stdout.slice(cut + 1)), body, json };
}
