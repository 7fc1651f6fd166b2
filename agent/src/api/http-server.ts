/**
 * The HTTP server: the only module that knows uWebSockets.js. It serves the KD-Cloudlet face (/api) and the /v1 face
 * from their route tables, and owns what both need: Content-Length on every response (the KD Android client rejects
 * chunked replies), abort safety, size-limited JSON bodies, 404/405 and turning every exception into a reply. It
 * also streams files from disk (with HTTP Range) and hands large uploads to routes as streams, both with backpressure,
 * so neither a big download nor a big upload is ever held in memory; and it serves the phone page's face at `/`.
 * The same faces are served on a plain listener and, with `tls`, an HTTPS one; every request passes the access gate
 * (trust/access.ts) for its route's access level before its body is read, and draws on its client's request bucket
 * (rate-limit.ts); a request body that stalls is answered 408 and cut off.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { STATUS_CODES } from 'node:http';
import { Duplex, Readable } from 'node:stream';
import {
  App,
  SSLApp,
  us_listen_socket_close,
  us_socket_local_port,
  type HttpRequest,
  type HttpResponse,
  type TemplatedApp,
  type us_listen_socket,
  type us_socket,
  type us_socket_context_t,
  type WebSocket,
} from 'uWebSockets.js';
import type { CloudletApi, ProvisioningApi } from '../core/types';
import { CloudletError, asCloudletError } from '../errors';
import { bearerToken, seenBy, type Access, type AccessGate, type Caller, type Transport } from '../trust/access';
import { BodyPace, type BodyPaceLimits } from './body-pace';
import { kdCloudletFace } from './kd-cloudlet';
import { kdEncryptedFace, type DeviceKeys } from './kd-encrypted';
import type { ConnectionCaps, Release } from './connection-caps';
import { InstanceView } from './instance-view';
import type { RateLimiter } from './rate-limit';
import { matchPath, type ApiRequest, type Face, type Reply, type Route } from './routing';
import { eventJson, eventsSnapshotJson, v1Face } from './v1';
import type { TrustView } from './v1-trust';
import { webFace } from './web';

export interface HttpServerOptions {
  api: CloudletApi;
  host: string;
  /** 0 picks a free port; HttpServer.port tells which. */
  port: number;
  logger?: (line: string) => void;
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
  /** Also serve HTTPS on this port (0 picks a free one) of the same host, with this key and certificate. */
  tls?: { port: number; keyFile: string; certFile: string };
}

export interface StreamEndpoint {
  path: string;
  /** The WebSocket subprotocol to agree to when the client offers it (MQTT clients offer `mqtt`). */
  protocol: string;
  /** Counts a connection at its upgrade until it is released, or throws (the upgrade is then refused with the error). */
  admit?(transport: Transport): Release;
  /** `transport`: who connected and whether over TLS (the stream's own protocol may carry credentials). */
  accept(stream: Duplex, transport: Transport): void;
}

export interface HttpServer {
  readonly port: number;
  /** The HTTPS listener's port, when there is one. */
  readonly tlsPort: number | null;
  close(): Promise<void>;
}

const DEFAULT_MAX_BODY_BYTES = 64 * 1024;
/** Below uWS's own cut of a connection idle for ~10 s, so that the client gets a 408 rather than a reset. */
const DEFAULT_BODY_IDLE_MS = 8000;
/** Files are streamed in chunks of this size: large enough for loopback-speed throughput, small per slow client. */
const FILE_CHUNK_BYTES = 1024 * 1024;
/** How much of a refused upload is read (and dropped) so its uploader still gets the answer; past it, it is cut off. */
const MAX_DISCARDED_BYTES = 16 * 1024 * 1024;
/**
 * A /v1/events client further behind than this is closed (code 1013, "try again later") instead of having events
 * queued for it without bound; it reconnects and starts from a fresh snapshot.
 */
export const EVENTS_MAX_BUFFERED_BYTES = 256 * 1024;
/** Largest WebSocket message accepted from a client (MQTT packets from subscribers are tiny). */
const MAX_WS_MESSAGE_BYTES = 256 * 1024;

/** `close()` exists on the v20.30 App but is missing from its d.ts; it also drops idle keep-alive connections. */
type ClosableApp = TemplatedApp & { close(): void };

