// A seeded generator of malformed HTTP requests for the route fuzzer (test/fuzz-routes.e2e.test.ts). Every request is
// a pure function of (seed, target, index): a failure names those three and the request can be rebuilt and replayed
// byte for byte with `fuzzRequest`. The lists it draws from are test/support/fuzz-vocabulary.ts; the raw-socket client
// that sends the bytes is test/support/raw-connection.ts.
import { gzipSync } from 'node:zlib';
import { AUTHORIZATIONS, CONTENT_TYPES, FIELDS, NASTY_VALUES, QUERY_KEYS, QUERY_VALUES, RANGES, SEGMENTS, WRONG_METHODS } from './fuzz-vocabulary';

/** What is fuzzed: a route of a face's table (method + path pattern), or one of the extra targets. */
export interface FuzzTarget {
  method: string;
  /** A route pattern (`/v1/services/:id`) or a literal path. */
  path: string;
  /** Takes a JSON body (`jsonBody`), a raw upload (`streamBody`), or nothing. */
  body: 'json' | 'stream' | 'none';
  /** A WebSocket endpoint: requests are (mostly malformed) upgrades. */
  upgrade?: boolean;
}

export interface FuzzRequest {
  /** The category it exercises, for the report. */
  kind: string;
  bytes: Buffer;
  /** The HTTP framing is valid: the server must answer (close is only fine for broken framing). */
  wellFramed: boolean;
  /** The body is shorter than its Content-Length: the server rightly waits; no answer is expected. */
  waits: boolean;
  head: boolean;
  /** Which path it went to (for the /v1 JSON-error check). */
  path: string;
}

/** mulberry32: small, fast, and the same sequence on every machine. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

class Dice {
  constructor(readonly next: () => number) {}
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }
}

/**
 * uWS drops the connection of a request whose head (request line and headers) is larger than this and arrives in more
 * than one read, as it does under load: heads up to 4 KiB are what it reliably takes.
 */
const UWS_MAX_HEAD_BYTES = 4096;
/** uWS leaves a request with more header lines than this (its compile-time limit) unanswered until its idle timeout. */
const UWS_MAX_HEADERS = 48;
/**
 * The methods uWS parses. Any other token (lower-case ones included) makes it close the connection without an
 * answer, before the agent sees the request: for those only "no crash, no 5xx" can be asked.
 */
const UWS_METHODS = new Set(['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD', 'OPTIONS', 'TRACE', 'CONNECT']);
/** A request line uWS takes: a method it knows and an origin-form target (`/`, printable ASCII, no fragment). */
function uwsParses(method: string, target: string): boolean {
  return UWS_METHODS.has(method) && /^\/[\x21-\x7e]*$/.test(target) && !target.includes('#');
}

/** Bytes that look like the start of something an upload route parses, then stop: truncated archives and overlays. */
function truncatedUploads(d: Dice): Buffer[] {
  const tarHeader = Buffer.alloc(512);
  tarHeader.write('manifest.json', 0);
  tarHeader.write('0000644', 100);
  tarHeader.write('00000001000', 124);
  const gz = gzipSync(Buffer.concat([tarHeader, Buffer.from('{"app_id":')]));
  return [
    gz.subarray(0, 10 + d.int(gz.length - 10)),
    Buffer.from([0x28, 0xb5, 0x2f, 0xfd, ...d.bytes(d.int(64))]),
    Buffer.from([0x1f, 0x8b, 0x08, 0x00, ...d.bytes(d.int(200))]),
    tarHeader.subarray(0, d.int(512)),
    Buffer.concat([Buffer.from('CLOUDLET-OVERLAY'), d.bytes(d.int(300))]),
    Buffer.concat([Buffer.from('QFI\xfb', 'latin1'), d.bytes(d.int(300))]),
    d.bytes(1 + d.int(4096)),
    Buffer.alloc(0),
  ];
}

function jsonValue(d: Dice, depth = 0): unknown {
  if (depth > 3 || d.chance(0.5)) return d.pick(NASTY_VALUES);
  if (d.chance(0.5)) return Array.from({ length: d.int(4) }, () => jsonValue(d, depth + 1));
  const obj: Record<string, unknown> = {};
  for (let i = d.int(5); i > 0; i--) obj[d.pick(FIELDS)] = jsonValue(d, depth + 1);
  return obj;
}

