/**
 * VM Synthesis on the cloudlet: read an overlay as its bytes arrive, check it, and rebuild the Service VM's disk (a
 * qcow2 overlay on the base's disk, never a copy) and saved memory state in an instance directory. Frames are
 * checked against their SHA-256 and fed to a streaming decompressor as they arrive, while the content of the earlier
 * ones is applied. Every record is bounds-checked: a copy may only read the base or what is already final.
 *
 * The memory state is restored while it is rebuilt. Its records come after every disk record, so the disk is
 * complete (tables and header written) before the first memory byte is handed to the restore, that is before QEMU
 * even starts. QEMU resumes the guest only after the whole migration stream was read, and the last batch of it is
 * held back until every frame was checked and decoded to its exact size: a VM never runs on a partial overlay. If
 * anything fails, the stream breaks off, the restore fails, and the caller cleans up the domain and the files.
 */
import type { KeyObject } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import type { BaseVm } from '../core/bases';
import { readSaveImageHeaderFrom, type LiveMigrationStream, type SaveImageHeader } from '../vm/save-image';
import { ImageReader, Qcow2OverlayWriter, qcow2OverlayMaxBytes } from '../images/qcow2-overlay';
import {
  BLOCK_BYTES,
  decodeHeader,
  decodeManifest,
  decodeRecords,
  hasData,
  HEADER_BYTES,
  invalid,
  OVERLAY_LIMITS,
  overlayBytes,
  sha256,
  Source,
  Target,
  type OverlayManifest,
  type OverlayRecord,
} from './overlay-format';
import { ByteReader } from '../images/byte-reader';
import { openFrameDecoder, type FrameDecoder, zstdReference } from '../images/zstd';

const MEMORY_WRITE_BUFFER = 1 << 20;
/** Memory state bytes rebuilt ahead of the restore reading them, before the applying waits. */
const MEMORY_PIPE_BYTES = 8 << 20;
/** Copies being read ahead of the record being stored. */
const READS_IN_FLIGHT = 64;
/** Copies mostly read forward through a source (a file's pages in order, pages in address order): read in windows. */
const READ_WINDOW_BYTES = 1 << 20;
const READ_WINDOWS = 8;
/**
 * A copy or a run of zeros may claim up to 4 GiB in a 24-byte record: it is read and stored in pieces of at most this
 * many bytes, so the buffers in flight stay within READS_IN_FLIGHT of them (16 MiB) whatever the overlay says.
 */
const PIECE_BYTES = 256 << 10;

export interface OpenedOverlay {
  manifest: OverlayManifest;
  /** Size of the whole overlay. */
  bytes: number;
  /** Positioned at the first frame. */
  reader: ByteReader;
}

/**
 * Reads and checks the header, manifest and signature. `declaredBytes` (an upload's announced size, a file's size)
 * must be the size the manifest describes: a truncated or padded overlay is refused before anything is made.
 */
export async function openOverlay(stream: Readable, declaredBytes: number, trustedKeys: KeyObject[]): Promise<OpenedOverlay> {
  const reader = new ByteReader(stream, (endsAt) => invalid(`truncated: it ends after ${endsAt} bytes`));
  try {
    const header = decodeHeader(await reader.read(Math.min(HEADER_BYTES, declaredBytes)));
    const manifestBytes = await reader.read(header.manifestBytes);
    const signature = await reader.read(header.signatureBytes);
    const manifest = decodeManifest(header, manifestBytes, signature, trustedKeys);
    const bytes = overlayBytes(header, manifest);
    if (bytes !== declaredBytes)
      throw invalid(`its manifest describes ${bytes} bytes, but ${declaredBytes} were sent${declaredBytes < bytes ? ' (truncated)' : ''}`);
    return { manifest, bytes, reader };
  } catch (err) {
    await reader.close();
    throw err;
  }
}

