/**
 * The only caller of the zstd CLI (Debian package zstd): Node 20's zlib has no zstd. Child processes fed through
 * pipes, so nothing blocks the event loop: one per frame to compress (frames are independent, so several run at
 * once), one streaming process to decompress a whole sequence of frames (overlays) or one stream (app packages),
 * and one to compress an app package (cloudlet-package).
 *
 * A frame may be compressed against a reference file both sides have (`--patch-from`: the file is a raw prefix the
 * frame's matches may point into, attached again for every frame decoded). Kernel data that moved in guest
 * memory, and so matches the base's memory state only at byte offsets no 4 KiB dedup sees, costs almost nothing
 * that way.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { Duplex } from 'node:stream';
import { CloudletError, type ErrorCode } from '../errors';
import { ByteReader } from './byte-reader';

/** `zstd -dc` as a stream stage; a non-zero exit (not zstd, truncated) fails the pipeline. */
export function zstdDecodeStream(): Duplex {
  return zstdStream(['-dcq'], 'not a valid zstd stream');
}

/** `zstd -c` as a stream stage (app packages made by cloudlet-package). */
export function zstdEncodeStream(): Duplex {
  return zstdStream(['-cq'], 'compression failed');
}

function zstdStream(args: string[], failure: string): Duplex {
  const zstd = spawn('zstd', args, { stdio: ['pipe', 'pipe', 'ignore'] });
  const duplex = Duplex.from({ writable: zstd.stdin, readable: zstd.stdout });
  // Without a listener, a failed spawn (zstd not installed) is an uncaught error that ends the whole agent.
  zstd.on('error', (err) => duplex.destroy(spawnError(err)));
  zstd.on('exit', (code, signal) => {
    if (code !== 0 && signal === null) duplex.destroy(new Error(`zstd exited with ${code}: ${failure}`));
  });
  duplex.on('close', () => zstd.kill());
  return duplex;
}

/** Why zstd could not run (the child's 'error' event: not installed, not executable). */
function spawnError(err: NodeJS.ErrnoException): CloudletError {
  return err.code === 'ENOENT'
    ? new CloudletError('IMAGE_TOOL_FAILED', 'zstd not found: install the Debian package zstd', { cause: err })
    : new CloudletError('IMAGE_TOOL_FAILED', `zstd: ${err.message}`, { cause: err });
}

/**
 * Runs zstd with `args`, `input` on stdin; resolves with stdout. Output beyond `maxOutputBytes` and a failed run are
 * `failure` errors (a tool failure, or bad input when decoding what came from outside); `signal` kills the run.
 */
function run(
  args: string[],
  input: Buffer,
  maxOutputBytes: number,
  { failure = 'IMAGE_TOOL_FAILED', signal }: { failure?: ErrorCode; signal?: AbortSignal } = {},
): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn('zstd', args, { stdio: ['pipe', 'pipe', 'pipe'], signal });
    const out: Buffer[] = [];
    let outBytes = 0;
    let stderr = '';
    let settled = false;
    const fail = (err: CloudletError) => {
      if (settled) return;
      settled = true;
      child.kill();
      reject(err);
    };
    child.on('error', (err) => fail(spawnError(err)));
    child.stdout.on('data', (chunk: Buffer) => {
      outBytes += chunk.length;
      if (outBytes > maxOutputBytes) return fail(new CloudletError(failure, `zstd output exceeds ${maxOutputBytes} bytes`));
      out.push(chunk);
    });
    child.stderr.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    child.stdin.on('error', () => {}); // an early exit (bad input) is reported through the exit code
    child.on('close', (code) => {
      if (code === 0 && !settled) {
        settled = true;
        resolve(Buffer.concat(out, outBytes));
      } else {
        fail(new CloudletError(failure, `zstd ${args[0]} failed: ${stderr.trim().split('\n').pop() || `exit code ${code}`}`));
      }
    });
    child.stdin.end(input);
  });
}

/** A file frames of up to `frameBytes` are compressed against, and the window (log2 bytes) that reaches all of it plus a frame. */
export interface ZstdReference {
  path: string;
  windowLog: number;
  frameBytes: number;
}

/**
 * `path` (of `bytes`) as the reference of frames of up to `frameBytes`, with the window that covers both; null when
 * that window would be over 1 GiB (what a decoder must be allowed to allocate).
 */
