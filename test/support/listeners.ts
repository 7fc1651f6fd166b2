// Real clients of the agent's live outputs, for tests and benchmarks: an MQTT subscriber and a /v1/events WebSocket
// client. Each records what it receives with the time it arrived, and can wait for a message matching a predicate.
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { performance } from 'node:perf_hooks';
import WebSocket from 'ws';
import { adminHeaders } from './agent';

export interface Received<T> {
  value: T;
  /** performance.now() when it arrived. */
  at: number;
}

/** Holds what arrived and resolves waiters as soon as something matching arrives. */
export class Inbox<T> {
  readonly items: Received<T>[] = [];
  private waiters: Array<{ match: (v: T) => boolean; resolve: (r: Received<T>) => void }> = [];

  /** `at`: when it arrived, if not now (a client in another process stamps its own arrivals). */
  add(value: T, at = performance.now()): void {
    const item = { value, at };
    this.items.push(item);
    this.waiters = this.waiters.filter((w) => !(w.match(value) && (w.resolve(item), true)));
  }

  /** The first item matching (already received at or after index `from`, or yet to come); rejects after timeoutMs. */
  next(match: (v: T) => boolean, timeoutMs = 30000, from = 0): Promise<Received<T>> {
    const found = this.items.slice(from).find((i) => match(i.value));
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`nothing matching arrived within ${timeoutMs} ms`)), timeoutMs);
      this.waiters.push({
        match,
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
      });
    });
  }
}

/**
 * Connects once: resolves on CONNACK, rejects on a refusal, an error or a connection closed first. (mqtt.js's own
 * connectAsync waits on a close without CONNACK for a retry that reconnectPeriod 0 never makes: a broker dropping a
 * connection unanswered, as the agent does over an address's cap, would hang it when the drop is a FIN, not a RST.)
 */
export function connectMqtt(url: string, login?: IClientOptions): Promise<MqttClient> {
  return mqtt.connectAsync(url, { reconnectPeriod: 0, connectTimeout: 5000, ...login }, false);
}

export interface MqttMessage {
  topic: string;
  /** Parsed JSON, or null for an empty payload (a cleared retained topic). */
  json: any;
  retain: boolean;
}

export class MqttWatcher {
  readonly inbox = new Inbox<MqttMessage>();

  private constructor(readonly client: MqttClient) {
    client.on('message', (topic, payload, packet) => {
      this.inbox.add({ topic, json: payload.length ? JSON.parse(payload.toString()) : null, retain: packet.retain });
    });
  }

  /**
   * Connects (mqtt://host:port or ws://host:port/mqtt) and subscribes to `topic` (several: in one SUBSCRIBE, whose
   * retained messages aedes sends topic by topic, in order) before resolving; `login` as username and password (and
   * TLS options); `qos` 1 for a subscriber that must not miss a message the broker holds for it.
   */
  static async connect(url: string, topic: string | string[], login?: IClientOptions, qos: 0 | 1 = 0): Promise<MqttWatcher> {
    const client = await connectMqtt(url, login);
    const watcher = new MqttWatcher(client);
    await client.subscribeAsync(topic, { qos });
    return watcher;
  }

  next(match: (m: MqttMessage) => boolean, timeoutMs?: number, from?: number) {
    return this.inbox.next(match, timeoutMs, from);
  }

  close(): Promise<void> {
    return this.client.endAsync(true);
  }
}

export class EventsSocket {
  readonly inbox = new Inbox<any>();

  private constructor(readonly socket: WebSocket) {
    socket.on('message', (data) => this.inbox.add(JSON.parse((data as Buffer).toString())));
  }

  /** To an agent the tests started, with its admin token unless `headers` say otherwise (as `request` does). */
  static async connect(apiPort: number, options: { headers?: Record<string, string>; protocols?: string[]; query?: string } = {}): Promise<EventsSocket> {
    const socket = new WebSocket(`ws://127.0.0.1:${apiPort}/v1/events${options.query ?? ''}`, options.protocols ?? [], {
      headers: options.headers ?? adminHeaders(apiPort),
    });
    const events = new EventsSocket(socket);
    await new Promise<void>((resolve, reject) => {
      socket.once('open', () => resolve());
      socket.once('error', reject);
    });
    return events;
  }

  next(match: (event: any) => boolean, timeoutMs?: number, from?: number) {
    return this.inbox.next(match, timeoutMs, from);
  }

  close(): Promise<void> {
    if (this.socket.readyState === WebSocket.CLOSED) return Promise.resolve();
    return new Promise((resolve) => {
      this.socket.once('close', () => resolve());
      this.socket.close();
    });
  }
}
