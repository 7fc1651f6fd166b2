/**
 * libvirt QEMU save images ("virsh save" files) and per-instance restore sources.
 *
 * A cached service holds one saved memory state (the template). Every instance restored from it needs its own
 * name, UUID, disk, port forward and console log, but virDomainRestoreFlags' dxml may not change name or UUID, so
 * the domain XML embedded in the image header has to be replaced. We never copy the template: the restore source
 * is a FIFO in the instance dir, and we write a freshly encoded header followed by the template's untouched
 * migration stream into it while libvirtd reads it (docs/save-image.md has the format and the measurements).
 * libvirt up to 11.0 reads the header and hands QEMU the stream in one open of the path; from 11.1 on it first reads
 * the header in an open of its own (the image's metadata), then opens it again: the FIFO then carries the header twice.
 *
 * Header layout (libvirt src/qemu/qemu_saveimage.h, version 2, little-endian host order):
 *   char magic[16] "LibvirtQemudSave"; u32 version; u32 data_len; u32 was_running; u32 compressed;
 *   u32 cookieOffset; u32 unused[14]                                  = 92 bytes, then data_len bytes:
 *   xml\0 [cookie\0] [padding]. cookieOffset is relative to the end of the 92-byte header (= strlen(xml)+1),
 *   0 when there is no cookie. The QEMU migration stream starts right after data_len; no alignment is required.
 */
import { execFile, spawn } from 'node:child_process';
import { closeSync, constants as fsConstants, openSync } from 'node:fs';
import { open, rm, stat } from 'node:fs/promises';
import { Socket } from 'node:net';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { promisify } from 'node:util';
import { CloudletError } from '../errors';

const SAVE_MAGIC = 'LibvirtQemudSave';
/** libvirt writes this magic first and the real one only after the migration finished. */
const PARTIAL_MAGIC = 'LibvirtQemudPart';
const SAVE_VERSION = 2;
const FIXED_HEADER_BYTES = 92;
/** Values of the `compressed` field libvirt 9.0 knows: raw, gzip, bzip2, xz, lzop. libvirt decompresses the
 *  stream itself, so we pass any of them through. */
const COMPRESSION_NAMES = ['raw', 'gzip', 'bzip2', 'xz', 'lzop'];
/** Newer values (libvirt 10-11), refused by name: zstd needs a zstd libvirt may not have, and "sparse" (QEMU's
 *  mapped-ram) is not a stream at all but RAM at fixed file offsets, which a FIFO cannot carry. */
const UNSUPPORTED_COMPRESSION: Record<number, string> = { 5: 'zstd', 6: 'sparse (QEMU mapped-ram)' };
/** The first libvirt that reads a restore image's header in an open of its own before the one it hands QEMU. */
const SEPARATE_HEADER_OPEN_SINCE = [11, 1];
/** libvirt pads its own headers by 64 KiB; anything near this bound is garbage, not a domain XML. */
const MAX_DATA_BYTES = 16 << 20;

export interface SaveImageHeader {
  version: number;
  xml: string;
  cookie: string | null;
  wasRunning: boolean;
  /** libvirt's save-image compression format (0 = raw). */
  compressed: number;
  /** Byte offset of the QEMU migration stream in the file. */
  streamOffset: number;
}

export interface RestoreSource {
  /** Pass to virDomainRestoreFlags. */
  path: string;
  /** Resolves when a reader has consumed the whole image; rejects on a stream error or after dispose(). */
  done(): Promise<void>;
  /** Stops streaming and removes the source. Idempotent. Call it once the restore call returned, success or not. */
  dispose(): Promise<void>;
}

function invalid(message: string): CloudletError {
  return new CloudletError('INVALID_IMAGE', `save image: ${message}`);
}