function jsonBody(d: Dice): Buffer {
  switch (d.int(10)) {
    case 0:
      return Buffer.from('{"path": ');
    case 1:
      return Buffer.from('['.repeat(1 + d.int(200000)));
    case 2:
      return Buffer.from(`${'{"a":'.repeat(5000)}1${'}'.repeat(5000)}`);
    case 3:
      return d.bytes(1 + d.int(512));
    case 4:
      return Buffer.from(d.pick(['null', 'true', '1e999', '-0', '"x"', '[]', '{}', '{"a":1,"a":2}', '\ufeff{}', "{'path':1}", '{"path":"\\ud800"}']));
    case 5:
      return Buffer.from(JSON.stringify({ path: d.pick(NASTY_VALUES), name: d.pick(NASTY_VALUES) }));
    case 6:
      return Buffer.from(JSON.stringify({ service_id: d.pick(NASTY_VALUES), join: d.pick(NASTY_VALUES) }));
    case 7:
      return Buffer.from(JSON.stringify({ bytes: d.pick(NASTY_VALUES) }));
    case 8:
      return Buffer.from(
        JSON.stringify({ service_id: 'x', version: d.pick(NASTY_VALUES), base: d.pick(NASTY_VALUES), files: d.pick(NASTY_VALUES), run: d.pick(NASTY_VALUES) }),
      );
    default:
      return Buffer.from(JSON.stringify(jsonValue(d)) ?? 'undefined');
  }
}

