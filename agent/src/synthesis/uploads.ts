/**
 * Resumable overlay uploads that survive an agent restart. A client announces the overlay's size and gets an upload
 * id; then it sends bytes from wherever the cloudlet stands (`received`), over as many requests as it takes: a cut
 * connection loses nothing that arrived, and the client asks where to continue.
 *
 * Each upload is a directory `<root>/<id>/`: `overlay.part`, the bytes so far, and `session.json`, the commit point.
 * The record's `received` is raised only after the bytes up to there are on disk (fdatasync), and the record is
 * replaced atomically (written aside, synced, renamed). The synthesis reads the bytes back from the part file as they
 * arrive, so checking and applying still run while the upload does. The part file is open only while a request writes
 * or a synthesis reads it: an idle session holds no file descriptor, and one owner may have only so many unfinished
 * sessions (`OwnerLimit`).
 *
 * A synthesis runs only while a request delivers bytes, or once all of them are in: it holds a launch slot, a port
 * and perhaps a half-restored domain, which a client that stalls or is cut off must not keep for the idle limit. So
 * it starts with the first request that sends bytes; when it has read everything that arrived and no request is
 * sending, it is stopped (its reader fails as paused, the registry cleans up the failed launch), and the session stays
 * as it was. The next request starts a new synthesis from byte 0 of the part file (local, so quickly caught up); a
 * request that comes while the stopped one still cleans up starts it once that is done. A synthesis that still has
 * received bytes to read when its request ends keeps going, and continues if the next request comes meanwhile.
 *
 * After a restart every session comes back with the bytes its record commits (the part file is cut back to them), and
 * without a synthesis until bytes come again (a session that has all its bytes starts it at once): whatever the cut
 * synthesis had made was swept with its instance directory, so a partial image is never used. A session idle for
 * longer than the idle limit is deleted instead. Once the synthesis has read the last byte, the files are deleted:
 * from then on the instance (adopted after a restart once its VM runs) carries on, and an upload cut by a restart in
 * the second between the two is lost, never doubled.
 */