export function zstdReference(path: string, bytes: number, frameBytes: number): ZstdReference | null {
  const windowLog = Math.max(MIN_WINDOW_LOG, Math.ceil(Math.log2(bytes + frameBytes)));
  return windowLog <= MAX_WINDOW_LOG ? { path, windowLog, frameBytes } : null;
}

const MIN_WINDOW_LOG = 20;
const MAX_WINDOW_LOG = 30;
/** Hash chains longer than 2^27 entries (512 MiB of tables) are not worth their memory: older matches are lost. */
const MAX_CHAIN_LOG = 27;
/** Below this, level 1 stored the frame nearly as it is: random bytes, where high levels only burn seconds. */
const INCOMPRESSIBLE_RATIO = 0.97;

/**
 * One zstd frame holding `data`. Without a reference: a quick level-1 pass first, and only a frame that it shrinks
 * is compressed again at `level` (the optimal parser of the high levels spends seconds per MiB on random bytes).
 * With one: level-12 hash chains (lazy2) whose tables span the whole reference; binary-tree levels find no more
 * there and take 10-30 s per 4 MiB frame at such a window.
 */
export async function compressFrame(data: Buffer, level: number, reference?: ZstdReference): Promise<Buffer> {
  const limit = Math.max(data.length * 2, 1 << 16);
  const args = ['-q', '-c', '--no-progress'];
  if (reference) {
    const chainLog = Math.min(reference.windowLog, MAX_CHAIN_LOG);
    return run(
      [
        ...args,
        '-12',
        `--long=${reference.windowLog}`,
        `--zstd=wlog=${reference.windowLog},clog=${chainLog},hlog=${chainLog - 1},slog=6`,
        `--patch-from=${reference.path}`,
        `--stream-size=${data.length}`,
      ],
      data,
      limit,
    );
  }
  const quick = await run([...args, '-1'], data, limit);
  if (level <= 1 || quick.length >= data.length * INCOMPRESSIBLE_RATIO) return quick;
  return run([...args, `-${level}`], data, limit);
}

/** Decodes a sequence of frames: frames are written in order as they arrive, and each one's content is read back by its size. */
export interface FrameDecoder {
  /** Resolves when the decoder took the frame (or is gone: then reading its content fails). */
  write(frame: Buffer): Promise<void>;
  /** The next `rawBytes` bytes of content: exactly one frame's, as its manifest entry says. */
  read(rawBytes: number): Promise<Buffer>;
  /** No more frames. */
  end(): void;
  /** After the last read: the content must end there, and zstd must have succeeded. */
  finish(): Promise<void>;
  close(): void;
}

/**
 * A decoder for frames compressed against `reference` (or against nothing). zstd 1.5.7 (Debian 13) attaches a
 * `--patch-from` reference to the first frame of its input only: a later frame that points into it fails ("Data
 * corruption detected"). 1.5.4 (Debian 12) attaches it to every frame, but reads the whole reference into memory in
 * every process (0.6 s and 256 MiB for a 256 MiB memory state). So a zstd that can map the reference instead
 * (`--mmap-dict`, 1.5.6 on) decodes each frame in a process of its own, and an older one all frames in one stream.
 */
export async function openFrameDecoder(reference?: ZstdReference): Promise<FrameDecoder> {
  return reference && (await mapsReferences()) ? new FramePerProcessDecoder(reference) : new StreamDecoder(reference);
}

let mapsReferencesProbe: Promise<boolean> | null = null;

/** Whether the installed zstd knows `--mmap-dict` (asked once; a zstd that cannot run is found by the decoder). */
function mapsReferences(): Promise<boolean> {
  mapsReferencesProbe ??= new Promise((resolve) => {
    const probe = spawn('zstd', ['--mmap-dict', '-qV'], { stdio: 'ignore' });
    probe.on('error', () => resolve(false));
    probe.on('close', (code) => resolve(code === 0));
  });
  return mapsReferencesProbe;
}

/** Frames decoded ahead of the one being read: one per core of a small box. */
const FRAMES_AHEAD = 2;

/** One `zstd -d --patch-from` per frame, the reference mapped, up to FRAMES_AHEAD of them running ahead of the reads. */
class FramePerProcessDecoder implements FrameDecoder {
  private readonly decoded: Promise<Buffer>[] = [];
  private readonly stop = new AbortController();
  private ended = false;
  /** Whoever waits for the queue to change: a read for a frame, a write for room. */
  private wake: (() => void) | null = null;

