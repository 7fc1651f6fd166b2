/**
 * The HTTP server: the only module that knows uWebSockets.js. It serves the KD-Cloudlet face (/api) and the /v1 face
 * from their route tables, and owns what both need: Content-Length on every response (the KD Android client rejects
 * chunked replies), abort safety, size-limited JSON bodies, 404/405 and turning every exception into a reply.
 */
import { STATUS_CODES } from 'node:http';
import {
  App,
  us_listen_socket_close,
  us_socket_local_port,
  type HttpRequest,
  type HttpResponse,
  type TemplatedApp,
  type us_listen_socket,
  type us_socket,
} from 'uWebSockets.js';
import type { CloudletApi } from '../core/types';
import { CloudletError, asCloudletError } from '../errors';
import { kdCloudletFace } from './kd-cloudlet';
import { matchPath, type ApiRequest, type Face, type Reply, type Route } from './routing';
import { v1Face } from './v1';

export interface HttpServerOptions {
  api: CloudletApi;
  host: string;
  /** 0 picks a free port; HttpServer.port tells which. */
  port: number;
  logger?: (line: string) => void;
  /** Largest accepted request body in bytes (413 PAYLOAD_TOO_LARGE above it). JSON bodies here are tiny. */
  maxBodyBytes?: number;
}

export interface HttpServer {
  readonly port: number;
  close(): Promise<void>;
}

const DEFAULT_MAX_BODY_BYTES = 64 * 1024;

/** `close()` exists on the v20.30 App but is missing from its d.ts; it also drops idle keep-alive connections. */
type ClosableApp = TemplatedApp & { close(): void };

export function startHttpServer(options: HttpServerOptions): Promise<HttpServer> {
  const log = options.logger ?? (() => {});
  const maxBodyBytes = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  const kdFace = kdCloudletFace(options.api);
  const ownFace = v1Face(options.api);
  // Paths under neither prefix are answered by our own face (a JSON 404).
  const faceFor = (path: string): Face => (ownsPath(kdFace, path) ? kdFace : ownFace);

  const app = App() as ClosableApp;
  app.any('/*', (res, req) => {
    const exchange = new Exchange(res);
    try {
      const incoming = readIncoming(req);
      const started = Date.now();
      serve(faceFor(incoming.path), incoming, exchange, maxBodyBytes, log)
        .then((status) => log(`${incoming.method} ${incoming.url} ${status} ${Date.now() - started}ms`))
        .catch((err: unknown) => log(`${incoming.method} ${incoming.url} failed to answer: ${describe(err)}`));
    } catch (err) {
      // Only a misuse of uWS can land here; an exception escaping to uWS would take the process down.
      log(`HTTP request handler failed: ${describe(err)}`);
      res.close();
    }
  });

  return new Promise((resolve, reject) => {
    app.listen(options.host, options.port, (listenSocket: us_listen_socket | false) => {
      if (!listenSocket) {
        app.close();
        reject(new CloudletError('INTERNAL', `Cannot listen on ${options.host}:${options.port}`));
        return;
      }
      const port = us_socket_local_port(listenSocket as unknown as us_socket);
      log(`HTTP API listening on ${options.host}:${port}`);
      let open = true;
      resolve({
        port,
        close: async () => {
          if (!open) return;
          open = false;
          us_listen_socket_close(listenSocket);
          app.close();
        },
      });
    });
  });
}

interface Incoming {
  method: string;
  url: string;
  path: string;
  query: string;
  headers: Map<string, string>;
}

/** Copies what we need: uWS's HttpRequest is stack-allocated and invalid once the handler returns. */
function readIncoming(req: HttpRequest): Incoming {
  const headers = new Map<string, string>();
  req.forEach((name, value) => headers.set(name, value));
  const path = req.getUrl();
  // getQuery() returns undefined, not '', when the URL has no query.
  const query = (req.getQuery() as string | undefined) ?? '';
  return { method: req.getMethod().toUpperCase(), url: query ? `${path}?${query}` : path, path, query, headers };
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
  maxBodyBytes: number,
  log: (line: string) => void,
): Promise<number | 'aborted'> {
  let reply: Reply;
  try {
    const { route, params } = resolveRoute(face, incoming);
    const body = route.jsonBody ? exchange.readBody(incoming.headers, maxBodyBytes) : undefined;
    const request: ApiRequest = {
      method: incoming.method,
      path: incoming.path,
      params,
      query: new URLSearchParams(incoming.query),
      header: (name) => incoming.headers.get(name) || undefined,
      body: body === undefined ? undefined : parseJson(await body),
    };
    reply = await route.handle(request);
  } catch (err) {
    const error = asCloudletError(err);
    // Unexpected errors keep their stack for the operator's log only; the client gets code and message.
    if (error.code === 'INTERNAL') log(`${incoming.method} ${incoming.url}: ${describe(error.cause ?? error)}`);
    reply = face.errorReply(error);
  }
  return exchange.send(reply, incoming.method === 'HEAD') ? reply.status : 'aborted';
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

  constructor(private readonly res: HttpResponse) {
    res.onAborted(() => {
      this.aborted = true;
      this.abortListener?.();
    });
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
        outcome();
      };
      this.abortListener = () => settle(() => reject(new CloudletError('BAD_REQUEST', 'The client aborted the request')));
      this.res.onData((chunk, isLast) => {
        if (settled) return;
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

  /** Writes the reply unless the client is gone; returns whether it was written. */
  send(reply: Reply, headOnly: boolean): boolean {
    if (this.aborted || this.answered) return false;
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
