// An MQTT client that runs on another host of a test network, not in the test's own (root) namespace: a fleet
// dashboard on the fleet broker's host, a cloudlet's own login from its box. The same surface as MqttWatcher
// (listeners.ts): what arrived, with the time it arrived (on the test's performance.now() clock), and a wait for a
// match; and publish, whose refusal by the broker (its ACL, under MQTT 5) rejects.
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import type { IClientOptions } from 'mqtt';
import { Inbox, type MqttMessage } from './listeners';
import { RemoteProcess } from './remote-process';

const PROGRAM = path.join(__dirname, 'netns-mqtt-program.js');

/** Login options that cross a process boundary: a certificate authority as PEM text, not a Buffer. */
export type MqttLogin = Pick<IClientOptions, 'username' | 'password' | 'protocolVersion' | 'rejectUnauthorized'> & { ca?: string };

export class NetnsMqttClient {
  readonly inbox = new Inbox<MqttMessage>();

  private constructor(private readonly remote: RemoteProcess) {}

  /** Connects from the host `via` enters; rejects (and ends the program) when the broker refuses the login. */
  static async connect(via: string[], url: string, login: MqttLogin): Promise<NetnsMqttClient> {
    let client!: NetnsMqttClient;
    const remote = RemoteProcess.start(via, PROGRAM, (m: { topic: string; payload: string; retain: boolean; at: number }) =>
      client.inbox.add({ topic: m.topic, json: m.payload.length ? JSON.parse(m.payload) : null, retain: m.retain }, m.at - performance.timeOrigin),
    );
    client = new NetnsMqttClient(remote);
    try {
      await remote.request('connect', { url, login });
    } catch (err) {
      await remote.close();
      throw err;
    }
    return client;
  }

  /** Connects and subscribes to `topic` (with `qos` 1: nothing the broker holds for it is missed) before resolving. */
  static async watch(via: string[], url: string, topic: string | string[], login: MqttLogin, qos: 0 | 1 = 1): Promise<NetnsMqttClient> {
    const client = await NetnsMqttClient.connect(via, url, login);
    await client.remote.request('subscribe', { topic, qos }).catch(async (err: Error) => {
      await client.close();
      throw err;
    });
    return client;
  }

  publish(topic: string, payload: string, options: { qos: 0 | 1; retain?: boolean }): Promise<void> {
    return this.remote.request('publish', { topic, payload, qos: options.qos, retain: options.retain ?? false });
  }

  next(match: (m: MqttMessage) => boolean, timeoutMs?: number, from?: number) {
    return this.inbox.next(match, timeoutMs, from);
  }

  close(): Promise<void> {
    return this.remote.close();
  }
}