/** The target's path with its `:params` filled in (`mangle`: with nasty segments). */
function pathOf(d: Dice, target: FuzzTarget, mangle: boolean): string {
  const filled = target.path
    .split('/')
    .map((segment) => {
      if (!segment.startsWith(':')) return segment;
      return mangle ? d.pick(SEGMENTS) : d.pick(['0', 'a'.repeat(24), 'f'.repeat(64), 'nothing-here', '00000000-0000-0000-0000-000000000000']);
    })
    .join('/');
  if (!mangle || target.path.includes(':')) return filled;
  // A literal path: damage it around its segments instead.
  return d.pick([
    `${filled}/`,
    `${filled}//`,
    `/${filled}`,
    `${filled}/${d.pick(SEGMENTS)}`,
    `${filled}%2F`,
    `${filled}/..`,
    `${filled}/../..${filled}`,
    filled.toUpperCase(),
    `${filled}%00`,
    `${filled};x`,
    `${filled}#frag`,
    filled.replace(/\//g, '%2F'),
    `${filled}/.`,
  ]);
}

/** Every byte of the UTF-8 (lone surrogates included, as U+FFFD) percent-encoded: encodeURIComponent throws on those. */
function percentEncoded(text: string): string {
  return [...Buffer.from(text)].map((byte) => `%${byte.toString(16).padStart(2, '0')}`).join('');
}

function queryOf(d: Dice): string {
  switch (d.int(6)) {
    case 0:
      return '';
    case 1:
      return `?${Array.from({ length: 1 + d.int(6) }, () => `${d.pick(QUERY_KEYS)}=${d.pick(QUERY_VALUES)}`).join('&')}`;
    case 2: {
      const key = d.pick(QUERY_KEYS);
      return `?${key}=${d.pick(QUERY_VALUES)}&${key}=${d.pick(QUERY_VALUES)}&${key}`;
    }
    case 3:
      return `?${'a=b&'.repeat(1 + d.int(1500))}`;
    case 4:
      return d.pick(['?', '??', '?&&&', '?=', '?%zz=%zz', '?a=%', '?%00=%00', '?a=1;b=2', '?a[b]=c', '?__proto__[x]=1', '?a=%C0%AE']);
    default:
      return `?${d.pick(QUERY_KEYS)}=${percentEncoded(String(d.pick(NASTY_VALUES)).slice(0, 3000))}`;
  }
}

interface Parts {
  method: string;
  target: string;
  headers: [string, string][];
  body: Buffer;
  /** Content-Length is left to the caller's headers (wrong on purpose). */
  rawLength?: boolean;
  wellFramed?: boolean;
  waits?: boolean;
}

function withLength(p: Parts): [string, string][] {
  return p.rawLength || p.body.length === 0 ? p.headers : [...p.headers, ['Content-Length', String(p.body.length)]];
}

function headerLines(p: Parts): number {
  return withLength(p).length;
}

function headOf(p: Parts): string {
  return `${p.method} ${p.target} HTTP/1.1\r\n${withLength(p)
    .map(([k, v]) => `${k}: ${v}\r\n`)
    .join('')}\r\n`;
}

function serialize(p: Parts): Buffer {
  return Buffer.concat([Buffer.from(headOf(p), 'latin1'), p.body]);
}

const KINDS = ['method', 'path', 'query', 'headers', 'length', 'chunked', 'body', 'body', 'auth', 'mixed'] as const;

/** Request `index` for `target`: one of KINDS in turn, the rest drawn from the seeded PRNG. */
export function fuzzRequest(seed: number, targetIndex: number, target: FuzzTarget, index: number, host: string, adminToken: string | null): FuzzRequest {
  const d = new Dice(prng((seed ^ Math.imul(targetIndex + 1, 0x9e3779b1) ^ Math.imul(index + 1, 0x85ebca6b)) >>> 0));
  const kind = KINDS[index % KINDS.length]!;
  // Half with the operator's credential, so malformed input also reaches the handlers behind the auth gate.
  const auth: [string, string][] = adminToken && index % 2 === 0 ? [['Authorization', `Bearer ${adminToken}`]] : [];
  const base: [string, string][] = [['Host', host], ...auth];
  const p: Parts = { method: target.method, target: pathOf(d, target, false), headers: base, body: Buffer.alloc(0) };
  const plausibleBody = () => {
    if (target.body === 'json') return jsonBody(d);
    if (target.body === 'stream') return d.pick(truncatedUploads(d));
    return d.chance(0.3) ? d.bytes(d.int(100)) : Buffer.alloc(0);
  };
  if (target.upgrade) return upgradeRequest(d, kind, target, host);
  switch (kind) {
    case 'method':
      p.method = d.pick(WRONG_METHODS);
      if (d.chance(0.3)) p.body = plausibleBody();
      break;
    case 'path':
      p.target = pathOf(d, target, true);
      if (target.body !== 'none') p.body = plausibleBody();
      break;
    case 'query':
      p.target += queryOf(d);
      if (target.body !== 'none') p.body = plausibleBody();
      break;
    case 'headers': {
      p.body = plausibleBody();
      const extra: [string, string][] = d.pick([
        [['Content-Type', d.pick(CONTENT_TYPES)]],
        [
          ['Range', d.pick(RANGES)],
          ['If-Range', d.pick(['"x"', '', 'W/"x"'])],
        ],
        [['X-Large', 'v'.repeat(1 + d.int(3500))]],
        Array.from({ length: 1 + d.int(60) }, (_, i) => [`X-H${i}`, 'y'.repeat(d.int(50))] as [string, string]),
        [
          ['Connection', d.pick(['close', 'upgrade', 'keep-alive, close', 'x'])],
          ['Upgrade', d.pick(['websocket', 'h2c', 'x'])],
        ],
        [['Expect', '100-continue']],
        [
          ['Accept-Encoding', 'gzip'],
          ['Content-Encoding', d.pick(['gzip', 'br', 'x'])],
        ],
        [['X-Device-Id', d.pick(SEGMENTS).slice(0, 2000)]],
        [['Host', d.pick(['', '[', '[::1', ':', 'a:b:c', 'x'.repeat(2000), '127.0.0.1:99999', '[fe80::1]:'])]],
      ]);
      p.headers = [...base.filter(([k]) => !extra.some(([e]) => e === k)), ...extra];
      break;
    }
    case 'length': {
      p.body = plausibleBody();
      p.rawLength = true;
      const declared = d.pick(['abc', '-1', '1e3', '99999999999999999999', '0x10', ' 5', '', 'short', 'twice', 'zero-with-body', 'missing']);
      if (declared === 'short') {
        // Announces more than it sends: the server must wait for the rest (or time out), never answer wrongly.
        p.body = Buffer.concat([p.body, Buffer.from('x')]);
        p.headers = [...base, ['Content-Length', String(p.body.length + 1 + d.int(1000))]];
        p.waits = true;
      } else if (declared === 'twice') {
        p.headers = [...base, ['Content-Length', String(p.body.length)], ['Content-Length', String(p.body.length + 1)]];
        p.wellFramed = false;
      } else if (declared === 'zero-with-body') {
        p.headers = [...base, ['Content-Length', '0']];
        p.wellFramed = p.body.length === 0;
      } else if (declared === 'missing') {
        p.headers = base;
        p.wellFramed = p.body.length === 0;
      } else {
        p.headers = [...base, ['Content-Length', declared]];
        p.wellFramed = false;
      }
      break;
    }
    case 'chunked': {
      const chunk = plausibleBody();
      const chunked = d.pick([
        `${chunk.length.toString(16)}\r\n${chunk.toString('latin1')}\r\n0\r\n\r\n`,
        `zz\r\n${chunk.toString('latin1')}\r\n0\r\n\r\n`,
        `${(chunk.length + 5).toString(16)}\r\n${chunk.toString('latin1')}\r\n0\r\n\r\n`,
        'ffffffffffffffff\r\nabc\r\n',
        '5\r\nabc',
        '-1\r\n\r\n',
        '0\r\n\r\n',
      ]);
      p.body = Buffer.from(chunked, 'latin1');
      p.rawLength = true;
      p.headers = [
        ...base,
        ['Transfer-Encoding', d.pick(['chunked', 'chunked, gzip', 'gzip, chunked', 'Chunked', 'identity'])],
        ...(d.chance(0.3) ? [['Content-Length', String(p.body.length)] as [string, string]] : []),
      ];
      p.wellFramed = false;
      break;
    }
    case 'body':
      p.body = plausibleBody();
      if (d.chance(0.2)) p.body = d.bytes(d.int(70000));
      if (d.chance(0.5)) p.headers = [...base, ['Content-Type', d.pick(CONTENT_TYPES)]];
      break;
    case 'auth':
      p.headers = [
        ['Host', host],
        ['Authorization', d.pick(AUTHORIZATIONS)],
      ];
      if (target.body !== 'none') p.body = plausibleBody();
      break;
    default: // mixed: a bit of everything at once
      p.target = pathOf(d, target, d.chance(0.5)) + queryOf(d);
      p.body = plausibleBody();
      if (d.chance(0.3)) p.method = d.pick(WRONG_METHODS);
      p.headers = [...base, ['Content-Type', d.pick(CONTENT_TYPES)], ...(d.chance(0.3) ? [['Range', d.pick(RANGES)] as [string, string]] : [])];
  }
  return {
    kind,
    bytes: serialize(p),
    wellFramed: (p.wellFramed ?? true) && uwsParses(p.method, p.target) && headerLines(p) <= UWS_MAX_HEADERS && headOf(p).length <= UWS_MAX_HEAD_BYTES,
    waits: p.waits ?? false,
    head: p.method === 'HEAD',
    path: p.target.split('?')[0]!,
  };
}

/** A well-formed request, for the fixed regression cases sent before the random ones. */
export function plainRequest(method: string, target: string, headers: [string, string][], body = ''): FuzzRequest {
  const p: Parts = { method, target, headers, body: Buffer.from(body) };
  return { kind: 'regression', bytes: serialize(p), wellFramed: true, waits: false, head: method === 'HEAD', path: target.split('?')[0]! };
}

/** WebSocket endpoints: upgrades missing or garbling what an upgrade needs, or a good one followed by garbage frames. */
function upgradeRequest(d: Dice, kind: string, target: FuzzTarget, host: string): FuzzRequest {
  const key = d.pick([Buffer.from(d.bytes(16)).toString('base64'), '', 'short', 'x'.repeat(500), '!!!!']);
  const headers: [string, string][] = [['Host', host]];
  if (!d.chance(0.15)) headers.push(['Upgrade', d.pick(['websocket', 'WebSocket', 'websocket, h2c', 'h2c', ''])]);
  if (!d.chance(0.15)) headers.push(['Connection', d.pick(['Upgrade', 'upgrade, keep-alive', 'keep-alive', 'close'])]);
  if (!d.chance(0.15)) headers.push(['Sec-WebSocket-Key', key]);
  if (!d.chance(0.15)) headers.push(['Sec-WebSocket-Version', d.pick(['13', '8', '', '99999', 'x'])]);
  if (d.chance(0.5)) headers.push(['Sec-WebSocket-Protocol', d.pick(['mqtt', 'mqttv3.1', '', ',,,', 'x'.repeat(1000), 'bearer.junk'])]);
  if (d.chance(0.3)) headers.push(['Sec-WebSocket-Extensions', d.pick(['permessage-deflate', 'permessage-deflate; client_max_window_bits=99', 'x;;'])]);
  if (d.chance(0.3)) headers.push(['Authorization', d.pick(AUTHORIZATIONS)]);
  let method = 'GET';
  if (kind === 'method') method = d.pick(WRONG_METHODS);
  let path = target.path;
  if (kind === 'path') path = pathOf(d, target, true);
  if (kind === 'query') path += queryOf(d);
  // After the request, frames: a real client would talk; here garbage, a truncated frame, or a huge announced length.
  const frames = d.pick([
    Buffer.alloc(0),
    d.bytes(1 + d.int(200)),
    Buffer.from([0x82, 0xff, ...d.bytes(8)]),
    Buffer.from([0x81, 0x85, 1, 2, 3, 4, 5]),
    Buffer.from([0x88, 0x80, 0, 0, 0, 0]),
    Buffer.from([0x82, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
  ]);
  // Bytes after the request are the next request to uWS: it may close on them before the answer is out.
  const head = `${method} ${path} HTTP/1.1\r\n${headers.map(([k, v]) => `${k}: ${v}\r\n`).join('')}\r\n`;
  const wellFramed = uwsParses(method, path) && frames.length === 0 && head.length <= UWS_MAX_HEAD_BYTES;
  return { kind: `upgrade-${kind}`, bytes: Buffer.concat([Buffer.from(head, 'latin1'), frames]), wellFramed, waits: false, head: method === 'HEAD', path };
}
