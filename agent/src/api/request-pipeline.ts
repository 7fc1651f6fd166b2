/**
 * One HTTP request's path through the agent, independent of the server library: the face that owns its path, the
 * route, the caller (one call on the access gate, trust/access.ts, before any body is read), the client's request
 * bucket (trust/rate-limit.ts), the body, the handler, and a file reply's Range. Every error becomes the face's error
 * reply. The transport (uws-transport.ts) hands each request in as an Incoming and answers through an Exchange.
 */
import { open, type FileHandle } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import { CloudletError, asCloudletError } from '../errors';
import { admit, bearerToken, identityOf, seenBy, type Access, type AccessGate, type Caller, type Transport } from '../trust/access';
import type { RateLimiter } from '../trust/rate-limit';
import { matchSegments, type ApiRequest, type Face, type Reply, type Route } from './routing';

/** A request as the transport read it, before any body. */
export interface Incoming {
  method: string;
  /** For the log: the path and query, with any `access_token` value replaced (the real query is `query`). */
  url: string;
  path: string;
  query: string;
  /** By lower-case name. */
  headers: Map<string, string>;
  remoteAddress: string;
  secure: boolean;
}

/** How the pipeline reads one request's body and answers it; the transport's side of one request. */
export interface Exchange {
  /** The whole body, at most `limit` bytes (else PAYLOAD_TOO_LARGE). */
  readBody(headers: Map<string, string>, limit: number): Promise<Buffer>;
  /** The body as a stream, for large uploads; it must come with Content-Length. Called before the first await. */
  streamBody(headers: Map<string, string>): { stream: Readable; length: number };
  /** Writes the reply unless the client is gone; returns whether it was written. */
  send(reply: Reply, headOnly: boolean): boolean;
  /** Streams the part of an opened file the reply stands for, then closes it; resolves whether it was all written. */
  sendFile(reply: Reply, file: OpenedFile, headOnly: boolean): Promise<boolean>;
}

/** A file opened for a reply, and the part of it to send. */
export interface OpenedFile {
  handle: FileHandle;
  start: number;
  length: number;
}

/** The faces a request may go to: the KD face (null when off) and the page own their prefixes; `own` takes the rest. */
export interface Faces {
  kd: Face | null;
  page: Face;
  own: Face;
}

export interface RequestPolicy {
  gate: AccessGate;
  /** Absent: no limit. */
  limiter: RateLimiter | null;
  /** The default limit of a JSON or form body. */
  maxBodyBytes: number;
  log: (line: string) => void;
  /** Told of every answered request (metrics); absent: nobody counts. */
  observer?: RequestObserver;
}

/**
 * What counts requests: the matched route's pattern (`unmatched` when none matched, so a client cannot add label
 * values by inventing paths), the method, the status sent ('aborted' when the client left first), and the bytes of a
 * streamed upload that was accepted (2xx; else 0).
 */
export interface RequestObserver {
  answered(route: string, method: string, status: number | 'aborted', uploadedBytes: number): void;
}

/** A route with its path split once, as every request's path is matched against it. */
interface RouteEntry {
  route: Route;
  segments: string[];
}

/** The routes a path matches, with the params each takes from it. */
type Candidates = { route: Route; params: Record<string, string> }[];

/**
 * A face's routes, split once; and for each route path without captures (the lists phones poll), the routes that
 * match it, found once rather than on every request.
 */
interface RouteTable {
  entries: RouteEntry[];
  literal: Map<string, Candidates>;
}

export class RequestPipeline {
  private readonly tables = new Map<Face, RouteTable>();
  /** The faces that own a prefix, asked in this order. */
  private readonly prefixed: Face[];

  constructor(
    private readonly faces: Faces,
    private readonly policy: RequestPolicy,
  ) {
    this.prefixed = faces.kd ? [faces.kd, faces.page] : [faces.page];
    for (const face of [faces.kd, faces.page, faces.own]) {
      if (!face) continue;
      const entries = face.routes.map((route) => ({ route, segments: route.path.split('/') }));
      const literal = new Map<string, Candidates>();
      for (const { route } of entries) if (!route.path.includes(':')) literal.set(route.path, candidatesFor(entries, route.path));
      this.tables.set(face, { entries, literal });
    }
  }