/** The bytes libvirt reads before the migration stream: the fixed header, xml\0 and cookie\0, without padding. */
export function encodeSaveImageHeader(header: Pick<SaveImageHeader, 'xml' | 'cookie' | 'wasRunning' | 'compressed'>): Buffer {
  if (header.xml.includes('\0') || header.cookie?.includes('\0')) throw invalid('XML and cookie must not contain NUL');
  const xml = Buffer.from(`${header.xml}\0`, 'utf8');
  const cookie = header.cookie === null ? Buffer.alloc(0) : Buffer.from(`${header.cookie}\0`, 'utf8');
  const fixed = Buffer.alloc(FIXED_HEADER_BYTES); // unused[14] stays zero
  fixed.write(SAVE_MAGIC, 0, 'latin1');
  fixed.writeUInt32LE(SAVE_VERSION, 16);
  fixed.writeUInt32LE(xml.length + cookie.length, 20);
  fixed.writeUInt32LE(header.wasRunning ? 1 : 0, 24);
  fixed.writeUInt32LE(header.compressed, 28);
  fixed.writeUInt32LE(header.cookie === null ? 0 : xml.length, 32);
  return Buffer.concat([fixed, xml, cookie]);
}

interface FixedHeader {
  version: number;
  dataLength: number;
  wasRunning: boolean;
  compressed: number;
  cookieOffset: number;
}

/** Checks the 92-byte fixed part, so that a garbage data_len is rejected before anything is allocated for it. */
function decodeFixedHeader(bytes: Buffer): FixedHeader {
  if (bytes.length < FIXED_HEADER_BYTES) throw invalid(`truncated header (${bytes.length} of ${FIXED_HEADER_BYTES} bytes)`);
  const magic = bytes.toString('latin1', 0, 16);
  if (magic === PARTIAL_MAGIC) throw invalid('incomplete image (the save did not finish)');
  if (magic !== SAVE_MAGIC) throw invalid('bad magic, not a libvirt QEMU save image');
  const version = bytes.readUInt32LE(16);
  if (version !== SAVE_VERSION) throw invalid(`unsupported header version ${version} (expected ${SAVE_VERSION})`);
  const fixed = {
    version,
    dataLength: bytes.readUInt32LE(20),
    wasRunning: bytes.readUInt32LE(24) !== 0,
    compressed: bytes.readUInt32LE(28),
    cookieOffset: bytes.readUInt32LE(32),
  };
  if (fixed.compressed >= COMPRESSION_NAMES.length) {
    const known = UNSUPPORTED_COMPRESSION[fixed.compressed];
    throw invalid(`unsupported compression format ${fixed.compressed}${known ? ` (${known})` : ''}: save it raw (save_image_format in qemu.conf)`);
  }
  if (fixed.dataLength === 0 || fixed.dataLength > MAX_DATA_BYTES || fixed.cookieOffset >= fixed.dataLength) {
    throw invalid(`bad data length ${fixed.dataLength} / cookie offset ${fixed.cookieOffset}`);
  }
  return fixed;
}

/** Parses a header from the first bytes of a save image (at least streamOffset of them). */
export function decodeSaveImageHeader(bytes: Buffer): SaveImageHeader {
  const { version, dataLength, wasRunning, compressed, cookieOffset } = decodeFixedHeader(bytes);
  const streamOffset = FIXED_HEADER_BYTES + dataLength;
  if (bytes.length < streamOffset) throw invalid(`truncated header (${bytes.length} of ${streamOffset} bytes)`);
  // Each region holds a NUL-terminated string, possibly followed by zero padding.
  const cString = (start: number, end: number, what: string): string => {
    const nul = bytes.indexOf(0, start);
    if (nul < 0 || nul >= end) throw invalid(`${what} is not NUL-terminated`);
    return bytes.toString('utf8', start, nul);
  };
  const xmlEnd = FIXED_HEADER_BYTES + (cookieOffset || dataLength);
  const xml = cString(FIXED_HEADER_BYTES, xmlEnd, 'domain XML');
  if (!xml.trimStart().startsWith('<domain')) throw invalid('the embedded XML is not a <domain>');
  const cookie = cookieOffset ? cString(xmlEnd, streamOffset, 'cookie') : null;
  return { version, xml, cookie, wasRunning, compressed, streamOffset };
}

