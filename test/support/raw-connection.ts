// A raw-socket HTTP/1.1 client for the route fuzzer (test/fuzz-routes.e2e.test.ts): it sends bytes exactly as
// test/support/http-fuzz.ts built them, malformed framing included (node's own HTTP clients validate what they send), and
// reads back one response at a time, or how the exchange ended without one.
import net from 'node:net';

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
