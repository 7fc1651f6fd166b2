// A seeded generator of malformed HTTP requests and a raw-socket client to send them, for the route fuzzer
// (test/fuzz-routes.e2e.test.ts). Every request is a pure function of (seed, target, index): a failure names those
// three and the request can be rebuilt and replayed byte for byte with `fuzzRequest`.
import net from 'node:net';
import { gzipSync } from 'node:zlib';

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

const WRONG_METHODS = [
  'PUT',
  'PATCH',
  'OPTIONS',
  'TRACE',
  'CONNECT',
  'PROPFIND',
  'M-SEARCH',
  'get',
  'post',
  'Delete',
  'HEAD',
  'FOO',
  'GET ',
  'X'.repeat(300),
  'G\u00c9T',
  'POST\t',
  '1',
  '-',
  'GETT',
  'BREW',
];
/**
 * The methods uWS parses. Any other token (lower-case ones included) makes it close the connection without an
 * answer, before the agent sees the request: for those only "no crash, no 5xx" can be asked.
 */
/**
 * uWS drops the connection of a request whose head (request line and headers) is larger than this and arrives in more
 * than one read, as it does under load: heads up to 4 KiB are what it reliably takes.
 */
const UWS_MAX_HEAD_BYTES = 4096;
/** uWS leaves a request with more header lines than this (its compile-time limit) unanswered until its idle timeout. */
const UWS_MAX_HEADERS = 48;
const UWS_METHODS = new Set(['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD', 'OPTIONS', 'TRACE', 'CONNECT']);
/** A request line uWS takes: a method it knows and an origin-form target (`/`, printable ASCII, no fragment). */
function uwsParses(method: string, target: string): boolean {
  return UWS_METHODS.has(method) && /^\/[\x21-\x7e]*$/.test(target) && !target.includes('#');
}

const SEGMENTS = [
  '',
  '..',
  '.',
  '%2e%2e',
  '%2E%2E%2F%2E%2E',
  '%zz',
  '%',
  '%0',
  '%00',
  'a%00b',
  '%C0%AE%C0%AE',
  '%C0%AF',
  '%E2%82',
  '%FF%FE',
  '%F0%9F%98%80',
  'ü',
  '\u00e9t\u00e9',
  'x'.repeat(4096),
  'A'.repeat(70000),
  '0',
  '-1',
  '00000000-0000-0000-0000-000000000000',
  'a'.repeat(24),
  'f'.repeat(64),
  'org.cloudlet.demo.http',
  '%20',
  '+',
  'a b',
  '..%2F..%2Fetc%2Fpasswd',
  '%252e',
  'null',
  'undefined',
  '__proto__',
  'constructor',
  'toString',
  '%7B%7D',
  '*',
  ';',
  'a;b=c',
  ':id',
  '~',
  '\\..\\',
];
const QUERY_KEYS = [
  'serviceId',
  'instanceId',
  'appId',
  'app_id',
  'services',
  'apps',
  'join',
  'osName',
  'osVersion',
  'tags',
  'offset',
  'bytes',
  'kind',
  'service_id',
  'name',
  'file_name',
  'sha256',
  'min_os_version',
  'os_name',
  'os_version',
  'access_token',
  '__proto__',
  '',
];
const QUERY_VALUES = [
  '',
  '1',
  '-1',
  '0',
  'NaN',
  '1e999',
  '9'.repeat(40),
  'true',
  'YES',
  'x'.repeat(3000),
  '%zz',
  '%',
  '%00',
  '%C0%AE',
  'ü',
  '%F0%9F%98%80',
  '../../etc/passwd',
  'a,b,,c',
  ',',
  'android',
  'Android',
  'web',
  '10.0',
  '1..2',
  '0x10',
  ' 5',
  '5 ',
  '[]',
  '{}',
];
const NASTY_VALUES: unknown[] = [
  null,
  true,
  false,
  0,
  -1,
  1.5,
  -0,
  1e308,
  2 ** 53 + 1,
  -(2 ** 63),
  '',
  ' ',
  'x'.repeat(70000),
  '\u0000',
  '\ud800',
  '/',
  '/etc',
  '/etc/passwd',
  '/dev/null',
  '/proc/self',
  'relative/path',
  '../../..',
  '/nonexistent/dir',
  [],
  {},
  [1, 2],
  { a: { b: {} } },
  'org.cloudlet.demo.http',
  'a'.repeat(24),
  '%00',
  'true',
  '1',
  '__proto__',
  JSON.parse('{"__proto__":{"polluted":1}}'),
];
const FIELDS = [
  'path',
  'service_id',
  'join',
  'bytes',
  'name',
  'id',
  'base',
  'files',
  'packages',
  'port',
  'version',
  'cache',
  'description',
  'run',
  'memory_mib',
  'code',
  'device_id',
  'expires_in_minutes',
  'ttl_seconds',
  '__proto__',
  'constructor',
  '',
];
const CONTENT_TYPES = [
  'application/json',
  'application/json; charset=utf-8',
  'text/plain',
  'application/octet-stream',
  'application/x-www-form-urlencoded',
  'multipart/form-data; boundary=x',
  'application/jsonx',
  'application/json; charset=latin1',
  '',
  ';;;',
  'x'.repeat(2000),
  'application/gzip',
];
const AUTHORIZATIONS = [
  'Bearer',
  'Bearer ',
  'Bearer  ',
  'bearer cld_x',
  'Basic YWRtaW46YWRtaW4=',
  'Bearer cld_' + 'A'.repeat(43),
  'Bearer ' + 'x'.repeat(4000),
  'Digest username="a"',
  'Bearer \u00ff\u00fe',
  'Bearer a b c',
  'Token abc',
  'Bearer cld_%00',
  ',',
  'Bearer null',
];
const RANGES = [
  'bytes=',
  'bytes=-',
  'bytes=5-1',
  'bytes=-0',
  'bytes=0-0',
  'bytes=999999999999-',
  'bytes=0-1,2-3',
  'bytes=x-y',
  'items=0-1',
  'bytes=-99999999999999999999',
  'bytes=1-',
  'bytes = 0-1',
];

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