export async function startHttpServer(options: HttpServerOptions): Promise<HttpServer> {
  const log = options.logger ?? (() => {});
  const maxBodyBytes = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  const kdApi = options.kdApi ?? { mode: 'plain' };
  const kdFace = kdApi.mode === 'encrypted' ? kdEncryptedFace(kdCloudletFace(options.api), kdApi.devices) : kdCloudletFace(options.api);
  const limiter = options.rateLimiter ?? null;
  const bodyPace: BodyPaceLimits = {
    idleMs: options.bodyIdleMs ?? DEFAULT_BODY_IDLE_MS, minBytesPerSecond: options.bodyMinBytesPerSecond ?? 0, windowMs: options.bodyRateWindowMs ?? 10000,
  };
  const ownFace = v1Face(options.api, options.provisioning, options.trust);
  const pageFace = webFace();
  const eventClients = new EventClients();
  const endEvents = (device: { id: string }) => eventClients.endDevice(device.id, log);
  options.trust?.devices.on('device-ended', endEvents);
  // The phone page owns `/` and its assets' prefix; paths under no face's prefix get our own face's JSON 404.
  // With the KD face off, /api paths are just unknown paths.
  const faceFor = (path: string): Face =>
    [...(kdApi.mode === 'off' ? [] : [kdFace]), pageFace].find((face) => ownsPath(face, path)) ?? (path === '/' ? pageFace : ownFace);

  // One request pipeline, mounted on each listener's app; only whether the transport is TLS differs.
  const mount = (app: ClosableApp, secure: boolean): ClosableApp => {
    serveEvents(app, options.api, options.gate, { limiter, caps: options.connectionCaps ?? null }, eventClients, secure, log);
    for (const endpoint of options.streamEndpoints ?? []) serveStream(app, endpoint, limiter, secure, log);
    app.any('/*', (res, req) => {
      const exchange = new Exchange(res, bodyPace);
      try {
        const incoming = readIncoming(req, res, secure);
        const started = Date.now();
        serve(faceFor(incoming.path), incoming, exchange, options.gate, limiter, maxBodyBytes, log)
          .then((status) => log(`${incoming.method} ${incoming.url} ${status} ${Date.now() - started}ms`))
          .catch((err: unknown) => log(`${incoming.method} ${incoming.url} failed to answer: ${describe(err)}`));
      } catch (err) {
        // Only a misuse of uWS can land here; an exception escaping to uWS would take the process down.
        log(`HTTP request handler failed: ${describe(err)}`);
        res.close();
      }
    });
    return app;
  };

  const plain = await listen(mount(App() as ClosableApp, false), options.host, options.port, 'HTTP', log);
  let secure: Listener | null = null;
  if (options.tls) {
    const tlsApp = SSLApp({ key_file_name: options.tls.keyFile, cert_file_name: options.tls.certFile }) as ClosableApp;
    // Without its HTTPS port the agent still serves loopback and the open routes (as with a taken MQTT port): phones
    // cannot send credentials until it is back, which /v1/system shows (tls_port null).
    secure = await listen(mount(tlsApp, true), options.host, options.tls.port, 'HTTPS', log).catch((err: Error) => {
      log(`no HTTPS listener: ${err.message}; devices cannot authenticate from other machines`);
      return null;
    });
  }
  let open = true;
  return {
    port: plain.port,
    tlsPort: secure?.port ?? null,
    close: async () => {
      if (!open) return;
      open = false;
      options.trust?.devices.off('device-ended', endEvents);
      plain.close();
      secure?.close();
    },
  };
}

interface Listener {
  port: number;
  close(): void;
}

function listen(app: ClosableApp, host: string, port: number, what: string, log: (line: string) => void): Promise<Listener> {
  return new Promise((resolve, reject) => {
    app.listen(host, port, (listenSocket: us_listen_socket | false) => {
      if (!listenSocket) {
        app.close();
        reject(new CloudletError('INTERNAL', `Cannot listen on ${host}:${port}`));
        return;
      }
      const bound = us_socket_local_port(listenSocket as unknown as us_socket);
      log(`${what} API listening on ${host}:${bound}`);
      resolve({
        port: bound,
        close: () => {
          us_listen_socket_close(listenSocket);
          app.close();
        },
      });
    });
  });
}

/**
 * GET /v1/events (WebSocket): a snapshot of the instances, then every event as one JSON text message each; a device
 * sees only its own instances (instance-view.ts). A client that reads too slowly is closed rather than buffered for
 * (see EVENTS_MAX_BUFFERED_BYTES). It needs a device credential, checked at the upgrade: in the Authorization header,
 * or (browsers cannot set headers on a WebSocket) as `?access_token=` or a `bearer.<token>` subprotocol entry; each
 * socket counts against its device's connection cap.
 */
