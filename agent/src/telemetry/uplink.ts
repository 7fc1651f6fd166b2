/**
 * The fleet uplink: the agent's topic tree mirrored to an external MQTT broker (a fleet operator's, docs/fleet.md), as
 * a client of it. QoS 1, retained state, a last will that marks the cloudlet offline when it vanishes, TLS with the
 * operator's certificate authority, and a password or client certificate from files.
 *
 * Store and forward: while the broker is unreachable every message is queued, and a restored uplink replays the queue
 * in order before anything newer. The queue is bounded (`mqtt.externalQueueLimit` messages); over the bound the oldest
 * message is dropped, and a retained topic that thereby lost its last queued value is sent again with its current
 * value after the replay, so state is never lost, only intermediate changes and events. The status and metrics topics
 * are not queued at all: they are samples, and only their newest value is sent on reconnect. Messages already handed
 * to the connection when it dropped are re-sent by the MQTT client itself (QoS 1, before the queue).
 */
import { readFile } from 'node:fs/promises';
import type { IClientOptions, MqttClient } from 'mqtt';
import type { AgentConfig } from '../config';
import type { PartsReporter } from '../core/optional-parts';
import type { Logger } from '../log';

/** Mean time between reconnection attempts; each agent draws its own period around it so a fleet does not stampede. */
const RECONNECT_MS = 2000;

export interface UplinkOptions {
  config: AgentConfig['mqtt'] & { externalUrl: string };
  /** Fixed per cloudlet; a broker set up as docs/fleet.md says uses the username instead. */
  clientId: string;
  log: Logger;
  /** Told whether the fleet broker is reached, and if not why (its own log line, and /v1/health's `mqtt-external`). */
  parts: PartsReporter;
  /** Published by the broker (retained) when the connection is lost without a goodbye. */
  will: { topic: string; payload: string };
  /** Topics sent only with their newest value after an outage, never queued (the status, host metrics). */
  latestOnly: ReadonlySet<string>;
  /** The retained value a topic holds now, '' when it has none (cleared or never set). */
  current(topic: string): string;
  /** Every retained topic with its value: all of it is sent again when the broker has forgotten this cloudlet. */
  snapshot(): Iterable<[string, string]>;
}

interface Message {
  topic: string;
  payload: string;
  retain: boolean;
}

export class FleetUplink {
  private queue: Message[] = [];
  /** Retained messages queued per topic, to know when dropping one leaves its topic without a queued value. */
  private readonly queuedPerTopic = new Map<string, number>();
  /** Topics whose current value is sent after the replay (latest-only topics, and those whose queued values were dropped). */
  private readonly resync = new Set<string>();
  private dropped = 0;
  /** Connected, and the queue replayed: messages go straight out. */
  private live = false;
  private connectedBefore = false;
  private closed = false;

  private constructor(
    private readonly options: UplinkOptions,
    private readonly client: MqttClient,
  ) {
    const url = options.config.externalUrl;
    client.on('connect', (connack) => {
      problem = 'the connection was lost';
      options.parts.on('mqtt-external');
      this.onConnect(connack.sessionPresent);
    });
    // parts.off logs one line per new reason, not one per attempt.
    let problem = 'no answer';
    const unreachable = () =>
      options.parts.off(
        'mqtt-external',
        `the fleet broker ${url} is unreachable (${problem}); retrying every ${RECONNECT_MS / 1000} s or so, queueing up to ${options.config.externalQueueLimit} messages; the local broker serves meanwhile`,
        'check that the broker runs and that this box reaches it (address, port, firewall, TLS, credentials), or correct mqtt.externalUrl (CLOUDLET_MQTT_URL)',
      );
    client.on('close', () => {
      if (this.live) options.log(`fleet broker ${url}: connection lost; queueing up to ${options.config.externalQueueLimit} messages`);
      this.live = false;
      if (!this.closed) unreachable();
    });
    client.on('error', (err) => {
      problem = err.message;
      unreachable();
    });
  }

