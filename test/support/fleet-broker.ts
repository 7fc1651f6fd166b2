// A fleet operator's MQTT broker for tests and benchmarks: Debian's mosquitto, configured as docs/fleet.md says (TLS
// with a throwaway certificate authority, a password per cloudlet, an ACL that lets each cloudlet write only its own
// tree under cloudlet/<name>/, and a dashboard user that reads every tree). It listens on loopback (or the address
// given, e.g. inside a test namespace), lives in a private directory, and stop() removes both.
import { ChildProcess, execFile, spawn } from 'node:child_process';
import { chmod, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import type { IClientOptions } from 'mqtt';
import { freePort } from './agent';
import { MqttWatcher } from './listeners';
import { certificateSignedBy, selfSignedCertificate } from './self-signed';

const run = promisify(execFile);

/** The user a fleet dashboard logs in as: it reads every cloudlet's tree and writes nothing. */
export const DASHBOARD = 'dashboard';

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

user ${DASHBOARD}
topic read cloudlet/#
`;

export class FleetBroker {
  log = '';

  private constructor(
    readonly dir: string,
    readonly host: string,
    readonly port: number,
    private readonly proc: ChildProcess,
    private readonly passwords: Map<string, string>,
    /** The authority's certificate (PEM), for clients of the tests. */
    readonly caPem: Buffer,
  ) {}

  /** Starts mosquitto with a login for each cloudlet in `cloudlets` and for the dashboard; resolves once it listens. */
  static async start(cloudlets: string[], host = '127.0.0.1'): Promise<FleetBroker> {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-fleet-broker-'));
    await chmod(dir, 0o755);
    const ca = { keyFile: path.join(dir, 'ca.key'), certFile: path.join(dir, 'ca.pem') };
    await selfSignedCertificate('fleet test CA', ca.keyFile, ca.certFile);
    await certificateSignedBy(ca, 'fleet-broker', { keyFile: path.join(dir, 'server.key'), certFile: path.join(dir, 'server.pem') }, `IP:${host}`);
    const passwords = new Map([...cloudlets, DASHBOARD].map((user) => [user, `pw-${user}-${Math.random().toString(36).slice(2)}`]));
    const passwd = path.join(dir, 'passwd');
    await writeFile(passwd, '');
    for (const [user, password] of passwords) {
      await run('mosquitto_passwd', ['-b', passwd, user, password]);
      await writeFile(path.join(dir, `${user}.password`), `${password}\n`, { mode: 0o600 });
    }
    await writeFile(path.join(dir, 'acl'), ACL);
    const port = await freePort();
    await writeFile(path.join(dir, 'mosquitto.conf'), mosquittoConf(dir, host, port));
    const proc = spawn('mosquitto', ['-c', path.join(dir, 'mosquitto.conf')], { stdio: ['ignore', 'ignore', 'pipe'] });
    const broker = new FleetBroker(dir, host, port, proc, passwords, await readFile(ca.certFile));
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

  get url(): string {
    return `mqtts://${this.host}:${this.port}`;
  }

  get caFile(): string {
    return path.join(this.dir, 'ca.pem');
  }

  passwordFile(user: string): string {
    return path.join(this.dir, `${user}.password`);
  }

  /** MQTT client options that log in as `user` over TLS, trusting the broker's authority. */
  login(user: string, password = this.passwords.get(user)): IClientOptions {
    return { username: user, password, ca: this.caPem, rejectUnauthorized: true };
  }

  /**
   * The agent's `mqtt` configuration for the cloudlet `name`: its tree under cloudlet/<name>, its uplink to `url`
   * (this broker, or a relay in front of it).
   */
  agentMqttConfig(name: string, url = this.url): Record<string, unknown> {
    return {
      topicRoot: `cloudlet/${name}`,
      externalUrl: url,
      externalCaFile: this.caFile,
      externalUsername: name,
      externalPasswordFile: this.passwordFile(name),
    };
  }

  /** A fleet dashboard: subscribed to every cloudlet's tree with QoS 1. */
  dashboard(): Promise<MqttWatcher> {
    return MqttWatcher.connect(this.url, 'cloudlet/#', this.login(DASHBOARD), 1);
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