function serveEvents(
  app: TemplatedApp, api: CloudletApi, gate: AccessGate, bounds: { limiter: RateLimiter | null; caps: ConnectionCaps | null },
  clients: EventClients, secure: boolean, log: (line: string) => void,
): void {
  app.ws<EventsClient>('/v1/events', {
    maxPayloadLength: 1024,
    idleTimeout: 120,
    sendPingsAutomatically: true,
    // uWS's own backstop; the check below closes well before it.
    maxBackpressure: 2 * EVENTS_MAX_BUFFERED_BYTES,
    upgrade: (res, req, context) => {
      const offered = offeredProtocols(req);
      const bearerEntry = offered.find((p) => p.startsWith(EVENTS_BEARER_PROTOCOL_PREFIX));
      const token = bearerToken(req.getHeader('authorization') || undefined) ?? (new URLSearchParams(req.getQuery() ?? '').get('access_token') || undefined)
        ?? bearerEntry?.slice(EVENTS_BEARER_PROTOCOL_PREFIX.length);
      let caller: Caller;
      let release: Release | undefined;
      try {
        caller = authorizeWithinRate(gate, bounds.limiter, 'device', token, { remoteAddress: remoteAddressOf(res), secure });
        if (caller.kind === 'device') release = bounds.caps?.holdForDevice(caller.device.id);
      } catch (err) {
        refuseUpgrade(res, asCloudletError(err));
        return;
      }
      // A browser that offered subprotocols fails the connection unless one is agreed to: the named one, else the
      // bearer entry it sent (it already holds that token).
      const client: EventsClient = {
        closed: false, view: InstanceView.of(caller), ...(release ? { release } : {}), ...(caller.kind === 'device' ? { deviceId: caller.device.id } : {}),
      };
      upgradeTo(res, req, context, client, offered.includes(EVENTS_PROTOCOL) ? EVENTS_PROTOCOL : bearerEntry ?? '');
    },
    open: (ws) => {
      const client = ws.getUserData();
      clients.add(ws);
      const send = (message: string) => {
        if (client.closed) return;
        if (ws.getBufferedAmount() > EVENTS_MAX_BUFFERED_BYTES) {
          log('closing a /v1/events client that does not keep up');
          endEventsClient(ws, 1013, 'too slow: events were dropped; reconnect');
          return;
        }
        ws.send(message, false);
      };
      send(JSON.stringify(eventsSnapshotJson(client.view.list(api.listInstances()))));
      client.unsubscribe = api.subscribe((event) => {
        const shown = client.view.event(event);
        if (shown) send(JSON.stringify(eventJson(shown)));
      });
    },
    close: (ws) => {
      const client = ws.getUserData();
      client.closed = true;
      client.unsubscribe?.();
      client.release?.();
      clients.delete(ws);
    },
  });
}

interface EventsClient { unsubscribe?: () => void; closed: boolean; view: InstanceView; deviceId?: string; release?: Release }

/** Stop sending to an events client and close it (once: `closed` makes the other paths skip it). */
function endEventsClient(ws: WebSocket<EventsClient>, code: number, reason: string): void {
  const client = ws.getUserData();
  client.closed = true;
  client.unsubscribe?.();
  ws.end(code, reason);
}

/** The peer's IP address as text (uWS hands it over as bytes of text). */
function remoteAddressOf(socket: { getRemoteAddressAsText(): ArrayBuffer }): string {
  return Buffer.from(socket.getRemoteAddressAsText()).toString();
}

/** The open /v1/events sockets of each device: a device whose authorization ends loses them at once. */
class EventClients {
  private readonly byDevice = new Map<string, Set<WebSocket<EventsClient>>>();

  add(ws: WebSocket<EventsClient>): void {
    const { deviceId } = ws.getUserData();
    if (deviceId === undefined) return;
    const sockets = this.byDevice.get(deviceId) ?? new Set();
    this.byDevice.set(deviceId, sockets.add(ws));
  }

  delete(ws: WebSocket<EventsClient>): void {
    const { deviceId } = ws.getUserData();
    const sockets = deviceId === undefined ? undefined : this.byDevice.get(deviceId);
    sockets?.delete(ws);
    if (sockets?.size === 0) this.byDevice.delete(deviceId!);
  }

  endDevice(deviceId: string, log: (line: string) => void): void {
    for (const ws of this.byDevice.get(deviceId) ?? []) {
      if (ws.getUserData().closed) continue;
      log(`closing a /v1/events client: device ${deviceId} may no longer watch`);
      // 1008: policy violation; the credential is no longer valid, so reconnecting is refused.
      endEventsClient(ws, 1008, 'device authorization ended');
    }
    this.byDevice.delete(deviceId);
  }
}

