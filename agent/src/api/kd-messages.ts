/**
 * The KD face's device mailboxes (`GET /api/system/get_messages`, docs/kd-cloudlet.md §5): SEI's client polls them
 * every 10 s with its `X-Device-ID` and a `serviceId`, and re-points itself when told `move-to-new-cloudlet-network`.
 * This cloudlet posts that message when an instance of a service moves to another cloudlet (docs/handoff.md). The
 * plain face knows no device behind an instance, so every device that asks about that service gets it, once. Bounded:
 * the newest MAX_MOVES moves, each kept MOVE_KEPT_MS and read by at most MAX_READERS devices.
 */
import type { CloudletApi } from '../core/types';

const MAX_MOVES = 64;
const MOVE_KEPT_MS = 10 * 60_000;
const MAX_READERS = 1024;

interface Move {
  serviceId: string;
  at: number;
  params: Record<string, unknown>;
  readBy: Set<string>;
}

export class KdMailbox {
  private readonly moves: Move[] = [];

  constructor(api: Pick<CloudletApi, 'subscribe'>) {
    api.subscribe((event) => {
      if (event.type !== 'instance' || event.state !== 'moved' || !event.movedTo) return;
      const to = event.movedTo;
      this.moves.push({
        serviceId: event.instance.serviceId,
        at: Date.now(),
        readBy: new Set(),
        // KD's PairedDeviceDataBundle; no Wi-Fi credentials travel (the phone joins the other network as it is told).
        params: {
          cloudlet_name: to.name,
          cloudlet_ip: to.address,
          cloudlet_fqdn: null,
          cloudlet_port: to.apiPort,
          cloudlet_encryption_enabled: false,
          ssid: null,
          auth_password: null,
          server_radius_cert: null,
          server_public_key: null,
          device_private_key: null,
        },
      });
      if (this.moves.length > MAX_MOVES) this.moves.shift();
    });
  }

  /** The unread messages of `deviceId` about `serviceId`, marked read. */
  take(deviceId: string, serviceId: string): Array<{ device_id: string; service_id: string; message: string; params: Record<string, unknown> }> {
    const now = Date.now();
    while (this.moves.length && now - this.moves[0]!.at > MOVE_KEPT_MS) this.moves.shift();
    return this.moves
      .filter((move) => move.serviceId === serviceId && !move.readBy.has(deviceId) && move.readBy.size < MAX_READERS)
      .map((move) => {
        move.readBy.add(deviceId);
        return { device_id: deviceId, service_id: serviceId, message: 'move-to-new-cloudlet-network', params: move.params };
      });
  }
}
