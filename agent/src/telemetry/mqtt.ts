/**
 * Telemetry on MQTT: the only module that speaks MQTT. It embeds an aedes broker (TCP, and MQTT over WebSocket
 * through the HTTP server's stream endpoint) and publishes the cloudlet's state there as retained JSON, so any MQTT
 * dashboard that subscribes sees the current state at once and every change after it. Optionally it mirrors every
 * publication to a fleet broker (uplink.ts). The topic tree is documented in docs/telemetry.md.
 * Clients only subscribe: with `mqtt.access: devices` they log in as a paired device (its id and token) or as
 * `admin`, checked by the HTTP API's own access gate, and a device whose authorization ends is disconnected. A device
 * gets only its own instances' topics (InstanceView, api/wire-shapes.ts). Before login a connection is bounded in
 * bytes, time and number per address; after it, in packet size and connections per device.
 */
import { statfs } from 'node:fs/promises';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { Aedes, type AuthenticateError, type Client } from 'aedes';
import { eventJson, instanceJson, InstanceView, movedToJson, poolJson } from '../api/wire-shapes';
import type { AgentConfig } from '../config';
import { isFinalState, type CloudletEvent } from '../core/events';
import type { PartsReporter } from '../core/optional-parts';
import type { CloudletApi, Service } from '../core/types';
import type { Logger } from '../log';
import type { AccessGate, Transport } from '../trust/access';
import type { ConnectionCaps, Release } from '../trust/connection-caps';
import type { DeviceRegistry } from '../trust/devices';
import type { RateLimiter } from '../trust/rate-limit';
import { HomeAssistantDiscovery } from './ha-discovery';
import { PacketGuard } from './packet-guard';
import { FleetUplink } from './uplink';

/** A connection whose CONNECT has not arrived (and been accepted) by then is closed; aedes's default is 30 s. */
const CONNECT_TIMEOUT_MS = 5000;
/** CONNACK return code 3, "server unavailable": the device already holds as many connections as it may. */
const SERVER_UNAVAILABLE = 3;

export interface TelemetryOptions {
  config: AgentConfig['mqtt'];
  api: CloudletApi;
  hostname: string;
  agentVersion: string;
  /** The disk the cloudlet's images live on: its free space is published. */
  dataDir: string;
  log: Logger;
  /** Where MQTT over TCP and the external broker say whether they run (and, when not, why and what to do). */
  parts: PartsReporter;
  /** How `mqtt.access: devices` checks a CONNECT's credentials, and learns that a device's authorization ended. */
  credentials: { gate: AccessGate; devices: Pick<DeviceRegistry, 'on' | 'off'> };
  /** The HTTP API's request buckets: a TCP connection draws on its address's (WebSocket ones did at the upgrade). */
  rateLimiter?: Pick<RateLimiter, 'takeForAddress'>;
  /** Connections per address (counted before login) and per device (after it), shared with /v1/events. */
  connectionCaps?: ConnectionCaps;
}

/** The agent's topic tree under `root` (docs/telemetry.md). */
export class TopicTree {
  constructor(readonly root: string) {}

  get status(): string {
    return `${this.root}/status`;
  }
  get metrics(): string {
    return `${this.root}/metrics`;
  }
  instance(id: string): string {
    return `${this.root}/instances/${id}`;
  }
  progress(id: string): string {
    return `${this.root}/instances/${id}/progress`;
  }
  service(id: string): string {
    return `${this.root}/services/${id}`;
  }

  /** The instance an instance or progress topic is about, or null for any other topic. */
  instanceOf(topic: string): { id: string; progress: boolean } | null {
    const prefix = `${this.root}/instances/`;
    if (!topic.startsWith(prefix)) return null;
    const [id, sub, ...rest] = topic.slice(prefix.length).split('/');
    if (!id || rest.length > 0 || (sub !== undefined && sub !== 'progress')) return null;
    return { id, progress: sub === 'progress' };
  }