/** A WebSocket endpoint whose binary messages are a byte stream in both directions, handed over as a Duplex. */
function serveStream(app: TemplatedApp, endpoint: StreamEndpoint, limiter: RateLimiter | null, secure: boolean, log: (line: string) => void): void {
  interface StreamClient { stream?: Duplex; closed: boolean; drained?: () => void; release?: Release }
  app.ws<StreamClient>(endpoint.path, {
    maxPayloadLength: MAX_WS_MESSAGE_BYTES,
    idleTimeout: 0, // the protocol inside has its own keep-alive
    maxBackpressure: 4 * MAX_WS_MESSAGE_BYTES,
    upgrade: (res, req, context) => {
      // The credentials come later, inside the stream: the connection draws on its address's bucket and cap.
      let release: Release | undefined;
      try {
        limiter?.takeForAddress(remoteAddressOf(res));
        release = endpoint.admit?.({ remoteAddress: remoteAddressOf(res), secure });
      } catch (err) {
        refuseUpgrade(res, asCloudletError(err));
        return;
      }
      upgradeTo(res, req, context, { closed: false, ...(release ? { release } : {}) }, endpoint.protocol);
    },
    open: (ws: WebSocket<StreamClient>) => {
      const client = ws.getUserData();
      client.stream = new Duplex({
        read() {},
        write(chunk: Buffer, _encoding, callback) {
          if (client.closed) return callback(new Error('WebSocket closed'));
          // 0: queued in uWS beyond its buffer; wait for drain before taking more (Node's stream backpressure).
          if (ws.send(chunk, true) === 0) client.drained = () => callback();
          else callback();
        },
        destroy(err, callback) {
          if (!client.closed) {
            client.closed = true;
            ws.end(1000);
          }
          callback(err);
        },
      });
      client.stream.on('error', (err) => log(`${endpoint.path} stream: ${err.message}`));
      endpoint.accept(client.stream, { remoteAddress: remoteAddressOf(ws), secure });
    },
    message: (ws, message) => {
      // Copy: uWS neuters the ArrayBuffer when this callback returns.
      ws.getUserData().stream?.push(Buffer.from(new Uint8Array(message)));
    },
    drain: (ws) => {
      const client = ws.getUserData();
      const drained = client.drained;
      client.drained = undefined;
      drained?.();
    },
    close: (ws) => {
      const client = ws.getUserData();
      client.closed = true;
      client.release?.();
      client.drained?.();
      client.stream?.push(null);
      client.stream?.destroy();
    },
  });
}

/** Answers a WebSocket upgrade with the error instead, as a /v1 error reply. */
function refuseUpgrade(res: HttpResponse, error: CloudletError): void {
  res.cork(() => {
    res.writeStatus(`${error.status} ${STATUS_CODES[error.status] ?? ''}`);
    for (const [name, value] of Object.entries(authHeaders(error))) res.writeHeader(name, value);
    if (typeof error.details?.retry_after_s === 'number') res.writeHeader('Retry-After', String(error.details.retry_after_s));
    res.writeHeader('Content-Type', 'application/json; charset=utf-8').end(JSON.stringify(error.toJSON()), true);
  });
}

/** Completes a WebSocket upgrade, agreeing to `protocol` when the client offers it. */
function upgradeTo<T>(res: HttpResponse, req: HttpRequest, context: us_socket_context_t, userData: T, protocol: string): void {
  res.upgrade(userData, req.getHeader('sec-websocket-key'), protocol && offeredProtocols(req).includes(protocol) ? protocol : '',
    req.getHeader('sec-websocket-extensions'), context);
}

function offeredProtocols(req: HttpRequest): string[] {
  return req.getHeader('sec-websocket-protocol').split(',').map((p) => p.trim()).filter((p) => p !== '');
}

/** The /v1/events subprotocol a browser may offer next to its `bearer.<token>` entry. */
const EVENTS_PROTOCOL = 'cloudlet.events';
const EVENTS_BEARER_PROTOCOL_PREFIX = 'bearer.';

/** A 401 tells the client how to authenticate (RFC 6750). */
function authHeaders(error: CloudletError): Record<string, string> {
  if (error.status !== 401) return {};
  return { 'WWW-Authenticate': error.code === 'UNAUTHENTICATED' ? 'Bearer realm="cloudlet"' : 'Bearer realm="cloudlet", error="invalid_token"' };
}

interface Incoming {
  method: string;
  /** For the log: the path and query, with any `access_token` value replaced (the real query is `query`). */
  url: string;
  path: string;
  query: string;
  headers: Map<string, string>;
  remoteAddress: string;
  secure: boolean;
}