  /**
   * Answers one request and returns the status sent ('aborted' when the client left first). Never throws for request
   * problems: every error becomes the face's error reply. Runs synchronously up to its first await, so the body
   * reader is attached inside the transport's handler, as uWS requires.
   */
  async serve(incoming: Incoming, exchange: Exchange): Promise<number | 'aborted'> {
    const { gate, limiter, maxBodyBytes, log } = this.policy;
    const face = this.faceFor(incoming.path);
    let reply: Reply;
    let file: OpenedFile | undefined;
    let caller: Caller | undefined;
    let routePattern = 'unmatched';
    let uploaded = 0;
    try {
      const { route, params } = resolveRoute(face, this.tables.get(face)!, incoming);
      routePattern = route.path;
      const transport: Transport = { remoteAddress: incoming.remoteAddress, secure: incoming.secure };
      caller = authorizeWithinRate(gate, limiter, route.access, bearerToken(incoming.headers.get('authorization')), transport, route.peers);
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
      if (bodyStream && reply.status < 300) uploaded = bodyStream.length;
      if (reply.file) ({ reply, file } = await openFileReply(reply, reply.file, incoming.headers));
    } catch (err) {
      const error = seenBy(asCloudletError(err), caller);
      // Unexpected errors keep their stack for the operator's log only; the client gets code and message.
      if (error.code === 'INTERNAL') log(`${incoming.method} ${incoming.url}: ${describe(error.cause ?? error)}`);
      reply = face.errorReply(error);
      Object.assign(reply.headers, errorHeaders(error));
    }
    const headOnly = incoming.method === 'HEAD';
    const sent = file ? await exchange.sendFile(reply, file, headOnly) : exchange.send(reply, headOnly);
    const status = sent ? reply.status : 'aborted';
    this.policy.observer?.answered(routePattern, incoming.method, status, uploaded);
    return status;
  }

  /** The phone page owns `/` and its assets' prefix; paths under no face's prefix get our own face's JSON 404. */
  private faceFor(path: string): Face {
    const { page, own } = this.faces;
    return this.prefixed.find((face) => ownsPath(face, path)) ?? (path === '/' ? page : own);
  }
}

function ownsPath(face: Face, path: string): boolean {
  return path === face.prefix || path.startsWith(`${face.prefix}/`);
}

/** The routes of `entries` that `path` matches. */
function candidatesFor(entries: RouteEntry[], path: string): Candidates {
  const segments = path.split('/');
  const candidates: Candidates = [];
  for (const { route, segments: pattern } of entries) {
    const params = matchSegments(pattern, segments);
    if (params) candidates.push({ route, params });
  }
  return candidates;
}

function resolveRoute(face: Face, table: RouteTable, incoming: Incoming): { route: Route; params: Record<string, string> } {
  // A handler gets params of its own: the shared ones of a literal path are copied.
  const candidates =
    table.literal.get(incoming.path)?.map(({ route, params }) => ({ route, params: { ...params } })) ?? candidatesFor(table.entries, incoming.path);
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

/**
 * The route's caller, once the client's rate allows the request, with one call on the gate. The bucket is the
 * credential's, whatever the route needs: a paired device draws on its own, anyone else (no credential, or one that
 * fails, so guessing tokens is throttled too) on its address's (an IPv6 /64's); the admin on the box is not limited.
 * The rate comes first: a client over it learns nothing of its credential.
 */
export function authorizeWithinRate(
  gate: AccessGate,
  limiter: RateLimiter | null,
  access: Access,
  token: string | undefined,
  transport: Transport,
  peers = false,
): Caller {
  const identity = identityOf(gate, token, transport);
  if (limiter) {
    const holder = identity instanceof CloudletError ? null : identity;
    if (holder?.kind === 'device') limiter.take(`device ${holder.device.id}`);
    else if (holder?.kind !== 'admin') limiter.takeForAddress(transport.remoteAddress);
  }
  return admit(access, identity, gate.policy, peers);
}

/** Headers an error reply carries besides the face's body: how to authenticate after a 401, when to come back. */
export function errorHeaders(error: CloudletError): Record<string, string> {
  const headers: Record<string, string> = {};
  // RFC 6750
  if (error.status === 401) {
    headers['WWW-Authenticate'] = error.code === 'UNAUTHENTICATED' ? 'Bearer realm="cloudlet"' : 'Bearer realm="cloudlet", error="invalid_token"';
  }
  // RATE_LIMITED and BUSY say when to come back.
  if (typeof error.details?.retry_after_s === 'number') headers['Retry-After'] = String(error.details.retry_after_s);
  return headers;
}

/**
 * Opens a file reply's file and settles what to send: all of it (200), the part a `Range: bytes=...` header asks for
 * (206, when the route allows ranges and any If-Range names the reply's ETag), or nothing (416, the range is outside
 * the file). Several ranges in one header are answered with the whole file, which RFC 9110 allows.
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

function parseJson(body: Buffer): unknown {
  if (body.length === 0) throw new CloudletError('BAD_REQUEST', 'The request body must be a JSON document');
  try {
    return JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw new CloudletError('BAD_REQUEST', `Malformed JSON body: ${(err as Error).message}`);
  }
}

export function describe(err: unknown): string {
  return err instanceof Error ? (err.stack ?? err.message) : String(err);
}
