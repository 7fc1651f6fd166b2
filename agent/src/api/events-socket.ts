/**
 * GET /v1/events (WebSocket): a snapshot of the instances, then every event as one JSON text message each; a device
 * sees only its own instances (InstanceView). A client that reads too slowly is closed rather than buffered for
 * (see EVENTS_MAX_BUFFERED_BYTES). It needs a device credential, checked at the upgrade: in the Authorization header,
 * or (browsers cannot set headers on a WebSocket) as `?access_token=` or a `bearer.<token>` subprotocol entry; each
 * socket counts against its device's connection cap, and a device whose authorization ends loses its sockets at once.
 */
import type { CloudletApi } from '../core/types';
import { bearerToken, type AccessGate } from '../trust/access';
import type { ConnectionCaps, Release } from '../trust/connection-caps';
import type { RateLimiter } from '../trust/rate-limit';
import { authorizeWithinRate } from './request-pipeline';
import type { SocketEndpoint, SocketPeer, SocketSession, UpgradeRequest } from './socket-endpoint';
import { eventJson, eventsSnapshotJson, InstanceView } from './wire-shapes';

/**
 * A /v1/events client further behind than this is closed (code 1013, "try again later") instead of having events
 * queued for it without bound; it reconnects and starts from a fresh snapshot.
 */
const EVENTS_MAX_BUFFERED_BYTES = 256 * 1024;
/** The subprotocol a browser may offer next to its `bearer.<token>` entry. */
const EVENTS_PROTOCOL = 'cloudlet.events';
const BEARER_PROTOCOL_PREFIX = 'bearer.';

export interface EventsSocketOptions {
  api: CloudletApi;
  gate: AccessGate;
  limiter: RateLimiter | null;
  caps: ConnectionCaps | null;
  log: (line: string) => void;
}

export class EventsSocket implements SocketEndpoint {
  readonly path = '/v1/events';
  // uWS's own backstop on backpressure; the sessions close a slow client well before it.
  readonly limits = { maxPayloadLength: 1024, idleTimeoutSeconds: 120, sendPingsAutomatically: true, maxBackpressure: 2 * EVENTS_MAX_BUFFERED_BYTES };
  /** The open sessions of each device. */
  private readonly byDevice = new Map<string, Set<EventsSession>>();

  constructor(private readonly options: EventsSocketOptions) {}

  upgrade(request: UpgradeRequest): SocketSession {
    const bearerEntry = request.offeredProtocols.find((p) => p.startsWith(BEARER_PROTOCOL_PREFIX));
    const token =
      bearerToken(request.header('authorization')) ?? (request.query.get('access_token') || undefined) ?? bearerEntry?.slice(BEARER_PROTOCOL_PREFIX.length);
    const { gate, limiter, caps } = this.options;
    const caller = authorizeWithinRate(gate, limiter, 'device', token, request.transport);
    const deviceId = caller.kind === 'device' ? caller.device.id : undefined;
    const release = deviceId === undefined ? undefined : caps?.holdForDevice(deviceId);
    // A browser that offered subprotocols fails the connection unless one is agreed to: the named one, else the
    // bearer entry it sent (it already holds that token).
    const protocol = request.offeredProtocols.includes(EVENTS_PROTOCOL) ? EVENTS_PROTOCOL : (bearerEntry ?? '');
    return new EventsSession(this, protocol, InstanceView.of(caller), deviceId, release);
  }

  /** Closes the device's sockets: its authorization ended. */
  endDevice(deviceId: string): void {
    for (const session of this.byDevice.get(deviceId) ?? []) {
      if (session.closed) continue;
      this.options.log(`closing a /v1/events client: device ${deviceId} may no longer watch`);
      // 1008: policy violation; the credential is no longer valid, so reconnecting is refused.
      session.end(1008, 'device authorization ended');
    }
    this.byDevice.delete(deviceId);
  }

  /** The snapshot and the events a session is sent; returns how to stop. */
  follow(session: EventsSession): () => void {
    const { api } = this.options;
    if (session.deviceId !== undefined) {
      const sessions = this.byDevice.get(session.deviceId) ?? new Set();
      this.byDevice.set(session.deviceId, sessions.add(session));
    }
    session.send(JSON.stringify(eventsSnapshotJson(session.view.list(api.listInstances()))));
    return api.subscribe((event) => {
      const shown = session.view.event(event);
      if (shown) session.send(JSON.stringify(eventJson(shown)));
    });
  }

  forget(session: EventsSession): void {
    const sessions = session.deviceId === undefined ? undefined : this.byDevice.get(session.deviceId);
    sessions?.delete(session);
    if (sessions?.size === 0) this.byDevice.delete(session.deviceId!);
  }

  log(line: string): void {
    this.options.log(line);
  }
}

class EventsSession implements SocketSession {
  closed = false;
  private peer: SocketPeer | undefined;
  private unsubscribe: (() => void) | undefined;

  constructor(
    private readonly socket: EventsSocket,
    readonly protocol: string,
    readonly view: InstanceView,
    readonly deviceId: string | undefined,
    private readonly release: Release | undefined,
  ) {}

  open(peer: SocketPeer): void {
    this.peer = peer;
    this.unsubscribe = this.socket.follow(this);
    // Closed while its snapshot was sent: nothing more to follow.
    if (this.closed) this.unsubscribe();
  }

  send(message: string): void {
    if (this.closed || !this.peer) return;
    if (this.peer.bufferedAmount() > EVENTS_MAX_BUFFERED_BYTES) {
      this.socket.log('closing a /v1/events client that does not keep up');
      this.end(1013, 'too slow: events were dropped; reconnect');
      return;
    }
    this.peer.send(message, false);
  }

  /** Stops sending and closes the socket (once: `closed` makes the other paths skip it). */
  end(code: number, reason: string): void {
    this.closed = true;
    this.unsubscribe?.();
    this.peer?.end(code, reason);
  }

  close(): void {
    this.closed = true;
    this.unsubscribe?.();
    this.release?.();
    this.socket.forget(this);
  }
}