/**
 * The most an overlay can expand to on disk: its disk with every cluster written, and its memory state. The records
 * cannot write more (each one is checked against these sizes), so this is what the free space is checked against
 * before anything is written: a few-KB overlay that claims a terabyte is refused at once.
 */
export function expandedBytes(manifest: OverlayManifest): number {
  return qcow2OverlayMaxBytes(manifest.disk.virtual_size) + (manifest.memory?.bytes ?? 0);
}

/** A memory state being rebuilt: its header, then its migration stream as the overlay is applied. */
export interface LiveMemoryState {
  header: SaveImageHeader;
  stream: LiveMigrationStream;
}

/**
 * Rebuild the overlay's disk (a qcow2 on the base's disk) and memory state (when it has one) at `to`, new files.
 * `launch` is called once the disk is complete: with the memory state as it is being rebuilt, to restore it while the
 * rest is applied, or with null for a service that cold-boots (then after everything was applied). Resolves with what
 * `launch` resolved with. `progress` gets the overlay bytes applied so far. On failure the files are left for the
 * caller to remove.
 */
export async function applyOverlay<T>(
  overlay: OpenedOverlay,
  base: BaseVm,
  to: { disk: string; memory: string | null },
  progress: (done: number, total: number) => void,
  launch: (memory: LiveMemoryState | null) => Promise<T>,
): Promise<T> {
  const { manifest, reader } = overlay;
  const baseDiskPath = path.join(base.dir, base.manifest.disk);
  const baseDisk = await ImageReader.open(baseDiskPath);
  let baseMemory: FileHandle | null = null;
  let disk: Qcow2OverlayWriter | null = null;
  let memory: FileHandle | null = null;
  let decoder: FrameDecoder | null = null;
  const pipe = to.memory ? new MemoryPipe() : null;
  let launching: Promise<T> | null = null;
  const startLaunch = () => {
    launching = pipe ? restoreWhileApplying(pipe, manifest.memory!.bytes, launch) : launch(null);
    launching.catch((err: unknown) => pipe?.fail(err)); // a failed launch stops the applying
  };
  try {
    const baseMemoryPath = base.manifest.state && path.join(base.dir, base.manifest.state);
    baseMemory = baseMemoryPath ? await open(baseMemoryPath, 'r') : null;
    const baseMemoryBytes = baseMemory ? (await baseMemory.stat()).size : 0;
    const reference =
      manifest.reference === 'base-memory' && baseMemoryPath ? zstdReference(baseMemoryPath, baseMemoryBytes, OVERLAY_LIMITS.frameRawBytes) : null;
    if (manifest.reference && !reference) throw invalid('its frames are compressed against a base memory state this base does not have or is too large for');
    decoder = await openFrameDecoder(reference ?? undefined);
    const frames = decoder;
    disk = await Qcow2OverlayWriter.create(to.disk, baseDiskPath, baseDisk, manifest.disk.virtual_size);
    if (!manifest.memory !== !to.memory) throw invalid('the overlay and its service disagree on a memory state');
    memory = to.memory ? await open(to.memory, 'wx+', 0o600) : null;
    const applier = new RecordApplier(manifest, baseDisk, baseMemoryBytes, baseMemory, disk, memory, pipe, startLaunch);
    // The frames are checked and fed to one streaming zstd as they arrive, while their content is applied.
    const feeding = (async () => {
      for (const [i, entry] of manifest.frames.entries()) {
        const frame = await reader.read(entry.bytes);
        if (sha256(frame) !== entry.sha256) throw invalid(`frame ${i} does not match its SHA-256 (corrupted)`);
        await frames.write(frame);
      }
      if (!(await reader.atEnd())) throw invalid('trailing bytes after the last frame');
      frames.end();
    })();
    const fed = feeding.then(() => new Promise<never>(() => {}));
    fed.catch(() => {}); // observed through the race below
    let applied = overlay.bytes - manifest.frames.reduce((sum, f) => sum + f.bytes, 0);
    for (const entry of manifest.frames) {
      const frame = await Promise.race([decoder.read(entry.raw_bytes), fed]);
      for (const record of decodeRecords(frame)) await applier.apply(record);
      applied += entry.bytes;
      progress(applied, overlay.bytes);
    }
    await feeding;
    await decoder.finish();
    await applier.finish();
    return await launching!;
  } catch (err) {
    pipe?.fail(err);
    await (launching as Promise<T> | null)?.catch(() => {}); // it fails too: the stream broke off
    throw err;
  } finally {
    decoder?.close();
    await reader.close();
    await disk?.close();
    await memory?.close();
    await baseMemory?.close();
    await baseDisk.close();
  }
}

