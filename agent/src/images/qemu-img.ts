/**
 * The agent's only door to qemu-img (Debian package qemu-utils). Every call is an async child process without a
 * shell; every file it creates is written under a temporary name next to its destination and renamed into place,
 * so a crash or a failure never leaves a half-written image where a caller looks for a complete one.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { rename, rm } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { CloudletError, isNoSpace, type ErrorCode } from '../errors';

export interface ImageInfo {
  format: string;
  /** Size the guest sees, in bytes. */
  virtualSize: number;
  /** Bytes allocated on the host for this file alone (not its backing chain). */
  actualSize: number;
  /** Absolute path of the backing file, or null for a standalone image. */
  backingFile: string | null;
  backingFormat: string | null;
  /** qcow2 lazy-refcounts dirty flag: the image was not closed cleanly. */
  dirty: boolean;
}

export type ImageFormat = 'qcow2' | 'raw';

/** qemu-img check exit codes that mean "nothing is corrupt": clean, only leaked clusters, format has no checks. */
const CHECK_PASSED = new Set([0, 3, 63]);
const STDERR_LINES_IN_MESSAGES = 2;

class QemuImgFailure extends Error {
  constructor(
    readonly exitCode: number | null,
    readonly detail: string,
  ) {
    super(detail);
  }
}

/** Runs qemu-img; resolves with stdout, or rejects with a QemuImgFailure (missing binary → IMAGE_TOOL_FAILED). */
function run(args: string[]): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    execFile('qemu-img', args, { encoding: 'utf8', maxBuffer: 16 << 20, env: { ...process.env, LC_ALL: 'C' } }, (err, stdout, stderr) => {
      if (!err) return resolvePromise(stdout);
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        return reject(new CloudletError('IMAGE_TOOL_FAILED', 'qemu-img not found: install the Debian package qemu-utils', { cause: err }));
      }
      const lines = `${stderr}\n${stdout}`
        .split('\n')
        .map((line) => line.trim())
        .filter(Boolean);
      reject(new QemuImgFailure(typeof err.code === 'number' ? err.code : null, lines.slice(0, STDERR_LINES_IN_MESSAGES).join(' / ') || err.message));
    });
  });
}

/** Runs qemu-img and turns a failure into a CloudletError with `code` and qemu-img's own words. */
async function runOrThrow(args: string[], code: ErrorCode, what: string): Promise<string> {
  try {
    return await run(args);
  } catch (err) {
    if (err instanceof CloudletError) throw err;
    const { detail } = err as QemuImgFailure;
    throw new CloudletError(isNoSpace(detail) ? 'NO_SPACE' : code, `${what}: ${detail}`);
  }
}

export async function imageInfo(path: string): Promise<ImageInfo> {
  // -U (force-share): works on images a running VM holds locked, e.g. a service disk in use as a backing file.
  const stdout = await runOrThrow(['info', '--output=json', '-U', '--', path], 'INVALID_IMAGE', `cannot read image ${path}`);
  const info = JSON.parse(stdout) as Record<string, unknown>;
  const text = (key: string): string | null => (typeof info[key] === 'string' ? info[key] : null);
  return {
    format: text('format') ?? 'unknown',
    virtualSize: Number(info['virtual-size'] ?? 0),
    actualSize: Number(info['actual-size'] ?? 0),
    backingFile: text('full-backing-filename') ?? text('backing-filename'),
    backingFormat: text('backing-filename-format'),
    dirty: info['dirty-flag'] === true,
  };
}

/** A range of an image's guest-visible bytes and where they are in the file (`hostOffset`, null when not stored). */
export interface ImageExtent {
  start: number;
  length: number;
  /** Reads as zeros (unallocated, or a zero cluster). */
  zero: boolean;
  /** Offset of the bytes in the image file itself; null for zeros and for compressed or backing-file data. */
  hostOffset: number | null;
}

/** Where each range of a standalone image's content lives in its file (qemu-img map). */
export async function imageMap(path: string): Promise<ImageExtent[]> {
  const stdout = await runOrThrow(['map', '--output=json', '-U', '--', path], 'INVALID_IMAGE', `cannot map image ${path}`);
  return (JSON.parse(stdout) as { start: number; length: number; zero: boolean; data: boolean; depth: number; offset?: number }[]).map((e) => ({
    start: e.start,
    length: e.length,
    zero: e.zero || !e.data,
    hostOffset: e.data && e.depth === 0 && typeof e.offset === 'number' ? e.offset : null,
  }));
}

/**
 * Rejects a corrupt image with INVALID_IMAGE and qemu-img's first error line. Pass `format` when it is known: a
 * qcow2 whose magic is garbled would otherwise be probed as raw, which has nothing to check.
 */
export async function checkImage(path: string, format?: ImageFormat): Promise<void> {
  const args = ['check', ...(format ? ['-f', format] : []), '--', path];
  try {
    await run(args);
  } catch (err) {
    if (err instanceof CloudletError) throw err;
    const { exitCode, detail } = err as QemuImgFailure;
    if (exitCode !== null && CHECK_PASSED.has(exitCode)) return;
    throw new CloudletError('INVALID_IMAGE', `image ${path} is corrupt or unreadable: ${detail}`);
  }
}

/**
 * A qcow2 overlay on `backing` (never a copy): the guest writes to the overlay, the backing file stays untouched.
 * Callers that know the backing file's format pass it and save a qemu-img run on the start path.
 */
export async function createLinkedClone(backing: string, dest: string, backingFormat?: ImageFormat): Promise<void> {
  const backingPath = resolve(backing); // an absolute path: the clone must not depend on the agent's cwd
  const format = backingFormat ?? (await imageInfo(backingPath)).format;
  await writeAtomically(dest, (tmp) =>
    runOrThrow(
      ['create', '-q', '-f', 'qcow2', '-b', backingPath, '-F', format, '--', tmp],
      'IMAGE_TOOL_FAILED',
      `cannot create a linked clone of ${backingPath}`,
    ),
  );
}

/** A standalone copy of `src` (its backing chain flattened) in `format`. */
export async function convertImage(src: string, dest: string, format: ImageFormat): Promise<void> {
  await writeAtomically(dest, (tmp) => runOrThrow(['convert', '-q', '-O', format, '--', src, tmp], 'IMAGE_TOOL_FAILED', `cannot convert ${src} to ${format}`));
}

async function writeAtomically(dest: string, write: (tmp: string) => Promise<unknown>): Promise<void> {
  const tmp = join(dirname(dest), `.${basename(dest)}.${randomBytes(6).toString('hex')}.tmp`);
  try {
    await write(tmp);
    await rename(tmp, dest);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}
