/**
 * One cloudlet's HTTP API as the CLI uses it: /v1 JSON calls, the KD /api/system for ranking, uploads and resumable
 * downloads streamed to and from disk. Errors become CliErrors carrying the cloudlet's own error code.
 */
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { rename, rm, stat } from 'node:fs/promises';
import http from 'node:http';
import https from 'node:https';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import WebSocket from 'ws';
import { CliError } from './errors';
import type { KdSystemInfo } from './ranking';

export const DEFAULT_PORT = 9999;

/** The most of an answer the CLI reads into memory (JSON answers, error bodies); downloads stream to disk instead. */
export const MAX_ANSWER_BYTES = 8 * 1024 * 1024;

/** `host`, `host:port`, `[v6]`, `[v6]:port` or an http:// URL. */
export function parseCloudlet(spec: string): { host: string; port: number } {
  const text = spec.replace(/^http:\/\//, '').replace(/\/.*$/, '');
  const match = /^(?:\[([^\]]+)\]|([^:]+))(?::(\d+))?$/.exec(text);
  const port = match?.[3] === undefined ? DEFAULT_PORT : Number(match[3]);
  if (!match || port < 1 || port > 65535) throw new CliError('USAGE', `not a cloudlet address: ${spec} (expected HOST[:PORT])`);
  return { host: match[1] ?? match[2]!, port };
}

/** A credential: a bearer token, and for a paired device the cloudlet's pinned certificate and HTTPS port. */
export interface ClientAuth {
  token?: string;
  tls?: { port: number; ca: string; fingerprint: string };
}

interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

export class CloudletClient {
  constructor(
    readonly host: string,
    readonly port: number,
    private readonly timeoutMs = 15000,
    private readonly auth?: ClientAuth,
  ) {}

  /**
   * Every request goes through here: with a pinned certificate over HTTPS to its port (refused unless the server
   * presents exactly that certificate), else plain HTTP; with the token as a bearer credential.
   */
  private open(options: http.RequestOptions & { headers: Record<string, string> }, onResponse: (res: http.IncomingMessage) => void): http.ClientRequest {
    const headers = this.auth?.token ? { ...options.headers, authorization: `Bearer ${this.auth.token}` } : options.headers;
    const pin = this.pinned();
    if (!pin) return http.request({ ...options, host: this.host, port: this.port, headers, agent: false }, onResponse);
    return https.request({ ...options, host: this.host, port: pin.port, headers, agent: false, ...pin.tls }, onResponse);
  }

  /** The pinned certificate's TLS options, when this cloudlet has one: its CA and nothing but its fingerprint. */
  private pinned() {
    const pin = this.auth?.tls;
    if (!pin) return undefined;
    return {
      port: pin.port,
      tls: {
        ca: pin.ca,
        // The pin stands in for the host name check: a cloudlet on a LAN is reached by whatever address it has.
        checkServerIdentity: (_host: string, cert: { fingerprint256: string }) =>
          cert.fingerprint256 === pin.fingerprint
            ? undefined
            : new Error(`the cloudlet's certificate ${cert.fingerprint256} is not the pinned ${pin.fingerprint}`),
      },
    };
  }

  /**
   * A WebSocket to `path` (/v1/events), with the credential and the certificate pin every request has; a message
   * larger than MAX_ANSWER_BYTES closes it.
   */
  socket(path: string): WebSocket {
    const headers: Record<string, string> = this.auth?.token ? { authorization: `Bearer ${this.auth.token}` } : {};
    const options = { headers, handshakeTimeout: this.timeoutMs, maxPayload: MAX_ANSWER_BYTES, followRedirects: false };
    const host = this.host.includes(':') ? `[${this.host}]` : this.host;
    const pin = this.pinned();
    if (!pin) return new WebSocket(`ws://${host}:${this.port}${path}`, options);
    return new WebSocket(`wss://${host}:${pin.port}${path}`, { ...options, ...pin.tls });
  }

  /** The error a refused WebSocket upgrade answered (its `{code, message}`), read with the size cap of any answer. */
  refusal(res: http.IncomingMessage): Promise<CliError> {
    return new Promise<Answer>((resolve, reject) => this.collect(res, resolve, reject)).then(
      (answer) => {
        try {
          this.parse(answer);
        } catch (err) {
          return err as CliError;
        }
        return new CliError('FAILED', `${this.label} refused the WebSocket with ${answer.status}`);
      },
      (err: CliError) => err,
    );
  }