export interface RawResponse {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
}

/** One HTTP response parsed off the front of `buffer`, or null while incomplete. */
function parseResponse(buffer: Buffer, head: boolean): { response: RawResponse; rest: Buffer } | null {
  const end = buffer.indexOf('\r\n\r\n');
  if (end < 0) return null;
  const lines = buffer.subarray(0, end).toString('latin1').split('\r\n');
  const status = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0]!);
  if (!status) throw new Error(`not an HTTP status line: ${JSON.stringify(lines[0]!.slice(0, 100))}`);
  const headers: Record<string, string> = {};
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(':');
    if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  const code = Number(status[1]);
  // An interim answer (100 Continue): the real one follows.
  if (code >= 100 && code < 200 && code !== 101) return parseResponse(buffer.subarray(end + 4), head);
  const length = head || code === 101 || code === 204 || code === 304 ? 0 : Number(headers['content-length'] ?? 0);
  if (buffer.length < end + 4 + length) return null;
  return { response: { status: code, headers, body: buffer.subarray(end + 4, end + 4 + length) }, rest: buffer.subarray(end + 4 + length) };
}

export type Outcome = { answer: RawResponse } | { closed: true } | { timedOut: true };

/**
 * A keep-alive connection sending one request at a time. `send` resolves with the response, or with how the exchange
 * ended without one; after anything but a clean response the connection is not reused.
 */
export class RawConnection {
  private socket: net.Socket | null = null;
  private buffer: Buffer = Buffer.alloc(0);
  private waiting: ((outcome: Outcome | 'data') => void) | null = null;

  constructor(private readonly port: number) {}

  private connect(): Promise<net.Socket> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(this.port, '127.0.0.1', () => {
        socket.off('error', reject);
        resolve(socket);
      });
      socket.once('error', reject);
      // Events of a connection given up on must not reach the exchange on its successor.
      socket.on('data', (chunk: Buffer) => {
        if (this.socket !== socket) return;
        this.buffer = Buffer.concat([this.buffer, chunk]);
        this.waiting?.('data');
      });
      socket.on('error', () => {});
      socket.on('close', () => {
        if (this.socket !== socket) return;
        this.socket = null;
        this.waiting?.({ closed: true });
      });
    });
  }

  async send(bytes: Buffer, head: boolean, timeoutMs: number, keepAlive: boolean): Promise<Outcome> {
    const reused = this.socket !== null && !this.socket.destroyed;
    const outcome = await this.exchange(bytes, head, timeoutMs, keepAlive);
    // The server may close an idle keep-alive connection just as the next request goes out: sent again, fresh.
    if (reused && 'closed' in outcome) return this.exchange(bytes, head, timeoutMs, keepAlive);
    return outcome;
  }

  private async exchange(bytes: Buffer, head: boolean, timeoutMs: number, keepAlive: boolean): Promise<Outcome> {
    if (!this.socket || this.socket.destroyed) {
      this.socket = await this.connect();
      this.buffer = Buffer.alloc(0);
    }
    const socket = this.socket;
    socket.write(bytes);
    const outcome = await new Promise<Outcome>((resolve) => {
      const timer = setTimeout(() => finish({ timedOut: true }), timeoutMs);
      const finish = (o: Outcome) => {
        clearTimeout(timer);
        this.waiting = null;
        resolve(o);
      };
      const check = (event: Outcome | 'data') => {
        try {
          const parsed = parseResponse(this.buffer, head);
          if (parsed) {
            this.buffer = parsed.rest;
            return finish({ answer: parsed.response });
          }
        } catch {
          return finish({ closed: true });
        }
        if (event !== 'data') finish(event);
      };
      this.waiting = check;
      check('data');
    });
    const reusable = keepAlive && 'answer' in outcome && outcome.answer.status !== 101 && outcome.answer.headers.connection !== 'close' && !socket.destroyed;
    if (!reusable) this.close();
    return outcome;
  }

  close(): void {
    this.socket?.destroy();
    this.socket = null;
    this.buffer = Buffer.alloc(0);
  }
}
