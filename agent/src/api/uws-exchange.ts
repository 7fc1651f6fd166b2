/**
 * One request's side of the uWS transport (uws-transport.ts): reads its body, whole and size-limited or as a stream
 * with backpressure, and writes its reply, always with Content-Length (the KD Android client rejects chunked replies),
 * streaming a file reply from disk a chunk at a time. It remembers an abort, so nothing is ever written to a response
 * uWS has freed, and cuts off a body that stalls or drips (body-pace.ts).
 */
import { STATUS_CODES } from 'node:http';
import { Readable } from 'node:stream';
import type { HttpResponse } from 'uWebSockets.js';
import { CloudletError } from '../errors';
import { BodyPace, type BodyPaceLimits } from './body-pace';
import type { Exchange, OpenedFile } from './request-pipeline';
import type { Reply } from './routing';

/** Files are streamed in chunks of this size: large enough for loopback-speed throughput, small per slow client. */
const FILE_CHUNK_BYTES = 1024 * 1024;
/** How much of a refused upload is read (and dropped) so its uploader still gets the answer; past it, it is cut off. */
const MAX_DISCARDED_BYTES = 16 * 1024 * 1024;

/** One request's response: remembers an abort so nothing is ever written to a response uWS has freed. */
export class UwsExchange implements Exchange {
  private aborted = false;
  private answered = false;
  /** The request body has not been read to its end; answering then must close the connection. */
  private bodyUnread = false;
  private abortListener: (() => void) | undefined;
  /** While an upload's body is still arriving: stop handing it on, discard the rest, then call `then`. */
  private discardBody: ((then: () => void) => void) | undefined;

  /** Cuts a request body that stalls or drips; paused while uWS is paused by us, ended once the body is in. */
  private pace: BodyPace | undefined;

  constructor(
    private readonly res: HttpResponse,
    private readonly paceLimits: BodyPaceLimits,
  ) {
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
