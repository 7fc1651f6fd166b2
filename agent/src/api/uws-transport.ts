/**
 * The HTTP transport: with uws-exchange.ts, the only code that knows uWebSockets.js. It listens (plain, and with
 * `tls` HTTPS too, serving the same), copies each request out of uWS into an Incoming for the request pipeline and
 * answers through a UwsExchange, and runs the WebSocket endpoints (socket-endpoint.ts): their upgrades, refusals
 * and messages. An exception never escapes to uWS, which would take the process down.
 */
import { STATUS_CODES } from 'node:http';
import {
  App,
  SSLApp,
  us_listen_socket_close,
  us_socket_local_port,
  type HttpRequest,
  type HttpResponse,
  type TemplatedApp,
  type us_listen_socket,
  type WebSocket,
} from 'uWebSockets.js';
import { CloudletError, asCloudletError } from '../errors';
import type { AccessLog } from './access-log';
import type { BodyPaceLimits } from './body-pace';
import { describe, errorHeaders, type Incoming, type RequestPipeline } from './request-pipeline';
import { jsonReply } from './routing';
import type { SocketEndpoint, SocketSession, UpgradeRequest } from './socket-endpoint';
import { UwsExchange } from './uws-exchange';

export interface TransportOptions {
  host: string;
  /** 0 picks a free port. */
  port: number;
  /** Also serve HTTPS on this port (0 picks a free one) of the same host, with this key and certificate. */
  tls?: { port: number; keyFile: string; certFile: string };
  pipeline: RequestPipeline;
  sockets: SocketEndpoint[];
  bodyPace: BodyPaceLimits;
  log: (line: string) => void;
  accessLog: AccessLog;
}

export interface Listeners {
  port: number;
  /** The HTTPS listener's port, when there is one. */
  tlsPort: number | null;
  /** Why the HTTPS listener asked for is missing (main.ts says so as the `https` part); null when it runs. */
  tlsProblem: string | null;
  close(): void;
}

/** `close()` exists on the v20.30 App but is missing from its d.ts; it also drops idle keep-alive connections. */
type ClosableApp = TemplatedApp & { close(): void };

