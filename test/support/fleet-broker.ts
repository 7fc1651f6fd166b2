// A fleet operator's MQTT broker for tests and benchmarks: Debian's mosquitto, configured as docs/fleet.md says (TLS
// with a throwaway certificate authority, a password per cloudlet, an ACL that lets each cloudlet write only its own
// tree under cloudlet/<name>/, and a dashboard user that reads every tree). It runs on a host of its own on the fleet's
// test network (the fleet harness's broker host, fleet.ts), bound to that host's address, so each cloudlet reaches it
// over its own uplink; its files live in a directory of the fleet's, which stop() removes.
import { ChildProcess, execFile, spawn } from 'node:child_process';
import { chmod, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { NetnsMqttClient, type MqttLogin } from './netns-mqtt';
import { certificateSignedBy, selfSignedCertificate } from './self-signed';

const run = promisify(execFile);

/**
 * The users fleet dashboards log in as: each reads every cloudlet's tree and writes nothing. One user per dashboard:
 * the broker takes the username as the client id, so a second login with the same name would take the first's session.
 */
export const DASHBOARDS = ['dashboard', 'dashboard-2'] as const;
export type Dashboard = (typeof DASHBOARDS)[number];
/** MQTT over TLS's own port: the broker host is a namespace of its own, so it is free. */
export const FLEET_BROKER_PORT = 8883;

/** A host of the test network: its address, and the command prefix that runs a program there. */
export interface Host {
  readonly address: string;
  enter(): string[];
}

/** The broker's configuration: the worked example docs/fleet.md quotes. `dir` holds the files it names. */
export function mosquittoConf(dir: string, host: string, port: number): string {
  return `# A fleet broker: TLS only, a password per cloudlet, each cloudlet writes only its own tree.
per_listener_settings false
allow_anonymous false
password_file ${dir}/passwd
acl_file ${dir}/acl
# The client id is the username, so no cloudlet can take over another's session (and its last will) by naming it.
use_username_as_clientid true
# A dashboard subscribed with QoS 1 may fall this far behind (a cloudlet replaying an outage's queue) before losing messages.
max_queued_messages 20000
persistence false
user ${os.userInfo().username}
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true

listener ${port} ${host}
cafile ${dir}/ca.pem
certfile ${dir}/server.pem
keyfile ${dir}/server.key
tls_version tlsv1.2
`;
}

/** Each cloudlet reads and writes cloudlet/<its username>/…, and nothing else; the dashboard reads everything. */
export const ACL = `# Patterns apply to every user: %u is the username, which mosquitto never substitutes if it holds / + or #.
pattern readwrite cloudlet/%u/#
${DASHBOARDS.map((user) => `\nuser ${user}\ntopic read cloudlet/#\n`).join('')}`;

export class FleetBroker {
  log = '';

  private constructor(
    readonly dir: string,
    readonly host: Host,
    private readonly proc: ChildProcess,
    private readonly passwords: Map<string, string>,
    /** The authority's certificate (PEM), for clients of the tests. */
    readonly caPem: string,
  ) {}

  /**
   * Starts mosquitto on `host` with a login for each cloudlet in `cloudlets` and for the dashboard, its files in `dir`
   * (made here); resolves once it listens.
   */
  static async start(cloudlets: string[], host: Host, dir: string): Promise<FleetBroker> {
    await mkdir(dir, { recursive: true });
    await chmod(dir, 0o755);
    const ca = { keyFile: path.join(dir, 'ca.key'), certFile: path.join(dir, 'ca.pem') };
    await selfSignedCertificate('fleet test CA', ca.keyFile, ca.certFile);
    await certificateSignedBy(ca, 'fleet-broker', { keyFile: path.join(dir, 'server.key'), certFile: path.join(dir, 'server.pem') }, `IP:${host.address}`);
    const passwords = new Map([...cloudlets, ...DASHBOARDS].map((user) => [user, `pw-${user}-${Math.random().toString(36).slice(2)}`]));
    const passwd = path.join(dir, 'passwd');
    await writeFile(passwd, '');
    for (const [user, password] of passwords) {
      await run('mosquitto_passwd', ['-b', passwd, user, password]);
      await writeFile(path.join(dir, `${user}.password`), `${password}\n`, { mode: 0o600 });
    }
    await writeFile(path.join(dir, 'acl'), ACL);
    await writeFile(path.join(dir, 'mosquitto.conf'), mosquittoConf(dir, host.address, FLEET_BROKER_PORT));
    const via = host.enter();
    const proc = spawn(via[0]!, [...via.slice(1), 'mosquitto', '-c', path.join(dir, 'mosquitto.conf')], { stdio: ['ignore', 'ignore', 'pipe'] });
    const broker = new FleetBroker(dir, host, proc, passwords, await readFile(ca.certFile, 'utf8'));
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`mosquitto did not say it runs within 20 s: ${broker.log}`)), 20000);
      proc.stderr.on('data', (chunk: Buffer) => {
        broker.log += chunk.toString();
        if (/mosquitto version \S+ running/.test(broker.log)) resolve(clearTimeout(timer));
      });
      proc.once('exit', (code) => reject(new Error(`mosquitto exited with ${code}: ${broker.log}`)));
    }).catch(async (err: Error) => {
      await broker.stop();
      throw err;
    });
    return broker;
  }

  /** Its process (nsenter execs mosquitto: the same pid). */
  get pid(): number | undefined {
    return this.proc.pid;
  }

  get url(): string {
    return `mqtts://${this.host.address}:${FLEET_BROKER_PORT}`;
  }

  get caFile(): string {
    return path.join(this.dir, 'ca.pem');
  }

  passwordFile(user: string): string {
    return path.join(this.dir, `${user}.password`);
  }

  /** MQTT client options that log in as `user` over TLS, trusting the broker's authority. */
  login(user: string, password = this.passwords.get(user)): MqttLogin {
    return { username: user, password, ca: this.caPem, rejectUnauthorized: true };
  }

  /** The agent's `mqtt` configuration for the cloudlet `name`: its tree under cloudlet/<name>, its uplink to this broker. */
  agentMqttConfig(name: string): Record<string, unknown> {
    return {
      topicRoot: `cloudlet/${name}`,
      externalUrl: this.url,
      externalCaFile: this.caFile,
      externalUsername: name,
      externalPasswordFile: this.passwordFile(name),
    };
  }

  /** A fleet dashboard on the broker's host: subscribed to every cloudlet's tree with QoS 1 (or to `topic`). */
  dashboard(topic = 'cloudlet/#', user: Dashboard = 'dashboard'): Promise<NetnsMqttClient> {
    return NetnsMqttClient.watch(this.host.enter(), this.url, topic, this.login(user), 1);
  }

  /**
   * The broker's client connections as its host's kernel sees them: each peer's address, and how long ago the broker
   * last received data from it (TCP_INFO's last data receipt, through `ss`).
   */
  async connections(): Promise<Array<{ peer: string; lastReceivedMs: number }>> {
    const via = this.host.enter();
    const { stdout } = await run(via[0]!, [...via.slice(1), 'ss', '-tinH', 'state', 'established', `( sport = :${FLEET_BROKER_PORT} )`]);
    const found: Array<{ peer: string; lastReceivedMs: number }> = [];
    // One line per socket (…  local:port  peer:port), then an indented line of its TCP_INFO (… lastrcv:N …).
    for (const line of stdout.split('\n')) {
      const socket = /(\S+):\d+\s+(\S+):\d+\s*$/.exec(line);
      if (socket && !/^\s/.test(line)) found.push({ peer: socket[2]!, lastReceivedMs: NaN });
      const received = /\blastrcv:(\d+)/.exec(line);
      if (received && found.length > 0) found[found.length - 1]!.lastReceivedMs = Number(received[1]);
    }
    return found;
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      const exited = new Promise<void>((resolve) => this.proc.once('exit', () => resolve()));
      this.proc.kill('SIGTERM');
      await exited;
    }
    await rm(this.dir, { recursive: true, force: true });
  }
}
