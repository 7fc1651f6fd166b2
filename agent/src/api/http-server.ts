/**
 * The HTTP server as main.ts starts it: the KD-Cloudlet face (/api), the /v1 face and the phone page's face (`/`),
 * the /v1/events socket and the byte-stream sockets (MQTT over WebSocket), put together over the uWS transport.
 * A request goes uws-transport.ts → request-pipeline.ts (face, route, one access check, rate, body, handler, Range)
 * → the face's handler, and back through uws-exchange.ts; a socket goes uws-transport.ts → its SocketEndpoint. The
 * same is served on a plain listener and, with `tls`, an HTTPS one; a request body that stalls is answered 408 and
 * cut off.
 */
import type { CloudletApi, ProvisioningApi } from '../core/types';
import type { AccessGate } from '../trust/access';
import type { ConnectionCaps } from '../trust/connection-caps';
import type { RateLimiter } from '../trust/rate-limit';
import { AccessLog, type AccessLogLevel } from './access-log';
import { EventsSocket } from './events-socket';
import { kdCloudletFace } from './kd-cloudlet';
import { kdEncryptedFace, type DeviceKeys } from './kd-encrypted';
import { metricsRoute, type MetricsSource } from './metrics-route';
import { RequestPipeline, type RequestObserver } from './request-pipeline';
import { streamSocket, type StreamEndpoint } from './stream-socket';
import { listenUws } from './uws-transport';
import { v1Face } from './v1';
import type { FleetView } from './v1-fleet';
import type { TrustView } from './v1-trust';
import { webFace } from './web';

export interface HttpServerOptions {
  api: CloudletApi;
  host: string;
  /** 0 picks a free port; HttpServer.port tells which. */
  port: number;
  logger?: (line: string) => void;
  /** `debug`: every request is logged; `info` (the default): refusals and failures, and counts once a minute. */
  accessLogLevel?: AccessLogLevel;
  /** Largest accepted request body in bytes (413 PAYLOAD_TOO_LARGE above it). JSON bodies here are tiny. */
  maxBodyBytes?: number;
  /** The KD-Cloudlet face under /api: plain (the default), encrypted with each paired device's key, or none. */
  kdApi?: { mode: 'plain' | 'off' } | { mode: 'encrypted'; devices: DeviceKeys };
  /** Requests per client: a paired device, else the remote IP; the admin is not limited (absent: no limit). */
  rateLimiter?: RateLimiter;
  /** Long-lived connections per device, shared with the MQTT broker (absent: not capped). */
  connectionCaps?: ConnectionCaps;
  /** A request body that brings no byte for this long is answered 408 and cut off (default 8 s). */
  bodyIdleMs?: number;
  /** A request body bringing fewer bytes per second than this over `bodyRateWindowMs` is answered 408 and cut off. */
  bodyMinBytesPerSecond?: number;
  bodyRateWindowMs?: number;
  /** On-Demand VM Provisioning routes under /v1 (absent: not offered). */
  provisioning?: ProvisioningApi;
  /** WebSocket endpoints carrying a byte stream (MQTT over WebSocket): each connection is handed over as a Duplex. */
  streamEndpoints?: StreamEndpoint[];
  /** Who may call which route (trust/access.ts). */
  gate: AccessGate;
  /** Pairing and device routes under /v1, and the TLS facts /v1/system shows (absent: not offered). */
  trust?: TrustView;
  /** The routes between cloudlets: placement, peers, pairing with another cloudlet (absent: /v1/peers shows mDNS only). */
  fleet?: FleetView;
  /** Also serve HTTPS on this port (0 picks a free one) of the same host, with this key and certificate. */
  tls?: { port: number; keyFile: string; certFile: string };
  /** GET /metrics from this source, and the observer every answered request is counted by (absent: no metrics). */
  metrics?: { source: MetricsSource; observer: RequestObserver };
}

export interface HttpServer {
  readonly port: number;
  /** The HTTPS listener's port, when there is one. */
  readonly tlsPort: number | null;
  /** Why the HTTPS listener asked for is missing; null when it runs (or none was asked for). */
  readonly tlsProblem: string | null;
  close(): Promise<void>;
}

const DEFAULT_MAX_BODY_BYTES = 64 * 1024;
/** Below uWS's own cut of a connection idle for ~10 s, so that the client gets a 408 rather than a reset. */
const DEFAULT_BODY_IDLE_MS = 8000;

export async function startHttpServer(options: HttpServerOptions): Promise<HttpServer> {
  const log = options.logger ?? (() => {});
  const kdApi = options.kdApi ?? { mode: 'plain' };
  const kd =
    kdApi.mode === 'off' ? null : kdApi.mode === 'encrypted' ? kdEncryptedFace(kdCloudletFace(options.api), kdApi.devices) : kdCloudletFace(options.api);
  const limiter = options.rateLimiter ?? null;
  const v1 = v1Face(options.api, options.provisioning, options.trust, options.fleet);
  // /metrics is under no face's prefix: the face that takes the rest (/v1's) answers it, with /v1's JSON errors.
  const own = options.metrics ? { ...v1, routes: [...v1.routes, metricsRoute(options.metrics.source)] } : v1;
  const pipeline = new RequestPipeline(
    { kd, page: webFace(), own },
    {
      gate: options.gate,
      limiter,
      maxBodyBytes: options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES,
      log,
      ...(options.metrics ? { observer: options.metrics.observer } : {}),
    },
  );
  const accessLog = new AccessLog(log, options.accessLogLevel ?? 'info');
  const events = new EventsSocket({ api: options.api, gate: options.gate, limiter, caps: options.connectionCaps ?? null, log });
  const endEvents = (device: { id: string }) => events.endDevice(device.id);
  options.trust?.devices.on('device-ended', endEvents);
  const listeners = await listenUws({
    host: options.host,
    port: options.port,
    ...(options.tls ? { tls: options.tls } : {}),
    pipeline,
    sockets: [events, ...(options.streamEndpoints ?? []).map((endpoint) => streamSocket(endpoint, limiter, log))],
    bodyPace: {
      idleMs: options.bodyIdleMs ?? DEFAULT_BODY_IDLE_MS,
      minBytesPerSecond: options.bodyMinBytesPerSecond ?? 0,
      windowMs: options.bodyRateWindowMs ?? 10000,
    },
    log,
    accessLog,
  }).catch((err: unknown) => {
    options.trust?.devices.off('device-ended', endEvents);
    accessLog.close();
    throw err;
  });
  let open = true;
  return {
    port: listeners.port,
    tlsPort: listeners.tlsPort,
    tlsProblem: listeners.tlsProblem,
    close: async () => {
      if (!open) return;
      open = false;
      options.trust?.devices.off('device-ended', endEvents);
      listeners.close();
      accessLog.close();
    },
  };
}