  /** True for the root and anything below it: topics only the agent may publish to. */
  owns(topic: string): boolean {
    return topic === this.root || topic.startsWith(`${this.root}/`);
  }
}

export class Telemetry {
  /** Retained payloads as last published: what a fleet broker gets again when it has lost them. */
  private readonly retained = new Map<string, string>();
  private readonly unsubscribe: () => void;
  private readonly metricsTimer: NodeJS.Timeout;
  private closed = false;
  /** How each connection reached the broker (the credential check needs it), and which device logged in on it. */
  private readonly transports = new WeakMap<Client, Transport>();
  private readonly guards = new WeakMap<Client, PacketGuard>();
  private readonly deviceOf = new Map<Client, string>();
  /** What each device's connection may see; the operator's and anonymous ones have none (they see everything). */
  private readonly views = new WeakMap<Client, InstanceView>();
  private readonly onDeviceEnded = (device: { id: string }) => this.disconnectDevice(device.id);
  /** Home Assistant's config topics; null when `mqtt.discoveryPrefix` is off. */
  private readonly homeAssistant: HomeAssistantDiscovery | null;
  /** When an instance last became ready for a user (a launch or a join); null until one does. */
  private lastProvisionedAt: string | null;

  private constructor(
    private readonly options: TelemetryOptions,
    readonly topics: TopicTree,
    private readonly broker: Aedes,
    /** The TCP listener; null when its port was taken. */
    private readonly server: net.Server | null,
    private readonly uplink: FleetUplink | null,
  ) {
    const prefix = options.config.discoveryPrefix;
    this.homeAssistant = prefix === null ? null : new HomeAssistantDiscovery(prefix, topics, options.hostname, options.agentVersion);
    this.lastProvisionedAt = latest(options.api.listInstances().map((instance) => instance.readyAt));
    this.unsubscribe = options.api.subscribe((event) => this.onEvent(event));
    options.credentials.devices.on('device-ended', this.onDeviceEnded);
    this.metricsTimer = setInterval(() => void this.publishMetrics(), options.config.metricsIntervalMs);
    this.metricsTimer.unref();
  }

  static async start(options: TelemetryOptions): Promise<Telemetry> {
    const topics = new TopicTree(options.config.topicRoot ?? `cloudlet/${options.hostname}`);
    let telemetry: Telemetry | undefined;
    const broker = await Aedes.createBroker({
      id: `cloudlet-agent-${options.hostname}`,
      connectTimeout: CONNECT_TIMEOUT_MS,
      authenticate: (client, username, password, done) => {
        const refused = options.config.access === 'anonymous-read' ? null : telemetry!.login(client, username, password);
        if (refused === null) telemetry!.guards.get(client)?.loggedInNow();
        done(refused, refused === null);
      },
      // null: not for this client.
      authorizeForward: (client, packet) => (telemetry ? telemetry.forwardable(client, packet) : packet),
      // Clients only read: the agent publishes through the broker object, not as a client, so no phone can fake a
      // VM's state or use the cloudlet as its own message bus.
      authorizePublish: (client, packet, callback) => {
        callback(client ? new Error(`${packet.topic}: clients of the cloudlet's broker may only subscribe`) : null);
      },
    });
    broker.on('clientDisconnect', (client) => telemetry?.deviceOf.delete(client));
    // A connection in the moment before the broker is ready is turned away (the client reconnects).
    const server = net.createServer((socket) => {
      const transport = { remoteAddress: socket.remoteAddress ?? '', secure: false };
      let release: Release;
      try {
        if (!telemetry) throw new Error('the broker is not ready yet');
        options.rateLimiter?.takeForAddress(transport.remoteAddress);
        release = telemetry.admit(transport);
      } catch {
        return socket.destroy();
      }
      whileOpen(socket, release);
      telemetry.handle(socket, transport);
    });
    // A box that cannot have its MQTT port (another broker holds it) must still serve phones: telemetry goes on over
    // the API port's /mqtt WebSocket, and the log says why TCP is missing.
    const { host, port } = options.config;
    const listening = await new Promise<boolean>((resolve) => {
      server.once('error', (err) => {
        options.parts.off(
          'mqtt-tcp',
          `cannot listen on ${host}:${port} (${err.message}); MQTT over WebSocket (/mqtt on the API port) still serves`,
          `stop what holds port ${port} (\`ss -ltnp 'sport = :${port}'\` names it: often a mosquitto) or give the cloudlet another port (mqtt.port, CLOUDLET_MQTT_PORT), then restart the agent`,
        );
        resolve(false);
      });
      server.listen(port, host, () => resolve(true));
    });
    if (listening) options.parts.on('mqtt-tcp');
    if (listening) options.log(`MQTT broker listening on ${options.config.host}:${(server.address() as net.AddressInfo).port}, topics under ${topics.root}/`);
    const uplink = options.config.externalUrl ? await connectUplink(options, topics, () => telemetry!.retained) : null;
    telemetry = new Telemetry(options, topics, broker, listening ? server : null, uplink);
    telemetry.publishRetained(topics.status, telemetry.statusJson('online'));
    for (const instance of options.api.listInstances()) telemetry.publishRetained(topics.instance(instance.id), JSON.stringify(instanceJson(instance)));
    telemetry.publishServices();
    await telemetry.publishMetrics();
    return telemetry;
  }