/** Copies what we need: uWS's HttpRequest is stack-allocated and invalid once the handler returns. */
function readIncoming(req: HttpRequest, res: HttpResponse, secure: boolean): Incoming {
  const headers = new Map<string, string>();
  req.forEach((name, value) => headers.set(name, value));
  const path = req.getUrl();
  // getQuery() returns undefined, not '', when the URL has no query.
  const query = (req.getQuery() as string | undefined) ?? '';
  const remoteAddress = remoteAddressOf(res);
  const logged = redactedQuery(query);
  return { method: req.getMethod().toUpperCase(), url: query ? `${path}?${logged}` : path, path, query, headers, remoteAddress, secure };
}

/** A query as logged: `access_token` values (browsers' /v1/events credential) never reach the log. */
function redactedQuery(query: string): string {
  const params = new URLSearchParams(query);
  if (!params.has('access_token')) return query;
  params.set('access_token', 'REDACTED');
  return params.toString();
}

function ownsPath(face: Face, path: string): boolean {
  return path === face.prefix || path.startsWith(`${face.prefix}/`);
}

/**
 * Answers one request and returns the status sent ('aborted' when the client left first). Never throws for request
 * problems: every error becomes the face's error reply. Runs synchronously up to its first await, so the body reader
 * is attached inside the uWS handler, as uWS requires.
 */
async function serve(
  face: Face,
  incoming: Incoming,
  exchange: Exchange,
  gate: AccessGate,
  limiter: RateLimiter | null,
  maxBodyBytes: number,
  log: (line: string) => void,
): Promise<number | 'aborted'> {
  let reply: Reply;
  let file: OpenedFile | undefined;
  let caller: Caller | undefined;
  try {
    const { route, params } = resolveRoute(face, incoming);
    const transport: Transport = { remoteAddress: incoming.remoteAddress, secure: incoming.secure };
    caller = authorizeWithinRate(gate, limiter, route.access, bearerToken(incoming.headers.get('authorization')), transport);
    const body = route.jsonBody ? exchange.readBody(incoming.headers, route.maxBodyBytes ?? maxBodyBytes) : undefined;
    const form = route.formBody ? exchange.readBody(incoming.headers, maxBodyBytes) : undefined;
    const bodyStream = route.streamBody ? exchange.streamBody(incoming.headers) : undefined;
    const request: ApiRequest = {
      method: incoming.method,
      path: incoming.path,
      params,
      query: new URLSearchParams(incoming.query),
      header: (name) => incoming.headers.get(name) || undefined,
      body: body === undefined ? undefined : parseJson(await body),
      ...(form ? { form: new URLSearchParams((await form).toString('utf8')) } : {}),
      remoteAddress: incoming.remoteAddress,
      secure: incoming.secure,
      caller,
      ...(bodyStream ? { bodyStream } : {}),
    };
    reply = await route.handle(request);
    if (reply.file) ({ reply, file } = await openFileReply(reply, reply.file, incoming.headers));
  } catch (err) {
    const error = seenBy(asCloudletError(err), caller);
    // Unexpected errors keep their stack for the operator's log only; the client gets code and message.
    if (error.code === 'INTERNAL') log(`${incoming.method} ${incoming.url}: ${describe(error.cause ?? error)}`);
    reply = face.errorReply(error);
    Object.assign(reply.headers, authHeaders(error));
    // RATE_LIMITED and BUSY say when to come back.
    if (typeof error.details?.retry_after_s === 'number') reply.headers['Retry-After'] = String(error.details.retry_after_s);
  }
  if (file) return (await exchange.sendFile(reply, file, incoming.method === 'HEAD')) ? reply.status : 'aborted';
  return exchange.send(reply, incoming.method === 'HEAD') ? reply.status : 'aborted';
}

/**
 * The route's caller, once the client's rate allows the request. The bucket is the credential's, whatever the route
 * needs: a paired device draws on its own, anyone else (no credential, or one that fails, so guessing tokens is
 * throttled too) on its address's (an IPv6 /64's); the admin on the box is not limited.
 */
function authorizeWithinRate(gate: AccessGate, limiter: RateLimiter | null, access: Access, token: string | undefined, transport: Transport): Caller {
  if (limiter) {
    let holder: Caller | null = null;
    if (token !== undefined) {
      try {
        holder = gate.authorize('device', token, transport);
      } catch {
        // Counted against the address; the route's own check below says what is wrong with the credential.
      }
    }
    if (holder?.kind === 'device') limiter.take(`device ${holder.device.id}`);
    else if (holder?.kind !== 'admin') limiter.takeForAddress(transport.remoteAddress);
  }
  return gate.authorize(access, token, transport);
}