/**
 * Applies records in order, checking that each one writes forward and reads only what is final. The reads of the
 * copies are started up to READS_IN_FLIGHT records ahead (most read the base or the finished disk); a record that
 * reads what earlier records write first waits until they are stored.
 */
class RecordApplier {
  private readonly baseDiskWindows: ReadWindows;
  private readonly baseMemoryWindows: ReadWindows;
  /** For memory records only: the disk is final by then. */
  private readonly finalDiskWindows: ReadWindows;
  private diskEnd = 0;
  private memoryEnd = 0;
  private lastTarget: Target | null = null;
  private readonly inFlight: { record: OverlayRecord; data: Promise<Buffer> }[] = [];
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private memoryFlushed = 0;
  private memoryStarted = false;
  private diskComplete = false;
  /** The last batch of memory written to the file, not yet handed to the restore. */
  private heldBack: Buffer | null = null;

  constructor(
    private readonly manifest: OverlayManifest,
    private readonly baseDisk: ImageReader,
    private readonly baseMemoryBytes: number,
    baseMemory: FileHandle | null,
    private readonly disk: Qcow2OverlayWriter,
    private readonly memory: FileHandle | null,
    private readonly pipe: MemoryPipe | null,
    private readonly onDiskComplete: () => void,
  ) {
    this.baseDiskWindows = new ReadWindows((offset, length) => baseDisk.read(offset, length), baseDisk.size);
    this.baseMemoryWindows = new ReadWindows((offset, length) => readAt(baseMemory!, offset, length), baseMemoryBytes);
    this.finalDiskWindows = new ReadWindows((offset, length) => disk.read(offset, length), manifest.disk.virtual_size);
  }

  async apply(r: OverlayRecord): Promise<void> {
    this.check(r);
    if (hasData(r.source) || r.length <= PIECE_BYTES) return this.start(r);
    for (let at = 0; at < r.length; at += PIECE_BYTES) {
      await this.start({ ...r, offset: r.offset + at, sourceOffset: r.sourceOffset + at, length: Math.min(PIECE_BYTES, r.length - at) });
    }
  }

  /** Starts reading a checked record's bytes (a piece of it, for a long copy), storing the oldest when enough are in flight. */
  private async start(r: OverlayRecord): Promise<void> {
    const readsOwnWrites = r.source === Source.TargetMemory || (r.source === Source.TargetDisk && r.target === Target.Disk) || r.target !== this.lastTarget;
    this.lastTarget = r.target;
    if (readsOwnWrites) await this.drain();
    if (r.target === Target.Memory && !this.diskComplete) await this.completeDisk();
    const data = this.bytes(r);
    data.catch(() => {}); // observed in store order
    this.inFlight.push({ record: r, data });
    if (this.inFlight.length >= READS_IN_FLIGHT) await this.storeOldest();
  }

