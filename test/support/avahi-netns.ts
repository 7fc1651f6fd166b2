// Two network namespaces made by the test, joined only by a veth pair created inside them (it never exists in the
// root namespace), each with a private dbus-daemon and its own avahi-daemon: mDNS never reaches the host's networks.
// (The recipe of shared/notes/platform.md Q7.) The agent itself stays in the root namespace on loopback and reaches
// side A's Avahi through A's bus socket (a file path, not a network address); side B plays the rest of the network.
import { ChildProcess, execFile, spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
export type Side = 'a' | 'b';

/** A private system bus on `socket` (the fleet's cloudlets use it too). */
export const BUS_CONF = (socket: string) => `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=${socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
`;

/** An avahi-daemon that publishes and browses on `iface` only. */
export const AVAHI_CONF = (hostName: string, iface: string) => `[server]
host-name=${hostName}
domain-name=local
use-ipv4=yes
use-ipv6=no
allow-interfaces=${iface}
enable-dbus=yes
ratelimit-interval-usec=1000000
ratelimit-burst=1000
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
publish-aaaa-on-ipv4=no
[reflector]
enable-reflector=no
`;

export interface BrowsedService {
  interface: string;
  name: string;
  type: string;
  host: string;
  address: string;
  port: number;
  txt: string[];
}

export class AvahiNetwork {
  private readonly children = new Set<ChildProcess>();
  private readonly avahi = new Map<Side, ChildProcess>();

  private constructor(
    private readonly dir: string,
    private readonly tag: string,
  ) {}

  /** Namespaces cl<pid>a and cl<pid>b with 10.213.0.1 and .2, their buses and their avahi-daemons, all running. */
  static async create(): Promise<AvahiNetwork> {
    const net = new AvahiNetwork(await mkdtemp(path.join(os.tmpdir(), 'cloudlet-avahi-')), `cl${process.pid}`);
    try {
      await net.setUp();
    } catch (err) {
      await net.dispose();
      throw err;
    }
    return net;
  }

  namespace(side: Side): string {
    return `${this.tag}${side}`;
  }
  private iface(side: Side): string {
    return `${this.tag}v${side}`;
  }
  address(side: Side): string {
    return side === 'a' ? '10.213.0.1' : '10.213.0.2';
  }
  busAddress(side: Side): string {
    return `unix:path=${this.socket(side)}`;
  }
  private socket(side: Side): string {
    return path.join(this.dir, side, 'bus.sock');
  }

  private async setUp(): Promise<void> {
    for (const side of ['a', 'b'] as const) await run('ip', ['netns', 'add', this.namespace(side)]);
    await run('ip', ['-n', this.namespace('a'), 'link', 'add', this.iface('a'), 'type', 'veth', 'peer', 'name', this.iface('b'), 'netns', this.namespace('b')]);
    for (const side of ['a', 'b'] as const) {
      const ns = this.namespace(side);
      await run('ip', ['-n', ns, 'addr', 'add', `${this.address(side)}/24`, 'dev', this.iface(side)]);
      await run('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
      await run('ip', ['-n', ns, 'link', 'set', this.iface(side), 'up']);
      await mkdir(path.join(this.dir, side));
      await writeFile(path.join(this.dir, side, 'bus.conf'), BUS_CONF(this.socket(side)));
      await writeFile(path.join(this.dir, side, 'avahi.conf'), AVAHI_CONF(`${this.tag}-${side}`, this.iface(side)));
      this.spawn(side, 'dbus-daemon', [`--config-file=${path.join(this.dir, side, 'bus.conf')}`, '--nofork']);
    }
    for (const side of ['a', 'b'] as const) await this.startAvahi(side);
  }

  /** Runs a command in the side's namespace with the side's bus as the system bus; it ends with dispose() at the latest. */
  spawn(side: Side, command: string, args: string[]): ChildProcess {
    const child = spawn('ip', ['netns', 'exec', this.namespace(side), 'env', `DBUS_SYSTEM_BUS_ADDRESS=${this.busAddress(side)}`, command, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    child.stdout?.resume();
    child.stderr?.resume();
    this.children.add(child);
    child.once('exit', () => this.children.delete(child));
    return child;
  }

  async startAvahi(side: Side): Promise<void> {
    await this.waitFor(async () => await this.busHasName(side, 'org.freedesktop.DBus'), 'the bus');
    // `ip netns exec` gives the command a private mount namespace: a fresh /run keeps this avahi's pid file and socket
    // apart from any other, and an empty services directory keeps the host's static services out.
    const avahi = this.spawn(side, 'sh', [
      '-c',
      `mount -t tmpfs none /run && mount -t tmpfs none /etc/avahi/services && exec avahi-daemon -f ${path.join(this.dir, side, 'avahi.conf')} --no-drop-root --no-chroot --no-rlimits --no-proc-title`,
    ]);
    this.avahi.set(side, avahi);
    await this.waitFor(() => this.busHasName(side, 'org.freedesktop.Avahi'), `avahi-daemon in ${this.namespace(side)}`);
  }

  /** SIGTERM, as a service manager stops it: avahi says goodbye on the network and leaves the bus. */
  async stopAvahi(side: Side): Promise<void> {
    const avahi = this.avahi.get(side);
    if (!avahi || avahi.exitCode !== null || avahi.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => avahi.once('exit', () => resolve()));
    avahi.kill('SIGTERM');
    await exited;
    this.avahi.delete(side);
  }

  /** avahi-browse from the side's namespace: every resolved service of that type (waits for avahi's "all for now"). */
  async browse(side: Side, type: string): Promise<BrowsedService[]> {
    const { stdout } = await run('ip', [
      'netns',
      'exec',
      this.namespace(side),
      'env',
      `DBUS_SYSTEM_BUS_ADDRESS=${this.busAddress(side)}`,
      'avahi-browse',
      '--resolve',
      '--terminate',
      '--parsable',
      '--no-db-lookup',
      type,
    ]);
    return stdout
      .split('\n')
      .filter((line) => line.startsWith('='))
      .map((line) => {
        const f = parseParsableLine(line);
        return { interface: f[1]!, name: f[3]!, type: f[4]!, host: f[6]!, address: f[7]!, port: Number(f[8]), txt: parseTxtField(f[9] ?? '') };
      });
  }

  /** Polls browse until `match` holds for the list, for up to 15 s. */
  async browseUntil(side: Side, type: string, match: (services: BrowsedService[]) => boolean): Promise<BrowsedService[]> {
    let last: BrowsedService[] = [];
    await this.waitFor(async () => match((last = await this.browse(side, type))), `a browse of ${type} from ${side} to match`, 15000);
    return last;
  }

  private async busHasName(side: Side, name: string): Promise<boolean> {
    try {
      const { stdout } = await run('dbus-send', [
        `--bus=${this.busAddress(side)}`,
        '--print-reply',
        '--dest=org.freedesktop.DBus',
        '/org/freedesktop/DBus',
        'org.freedesktop.DBus.NameHasOwner',
        `string:${name}`,
      ]);
      return /boolean true/.test(stdout);
    } catch {
      return false;
    }
  }

  private async waitFor(condition: () => Promise<boolean>, what: string, timeoutMs = 10000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (await condition()) return;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`timed out waiting for ${what}`);
  }

  /** Ends every process it started, deletes both namespaces (and so the veth pair) and its files. */
  async dispose(): Promise<void> {
    await Promise.all(
      [...this.children].map(
        (child) =>
          new Promise<void>((resolve) => {
            if (child.exitCode !== null || child.signalCode !== null) return resolve();
            child.once('exit', () => resolve());
            child.kill('SIGTERM');
          }),
      ),
    );
    for (const side of ['a', 'b'] as const) await run('ip', ['netns', 'del', this.namespace(side)]).catch(() => {});
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** avahi-browse -p separates fields with ';' and escapes ';' and '\' in names as \059 / \092 (decimal). */
function parseParsableLine(line: string): string[] {
  return line.split(';').map((field) => field.replace(/\\(\d{3})/g, (_, code: string) => String.fromCharCode(Number(code))));
}

/** The TXT field is a space-separated list of double-quoted strings. */
function parseTxtField(field: string): string[] {
  return [...field.matchAll(/"((?:[^"\\]|\\.)*)"/g)].map((m) => m[1]!);
}