/** A file opened for a reply, and the part of it to send. */
interface OpenedFile {
  handle: FileHandle;
  start: number;
  length: number;
}

/**
 * Opens a file reply's file and settles what to send: all of it (200), the part a `Range: bytes=...` header asks for
 * (206, when the route allows ranges and any If-Range names the reply's ETag), or nothing (416, the range is outside
 * the file). Several ranges in one
 * header are answered with the whole file, which RFC 9110 allows.
 */
async function openFileReply(reply: Reply, file: NonNullable<Reply['file']>, request: Map<string, string>): Promise<{ reply: Reply; file?: OpenedFile }> {
  const range = request.get('range');
  // If-Range: the part is only wanted if the file is still the one the client has the beginning of.
  const ifRange = request.get('if-range');
  const rangeValid = ifRange === undefined || ifRange === reply.headers.ETag;
  const handle = await open(file.path, 'r');
  try {
    const size = (await handle.stat()).size;
    const headers = { ...reply.headers, ...(file.ranges ? { 'Accept-Ranges': 'bytes' } : {}) };
    const wanted = file.ranges && range && rangeValid ? /^bytes=(\d*)-(\d*)$/.exec(range.trim()) : null;
    if (!wanted || (wanted[1] === '' && wanted[2] === '')) return { reply: { ...reply, headers }, file: { handle, start: 0, length: size } };
    // bytes=a-b, bytes=a- (to the end), bytes=-n (the last n bytes)
    const start = wanted[1] === '' ? Math.max(0, size - Number(wanted[2])) : Number(wanted[1]);
    const end = wanted[1] === '' || wanted[2] === '' ? size - 1 : Math.min(Number(wanted[2]), size - 1);
    if (start >= size || end < start) {
      await handle.close();
      return { reply: { status: 416, headers: { 'Accept-Ranges': 'bytes', 'Content-Range': `bytes */${size}` }, body: '' } };
    }
    const partial = { ...headers, 'Content-Range': `bytes ${start}-${end}/${size}` };
    return { reply: { ...reply, status: 206, headers: partial }, file: { handle, start, length: end - start + 1 } };
  } catch (err) {
    await handle.close();
    throw err;
  }
}

function resolveRoute(face: Face, incoming: Incoming): { route: Route; params: Record<string, string> } {
  const candidates = face.routes.flatMap((route) => {
    const params = matchPath(route.path, incoming.path);
    return params ? [{ route, params }] : [];
  });
  if (candidates.length === 0) throw new CloudletError('NOT_FOUND', `No route for ${incoming.path}`);
  const method = face.headAsGet && incoming.method === 'HEAD' ? 'GET' : incoming.method;
  const match = candidates.find((candidate) => candidate.route.method === method);
  if (match) return match;
  if (face.wrongMethod === 'not-found') throw new CloudletError('NOT_FOUND', `No route for ${incoming.method} ${incoming.path}`);
  const allowed = candidates.map((candidate) => candidate.route.method);
  throw new CloudletError('METHOD_NOT_ALLOWED', `${incoming.method} is not allowed on ${incoming.path}; use ${allowed.join(' or ')}`, {
    details: { allowed },
  });
}

function parseJson(body: Buffer): unknown {
  if (body.length === 0) throw new CloudletError('BAD_REQUEST', 'The request body must be a JSON document');
  try {
    return JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw new CloudletError('BAD_REQUEST', `Malformed JSON body: ${(err as Error).message}`);
  }
}

function describe(err: unknown): string {
  return err instanceof Error ? (err.stack ?? err.message) : String(err);
}

/** One request's response: remembers an abort so nothing is ever written to a response uWS has freed. */
class Exchange {
  private aborted = false;
  private answered = false;
  /** The request body has not been read to its end; answering then must close the connection. */
  private bodyUnread = false;
  private abortListener: (() => void) | undefined;
  /** While an upload's body is still arriving: stop handing it on, discard the rest, then call `then`. */
  private discardBody: ((then: () => void) => void) | undefined;

  /** Cuts a request body that stalls or drips; paused while uWS is paused by us, ended once the body is in. */
  private pace: BodyPace | undefined;

  constructor(private readonly res: HttpResponse, private readonly paceLimits: BodyPaceLimits) {
    res.onAborted(() => {
      this.aborted = true;
      this.pace?.end();
      this.abortListener?.();
    });
  }