  /**
   * Counts a new connection (TCP, or a WebSocket upgrade) against its address's cap until the returned release is
   * called, or throws TOO_MANY_CONNECTIONS (a TCP one is then dropped unanswered, a WebSocket upgrade answered 429).
   */
  admit(transport: Transport): Release {
    try {
      return this.options.connectionCaps?.holdForAddress(transport.remoteAddress) ?? (() => {});
    } catch (err) {
      this.options.log(`MQTT: refusing a connection from ${transport.remoteAddress}: ${(err as Error).message}`);
      throw err;
    }
  }

  /**
   * Serve one admitted MQTT connection (a TCP socket, or a WebSocket stream from the HTTP server), cut as soon as it
   * announces a packet over the bounds (packet-guard.ts).
   */
  handle(stream: Duplex, transport: Transport): void {
    const client = this.broker.handle(stream);
    this.transports.set(client, transport);
    const guard = new PacketGuard();
    this.guards.set(client, guard);
    // The broker reads the stream on 'readable'; a 'data' listener then sees each chunk as it is read, before parsing.
    stream.on('data', (chunk: Buffer) => {
      const refusal = guard.inspect(chunk);
      if (refusal === null || stream.destroyed) return;
      this.options.log(`MQTT: cutting the connection from ${transport.remoteAddress}: ${refusal}`);
      stream.destroy();
    });
  }

  /**
   * `mqtt.access: devices`: username = a paired device's id and password = its token, or `admin` and the admin token,
   * under the HTTP API's rules (a token crosses a network only inside TLS). Returns why a CONNECT is refused, or null.
   */
  private login(client: Client, username: string | undefined, password: Buffer | undefined): AuthenticateError | null {
    const refuse = (message: string) => Object.assign(new Error(message), { returnCode: 4 });
    if (!username || !password) return refuse('a username (device id) and password (its token) are required');
    try {
      const caller = this.options.credentials.gate.identify(password.toString('utf8'), this.transports.get(client) ?? { remoteAddress: '', secure: false });
      const name = caller.kind === 'admin' ? 'admin' : caller.kind === 'device' ? caller.device.id : null;
      if (name !== username) return refuse(`the token does not belong to ${username}`);
      // A paired cloudlet's credential is good for its deliberate list of HTTP routes only (docs/security.md).
      if (caller.kind === 'device' && caller.device.kind === 'cloudlet') return refuse(`${username} is a paired cloudlet, not a device`);
      if (caller.kind === 'device') {
        try {
          const release = this.options.connectionCaps?.holdForDevice(caller.device.id);
          if (release) whileOpen(client.conn, release);
        } catch (err) {
          return Object.assign(new Error((err as Error).message), { returnCode: SERVER_UNAVAILABLE });
        }
        this.deviceOf.set(client, caller.device.id);
        this.views.set(client, InstanceView.of(caller));
      }
      return null;
    } catch (err) {
      return refuse((err as Error).message);
    }
  }

