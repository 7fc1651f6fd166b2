// A fleet of whole cloudlets side by side on one machine (see cloudlet-box.ts for one of them), joined by a test
// bridge that lives in a network namespace of its own (never eth0, never the root namespace), and phones: further
// namespaces on the same bridge, with nothing running in them but what a test runs there (the CLI, curl); and, if
// asked, a fleet broker on a host of its own on the bridge (fleet-broker.ts), to which every cloudlet's agent publishes
// over its uplink. Cutting a cloudlet's uplink is one `ip link set down` of its port on the bridge. Tear-down leaves
// nothing, and says so: leftovers() lists any namespace, process, domain or file of the fleet that is still there.
import { execFile } from 'node:child_process';
import { access, chmod, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { CloudletBox, UPLINK, httpFrom, type HttpReply } from './cloudlet-box';
import { cli, type CliResult } from './cli';
import { FleetBroker, type Host } from './fleet-broker';

const run = promisify(execFile);

/** Namespaces are private: every fleet may use the same subnet. */
const SUBNET = '10.87.0';
const BRIDGE = 'br0';
/** The fleet broker host's address on the bridge (cloudlets have .1 up, phones .100 up). */
const BROKER_ADDRESS = `${SUBNET}.250`;

export interface FleetOptions {
  /** Host names of the cloudlets, e.g. ['cloudlet-a', 'cloudlet-b', 'cloudlet-c']. */
  cloudlets: string[];
  /**
   * A fleet broker on a host of its own on the bridge, started before the cloudlets, with a login for each of them;
   * every agent's uplink (`mqtt.externalUrl`, its credentials) points at it.
   */
  broker?: boolean;
  /** Further logins on the fleet broker, besides one per cloudlet and the dashboards' (a benchmark's own client). */
  brokerLogins?: string[];
  /** Agent configuration per cloudlet (by name), over the appliance defaults; its `mqtt` over the broker's uplink settings. */
  config?: (name: string, index: number) => { mqtt?: Record<string, unknown>; [key: string]: unknown };
  /** Extra agent environment per cloudlet (by name), over the appliance defaults. */
  env?: (name: string, index: number) => Record<string, string>;
}

export class Phone implements Host {
  constructor(
    readonly namespace: string,
    readonly address: string,
    /** Its own HOME: the CLI keeps its credentials (and pinned certificates) there. */
    readonly home: string,
  ) {}

  /** The command prefix that runs a program on this host. */
  enter(): string[] {
    return ['nsenter', `--net=/run/netns/${this.namespace}`];
  }

  /** The `cloudlet` CLI, run on the phone. */
  cli(...args: string[]): Promise<CliResult> {
    return cli(args, { via: this.enter(), env: { HOME: this.home, XDG_CONFIG_HOME: path.join(this.home, '.config') } });
  }

  /** An HTTP(S) request from the phone (an app talking to its Service VM, say). */
  http(method: string, url: string, options: { body?: unknown; headers?: Record<string, string>; timeoutSeconds?: number } = {}): Promise<HttpReply> {
    return httpFrom(this.enter(), method, url, options);
  }
}

export class Fleet {
  readonly cloudlets: CloudletBox[] = [];
  readonly phones: Phone[] = [];
  /** The fleet broker, with `broker: true`; its host is a namespace on the bridge like a phone's. */
  broker: FleetBroker | undefined;
  private readonly bridgeNamespace: string;
  private readonly brokerNamespace: string;

  private constructor(
    private readonly tag: string,
    private readonly dir: string,
  ) {
    this.bridgeNamespace = `${tag}-br`;
    this.brokerNamespace = `${tag}-fb`;
  }

  /** The bridge, then each cloudlet whole (its daemons and its agent answering). */
  static async start(options: FleetOptions): Promise<Fleet> {
    const fleet = new Fleet(`fl${process.pid}`, await mkdtemp(path.join(os.tmpdir(), 'cloudlet-fleet-')));
    // QEMU (libvirt's own user) must be able to search the way down to each cloudlet's data directory.
    await chmod(fleet.dir, 0o755);
    try {
      await run('ip', ['netns', 'add', fleet.bridgeNamespace]);
      await run('ip', ['-n', fleet.bridgeNamespace, 'link', 'set', 'lo', 'up']);
      // No multicast snooping: without an IGMP querier on the bridge it could stop flooding mDNS.
      await run('ip', ['-n', fleet.bridgeNamespace, 'link', 'add', BRIDGE, 'type', 'bridge', 'mcast_snooping', '0']);
      await run('ip', ['-n', fleet.bridgeNamespace, 'link', 'set', BRIDGE, 'up']);
      if (options.broker) {
        await fleet.plug(fleet.brokerNamespace, 'p-fb', 'lan0', BROKER_ADDRESS);
        const host = { address: BROKER_ADDRESS, enter: () => ['nsenter', `--net=/run/netns/${fleet.brokerNamespace}`] };
        fleet.broker = await FleetBroker.start([...options.cloudlets, ...(options.brokerLogins ?? [])], host, path.join(fleet.dir, 'fleet-broker'));
      }
      for (const [index, name] of options.cloudlets.entries()) {
        const namespace = `${fleet.tag}-c${index}`;
        const address = `${SUBNET}.${index + 1}`;
        await fleet.plug(namespace, `p-c${index}`, UPLINK, address);
        const config = options.config?.(name, index);
        const uplink = fleet.broker?.agentMqttConfig(name);
        const box = new CloudletBox({
          name,
          namespace,
          address,
          dir: path.join(fleet.dir, name),
          config: uplink ? { ...config, mqtt: { ...uplink, ...config?.mqtt } } : config,
          env: options.env?.(name, index) ?? {},
        });
        fleet.cloudlets.push(box);
        await box.start();
      }
    } catch (err) {
      await fleet.stop();
      throw err;
    }
    return fleet;
  }

  cloudlet(name: string): CloudletBox {
    const box = this.cloudlets.find((c) => c.name === name);
    if (!box) throw new Error(`no cloudlet ${name} in the fleet`);
    return box;
  }

  /**
   * A phone on the bridge: a namespace with an address and nothing running. Any other host of the LAN (a fleet
   * broker, say) is one too: run it there with `phone.enter()`, and end it in the test.
   */
  async addPhone(): Promise<Phone> {
    const index = this.phones.length;
    const namespace = `${this.tag}-ph${index}`;
    const address = `${SUBNET}.${100 + index}`;
    await this.plug(namespace, `p-ph${index}`, 'wlan0', address);
    const phone = new Phone(namespace, address, path.join(this.dir, `phone-${index}`));
    await run('mkdir', ['-p', phone.home]);
    this.phones.push(phone);
    return phone;
  }

  /**
   * Cuts (or restores) the uplink of a cloudlet (by name) or a phone: its port on the bridge goes down (up), as a
   * pulled cable would, and neither end is told.
   */
  async setUplink(host: string | Phone, up: boolean): Promise<void> {
    const port = typeof host === 'string' ? `p-c${this.cloudlets.indexOf(this.cloudlet(host))}` : `p-ph${this.phones.indexOf(host)}`;
    await run('ip', ['-n', this.bridgeNamespace, 'link', 'set', port, up ? 'up' : 'down']);
  }

  /** A namespace with a veth whose peer is a port of the bridge; the veth is made inside the namespaces, never in root. */
  private async plug(namespace: string, port: string, link: string, address: string): Promise<void> {
    await run('ip', ['netns', 'add', namespace]);
    await run('ip', ['-n', this.bridgeNamespace, 'link', 'add', port, 'type', 'veth', 'peer', 'name', link, 'netns', namespace]);
    await run('ip', ['-n', this.bridgeNamespace, 'link', 'set', port, 'master', BRIDGE, 'up']);
    await run('ip', ['-n', namespace, 'addr', 'add', `${address}/24`, 'dev', link]);
    await run('ip', ['-n', namespace, 'link', 'set', 'lo', 'up']);
    await run('ip', ['-n', namespace, 'link', 'set', link, 'up']);
  }

  private namespaces(): string[] {
    return [...this.cloudlets.map((c) => c.namespace), ...this.phones.map((p) => p.namespace), this.brokerNamespace, this.bridgeNamespace];
  }

  /** Every cloudlet stopped (its domains destroyed first), then the broker; every namespace deleted, every file removed. */
  async stop(): Promise<void> {
    this.pidsStarted = [...this.cloudlets.flatMap((c) => c.pids), ...(this.broker?.pid ? [this.broker.pid] : [])];
    for (const box of this.cloudlets) await box.stop().catch(() => {});
    await this.broker?.stop().catch(() => {});
    for (const namespace of this.namespaces()) await run('ip', ['netns', 'del', namespace]).catch(() => {});
    await rm(this.dir, { recursive: true, force: true });
  }

  private pidsStarted: number[] = [];

  /** What stop() left behind: namespaces, processes (the fleet's own, or any naming its directory), files. */
  async leftovers(): Promise<string[]> {
    const left: string[] = [];
    const { stdout } = await run('ip', ['netns', 'list']);
    for (const line of stdout.split('\n')) if (line.startsWith(`${this.tag}-`)) left.push(`namespace ${line.split(' ')[0]}`);
    for (const pid of this.pidsStarted) if (alive(pid)) left.push(`process ${pid}`);
    for (const entry of await readdir('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      const cmdline = await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '');
      if (cmdline.includes(this.dir)) left.push(`process ${entry}: ${cmdline.replace(/\0/g, ' ').slice(0, 200)}`);
    }
    if (
      await access(this.dir).then(
        () => true,
        () => false,
      )
    )
      left.push(`directory ${this.dir}`);
    return left;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
