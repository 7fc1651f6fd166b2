/**
 * Resumable overlay uploads. A client announces the overlay's size and gets an upload id; then it sends bytes from
 * any offset the cloudlet has already received up to (`received`), over as many requests as it takes: a cut
 * connection loses nothing that arrived, and the client asks where to continue. The bytes are handed on, in order,
 * to the synthesis that consumes them as they arrive: the overlay is never spooled to disk.
 */
import { randomUUID } from 'node:crypto';
import { PassThrough, type Readable } from 'node:stream';
import { CloudletError } from '../errors';

export interface UploadView {
  id: string;
  bytes: number;
  received: number;
  state: 'receiving' | 'synthesizing' | 'done' | 'failed';
}

export type AppendOutcome<T> = { complete: false; upload: UploadView } | { complete: true; result: T };

interface Upload<T> {
  id: string;
  bytes: number;
  received: number;
  sink: PassThrough;
  /** Resolves with the synthesis' result; rejects with its error. */
  result: Promise<T>;
  outcome: 'ok' | 'failed' | null;
  /** A request is sending bytes right now. */
  sending: boolean;
  idle?: NodeJS.Timeout;
}

const SINK_BUFFER_BYTES = 4 << 20;

export class UploadSessions<T> {
  private readonly uploads = new Map<string, Upload<T>>();

  constructor(
    /** An upload that gets no bytes for this long is abandoned (and its synthesis cleaned up). */
    private readonly idleMs: number,
    /** How long a finished upload stays visible, so a client whose last response was lost can learn the outcome. */
    private readonly keepMs: number,
  ) {}

  /** Start an upload of `bytes` whose bytes `consume` reads as they come. */
  create(bytes: number, consume: (stream: Readable) => Promise<T>): UploadView {
    const sink = new PassThrough({ highWaterMark: SINK_BUFFER_BYTES });
    const upload: Upload<T> = { id: randomUUID(), bytes, received: 0, sink, result: consume(sink), outcome: null, sending: false };
    upload.result.then(() => { upload.outcome = 'ok'; }, () => { upload.outcome = 'failed'; sink.destroy(); }).finally(() => {
      clearTimeout(upload.idle);
      setTimeout(() => this.uploads.delete(upload.id), this.keepMs).unref();
    });
    this.uploads.set(upload.id, upload);
    this.armIdle(upload);
    return view(upload);
  }

  get(id: string): UploadView {
    return view(this.upload(id));
  }

  /**
   * Bytes of the upload from `offset`, which must be where it stands. Resolves with the synthesis' result once the
   * last byte is in, or with the upload's state when `body` ended (or broke off) before that.
   */
  async append(id: string, offset: number, body: Readable): Promise<AppendOutcome<T>> {
    const upload = this.upload(id);
    if (upload.outcome === 'failed') await upload.result;
    if (upload.sending) throw new CloudletError('CONFLICT', `upload ${id} is receiving bytes on another request`, { details: { received: upload.received } });
    if (offset !== upload.received || upload.received === upload.bytes) {
      throw new CloudletError('CONFLICT', `upload ${id} continues at byte ${upload.received}, not ${offset}`, { details: { received: upload.received } });
    }
    upload.sending = true;
    clearTimeout(upload.idle);
    try {
      for await (const chunk of body as AsyncIterable<Buffer>) {
        if (upload.received + chunk.length > upload.bytes) {
          upload.sink.destroy(new CloudletError('OVERLAY_INVALID', `overlay: more than the announced ${upload.bytes} bytes were sent`));
          break;
        }
        upload.received += chunk.length;
        if (!upload.sink.write(chunk)) await drainOrFailure(upload);
        if (upload.outcome === 'failed') break;
      }
    } catch {
      // The client broke off: what arrived stays; it continues with another request.
    } finally {
      upload.sending = false;
    }
    if (upload.outcome === 'failed' || upload.sink.destroyed) return { complete: true, result: await upload.result };
    if (upload.received < upload.bytes) {
      this.armIdle(upload);
      return { complete: false, upload: view(upload) };
    }
    upload.sink.end();
    return { complete: true, result: await upload.result };
  }

  private upload(id: string): Upload<T> {
    const upload = this.uploads.get(id);
    if (!upload) throw new CloudletError('NOT_FOUND', `no overlay upload ${id}`, { details: { upload_id: id } });
    return upload;
  }

  private armIdle(upload: Upload<T>): void {
    clearTimeout(upload.idle);
    upload.idle = setTimeout(() => {
      upload.sink.destroy(new CloudletError('OVERLAY_INVALID', `overlay: the upload stalled at byte ${upload.received} of ${upload.bytes}`));
    }, this.idleMs);
    upload.idle.unref();
  }
}

function view(upload: Upload<unknown>): UploadView {
  const state = upload.outcome === 'ok' ? 'done' : upload.outcome === 'failed' ? 'failed' : upload.received < upload.bytes ? 'receiving' : 'synthesizing';
  return { id: upload.id, bytes: upload.bytes, received: upload.received, state };
}

/** Waits until the synthesis took the buffered bytes, or failed (and will take no more). */
function drainOrFailure(upload: Upload<unknown>): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      upload.sink.off('drain', done);
      upload.sink.off('close', done);
      resolve();
    };
    upload.sink.once('drain', done);
    upload.sink.once('close', done);
  });
}