  /**
   * What a message becomes for this client (aedes asks before each delivery, retained ones included): a device gets
   * the agent's own tree only (no $SYS topics, which name other clients), and of the instances only its own, with
   * no other device's id in them.
   */
  private forwardable<P extends { topic: string; payload: Buffer | string }>(client: Client, packet: P): P | null {
    const view = this.views.get(client);
    if (!view) return packet;
    if (!this.topics.owns(packet.topic)) return null;
    const about = this.topics.instanceOf(packet.topic);
    if (!about) return packet;
    if (about.progress) return view.follows(about.id, null, false) ? packet : null;
    // The agent's own JSON (clients cannot publish); empty when the retained topic is cleared.
    const text = packet.payload.toString();
    const state = text === '' ? null : (JSON.parse(text) as { owners: string[] });
    if (!view.follows(about.id, state?.owners ?? null, state === null)) return null;
    return state ? { ...packet, payload: Buffer.from(JSON.stringify(view.redacted(state))) } : packet;
  }

  /** A device whose authorization ended (revoked, removed, expired) loses its subscriptions at once. */
  private disconnectDevice(deviceId: string): void {
    for (const [client, id] of this.deviceOf) {
      if (id !== deviceId) continue;
      this.options.log(`MQTT: disconnecting ${client.id}: device ${deviceId} may no longer subscribe`);
      this.deviceOf.delete(client);
      client.close();
    }
  }

  /** Clients connected to the embedded broker (metrics). */
  get clientCount(): number {
    return this.broker.connectedClients;
  }

  /** Says offline (retained), then stops the broker. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.unsubscribe();
    this.options.credentials.devices.off('device-ended', this.onDeviceEnded);
    clearInterval(this.metricsTimer);
    this.publishRetained(this.topics.status, this.statusJson('offline'));
    await this.uplink?.close();
    await new Promise<void>((resolve) => this.broker.close(() => resolve()));
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  private statusJson(state: 'online' | 'offline'): string {
    return JSON.stringify({ state, hostname: this.options.hostname, agent_version: this.options.agentVersion, at: new Date().toISOString() });
  }

  private onEvent(event: CloudletEvent): void {
    if (event.type === 'progress') {
      this.publish(this.topics.progress(event.instanceId), JSON.stringify(eventJson(event)), false);
      return;
    }
    const topic = this.topics.instance(event.instance.id);
    if (event.state === 'ready') {
      this.lastProvisionedAt = event.at;
      void this.publishMetrics();
    }
    const moved = event.movedTo ? { moved_to: movedToJson(event.movedTo) } : {};
    const payload = JSON.stringify({
      ...instanceJson(event.instance),
      state: event.state,
      ...(event.reason ? { reason: event.reason } : {}),
      ...moved,
      at: event.at,
    });
    if (isFinalState(event.state)) {
      // The final state reaches current subscribers; then the retained topic is cleared (an empty retained message),
      // after Home Assistant has been told the instance's entity is gone.
      this.publish(topic, payload, false);
      this.publishServices();
      this.publishRetained(topic, '');
    } else {
      this.publishRetained(topic, payload);
    }
    this.publishServices();
  }

  /**
   * One retained topic per service, with its instance count, and Home Assistant's config topics; publishes only what
   * changed, and clears those of removed services and ended instances.
   */
  private publishServices(): void {
    const instances = this.options.api.listInstances();
    const services = this.options.api.listServices();
    const counts = new Map<string, number>();
    for (const instance of instances) counts.set(instance.serviceId, (counts.get(instance.serviceId) ?? 0) + 1);
    const summaries = services.map((service) => ({
      topic: this.topics.service(service.id),
      payload: JSON.stringify(serviceSummaryJson(service, counts.get(service.id) ?? 0)),
    }));
    this.replaceRetained((topic) => topic.startsWith(this.topics.service('')), summaries);
    const homeAssistant = this.homeAssistant;
    if (homeAssistant) this.replaceRetained((topic) => homeAssistant.owns(topic), homeAssistant.configs(services, instances));
  }