  private check(r: OverlayRecord): void {
    if (r.target === Target.Disk) {
      if (this.memoryStarted) throw invalid('a disk record after the memory records');
      if (
        r.offset % BLOCK_BYTES !== 0 ||
        r.length % BLOCK_BYTES !== 0 ||
        r.length === 0 ||
        r.offset < this.diskEnd ||
        r.offset + r.length > this.manifest.disk.virtual_size
      )
        throw invalid(`a disk record out of order or bounds at ${r.offset}`);
      this.diskEnd = r.offset + r.length;
    } else {
      if (!this.memory || r.offset !== this.memoryEnd || r.offset + r.length > this.manifest.memory!.bytes) {
        throw invalid(`a memory record out of order or bounds at ${r.offset}`);
      }
      this.memoryStarted = true;
      this.memoryEnd += r.length;
    }
    const within = (limit: number) => {
      if (r.sourceOffset + r.length > limit) throw invalid(`a record copies from beyond what it may read (source ${r.source} at ${r.sourceOffset})`);
    };
    switch (r.source) {
      case Source.BaseDisk:
      case Source.XorBaseDisk:
        return within(this.baseDisk.size);
      case Source.BaseMemory:
      case Source.XorBaseMemory:
        return within(this.baseMemoryBytes);
      // Memory records come after every disk record, so the whole disk is final for them.
      case Source.TargetDisk:
        return within(r.target === Target.Disk ? r.offset : this.manifest.disk.virtual_size);
      case Source.TargetMemory:
        return within(r.offset);
      default:
        return undefined;
    }
  }

  private async bytes(r: OverlayRecord): Promise<Buffer> {
    switch (r.source) {
      case Source.Literal:
        return r.data!;
      case Source.Zero:
        return Buffer.alloc(r.target === Target.Disk ? 0 : r.length); // the disk stores zeros as a flag
      case Source.BaseDisk:
        return this.baseDiskWindows.read(r.sourceOffset, r.length);
      case Source.BaseMemory:
        return this.baseMemoryWindows.read(r.sourceOffset, r.length);
      case Source.TargetDisk:
        return r.target === Target.Memory ? this.finalDiskWindows.read(r.sourceOffset, r.length) : this.disk.read(r.sourceOffset, r.length);
      case Source.TargetMemory:
        return readAt(this.memory!, r.sourceOffset, r.length);
      case Source.XorBaseDisk:
      case Source.XorBaseMemory: {
        const old = await (r.source === Source.XorBaseDisk ? this.baseDiskWindows : this.baseMemoryWindows).read(r.sourceOffset, r.length);
        return xor(old, r.data!);
      }
    }
  }

  private async storeOldest(): Promise<void> {
    const { record, data } = this.inFlight.shift()!;
    const bytes = await data;
    if (record.target === Target.Disk) {
      if (record.source === Source.Zero) this.disk.zero(record.offset, record.length);
      else await this.disk.write(record.offset, bytes);
      return;
    }
    this.pending.push(bytes);
    this.pendingBytes += bytes.length;
    if (this.pendingBytes >= MEMORY_WRITE_BUFFER) await this.flushMemory();
  }

  /** Stores every record started so far. */
  private async drain(): Promise<void> {
    while (this.inFlight.length > 0) await this.storeOldest();
    await this.flushMemory();
  }

  /** Writes the pending memory to its file and hands the batch before it to the restore (one batch stays held back). */
  private async flushMemory(): Promise<void> {
    if (this.pendingBytes === 0) return;
    const batch = this.pending.length === 1 ? this.pending[0]! : Buffer.concat(this.pending, this.pendingBytes);
    this.pending = [];
    this.pendingBytes = 0;
    const released = this.heldBack;
    this.heldBack = batch;
    await Promise.all([this.memory!.write(batch, 0, batch.length, this.memoryFlushed), released && this.pipe!.write(released)]);
    this.memoryFlushed += batch.length;
  }

  /** The disk's tables and header are written: the image is complete, and the launch can start. */
  private async completeDisk(): Promise<void> {
    this.diskComplete = true;
    await this.disk.finish();
    this.onDiskComplete();
  }

  /** After every frame was checked and decoded: the rest is stored, and the restore gets the last of the memory. */
  async finish(): Promise<void> {
    await this.drain();
    if (!this.diskComplete) await this.completeDisk();
    if (this.manifest.memory && this.memoryFlushed !== this.manifest.memory.bytes) {
      throw invalid(`the memory state is ${this.memoryFlushed} bytes, not the ${this.manifest.memory.bytes} of the manifest`);
    }
    if (this.heldBack) await this.pipe!.write(this.heldBack);
    this.pipe?.end();
  }
}