export async function listenUws(options: TransportOptions): Promise<Listeners> {
  const { log, accessLog } = options;
  // The same handlers on each listener's app; only whether the transport is TLS differs.
  const mount = (app: ClosableApp, secure: boolean): ClosableApp => {
    for (const endpoint of options.sockets) serveSocket(app, endpoint, secure);
    app.any('/*', (res, req) => {
      const exchange = new UwsExchange(res, options.bodyPace);
      try {
        const incoming = readIncoming(req, res, secure);
        const started = Date.now();
        options.pipeline
          .serve(incoming, exchange)
          .then((status) => accessLog.record(incoming.method, incoming.url, status, Date.now() - started))
          .catch((err: unknown) => log(`${incoming.method} ${incoming.url} failed to answer: ${describe(err)}`));
      } catch (err) {
        // Only a misuse of uWS can land here.
        log(`HTTP request handler failed: ${describe(err)}`);
        res.close();
      }
    });
    return app;
  };

  const plain = await listen(mount(App() as ClosableApp, false), options.host, options.port, 'HTTP', log);
  let secure: Listener | null = null;
  let tlsProblem: string | null = null;
  if (options.tls) {
    const tlsApp = SSLApp({ key_file_name: options.tls.keyFile, cert_file_name: options.tls.certFile }) as ClosableApp;
    // Without its HTTPS port the agent still serves loopback and the open routes (as with a taken MQTT port): phones
    // cannot send credentials until it is back, which /v1/system shows (tls_port null).
    secure = await listen(mount(tlsApp, true), options.host, options.tls.port, 'HTTPS', log).catch((err: Error) => {
      tlsProblem = `${err.message} (the port is taken, or the certificate cannot be used)`;
      return null;
    });
  }
  return {
    port: plain.port,
    tlsPort: secure?.port ?? null,
    tlsProblem,
    close: () => {
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
      const bound = us_socket_local_port(listenSocket);
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

/** Runs a WebSocket endpoint on `app`: each connection's session rides on the socket as its user data. */
function serveSocket(app: TemplatedApp, endpoint: SocketEndpoint, secure: boolean): void {
  const { maxPayloadLength, idleTimeoutSeconds, maxBackpressure, sendPingsAutomatically } = endpoint.limits;
  app.ws<{ session: SocketSession }>(endpoint.path, {
    maxPayloadLength,
    idleTimeout: idleTimeoutSeconds,
    maxBackpressure,
    ...(sendPingsAutomatically === undefined ? {} : { sendPingsAutomatically }),
    upgrade: (res, req, context) => {
      // Copied first: uWS's HttpRequest is invalid once this handler returns (and unreadable after res.cork).
      const request = readUpgrade(req, res, secure);
      const key = req.getHeader('sec-websocket-key');
      const extensions = req.getHeader('sec-websocket-extensions');
      let session: SocketSession;
      try {
        session = endpoint.upgrade(request);
      } catch (err) {
        refuseUpgrade(res, asCloudletError(err));
        return;
      }
      const protocol = session.protocol && request.offeredProtocols.includes(session.protocol) ? session.protocol : '';
      res.upgrade({ session }, key, protocol, extensions, context);
    },
    open: (ws: WebSocket<{ session: SocketSession }>) => {
      ws.getUserData().session.open({
        // 0: queued in uWS beyond its buffer.
        send: (data, binary) => ws.send(data, binary) !== 0,
        bufferedAmount: () => ws.getBufferedAmount(),
        end: (code, reason) => ws.end(code, reason),
      });
    },
    message: (ws, message) => {
      const { session } = ws.getUserData();
      // Copy: uWS neuters the ArrayBuffer when this callback returns.
      session.message?.(Buffer.from(new Uint8Array(message)));
    },
    drain: (ws) => ws.getUserData().session.drain?.(),
    close: (ws) => ws.getUserData().session.close(),
  });
}

function readUpgrade(req: HttpRequest, res: HttpResponse, secure: boolean): UpgradeRequest {
  const headers = readHeaders(req);
  const offeredProtocols = (headers.get('sec-websocket-protocol') ?? '')
    .split(',')
    .map((p) => p.trim())
    .filter((p) => p !== '');
  return {
    header: (name) => headers.get(name) || undefined,
    // getQuery() returns undefined, not '', when the URL has no query.
    query: new URLSearchParams((req.getQuery() as string | undefined) ?? ''),
    offeredProtocols,
    transport: { remoteAddress: remoteAddressOf(res), secure },
  };
}

/** Answers a WebSocket upgrade with the error instead, as a /v1 error reply, and closes the connection. */
function refuseUpgrade(res: HttpResponse, error: CloudletError): void {
  const reply = jsonReply(error.status, error.toJSON());
  res.cork(() => {
    res.writeStatus(`${reply.status} ${STATUS_CODES[reply.status] ?? ''}`);
    for (const [name, value] of Object.entries({ ...errorHeaders(error), ...reply.headers })) res.writeHeader(name, value);
    res.end(reply.body, true);
  });
}

/** An address's text is ASCII: latin1 decodes it without Buffer.from's wrapper, which counted under load. */
const ADDRESS_TEXT = new TextDecoder('latin1');

/** The peer's IP address as text (uWS hands it over as bytes of text). */
function remoteAddressOf(res: HttpResponse): string {
  return ADDRESS_TEXT.decode(res.getRemoteAddressAsText());
}

function readHeaders(req: HttpRequest): Map<string, string> {
  const headers = new Map<string, string>();
  req.forEach((name, value) => headers.set(name, value));
  return headers;
}

/** Copies what we need: uWS's HttpRequest is stack-allocated and invalid once the handler returns. */
function readIncoming(req: HttpRequest, res: HttpResponse, secure: boolean): Incoming {
  const path = req.getUrl();
  // getQuery() returns undefined, not '', when the URL has no query.
  const query = (req.getQuery() as string | undefined) ?? '';
  const logged = redactedQuery(query);
  return {
    method: req.getMethod().toUpperCase(),
    url: query ? `${path}?${logged}` : path,
    path,
    query,
    headers: readHeaders(req),
    remoteAddress: remoteAddressOf(res),
    secure,
  };
}

/** A query as logged: `access_token` values (browsers' /v1/events credential) never reach the log. */
function redactedQuery(query: string): string {
  const params = new URLSearchParams(query);
  if (!params.has('access_token')) return query;
  params.set('access_token', 'REDACTED');
  return params.toString();
}