export async function readSaveImageHeader(path: string): Promise<SaveImageHeader> {
  const file = await open(path, 'r').catch((err: unknown) => {
    throw new CloudletError('INVALID_IMAGE', `save image ${path}: ${(err as Error).message}`, { cause: err });
  });
  try {
    const fixed = Buffer.alloc(FIXED_HEADER_BYTES);
    const { bytesRead } = await file.read(fixed, 0, FIXED_HEADER_BYTES, 0);
    const { dataLength } = decodeFixedHeader(fixed.subarray(0, bytesRead));
    const bytes = Buffer.alloc(FIXED_HEADER_BYTES + dataLength);
    const { bytesRead: headerBytesRead } = await file.read(bytes, 0, bytes.length, 0);
    const header = decodeSaveImageHeader(bytes.subarray(0, headerBytesRead));
    const { size } = await file.stat();
    if (size <= header.streamOffset) throw invalid(`${path} has no migration stream after its header`);
    return header;
  } finally {
    await file.close();
  }
}

/** The header at the start of a save image that is being read as a stream: `read(n)` gives exactly the next n bytes. */
export async function readSaveImageHeaderFrom(read: (bytes: number) => Promise<Buffer>): Promise<SaveImageHeader> {
  const fixed = await read(FIXED_HEADER_BYTES);
  const { dataLength } = decodeFixedHeader(fixed);
  return decodeSaveImageHeader(Buffer.concat([fixed, await read(dataLength)]));
}

const execFileAsync = promisify(execFile);

/** How many times libvirt `version` ("11.3.0") reads a restore image's header, each time in an open of its own. */
export function headerReadsOf(version: string): 1 | 2 {
  const [major = 0, minor = 0] = version.split('.').map(Number);
  const [sinceMajor, sinceMinor] = SEPARATE_HEADER_OPEN_SINCE as [number, number];
  return major > sinceMajor || (major === sinceMajor && minor >= sinceMinor) ? 2 : 1;
}

/** Bytes of the image written to the reader so far, and in all. */
export type StreamProgress = (done: number, total: number) => void;

/** A migration stream that is being produced while it is restored (VM Synthesis), and how long it will be. */
export interface LiveMigrationStream {
  chunks: AsyncIterable<Buffer>;
  bytes: number;
}

/**
 * Prepare a restore source at a path inside instanceDir whose embedded domain XML is `xml` and whose memory
 * stream is the template's. Nothing is copied: the path is a FIFO fed from the template while it is read.
 * `templatePath`: the save image whose migration stream is streamed, or a live migration stream; `template` is its
 * header. `headerReads`: how many times the restoring libvirt reads the header first (headerReadsOf).
 */
export async function prepareRestoreSource(
  templatePath: string | LiveMigrationStream,
  template: SaveImageHeader,
  xml: string,
  instanceDir: string,
  headerReads: number,
  onProgress: StreamProgress = () => {},
): Promise<RestoreSource> {
  const header = encodeSaveImageHeader({ xml, cookie: template.cookie, wasRunning: template.wasRunning, compressed: template.compressed });
  const path = join(instanceDir, 'memory-state.fifo');
  await rm(path, { force: true });
  await execFileAsync('mkfifo', ['-m', '0600', '--', path]).catch((err: unknown) => {
    throw new CloudletError('LAUNCH_FAILED', `cannot create the restore FIFO ${path}: ${(err as Error).message}`, { cause: err });
  });

  const stream = typeof templatePath === 'string' ? { file: templatePath, bytes: (await stat(templatePath)).size - template.streamOffset } : templatePath;
  const abort = new AbortController();
  const feeding = feed(path, stream, template.streamOffset, Buffer.concat(Array<Buffer>(headerReads).fill(header)), abort.signal, onProgress);
  feeding.catch(() => {}); // observed through done(); never an unhandled rejection
  let disposed: Promise<void> | undefined;
  return {
    path,
    done: () => feeding,
    dispose: () =>
      (disposed ??= (async () => {
        abort.abort();
        await feeding.catch(() => {});
        releaseWaitingReader(path);
        await rm(path, { force: true });
      })()),
  };
}