  /** Publishes `wanted`, and clears the retained topics `owned` names that it no longer has. */
  private replaceRetained(owned: (topic: string) => boolean, wanted: Array<{ topic: string; payload: string }>): void {
    const current = new Set(wanted.map(({ topic }) => topic));
    for (const topic of [...this.retained.keys()]) if (owned(topic) && !current.has(topic)) this.publishRetained(topic, '');
    for (const { topic, payload } of wanted) this.publishRetained(topic, payload);
  }

  private async publishMetrics(): Promise<void> {
    try {
      const [info, disk] = await Promise.all([this.options.api.systemInfo(), statfs(this.options.dataDir)]);
      this.publishRetained(
        this.topics.metrics,
        JSON.stringify({
          cpu_cores: info.cpu.cores,
          cpu_usage_percent: info.cpu.usagePercent,
          memory_total_bytes: info.memory.totalBytes,
          memory_free_bytes: info.memory.freeBytes,
          disk_total_bytes: disk.blocks * disk.bsize,
          disk_free_bytes: disk.bavail * disk.bsize,
          instances: info.instances,
          last_provisioned_at: this.lastProvisionedAt,
          at: new Date().toISOString(),
        }),
      );
      // Services imported or removed between events show up here.
      this.publishServices();
    } catch (err) {
      this.options.log(`host metrics unavailable: ${(err as Error).message}`);
    }
  }

  /** Retained state: skipped when unchanged (subscribers see changes, not repeats); '' clears the topic. */
  private publishRetained(topic: string, payload: string): void {
    if (this.retained.get(topic) === payload || (payload === '' && !this.retained.has(topic))) return;
    if (payload === '') this.retained.delete(topic);
    else this.retained.set(topic, payload);
    this.publish(topic, payload, true);
  }

  private publish(topic: string, payload: string, retain: boolean): void {
    if (this.closed && topic !== this.topics.status) return;
    this.broker.publish({ cmd: 'publish', topic, payload: Buffer.from(payload), qos: 0, retain, dup: false }, (err) => {
      if (err) this.options.log(`MQTT publish to ${topic} failed: ${err.message}`);
    });
    this.uplink?.publish(topic, payload, retain);
  }
}

/** The fleet broker gets the same tree, its status topic marked offline by a last will. */
function connectUplink(options: TelemetryOptions, topics: TopicTree, retained: () => Map<string, string>): Promise<FleetUplink | null> {
  const config = { ...options.config, externalUrl: options.config.externalUrl! };
  return FleetUplink.connect({
    config,
    clientId: `cloudlet-agent-${config.externalUsername ?? options.hostname}`,
    log: options.log,
    parts: options.parts,
    will: { topic: topics.status, payload: JSON.stringify({ state: 'offline', hostname: options.hostname, agent_version: options.agentVersion }) },
    latestOnly: new Set([topics.status, topics.metrics]),
    current: (topic) => retained().get(topic) ?? '',
    snapshot: () => retained(),
  });
}

/** The latest of ISO timestamps (null ones skipped), or null. */
function latest(times: Array<string | null>): string | null {
  return times.reduce<string | null>((max, time) => (time !== null && (max === null || time > max) ? time : max), null);
}

/** Calls `release` once the stream is closed (at once if it already is). */
function whileOpen(stream: Duplex, release: Release): void {
  if (stream.destroyed) release();
  else stream.once('close', release);
}

function serviceSummaryJson(service: Service, instances: number) {
  const m = service.manifest;
  return {
    id: service.id,
    version: m.version,
    description: m.description,
    tags: m.tags,
    shareable: m.shareable,
    memory_state: m.state !== null,
    instances,
    ...poolJson(service),
  };
}
