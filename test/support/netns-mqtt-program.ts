// An MQTT client on another host of a test network (run by netns-mqtt.ts under a namespace prefix): it connects,
// subscribes and publishes as the test asks, and reports every message it receives with the time it arrived there.
import { performance } from 'node:perf_hooks';
import type { IClientOptions, MqttClient } from 'mqtt';
import { connectMqtt } from './listeners';
import { serveRequests } from './remote-process';

let client: MqttClient | undefined;

const remote = serveRequests({
  async connect({ url, login }: { url: string; login: IClientOptions }) {
    client = await connectMqtt(url, login);
    client.on('message', (topic, payload, packet) =>
      // Epoch milliseconds, to the microsecond: the test reads them on its own clock (the machine's one clock).
      remote.report({ topic, payload: payload.toString('utf8'), retain: packet.retain, at: performance.timeOrigin + performance.now() }),
    );
  },
  async subscribe({ topic, qos }: { topic: string | string[]; qos: 0 | 1 }) {
    await client!.subscribeAsync(topic, { qos });
  },
  async publish({ topic, payload, qos, retain }: { topic: string; payload: string; qos: 0 | 1; retain: boolean }) {
    await client!.publishAsync(topic, payload, { qos, retain });
  },
});