import { randomUUID } from 'node:crypto';
import { mkdir, open, readdir, readFile, rm, writeFile, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { Readable } from 'node:stream';
import { replaceFile } from '../system/atomic-file';
import type { AppendOutcome, UploadView } from '../core/types';
import { CloudletError, asCloudletError, withDetails } from '../errors';
import { faultPoint } from '../system/fault-points';

/** session.json: what is needed to continue the upload and to start its synthesis again. */
interface SessionRecord<M> {
  id: string;
  bytes: number;
  received: number;
  meta: M;
  updated_at: string;
}

interface Upload<T, M> {
  id: string;
  dir: string;
  bytes: number;
  meta: M;
  /** Bytes in the part file. */
  received: number;
  /** Bytes the record commits. */
  committed: number;
  updatedAt: number;
  /** The upload's outcome: the result of the synthesis that read every byte, or why the upload failed. */
  result: Promise<T>;
  conclude: (outcome: Outcome<T>) => void;
  outcome: Outcome<T> | null;
  /** Why the upload was given up (stalled, too many bytes, a write failed): the synthesis reads no further. */
  abandoned: CloudletError | null;
  /** The synthesis running (or stopped and still cleaning up), if any. */
  synthesis: Synthesis | null;
  /** The synthesis waiting for more bytes (or for the request to end). */
  waiters: { resolve: () => void; reject: (err: Error) => void }[];
  /** A request is sending bytes right now. */
  sending: boolean;
  idle?: NodeJS.Timeout;
  /** Commits and the final removal of the files, one after the other (a record must not land in a removed directory). */
  files: Promise<void>;
  removed: boolean;
}

type Outcome<T> = { ok: true; value: T } | { ok: false; error: CloudletError };

interface Synthesis {
  /** Its reader caught up with the bytes while no request was sending: it failed, and its failure is not the upload's. */
  paused: boolean;
}

const SESSION = 'session.json';
const PART = 'overlay.part';
/** The record is committed at least every this many bytes of a request, and at its end. */
const COMMIT_BYTES = 8 << 20;
/** What the synthesis reads of the part file at a time. */
const READ_BYTES = 1 << 20;
const ID = /^[0-9a-f-]{36}$/;

/** Who an upload belongs to, and how many unfinished uploads one owner may have at a time. */
export interface OwnerLimit<M> {
  /** The owner of an upload; undefined for one no limit applies to (the operator's). */
  ownerOf: (meta: M) => string | undefined;
  max: number;
}

export class UploadSessions<T, M extends object> {
  private readonly uploads = new Map<string, Upload<T, M>>();
  /** Uploads being created, per owner: counted against the limit before they are in `uploads`. */
  private readonly creating = new Map<string, number>();

  constructor(
    private readonly root: string,
    /**
     * The synthesis of an upload: reads the overlay's `bytes` bytes from `stream` as they arrive. `arrived` resolves
     * once every byte is on the cloudlet (what it waits for before taking a launch slot), and fails as the stream does.
     */
    private readonly consume: (stream: Readable, bytes: number, meta: M, arrived: () => Promise<void>) => Promise<T>,
    /** An upload that gets no bytes for this long is abandoned (its files deleted). */
    private readonly idleMs: number,
    /** How long a finished upload stays visible, so a client whose last response was lost can learn the outcome. */
    private readonly keepMs: number,
    private readonly log: (line: string) => void,
    /**
     * Each unfinished upload holds disk space and a timer for up to the idle limit: one device must not be able to
     * make them without end.
     */
    private readonly ownerLimit?: OwnerLimit<M>,
  ) {}

  /** Reload the sessions an earlier agent left: continue the fresh ones, delete the stale and the broken. */
  async load(): Promise<void> {
    await mkdir(this.root, { recursive: true, mode: 0o700 });
    for (const entry of await readdir(this.root)) {
      const dir = path.join(this.root, entry);
      try {
        const record = parseRecord<M>(await readFile(path.join(dir, SESSION), 'utf8'), entry);
        const idleFor = Date.now() - Date.parse(record.updated_at);
        if (idleFor > this.idleMs) {
          this.log(`uploads: deleting upload ${entry}, idle for ${Math.round(idleFor / 1000)} s`);
          await rm(dir, { recursive: true, force: true });
          continue;
        }
        const file = await open(path.join(dir, PART), 'r+');
        // Bytes past the commit point may be torn; the client sends them again.
        await file.truncate(record.received).finally(() => file.close());
        const upload = this.begin({ ...record, dir, updatedAt: Date.parse(record.updated_at) });
        // Its last request was cut by the restart, but nothing more is needed: the synthesis need not wait for one.
        if (upload.received === upload.bytes) this.synthesize(upload);
        this.log(`uploads: continuing upload ${entry} at byte ${record.received} of ${record.bytes}`);
      } catch (err) {
        this.log(`uploads: deleting ${dir}: ${(err as Error).message}`);
        await rm(dir, { recursive: true, force: true });
      }
    }
  }

  /**
   * Start an upload of `bytes`; its synthesis starts with the first request that sends bytes. An owner with as many
   * unfinished uploads as its limit allows gets TOO_MANY_UPLOADS.
   */
  async create(bytes: number, meta: M): Promise<UploadView<T>> {
    const limit = this.ownerLimit;
    const owner = limit?.ownerOf(meta);
    if (limit && owner !== undefined) this.reserve(owner, limit);
    try {
      const id = randomUUID();
      const dir = path.join(this.root, id);
      await mkdir(dir, { mode: 0o700 });
      try {
        await writeFile(path.join(dir, PART), '', { flag: 'wx', mode: 0o600 });
        await writeRecord(dir, { id, bytes, received: 0, meta, updated_at: new Date().toISOString() });
        return view(this.begin({ id, bytes, received: 0, meta, dir, updatedAt: Date.now() }));
      } catch (err) {
        await rm(dir, { recursive: true, force: true });
        throw asCloudletError(err);
      }
    } finally {
      if (owner !== undefined) this.unreserve(owner);
    }
  }

  /** Bytes announced by unfinished uploads and not yet received: the disk space they may still fill. */
  outstandingBytes(): number {
    let bytes = 0;
    for (const upload of this.uploads.values()) if (!upload.outcome && !upload.abandoned) bytes += upload.bytes - upload.received;
    return bytes;
  }

  /** Count an upload about to be created against its owner's limit (synchronously, so concurrent creates count too). */
  private reserve(owner: string, { ownerOf, max }: OwnerLimit<M>): void {
    let live = this.creating.get(owner) ?? 0;
    for (const upload of this.uploads.values()) if (!upload.outcome && ownerOf(upload.meta) === owner) live += 1;
    if (live >= max) {
      throw new CloudletError('TOO_MANY_UPLOADS', `at most ${max} overlay uploads may be unfinished at a time; finish or wait for one first`, {
        details: { limit: max },
      });
    }
    this.creating.set(owner, (this.creating.get(owner) ?? 0) + 1);
  }

  private unreserve(owner: string): void {
    const left = (this.creating.get(owner) ?? 1) - 1;
    if (left > 0) this.creating.set(owner, left);
    else this.creating.delete(owner);
  }

  /** `visible`: whether the asker may see this upload (whose `meta` it is); one it may not is NOT_FOUND to it. */
  get(id: string, visible?: (meta: M) => boolean): UploadView<T> {
    return view(this.upload(id, visible));
  }

  /**
   * Bytes of the upload from `offset`, which must be where it stands. Resolves with the synthesis' result once the
   * last byte is in, or with the upload's state when `body` ended (or broke off) before that.
   */
  async append(id: string, offset: number, body: Readable, visible?: (meta: M) => boolean): Promise<AppendOutcome<T>> {
    const upload = this.upload(id, visible);
    if (upload.outcome && !upload.outcome.ok) throw upload.outcome.error;
    if (upload.abandoned) throw upload.abandoned;
    if (upload.sending) throw new CloudletError('CONFLICT', `upload ${id} is receiving bytes on another request`, { details: { received: upload.received } });
    if (offset !== upload.received || upload.received === upload.bytes) {
      throw new CloudletError('CONFLICT', `upload ${id} continues at byte ${upload.received}, not ${offset}`, { details: { received: upload.received } });
    }
    upload.sending = true;
    clearTimeout(upload.idle);
    // Opened per request, not held by the session: an idle upload holds no file descriptor.
    let file: FileHandle;
    try {
      file = await open(path.join(upload.dir, PART), 'r+');
    } catch (err) {
      upload.sending = false;
      this.armIdle(upload);
      throw asCloudletError(err);
    }
    // A synthesis still running continues; one still cleaning up after its pause starts again once done (settle).
    if (!upload.synthesis) this.synthesize(upload);
    let cut: CloudletError | null;
    try {
      cut = await this.receive(upload, file, body);
    } finally {
      // Not through the commit: a client that reconnects at once continues while it is made (commits are serialized).
      upload.sending = false;
      // A synthesis waiting for bytes that no request sends any more stops (see follow).
      this.wake(upload);
    }
    await this.commit(upload, file)
      .catch((err: unknown) => this.abandon(upload, asCloudletError(err)))
      .finally(() => file.close().catch(() => {}));
    if (upload.abandoned || upload.outcome) return { complete: true, result: await upload.result };
    if (upload.received < upload.bytes) {
      this.armIdle(upload);
      // Cut by the server (it stalled or dripped): the client is told so, and where to continue.
      if (cut) throw withDetails(cut, { upload_id: upload.id, received: upload.received });
      return { complete: false, upload: view(upload) };
    }
    return { complete: true, result: await upload.result };
  }

  /** Returns the server's own reason when it cut the body off (REQUEST_TIMEOUT); a client that broke off returns null. */
  private async receive(upload: Upload<T, M>, file: FileHandle, body: Readable): Promise<CloudletError | null> {
    try {
      for await (const chunk of body as AsyncIterable<Buffer>) {
        if (upload.received + chunk.length > upload.bytes) {
          this.abandon(upload, new CloudletError('OVERLAY_INVALID', `overlay: more than the announced ${upload.bytes} bytes were sent`));
          return null;
        }
        try {
          await file.write(chunk, 0, chunk.length, upload.received);
          upload.received += chunk.length;
          this.wake(upload);
          if (upload.received - upload.committed >= COMMIT_BYTES) await this.commit(upload, file);
          if (upload.received * 2 >= upload.bytes) faultPoint('synthesis:mid-upload');
        } catch (err) {
          this.abandon(upload, asCloudletError(err));
          return null;
        }
        if (upload.outcome) return null;
      }
    } catch (err) {
      // The client broke off, or was cut off: what arrived stays; it continues with another request.
      if (err instanceof CloudletError && err.code === 'REQUEST_TIMEOUT') return err;
    }
    return null;
  }

  /** Make the bytes received so far durable (through `file`, the part file as the writing request opened it), then record it. */
  private commit(upload: Upload<T, M>, file: FileHandle): Promise<void> {
    return this.onFiles(upload, async () => {
      if (upload.removed || upload.received === upload.committed) return;
      const received = upload.received;
      await file.datasync();
      upload.updatedAt = Date.now();
      await writeRecord(upload.dir, { id: upload.id, bytes: upload.bytes, received, meta: upload.meta, updated_at: new Date(upload.updatedAt).toISOString() });
      upload.committed = received;
    });
  }

  /** Delete the upload's files (once: after that, nothing is committed any more). */
  private remove(upload: Upload<T, M>): Promise<void> {
    return this.onFiles(upload, async () => {
      if (upload.removed) return;
      upload.removed = true;
      await rm(upload.dir, { recursive: true, force: true }).catch((err: Error) => this.log(`uploads: cannot delete ${upload.dir}: ${err.message}`));
    });
  }

  private onFiles(upload: Upload<T, M>, work: () => Promise<void>): Promise<void> {
    const done = upload.files.then(work);
    upload.files = done.catch(() => {});
    return done;
  }

  /** `updatedAt`: the last activity, from which the idle limit counts (also across a restart). */
  private begin(session: { id: string; bytes: number; received: number; meta: M; dir: string; updatedAt: number }): Upload<T, M> {
    let conclude!: (outcome: Outcome<T>) => void;
    const result = new Promise<T>((resolve, reject) => {
      conclude = (outcome) => (outcome.ok ? resolve(outcome.value) : reject(outcome.error));
    });
    result.catch(() => {}); // an upload that failed with no request waiting is told by get()
    const upload: Upload<T, M> = {
      ...session,
      committed: session.received,
      result,
      conclude: null!,
      outcome: null,
      abandoned: null,
      synthesis: null,
      waiters: [],
      sending: false,
      files: Promise.resolve(),
      removed: false,
    };
    upload.conclude = (outcome) => {
      if (upload.outcome) return;
      upload.outcome = outcome;
      conclude(outcome);
      void this.finish(upload);
    };
    this.uploads.set(upload.id, upload);
    if (upload.received < upload.bytes) this.armIdle(upload);
    return upload;
  }

  /** Start a synthesis of the upload, reading from byte 0. */
  private synthesize(upload: Upload<T, M>): void {
    const synthesis: Synthesis = { paused: false };
    upload.synthesis = synthesis;
    const arrived = () => this.awaitBytes(upload, synthesis, () => upload.received === upload.bytes);
    new Promise<T>((resolve) => resolve(this.consume(this.follow(upload, synthesis), upload.bytes, upload.meta, arrived))).then(
      (value) => this.settle(upload, synthesis, { ok: true, value }),
      (err: unknown) => this.settle(upload, synthesis, { ok: false, error: asCloudletError(err) }),
    );
  }

  /** A synthesis ended: a paused one leaves the upload open (and is followed by the next); any other decides it. */
  private settle(upload: Upload<T, M>, synthesis: Synthesis, outcome: Outcome<T>): void {
    upload.synthesis = null;
    if (outcome.ok || !synthesis.paused) return upload.conclude(outcome);
    if (upload.abandoned) return upload.conclude({ ok: false, error: upload.abandoned });
    this.log(`uploads: upload ${upload.id} paused at byte ${upload.received} of ${upload.bytes}; its synthesis stopped until bytes come again`);
    if (upload.sending || upload.received === upload.bytes) this.synthesize(upload);
    return undefined;
  }

  /** The upload's bytes as they arrive, read back from the part file, for as long as a request sends them. */
  private follow(upload: Upload<T, M>, synthesis: Synthesis): Readable {
    let at = 0;
    let file: Promise<FileHandle> | null = null;
    const next = async (): Promise<Buffer | null> => {
      file ??= open(path.join(upload.dir, PART), 'r');
      await this.awaitBytes(upload, synthesis, () => at < upload.received || at === upload.bytes);
      if (at === upload.bytes) {
        // Everything was read: the bytes are no longer needed (see the file's header).
        await this.remove(upload);
        return null;
      }
      const length = Math.min(upload.received - at, READ_BYTES);
      const { bytesRead, buffer } = await (await file).read(Buffer.allocUnsafe(length), 0, length, at);
      if (bytesRead === 0) throw new CloudletError('INTERNAL', `upload ${upload.id}: its file ends at ${at} bytes, before the ${upload.received} received`);
      at += bytesRead;
      return buffer.subarray(0, bytesRead);
    };
    const stream: Readable = new Readable({
      highWaterMark: 4 * READ_BYTES,
      read: () => {
        next().then(
          (chunk) => stream.push(chunk),
          (err: Error) => stream.destroy(err),
        );
      },
      destroy: (err, callback) => {
        if (!file) return callback(err);
        return void file
          .then((f) => f.close())
          .catch(() => {})
          .finally(() => callback(err));
      },
    });
    return stream;
  }

  /**
   * Waits until `enough()` holds, for as long as a request is sending bytes: once none is, the synthesis is paused
   * (it fails, and settle leaves the upload open for the next request).
   */
  private async awaitBytes(upload: Upload<T, M>, synthesis: Synthesis, enough: () => boolean): Promise<void> {
    while (!enough()) {
      if (!upload.sending) synthesis.paused = true;
      if (synthesis.paused) throw new CloudletError('CONFLICT', `upload ${upload.id} is paused at byte ${upload.received}: no request is sending bytes`);
      await this.arrival(upload);
    }
  }

  /** Resolves when more bytes arrived or the request sending them ended; rejects once the upload is abandoned. */
  private arrival(upload: Upload<T, M>): Promise<void> {
    if (upload.abandoned) return Promise.reject(upload.abandoned);
    return new Promise((resolve, reject) => upload.waiters.push({ resolve, reject }));
  }

  private wake(upload: Upload<T, M>): void {
    for (const waiter of upload.waiters.splice(0)) waiter.resolve();
  }

  /** Give up the upload: its synthesis, if one runs, fails with `error` at the next byte it waits for. */
  private abandon(upload: Upload<T, M>, error: CloudletError): void {
    upload.abandoned ??= error;
    for (const waiter of upload.waiters.splice(0)) waiter.reject(upload.abandoned);
    if (!upload.synthesis) upload.conclude({ ok: false, error: upload.abandoned });
  }

  private async finish(upload: Upload<T, M>): Promise<void> {
    clearTimeout(upload.idle);
    // A read-ahead of the synthesis may still wait for bytes that will never be needed.
    for (const waiter of upload.waiters.splice(0)) waiter.reject(new CloudletError('CONFLICT', `upload ${upload.id} is finished`));
    await this.remove(upload);
    setTimeout(() => this.uploads.delete(upload.id), this.keepMs).unref();
  }

  private upload(id: string, visible: (meta: M) => boolean = () => true): Upload<T, M> {
    const upload = this.uploads.get(id);
    if (!upload || !visible(upload.meta)) throw new CloudletError('NOT_FOUND', `no overlay upload ${id}`, { details: { upload_id: id } });
    return upload;
  }

  private armIdle(upload: Upload<T, M>): void {
    clearTimeout(upload.idle);
    upload.idle = setTimeout(
      () => {
        if (upload.sending) return; // the request sending now arms it again when it ends
        this.abandon(upload, new CloudletError('OVERLAY_INVALID', `overlay: the upload stalled at byte ${upload.received} of ${upload.bytes}`));
      },
      Math.max(0, upload.updatedAt + this.idleMs - Date.now()),
    );
    upload.idle.unref();
  }
}

function view<T>(upload: Upload<T, object>): UploadView<T> {
  const { outcome } = upload;
  const state = outcome ? (outcome.ok ? 'done' : 'failed') : upload.received < upload.bytes ? 'receiving' : 'synthesizing';
  return {
    id: upload.id,
    bytes: upload.bytes,
    received: upload.received,
    state,
    result: outcome?.ok ? outcome.value : null,
    error: outcome && !outcome.ok ? outcome.error : null,
  };
}

/** Written aside, synced and renamed over the old one: a crash, even a power loss, leaves either record whole. */
function writeRecord<M>(dir: string, record: SessionRecord<M>): Promise<void> {
  return replaceFile(path.join(dir, SESSION), JSON.stringify(record));
}

function parseRecord<M>(text: string, id: string): SessionRecord<M> {
  const record = JSON.parse(text) as Partial<SessionRecord<M>>;
  const count = (n: unknown) => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;
  if (
    !ID.test(id) ||
    record.id !== id ||
    !count(record.bytes) ||
    !count(record.received) ||
    record.received! > record.bytes! ||
    typeof record.meta !== 'object' ||
    record.meta === null ||
    Number.isNaN(Date.parse(record.updated_at ?? ''))
  ) {
    throw new Error('not an upload record');
  }
  return record as SessionRecord<M>;
}