  constructor(private readonly reference: ZstdReference) {}

  async write(frame: Buffer): Promise<void> {
    while (this.decoded.length >= FRAMES_AHEAD && !this.stop.signal.aborted) await this.changed();
    if (this.stop.signal.aborted) return;
    const { path, windowLog, frameBytes } = this.reference;
    const args = ['-d', '-q', '-c', '--no-progress', `--long=${windowLog}`, '--mmap-dict', `--patch-from=${path}`];
    const content = run(args, frame, frameBytes, { failure: 'OVERLAY_INVALID', signal: this.stop.signal });
    content.catch(() => {}); // observed by its read
    this.decoded.push(content);
    this.notify();
  }

  async read(rawBytes: number): Promise<Buffer> {
    while (this.decoded.length === 0) {
      if (this.ended || this.stop.signal.aborted) throw new CloudletError('OVERLAY_INVALID', 'overlay: it has fewer frames than its manifest says');
      await this.changed();
    }
    const content = this.decoded.shift()!;
    this.notify();
    const bytes = await content;
    if (bytes.length !== rawBytes)
      throw new CloudletError('OVERLAY_INVALID', `overlay: a frame decompresses to ${bytes.length} bytes, its manifest says ${rawBytes}`);
    return bytes;
  }

  end(): void {
    this.ended = true;
    this.notify();
  }

  finish(): Promise<void> {
    if (this.decoded.length > 0) return Promise.reject(new CloudletError('OVERLAY_INVALID', 'overlay: it has more frames than its manifest says'));
    return Promise.resolve();
  }

  close(): void {
    this.stop.abort();
    this.notify();
  }

  private changed(): Promise<void> {
    return new Promise((resolve) => (this.wake = resolve));
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }
}

/** One `zstd -d` for all frames: spawning one per frame costs more than decoding them. */
class StreamDecoder implements FrameDecoder {
  private readonly child: ChildProcessWithoutNullStreams;
  private readonly out: ByteReader;
  private stderr = '';
  private failed: CloudletError | null = null;

  /** `reference`: the file the frames may have been compressed against (frames compressed without one decode too). */
  constructor(reference?: ZstdReference) {
    const withReference = reference ? [`--long=${reference.windowLog}`, `--patch-from=${reference.path}`] : [];
    this.child = spawn('zstd', ['-d', '-q', '-c', '--no-progress', ...withReference], { stdio: ['pipe', 'pipe', 'pipe'] });
    this.child.on('error', (err) => {
      this.failed = spawnError(err);
    });
    this.child.stderr.on('data', (chunk: Buffer) => {
      this.stderr += chunk.toString();
    });
    this.child.stdin.on('error', () => {}); // an early exit is reported through its output ending
    this.out = new ByteReader(
      this.child.stdout,
      (endsAt) =>
        this.failed ??
        new CloudletError(
          'OVERLAY_INVALID',
          `overlay: its frames decompress to ${endsAt} bytes, fewer than its manifest says${this.stderr ? ` (zstd: ${this.stderr.trim()})` : ''}`,
        ),
    );
  }

  write(frame: Buffer): Promise<void> {
    if (this.child.stdin.write(frame)) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        this.child.stdin.off('drain', done);
        this.child.stdin.off('close', done);
        resolve();
      };
      this.child.stdin.once('drain', done);
      this.child.stdin.once('close', done);
    });
  }

  read(rawBytes: number): Promise<Buffer> {
    return this.out.read(rawBytes);
  }

  end(): void {
    this.child.stdin.end();
  }

  async finish(): Promise<void> {
    if (!(await this.out.atEnd())) throw new CloudletError('OVERLAY_INVALID', 'overlay: its frames decompress to more bytes than its manifest says');
    const code = this.child.exitCode ?? (await new Promise<number | null>((resolve) => this.child.once('exit', resolve)));
    if (code !== 0) throw this.failed ?? new CloudletError('OVERLAY_INVALID', `overlay: zstd failed: ${this.stderr.trim() || `exit code ${code}`}`);
  }

  close(): void {
    if (this.child.exitCode === null) this.child.kill();
  }
}