  /**
   * Reads the credential files and starts connecting (in the background: the agent serves phones whether or not the
   * fleet broker is there). Null, with the reason logged, when a file cannot be read.
   */
  static async connect(options: UplinkOptions): Promise<FleetUplink | null> {
    const c = options.config;
    let tls: Pick<IClientOptions, 'ca' | 'cert' | 'key' | 'password'>;
    try {
      const read = (file: string | null) => (file === null ? Promise.resolve(undefined) : readFile(file));
      const [ca, cert, key, password] = await Promise.all([
        read(c.externalCaFile),
        read(c.externalCertFile),
        read(c.externalKeyFile),
        read(c.externalPasswordFile),
      ]);
      tls = { ca, cert, key, password: password?.toString('utf8').split('\n')[0] };
    } catch (err) {
      options.parts.off(
        'mqtt-external',
        `a credential file of the fleet broker ${c.externalUrl} cannot be read: ${(err as Error).message}`,
        'make the files named by mqtt.externalCaFile, externalCertFile, externalKeyFile and externalPasswordFile readable by the agent, then restart it',
      );
      return null;
    }
    // Loaded only when an external broker is configured: the client library costs ~2 MB of resident memory.
    const { connect } = require('mqtt') as typeof import('mqtt');
    const client = connect(c.externalUrl, {
      ...tls,
      clientId: options.clientId,
      username: c.externalUsername ?? undefined,
      rejectUnauthorized: true,
      // A persistent session: the CONNACK then tells whether the broker still knows this cloudlet.
      clean: false,
      keepalive: c.externalKeepaliveSeconds,
      reconnectPeriod: Math.round(RECONNECT_MS * (0.75 + Math.random() / 2)),
      connectTimeout: 10000,
      queueQoSZero: false,
      will: { topic: options.will.topic, payload: Buffer.from(options.will.payload), qos: 1, retain: true },
    });
    return new FleetUplink(options, client);
  }

  /** How many messages wait for the broker. */
  get queued(): number {
    return this.queue.length;
  }

  publish(topic: string, payload: string, retain: boolean): void {
    if (this.closed) return;
    if (this.live) return this.send(topic, payload, retain);
    if (retain && this.options.latestOnly.has(topic)) {
      this.resync.add(topic);
      return;
    }
    if (this.queue.length >= this.options.config.externalQueueLimit) this.dropOldest();
    this.queue.push({ topic, payload, retain });
    if (retain) {
      this.queuedPerTopic.set(topic, (this.queuedPerTopic.get(topic) ?? 0) + 1);
      this.resync.delete(topic);
    }
  }

  /** Sends what is still due if connected (the agent's goodbye), then disconnects; the queue is dropped. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.queue.length > 0) this.options.log(`fleet broker: ${this.queue.length} queued messages dropped at stop`);
    await new Promise<void>((resolve) => this.client.end(false, {}, () => resolve()));
  }

  private dropOldest(): void {
    const oldest = this.queue.shift()!;
    if (this.dropped++ === 0) {
      this.options.log(
        `fleet broker unreachable and ${this.options.config.externalQueueLimit} messages queued: dropping the oldest; retained state is kept (its newest values are sent on reconnect)`,
      );
    }
    if (!oldest.retain) return;
    const left = this.queuedPerTopic.get(oldest.topic)! - 1;
    if (left > 0) return void this.queuedPerTopic.set(oldest.topic, left);
    this.queuedPerTopic.delete(oldest.topic);
    this.resync.add(oldest.topic);
  }

  /**
   * After the client has re-sent what was in flight: the current status first (the broker may have published the
   * last will meanwhile), then the queue in order, then the current values of the topics that need them.
   */
  private onConnect(sessionPresent: boolean): void {
    const { log, config, will } = this.options;
    const replay = this.queue;
    log(
      `connected to the fleet broker ${config.externalUrl}` +
        (replay.length > 0 ? `; replaying ${replay.length} queued messages` : '') +
        (this.dropped > 0 ? ` (${this.dropped} older ones were dropped over the queue's bound)` : ''),
    );
    this.queue = [];
    this.queuedPerTopic.clear();
    this.dropped = 0;
    const status = this.options.current(will.topic);
    if (status) this.send(will.topic, status, true);
    this.resync.delete(will.topic);
    for (const m of replay) this.send(m.topic, m.payload, m.retain);
    // A broker that lost this cloudlet's session may have lost its retained state too (a restart without persistence).
    const topics = new Map([...this.resync].map((t) => [t, this.options.current(t)]));
    if (this.connectedBefore && !sessionPresent) for (const [topic, payload] of this.options.snapshot()) topics.set(topic, payload);
    for (const [topic, payload] of topics) if (topic !== will.topic) this.send(topic, payload, true);
    this.resync.clear();
    this.connectedBefore = true;
    this.live = true;
  }

  private send(topic: string, payload: string, retain: boolean): void {
    this.client.publish(topic, payload, { qos: 1, retain }, (err) => {
      // Not an outage (the client keeps those for re-sending): the broker refused it, e.g. by its ACL under MQTT 5.
      if (err && !this.closed) this.options.log(`fleet broker: publishing ${topic} failed: ${err.message}`);
    });
  }
}
