/**
 * What an HTTP face is made of, independent of the server library: a route table of handlers that turn a parsed
 * request into a Reply, and the face's way of answering errors. request-pipeline.ts runs faces; the faces never see uWS.
 */
import type { Readable } from 'node:stream';
import { CloudletError } from '../errors';
import type { Access, Caller } from '../trust/access';

export type RouteMethod = 'GET' | 'POST' | 'DELETE';

export interface ApiRequest {
  /** Upper-case, as the client sent it (HEAD stays HEAD even when a GET route answers it). */
  method: string;
  /** The URL path, still percent-encoded; `params` holds the decoded captures. */
  path: string;
  params: Record<string, string>;
  query: URLSearchParams;
  /** A request header by lower-case name; undefined when absent or empty. */
  header(name: string): string | undefined;
  /** The parsed JSON body for routes with `jsonBody`, otherwise undefined. */
  body: unknown;
  /** The client's IP address as text (IPv4 dotted, IPv6 full form). */
  remoteAddress: string;
  /** Whether it came over the TLS listener. */
  secure: boolean;
  /** Who the request's credential names (anonymous on open routes). */
  caller: Caller;
  /** For routes with `streamBody`: the raw body as it arrives, `length` bytes as its Content-Length announced. */
  bodyStream?: { stream: Readable; length: number };
  /** For routes with `formBody`: the application/x-www-form-urlencoded body's fields. */
  form?: URLSearchParams;
}

export interface Reply {
  status: number;
  /** Content-Length is never set here: the server computes it from `body`. */
  headers: Record<string, string>;
  body: string;
  /**
   * Send this file from disk instead of `body`, streamed (never read whole) with its Content-Length. With `ranges`,
   * a `Range: bytes=...` request is answered 206 with that part (or 416), so an interrupted download resumes.
   */
  file?: { path: string; ranges: boolean };
}

export interface Route {
  method: RouteMethod;
  /** Literal segments and `:name` captures of exactly one segment, e.g. `/v1/services/:id`. */
  path: string;
  /** Who may call it (trust/access.ts); the open ones are a deliberate, documented list (docs/security.md). */
  access: Access;
  /** A paired cloudlet may call it too (with `device` access): the list of docs/security.md, "Between cloudlets". */
  peers?: boolean;
  /** Read the request body (size-limited) and parse it as JSON before calling `handle`. */
  jsonBody?: boolean;
  /** A larger limit than the server's default for this route's JSON body (e.g. recipes). */
  maxBodyBytes?: number;
  /** Read the request body (size-limited) as an HTML form (application/x-www-form-urlencoded) into `form`. */
  formBody?: boolean;
  /** Hand the body to `handle` as a stream (large uploads) instead of reading it; it must come with Content-Length. */
  streamBody?: boolean;
  handle(request: ApiRequest): Reply | Promise<Reply>;
}

export interface Face {
  /** The path prefix the face owns (`/api`, `/v1`). */
  prefix: string;
  routes: Route[];
  /** Answer HEAD with the matching GET route (minus the body), as Pylons does. */
  headAsGet: boolean;
  /** How a known path with an unsupported method is answered: Pylons answers 404, /v1 answers 405. */
  wrongMethod: 'not-found' | 'method-not-allowed';
  /** The reply for any error a handler did not answer itself, and for routing and body errors. Must not throw. */
  errorReply: (error: CloudletError) => Reply;
}

export function jsonReply(status: number, value: unknown): Reply {
  return { status, headers: { 'Content-Type': 'application/json; charset=utf-8' }, body: JSON.stringify(value) };
}

/**
 * A reply built by `build` and kept while `revision` says the same: a copy of it (its headers its own, so nothing
 * downstream can change the kept one) for every request, built again at the first request after a change.
 */
export function keptWhile(revision: () => string, build: () => Reply): () => Reply {
  let kept: { revision: string; reply: Reply } | undefined;
  return () => {
    const now = revision();
    if (kept?.revision !== now) kept = { revision: now, reply: build() };
    return { ...kept.reply, headers: { ...kept.reply.headers } };
  };
}

export function textReply(status: number, text: string): Reply {
  return { status, headers: { 'Content-Type': 'text/plain; charset=utf-8' }, body: text };
}

export function fileReply(path: string, headers: Record<string, string>, ranges: boolean): Reply {
  return { status: 200, headers, body: '', file: { path, ranges } };
}

export function emptyReply(status: number): Reply {
  return { status, headers: {}, body: '' };
}

/** The params of `routePath` matched against a raw `path`, or null when it does not match. */
export function matchPath(routePath: string, path: string): Record<string, string> | null {
  return matchSegments(routePath.split('/'), path.split('/'));
}

/** matchPath on paths already split at '/' (a face's route table splits its routes' paths once, not per request). */
export function matchSegments(routeSegments: readonly string[], segments: readonly string[]): Record<string, string> | null {
  if (routeSegments.length !== segments.length) return null;
  for (let i = 0; i < segments.length; i++) {
    const expected = routeSegments[i]!;
    if (!expected.startsWith(':') && expected !== segments[i]) return null;
  }
  const params: Record<string, string> = {};
  for (let i = 0; i < segments.length; i++) {
    const expected = routeSegments[i]!;
    if (!expected.startsWith(':')) continue;
    const actual = segments[i]!;
    if (actual === '') return null;
    params[expected.slice(1)] = decodePathSegment(actual);
  }
  return params;
}

function decodePathSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw new CloudletError('BAD_REQUEST', `Malformed percent-encoding in path segment "${segment}"`);
  }
}

/** The host part of a Host header (`10.0.0.5:9999` → `10.0.0.5`, `[fe80::1]:9999` → `fe80::1`). */
export function hostOf(hostHeader: string | undefined): string | undefined {
  if (!hostHeader) return undefined;
  const bracketed = /^\[([^\]]+)\]/.exec(hostHeader);
  if (bracketed) return bracketed[1];
  const host = hostHeader.replace(/:\d*$/, '');
  return host === '' ? undefined : host;
}