/** Reads the rebuilt memory state's header from the pipe, then launches with the rest of it as a live stream. */
async function restoreWhileApplying<T>(pipe: MemoryPipe, bytes: number, launch: (memory: LiveMemoryState) => Promise<T>): Promise<T> {
  const reader = new ByteReader(pipe, () => invalid('the memory state ends inside its header'));
  const header = await readSaveImageHeaderFrom((n) => reader.read(n));
  return launch({ header, stream: { chunks: reader.rest(), bytes: bytes - header.streamOffset } });
}

/** Memory state bytes from the applier to the restore. write() waits while more than MEMORY_PIPE_BYTES are unread. */
class MemoryPipe implements AsyncIterable<Buffer> {
  private readonly queue: Buffer[] = [];
  private queuedBytes = 0;
  private ended = false;
  private failure: { error: unknown } | null = null;
  private waiters: (() => void)[] = [];

  async write(chunk: Buffer): Promise<void> {
    this.throwIfFailed();
    this.queue.push(chunk);
    this.queuedBytes += chunk.length;
    this.notify();
    while (this.queuedBytes > MEMORY_PIPE_BYTES && !this.failure) await this.change();
    this.throwIfFailed();
  }

  end(): void {
    this.ended = true;
    this.notify();
  }

  /** Both sides see `error` from now on: the reader instead of more bytes, the writer on its next write. */
  fail(error: unknown): void {
    this.failure ??= { error };
    this.notify();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<Buffer> {
    for (;;) {
      this.throwIfFailed();
      const chunk = this.queue.shift();
      if (chunk) {
        this.queuedBytes -= chunk.length;
        this.notify();
        yield chunk;
      } else if (this.ended) {
        return;
      } else {
        await this.change();
      }
    }
  }

  private throwIfFailed(): void {
    if (this.failure) throw this.failure.error;
  }

  private change(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  private notify(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }
}

/** a XOR b, in 32-bit words: both are copied to fresh (aligned) buffers first, which costs far less than bytewise XOR. */
function xor(a: Buffer, b: Buffer): Buffer {
  const out = Buffer.from(new ArrayBuffer(a.length));
  a.copy(out);
  const other = Buffer.from(new ArrayBuffer(b.length));
  b.copy(other);
  const words = a.length >> 2;
  const x = new Uint32Array(out.buffer, 0, words);
  const y = new Uint32Array(other.buffer, 0, words);
  for (let i = 0; i < words; i++) x[i]! ^= y[i]!;
  for (let i = words << 2; i < a.length; i++) out[i]! ^= other[i]!;
  return out;
}

/** Reads of a file that does not change, served from the last few 1 MiB windows read from it. */
class ReadWindows {
  private windows: { start: number; end: number; data: Promise<Buffer> }[] = [];

  constructor(
    private readonly readDirect: (offset: number, length: number) => Promise<Buffer>,
    private readonly size: number,
  ) {}

  /** A view of the bytes: callers must not change it. */
  async read(offset: number, length: number): Promise<Buffer> {
    if (length > READ_WINDOW_BYTES) return this.readDirect(offset, length);
    let window = this.windows.find((w) => offset >= w.start && offset + length <= w.end);
    if (!window) {
      const end = Math.min(this.size, offset + READ_WINDOW_BYTES);
      window = { start: offset, end, data: this.readDirect(offset, end - offset) };
      this.windows = [window, ...this.windows.slice(0, READ_WINDOWS - 1)];
    }
    const data = await window.data;
    return data.subarray(offset - window.start, offset - window.start + length);
  }
}

async function readAt(file: FileHandle, offset: number, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  await file.read(out, 0, length, offset);
  return out;
}