  get label(): string {
    return `${this.host.includes(':') ? `[${this.host}]` : this.host}:${this.port}`;
  }

  /**
   * A /v1 call: JSON in, JSON out; a `{code, message}` error answer becomes a CliError with that code. `timeoutMs`: how
   * long the cloudlet may stay silent (a provisioning answers only once its VM is ready).
   */
  async call<T>(method: string, path: string, body?: unknown, timeoutMs = this.timeoutMs): Promise<T> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const headers: Record<string, string> = payload ? { 'content-type': 'application/json', 'content-length': String(payload.length) } : {};
    const answer = await new Promise<Answer>((resolve, reject) => this.request(method, path, headers, resolve, reject, timeoutMs).end(payload));
    return this.parse<T>(answer);
  }

  /** A GET whose answer is JSON whatever its status (a health report is one also as a 503); never throws on a status. */
  async raw<T>(method: string, path: string): Promise<{ status: number; json: T | undefined }> {
    const answer = await this.exchange(method, path, {});
    try {
      return { status: answer.status, json: JSON.parse(answer.body.toString('utf8')) as T };
    } catch {
      return { status: answer.status, json: undefined };
    }
  }

  /** A GET answered with text (a console), read with the same size cap; an error answer is a CliError as for `call`. */
  async text(path: string): Promise<string> {
    const answer = await this.exchange('GET', path, {});
    if (answer.status >= 400) return this.parse<never>(answer);
    return answer.body.toString('utf8');
  }

  /**
   * The KD face's system metadata, what client-lib ranks cloudlets by. Asked of every cloudlet mDNS finds, so it has
   * a hard deadline: a discovered server that drips its answer does not hold the CLI.
   */
  async kdSystem(deadlineMs: number): Promise<KdSystemInfo> {
    const answer = await this.exchange('GET', '/api/system', {}, undefined, AbortSignal.timeout(deadlineMs));
    if (answer.status !== 200) throw new CliError('FAILED', `${this.label} answered /api/system with ${answer.status}`);
    return JSON.parse(answer.body.toString()) as KdSystemInfo;
  }

  /**
   * POST a file of `size` bytes as the raw body, from byte `from` on, streamed from disk; `onProgress` gets the bytes
   * of the file sent so far. A connection lost after it was made is a CONNECTION_CUT error. `timeoutMs`: how long the
   * cloudlet may stay silent (an answer that comes only once a VM is ready takes a while).
   */
  async upload<T>(
    path: string,
    file: string,
    size: number,
    contentType: string,
    onProgress: (sent: number) => void,
    { from = 0, timeoutMs = this.timeoutMs }: { from?: number; timeoutMs?: number } = {},
  ): Promise<T> {
    const answer = await new Promise<Answer>((resolve, reject) => {
      let connected = false;
      const cutOff = (err: Error) =>
        reject(
          connected
            ? new CliError(
                'CONNECTION_CUT',
                `the cloudlet cut the upload off (${(err as NodeJS.ErrnoException).code ?? err.message}); is the file larger than it accepts?`,
              )
            : this.unreachable(err),
        );
      const req = this.request('POST', path, { 'content-type': contentType, 'content-length': String(size - from) }, resolve, cutOff, timeoutMs);
      req.on('socket', (socket) =>
        socket.once('connect', () => {
          connected = true;
        }),
      );
      let sent = from;
      const counting = new Transform({
        transform(chunk: Buffer, _encoding, callback) {
          sent += chunk.length;
          onProgress(sent);
          callback(null, chunk);
        },
      });
      // The cloudlet may refuse before reading it all (too large, forbidden): its answer matters, not the pipe's end.
      pipeline(createReadStream(file, { start: from }), counting, req).catch(() => {});
    });
    return this.parse<T>(answer);
  }

  /**
   * Download `path` into `dest`, resuming from `dest.part` when an earlier try left one (a Range request), and check
   * the result against `sha256` before it takes its final name. A mismatch deletes the partial file.
   */
  async download(
    path: string,
    dest: string,
    expected: { size: number; sha256: string },
    onProgress: (done: number, resumedFrom: number) => void,
  ): Promise<{ resumedFrom: number; bytes: number }> {
    const part = `${dest}.part`;
    const have = await stat(part).then(
      (s) => s.size,
      () => 0,
    );
    // A part as large as the file (or larger) cannot be resumed: it is replaced.
    const from = have > 0 && have < expected.size ? have : 0;
    const res = await new Promise<http.IncomingMessage>((resolve, reject) => {
      // If-Range: should the app's content differ from what the part came from, the server sends it all (200).
      const headers: Record<string, string> = from > 0 ? { range: `bytes=${from}-`, 'if-range': `"${expected.sha256}"` } : {};
      const req = this.open({ method: 'GET', path, headers }, resolve);
      req.setTimeout(this.timeoutMs, () => req.destroy(new Error(`no answer within ${this.timeoutMs} ms`)));
      req.on('error', (err) => reject(this.unreachable(err)));
      req.end();
    });
    if (res.statusCode !== 200 && res.statusCode !== 206) {
      return this.parse(await new Promise<Answer>((resolve, reject) => this.collect(res, resolve, reject)));
    }
    const resumedFrom = res.statusCode === 206 ? from : 0;
    const hash = createHash('sha256');
    if (resumedFrom > 0) for await (const chunk of createReadStream(part, { end: resumedFrom - 1 })) hash.update(chunk as Buffer);
    let done = resumedFrom;
    const counting = new Transform({
      transform(chunk: Buffer, _encoding, callback) {
        done += chunk.length;
        // No more than the announced size is ever written: a server that keeps sending does not fill the disk.
        if (done > expected.size)
          return callback(new CliError('RESPONSE_TOO_LARGE', `the cloudlet sent more than the ${expected.size} bytes it announced; the download was deleted`));
        hash.update(chunk);
        onProgress(done, resumedFrom);
        callback(null, chunk);
      },
    });
    try {
      await pipeline(res, counting, createWriteStream(part, resumedFrom > 0 ? { flags: 'a' } : {}));
    } catch (err) {
      if (!(err instanceof CliError)) throw err;
      await rm(part, { force: true });
      throw err;
    }
    const sha256 = hash.digest('hex');
    if (sha256 !== expected.sha256 || done !== expected.size) {
      await rm(part, { force: true });
      throw new CliError(
        'CHECKSUM_MISMATCH',
        `the download has SHA-256 ${sha256} (${done} bytes), expected ${expected.sha256} (${expected.size} bytes); it was deleted`,
      );
    }
    await rename(part, dest);
    return { resumedFrom, bytes: done - resumedFrom };
  }

  private parse<T>(answer: Answer): T {
    const text = answer.body.toString();
    let json: unknown;
    try {
      json = text ? JSON.parse(text) : undefined;
    } catch {
      json = undefined;
    }
    if (answer.status >= 400) {
      const error = json as { code?: string; message?: string } | undefined;
      throw new CliError(error?.code ?? `HTTP_${answer.status}`, error?.message ?? `${this.label} answered ${answer.status}: ${text.trim().slice(0, 200)}`);
    }
    return json as T;
  }

  private exchange(method: string, path: string, headers: Record<string, string>, body?: Buffer, signal?: AbortSignal): Promise<Answer> {
    return new Promise((resolve, reject) => {
      const req = this.request(method, path, headers, resolve, reject, this.timeoutMs, signal);
      req.end(body);
    });
  }

  private request(
    method: string,
    path: string,
    headers: Record<string, string>,
    resolve: (answer: Answer) => void,
    reject: (err: Error) => void,
    timeoutMs = this.timeoutMs,
    signal?: AbortSignal,
  ): http.ClientRequest {
    const req = this.open({ method, path, headers, ...(signal ? { signal } : {}) }, (res) => this.collect(res, resolve, reject));
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on('error', (err) => reject(this.unreachable(err)));
    return req;
  }

  /** Reads an answer into memory, up to MAX_ANSWER_BYTES: past that the connection is dropped. */
  private collect(res: http.IncomingMessage, resolve: (answer: Answer) => void, reject: (err: Error) => void): void {
    const chunks: Buffer[] = [];
    let size = 0;
    res.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_ANSWER_BYTES) {
        res.destroy();
        reject(new CliError('RESPONSE_TOO_LARGE', `${this.label} answered with more than ${MAX_ANSWER_BYTES} bytes; not reading the rest`));
        return;
      }
      chunks.push(chunk);
    });
    res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
    res.on('error', (err) => reject(this.unreachable(err)));
  }

  /** The error for a cloudlet that could not be reached (or went away). */
  unreachable(err: Error): CliError {
    return new CliError('UNREACHABLE', `cannot reach the cloudlet at ${this.label}: ${(err as NodeJS.ErrnoException).code ?? err.message}`);
  }
}