  /** Starts watching the body's pace: `onStall` runs once when it stalls or drips (BodyPace). */
  private watchPace(onStall: (error: CloudletError) => void): BodyPace {
    this.pace = new BodyPace(this.paceLimits, (error) => {
      // Answered now, with the connection closed: the rest of the body is not waited for (nor discarded) any more.
      this.discardBody = undefined;
      onStall(error);
    });
    this.pace.start();
    return this.pace;
  }

  readBody(headers: Map<string, string>, limit: number): Promise<Buffer> {
    this.bodyUnread = true;
    // uWS v20.30 does not decode chunked request bodies.
    if (headers.has('transfer-encoding')) {
      return Promise.reject(new CloudletError('BAD_REQUEST', 'Chunked request bodies are not supported; send Content-Length'));
    }
    const tooLarge = () => new CloudletError('PAYLOAD_TOO_LARGE', `The request body exceeds ${limit} bytes`, { details: { limit } });
    if (Number(headers.get('content-length')) > limit) return Promise.reject(tooLarge());
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      let size = 0;
      let settled = false;
      const settle = (outcome: () => void) => {
        settled = true;
        pace.end();
        outcome();
      };
      this.abortListener = () => settle(() => reject(new CloudletError('BAD_REQUEST', 'The client aborted the request')));
      const pace = this.watchPace((error) => settle(() => reject(error)));
      this.res.onData((chunk, isLast) => {
        if (settled) return;
        pace.touch(chunk.byteLength);
        size += chunk.byteLength;
        if (size > limit) return settle(() => reject(tooLarge()));
        // Copy: uWS neuters the ArrayBuffer when this callback returns.
        chunks.push(Buffer.from(new Uint8Array(chunk)));
        if (isLast) {
          this.bodyUnread = false;
          settle(() => resolve(Buffer.concat(chunks)));
        }
      });
    });
  }

  /**
   * The request body as a stream, for routes that take large uploads: chunks are pushed as uWS delivers them, and
   * uWS is paused while the consumer lags (so a fast client cannot fill memory). Must be called inside the handler.
   */
  streamBody(headers: Map<string, string>): { stream: Readable; length: number } {
    if (headers.has('transfer-encoding')) throw new CloudletError('BAD_REQUEST', 'Chunked request bodies are not supported; send Content-Length');
    const declared = headers.get('content-length');
    if (declared === undefined || !/^\d+$/.test(declared)) throw new CloudletError('LENGTH_REQUIRED', 'Uploads must be sent with Content-Length');
    this.bodyUnread = true;
    let paused = false;
    let discarding: { bytes: number; then: () => void } | undefined;
    // A stalled upload fails its consumer (whose error is then answered), or, once refused, is answered at once.
    const onStall = (error: CloudletError) => (discarding ? discarding.then() : stream.destroy(error));
    const stream = new Readable({
      read: () => {
        if (paused && !this.aborted) {
          paused = false;
          pace.start();
          this.res.resume();
        }
      },
    });
    this.abortListener = () => stream.destroy(new CloudletError('BAD_REQUEST', 'The client aborted the upload'));
    // A route may answer without reading the body (refused, unknown id): an abort then has no consumer to hear it,
    // and an 'error' nobody listens to would end the process. Consumers still get it through their own listeners.
    stream.on('error', () => {});
    this.discardBody = (then) => {
      discarding = { bytes: 0, then };
      stream.destroy();
      if (paused) {
        paused = false;
        pace.start();
        this.res.resume();
      }
    };
    const pace = this.watchPace(onStall);
    this.res.onData((chunk, isLast) => {
      if (isLast) pace.end();
      else pace.touch(chunk.byteLength);
      if (discarding) {
        discarding.bytes += chunk.byteLength;
        if (isLast) {
          this.bodyUnread = false;
          discarding.then();
        } else if (discarding.bytes > MAX_DISCARDED_BYTES) {
          // Not worth reading on: cut off, unanswered (uWS cannot answer mid-body without losing the answer).
          this.res.close();
        }
        return;
      }
      // Copy: uWS neuters the ArrayBuffer when this callback returns.
      if (!stream.push(Buffer.from(new Uint8Array(chunk))) && !isLast) {
        // Waiting on our consumer, not on the client: no stall to watch for until it reads again.
        paused = true;
        pace.pause();
        this.res.pause();
      }
      if (isLast) {
        this.bodyUnread = false;
        this.discardBody = undefined;
        stream.push(null);
      }
    });
    return { stream, length: Number(declared) };
  }

  /**
   * Streams an opened file as the reply body: a chunk is read from disk only when uWS has taken the previous one
   * (tryEnd, then onWritable when its buffer is full), so a slow client costs one chunk of memory, not the file.
   * Returns whether the whole reply was written.
   */
  sendFile(reply: Reply, file: OpenedFile, headOnly: boolean): Promise<boolean> {
    const closeFile = () => void file.handle.close().catch(() => {});
    if (this.aborted || this.answered) {
      closeFile();
      return Promise.resolve(false);
    }
    this.answered = true;
    const writeHead = () => {
      this.res.writeStatus(`${reply.status} ${STATUS_CODES[reply.status] ?? ''}`);
      for (const [name, value] of Object.entries(reply.headers)) this.res.writeHeader(name, value);
    };
    if (headOnly) {
      // As in send(): this build's endWithoutBody needs Content-Length written by hand.
      this.res.cork(() => {
        writeHead();
        this.res.writeHeader('Content-Length', String(file.length)).endWithoutBody();
      });
      closeFile();
      return Promise.resolve(true);
    }
    if (file.length === 0) {
      this.res.cork(() => {
        writeHead();
        this.res.end('');
      });
      closeFile();
      return Promise.resolve(true);
    }
    return new Promise((resolve) => {
      let settled = false;
      const finish = (written: boolean) => {
        if (settled) return;
        settled = true;
        closeFile();
        resolve(written);
      };
      this.abortListener = () => finish(false);
      // Bytes read from disk so far; the next chunk is read while the current one is being sent (one chunk ahead).
      let read = 0;
      const readChunk = async (): Promise<Buffer> => {
        const chunk = Buffer.allocUnsafe(Math.min(FILE_CHUNK_BYTES, file.length - read));
        const at = read;
        read += chunk.length;
        const { bytesRead } = await file.handle.read(chunk, 0, chunk.length, file.start + at);
        if (bytesRead < chunk.length) throw new Error(`the file ended ${file.length - at - bytesRead} bytes early`);
        return chunk;
      };
      let next: Promise<Buffer> | undefined = readChunk();
      // The chunk uWS could not take whole, and the write offset it started at.
      let pending: { data: Buffer; offset: number } | undefined;
      const offer = (data: Buffer, offset: number): boolean => {
        // tryEnd writes Content-Length from the total on its first call.
        const [ok, done] = this.res.tryEnd(data, file.length);
        if (done) finish(true);
        else if (!ok) pending = { data, offset };
        return ok;
      };
      let headWritten = false;
      const pump = async () => {
        try {
          while (!settled && !pending && next) {
            const chunk = await next;
            next = read < file.length ? readChunk() : undefined;
            // Not yet awaited: a rejection is handled when the loop comes to it (or ignored once settled).
            next?.catch(() => {});
            if (settled) return;
            this.res.cork(() => {
              if (!headWritten) writeHead();
              headWritten = true;
              offer(chunk, this.res.getWriteOffset());
            });
          }
        } catch {
          // Headers (and a Content-Length) may be out already: the only honest signal left is a cut connection.
          if (!settled && !this.aborted) this.res.close();
          finish(false);
        }
      };
      this.res.onWritable((offset) => {
        if (!pending) return true;
        const { data, offset: start } = pending;
        pending = undefined;
        const ok = offer(data.subarray(offset - start), offset);
        if (ok && !settled) void pump();
        return ok;
      });
      void pump();
    });
  }

  /** Writes the reply unless the client is gone; returns whether it was written. */
  send(reply: Reply, headOnly: boolean): boolean {
    if (this.aborted || this.answered) return false;
    if (this.bodyUnread && this.discardBody) {
      // An upload refused before its end (too large, forbidden...): uWS would cut the connection on an answer sent
      // mid-body and the client, still sending, would lose it to the reset. The rest is read and dropped first.
      const discard = this.discardBody;
      this.discardBody = undefined;
      discard(() => this.send(reply, headOnly));
      return true;
    }
    this.answered = true;
    const closeConnection = this.bodyUnread;
    // Corked because this usually runs after an await, outside uWS's own corked handler scope.
    this.res.cork(() => {
      this.res.writeStatus(`${reply.status} ${STATUS_CODES[reply.status] ?? ''}`);
      for (const [name, value] of Object.entries(reply.headers)) this.res.writeHeader(name, value);
      if (headOnly) {
        // This build's endWithoutBody(length) never sends the response and endWithoutBody(undefined) writes a bogus
        // second Content-Length, so the header is written by hand and no argument is passed. HEAD routes read no body.
        this.res.writeHeader('Content-Length', String(Buffer.byteLength(reply.body))).endWithoutBody();
      } else {
        // end(body) always writes Content-Length (0 for an empty body); uWS only chunks after write().
        this.res.end(reply.body, closeConnection);
      }
    });
    return true;
  }
}
