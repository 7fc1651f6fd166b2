// The fleet uplink module (agent/src/telemetry/uplink.ts) alone, on a host of the fleet's test network (run by
// bench/fleet.ts in a phone's namespace, whose link the bench cuts): it connects as the login it is given, reports each
// line the module logs (connected, connection lost, replaying), and publishes bursts of numbered messages on request.
import { DEFAULT_CONFIG } from '../../agent/src/config';
import { OptionalParts } from '../../agent/src/core/optional-parts';
import { FleetUplink } from '../../agent/src/telemetry/uplink';
import { serveRequests } from '../../test/support/remote-process';

let uplink: FleetUplink | null = null;

const remote = serveRequests({
  async connect({ mqtt, name, keepaliveSeconds }: { mqtt: Record<string, unknown>; name: string; keepaliveSeconds: number }) {
    const statusTopic = `cloudlet/${name}/status`;
    const online = JSON.stringify({ state: 'online' });
    const config = { ...DEFAULT_CONFIG.mqtt, ...mqtt, externalKeepaliveSeconds: keepaliveSeconds } as typeof DEFAULT_CONFIG.mqtt & { externalUrl: string };
    uplink = await FleetUplink.connect({
      config,
      clientId: name,
      parts: new OptionalParts(() => {}),
      log: (line) => remote.report({ log: line }),
      will: { topic: statusTopic, payload: JSON.stringify({ state: 'offline' }) },
      latestOnly: new Set([statusTopic]),
      current: (topic) => (topic === statusTopic ? online : ''),
      snapshot: () => [[statusTopic, online]],
    });
    if (!uplink) throw new Error('the uplink did not start (a credential file?)');
  },
  /** `count` messages {i: 0…count-1} on `topic`, handed to the uplink at once (sent, or queued while it is down). */
  async burst({ topic, count }: { topic: string; count: number }) {
    for (let i = 0; i < count; i++) uplink!.publish(topic, JSON.stringify({ i }), false);
    return { queued: uplink!.queued };
  },
  async close() {
    await uplink?.close();
  },
});