/**
 * Everything here stays off libuv's thread pool: the restore call that reads this FIFO holds a pool thread until it has
 * read it all, so a burst of restores can hold the whole pool, and a feed that needed a pool thread would wait forever.
 * Hence a child process reads the template file, and the FIFO is opened without blocking: read-write, which Linux
 * allows for a FIFO and which never waits. Holding a read end of our own also keeps the pipe and what is buffered in
 * it while libvirt's readers come and go: a libvirt that reads the header in an open of its own closes it having read
 * exactly one header (`header` then holds one copy per such open), and its next open reads on from there. Writes never
 * fail with EPIPE either: a reader that went away for good is noticed by the restore call failing, then dispose().
 */
async function feed(
  path: string,
  stream: { file: string; bytes: number } | LiveMigrationStream,
  streamOffset: number,
  header: Buffer,
  signal: AbortSignal,
  onProgress: StreamProgress,
): Promise<void> {
  const total = header.length + stream.bytes;
  if (signal.aborted) throw new CloudletError('LAUNCH_FAILED', 'restore source disposed before it was opened');
  let fd: number;
  try {
    fd = openSync(path, fsConstants.O_RDWR | fsConstants.O_NONBLOCK);
  } catch (err) {
    throw new CloudletError('LAUNCH_FAILED', `cannot open the restore FIFO ${path}: ${(err as Error).message}`, { cause: err });
  }
  const sink = new Socket({ fd, readable: false, writable: true }); // a pipe fd: libuv writes it non-blocking
  const reader = 'chunks' in stream ? null : templateReader(stream.file, streamOffset);
  const chunks: AsyncIterable<Buffer> = reader?.stdout ?? (stream as LiveMigrationStream).chunks;
  try {
    await pipeline(
      async function* () {
        let done = header.length;
        yield header;
        for await (const chunk of chunks) {
          yield chunk;
          done += chunk.length;
          onProgress(done, total);
        }
        if (reader) await reader.succeeded();
        if (done !== total) throw new Error(`the memory state ended after ${done} of ${total} bytes`);
      },
      sink,
      { signal },
    );
  } catch (err) {
    if (signal.aborted) throw new CloudletError('LAUNCH_FAILED', 'restore source disposed before it was consumed', { cause: err });
    throw new CloudletError('LAUNCH_FAILED', `restore stream failed: ${(err as Error).message}`, { cause: err });
  } finally {
    sink.destroy();
    reader?.stop();
  }
}

/** The template's migration stream, from `offset` on, read by `tail` (whose reads take no pool thread of ours). */
function templateReader(file: string, offset: number) {
  const child = spawn('tail', ['-c', `+${offset + 1}`, '--', file], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => {
    stderr = (stderr + d.toString()).slice(-1024);
  });
  const exited = new Promise<number | null>((resolve) => {
    child.once('error', () => resolve(null));
    child.once('close', (code) => resolve(code));
  });
  return {
    stdout: child.stdout,
    succeeded: async () => {
      const code = await exited;
      if (code !== 0) throw new Error(`reading ${file} failed (${code === null ? 'tail did not run' : `exit ${code}`}): ${stderr.trim()}`);
    },
    stop: () => {
      if (child.exitCode === null) child.kill('SIGKILL');
    },
  };
}

/** Lets a reader blocked in open() (libvirtd waiting for a writer that will never come) see EOF and fail. */
function releaseWaitingReader(path: string): void {
  try {
    closeSync(openSync(path, fsConstants.O_WRONLY | fsConstants.O_NONBLOCK));
  } catch {
    // ENXIO: nobody waits
  }
}
