/**
 * The app package store: `<data>/packages/<sha256>/` holds one imported package (manifest.json and app/), named by
 * the SHA-256 of its tarball. A package appears there only complete: it is unpacked and checked in a private
 * staging directory and renamed in; anything that fails leaves nothing behind.
 *
 * Tarballs are read with npm `tar` (a streaming parser, no shell-out) behind our own checks, which run on every
 * header before anything is written: only regular files, directories and links that stay inside app/, no absolute
 * or `..` paths, bounded size and entry count. The decompressed stream is bounded too (gzip/zstd bombs). `tar`
 * additionally refuses to write through symlinks. zstd is decoded by the zstd tool: Node 20's zlib has no zstd.
 */
import { createHash, randomUUID, type Hash } from 'node:crypto';
import { createReadStream, createWriteStream, type Stats } from 'node:fs';
import { chmod, lstat, mkdir, open, readdir, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { Transform, type Readable, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import type { Parser, ReadEntry } from 'tar';

/** Loaded on the first import: the agent mostly runs without touching a tarball. */
const tar = () => require('tar') as typeof import('tar');
import { CloudletError, isErrno, isNoSpace } from '../errors';
import { noSpaceError, requireFreeSpace } from '../system/disk-space';
import { zstdDecodeStream } from '../images/zstd';
import type { Logger } from '../log';
import { RevisedMap } from '../core/revised-map';
import type { Package, PackageSource } from '../core/types';
import { parsePackageManifest } from './manifest';
import { faultPoint } from '../system/fault-points';

const MANIFEST = 'manifest.json';
const APP = 'app';
const MANIFEST_MAX_BYTES = 64 * 1024;
const ALLOWED_TYPES = new Set(['File', 'OldFile', 'ContiguousFile', 'Directory', 'SymbolicLink', 'Link']);

export interface PackageLimits {
  /** Sum of the unpacked file sizes. */
  maxBytes: number;
  maxEntries: number;
}

export const DEFAULT_PACKAGE_LIMITS: PackageLimits = { maxBytes: 1024 ** 3, maxEntries: 20000 };

type Compression = 'gzip' | 'zstd';

function invalid(reason: string, message: string, details: Record<string, unknown> = {}): CloudletError {
  return new CloudletError('INVALID_PACKAGE', message, { details: { reason, ...details } });
}

export class PackageStore {
  private readonly packages = new RevisedMap<string, Package>();
  /** App ids being imported right now: a second import of the same id must not race the first. */
  private readonly importing = new Set<string>();

  constructor(
    private readonly root: string,
    private readonly staging: string,
    /** Ids taken by something else that clients start the same way (the cached services). */
    private readonly takenElsewhere: (id: string) => boolean,
    private readonly log: Logger,
    private readonly limits: PackageLimits = DEFAULT_PACKAGE_LIMITS,
  ) {}

  /** Read every package directory; a broken one is reported and skipped, never deleted. */
  async load(): Promise<void> {
    await mkdir(this.root, { recursive: true, mode: 0o755 });
    await mkdir(this.staging, { recursive: true, mode: 0o755 });
    for (const entry of await readdir(this.root)) {
      const dir = path.join(this.root, entry);
      try {
        if (!/^[0-9a-f]{64}$/.test(entry)) throw new Error('not a package directory name');
        const manifest = parsePackageManifest(JSON.parse(await readFile(path.join(dir, MANIFEST), 'utf8')));
        if (this.packages.has(manifest.app_id)) throw new Error(`a second package for ${manifest.app_id}`);
        const importedAt = (await lstat(path.join(dir, MANIFEST))).mtime.toISOString();
        this.packages.set(manifest.app_id, { id: manifest.app_id, sha256: entry, manifest, dir, importedAt });
      } catch (err) {
        this.log(`packages: skipping ${dir}: ${(err as Error).message}`);
      }
    }
  }

  list(): Package[] {
    return [...this.packages.values()].sort((a, b) => a.id.localeCompare(b.id));
  }

  /** Changes whenever a package is imported or removed. */
  get revision(): number {
    return this.packages.revision;
  }

  has(id: string): boolean {
    return this.packages.has(id);
  }

  find(id: string): Package | undefined {
    return this.packages.get(id);
  }

  get(id: string): Package {
    const found = this.packages.get(id);
    if (!found) throw new CloudletError('SERVICE_NOT_FOUND', `no package with app id ${id}`, { details: { service_id: id } });
    return found;
  }

  /** Import a tarball. The same tarball again is a no-op; another one for an app id in use is refused. */
  async import(source: PackageSource): Promise<Package> {
    if ('stream' in source && source.length > this.limits.maxBytes) {
      throw new CloudletError('PAYLOAD_TOO_LARGE', `The package has ${source.length} bytes; at most ${this.limits.maxBytes} are accepted`, {
        details: { limit: this.limits.maxBytes },
      });
    }
    // The tarball is written once and unpacked to at least as many bytes again.
    const needed = 'stream' in source ? 2 * source.length : undefined;
    if (needed !== undefined) await requireFreeSpace(this.staging, needed, 'import the package');
    const work = path.join(this.staging, `package-${randomUUID()}`);
    const unpacked = path.join(work, 'package');
    let reserved: string | undefined;
    try {
      await mkdir(unpacked, { recursive: true, mode: 0o755 });
      const tarball = 'path' in source ? source.path : await this.receive(source.stream, path.join(work, 'upload'));
      const sha256 = await this.unpack(tarball, unpacked);
      const manifest = parsePackageManifest(await readManifest(unpacked));
      const existing = this.packages.get(manifest.app_id);
      if (existing?.sha256 === sha256) return existing;
      if (existing || this.importing.has(manifest.app_id) || this.takenElsewhere(manifest.app_id)) {
        throw new CloudletError('SERVICE_EXISTS', `app id ${manifest.app_id} is already in use; remove it first`, { details: { service_id: manifest.app_id } });
      }
      this.importing.add((reserved = manifest.app_id));
      await checkTree(path.join(unpacked, APP));
      const dir = path.join(this.root, sha256);
      faultPoint('package:before-rename');
      await rename(unpacked, dir);
      const imported: Package = { id: manifest.app_id, sha256, manifest, dir, importedAt: new Date().toISOString() };
      this.packages.set(imported.id, imported);
      this.log(`packages: imported ${imported.id} ${manifest.version} (${sha256.slice(0, 12)})`);
      return imported;
    } catch (err) {
      // No size: how much the unpacked files need is not known (the pre-check's estimate is a lower bound).
      throw await noSpaceError(err, this.staging, 'import the package');
    } finally {
      if (reserved) this.importing.delete(reserved);
      await rm(work, { recursive: true, force: true });
    }
  }

  async remove(id: string): Promise<void> {
    const found = this.get(id);
    this.packages.delete(id);
    // Out of the store in one step; deleting the files afterwards may take a while.
    const trash = path.join(this.staging, `removed-${randomUUID()}`);
    await rename(found.dir, trash);
    await rm(trash, { recursive: true, force: true });
  }

  /** An uploaded tarball, to a staging file first: it is read twice (format sniffing, then unpacking). */
  private async receive(stream: Readable, file: string): Promise<string> {
    const tooLarge = () => invalid('too-large', `the upload exceeds ${this.limits.maxBytes} bytes`, { limit: this.limits.maxBytes });
    await pipeline(stream, byteLimit(this.limits.maxBytes, tooLarge), createWriteStream(file, { mode: 0o600 }));
    return file;
  }

  /**
   * Check the whole tarball, then unpack it into `dest`; returns its SHA-256. Two passes, so that a refused package
   * never has tar writing files in the background while its staging directory is being deleted.
   */
  private async unpack(tarball: string, dest: string): Promise<string> {
    const compression = sniff(await head(tarball));
    if (!compression) throw invalid('not-a-tarball', 'a package must be a gzip- or zstd-compressed tarball');
    const hash = createHash('sha256');
    const checks = new EntryChecks(this.limits);
    const abort = new AbortController();
    const parser = new (tar().Parser)({
      strict: true,
      filter: (_path: string, entry: ReadEntry | Stats) => {
        const problem = checks.admit(entry as ReadEntry);
        if (problem) abort.abort(problem);
        return false;
      },
    });
    await this.readTar(tarball, compression, parser, abort, hash);
    if (checks.entries === 0) throw invalid('not-a-tarball', 'the package holds no files');
    await this.readTar(tarball, compression, new (tar().Unpack)({ cwd: dest, strict: true, preserveOwner: false, noMtime: true }), new AbortController());
    return hash.digest('hex');
  }

  /** Decompress the tarball (bounded: gzip/zstd bombs) into a tar parser; `abort` carries the first refusal. */
  private async readTar(tarball: string, compression: Compression, sink: Parser, abort: AbortController, hash?: Hash): Promise<void> {
    // Headers and padding add at most a few blocks per entry to the file data.
    const streamLimit = this.limits.maxBytes + (this.limits.maxEntries + 4) * 1536;
    const tooLarge = () => invalid('too-large', `the package unpacks to more than ${this.limits.maxBytes} bytes`, { limit: this.limits.maxBytes });
    try {
      await pipeline(
        createReadStream(tarball),
        tap((chunk) => hash?.update(chunk)),
        compression === 'gzip' ? createGunzip() : zstdDecodeStream(),
        byteLimit(streamLimit, tooLarge),
        sink as unknown as NodeJS.WritableStream,
        { signal: abort.signal },
      );
    } catch (err) {
      if (abort.signal.aborted) throw abort.signal.reason;
      // Unpacking into a full disk is not a broken tarball.
      if (err instanceof CloudletError || isNoSpace(err)) throw err;
      throw invalid('not-a-tarball', `the package cannot be unpacked: ${(err as Error).message}`);
    }
  }
}

/** The per-header checks, run on every entry before anything is unpacked. */
class EntryChecks {
  entries = 0;
  private bytes = 0;

  constructor(private readonly limits: PackageLimits) {}

  /** The problem with this entry, or null when it may be unpacked. */
  admit(entry: ReadEntry): CloudletError | null {
    const name = entry.path.replace(/\/+$/, '');
    if (++this.entries > this.limits.maxEntries) {
      return invalid('too-many-files', `the package has more than ${this.limits.maxEntries} entries`, { limit: this.limits.maxEntries });
    }
    this.bytes += entry.size ?? 0;
    if (this.bytes > this.limits.maxBytes) {
      return invalid('too-large', `the package unpacks to more than ${this.limits.maxBytes} bytes`, { limit: this.limits.maxBytes });
    }
    if (!ALLOWED_TYPES.has(entry.type)) {
      return invalid('special-file', `${name} is a ${entry.type}: only files, directories and links are allowed`, { path: name });
    }
    if (!isPackagePath(name)) {
      return invalid('path-traversal', `${name} is outside the package layout (manifest.json and app/, relative, no "..")`, { path: name });
    }
    if (name === MANIFEST && (entry.type !== 'File' || (entry.size ?? 0) > MANIFEST_MAX_BYTES)) {
      return invalid('bad-manifest-file', `manifest.json must be a regular file of at most ${MANIFEST_MAX_BYTES} bytes`);
    }
    if (entry.type === 'SymbolicLink' || entry.type === 'Link') {
      const link = entry.linkpath ?? '';
      // A symlink is relative to its own directory; a hard link names another entry of the archive.
      const target = entry.type === 'SymbolicLink' ? path.posix.join(path.posix.dirname(name), link) : path.posix.normalize(link);
      if (link.startsWith('/') || !isInsideApp(target)) {
        return invalid('link-escapes', `${name} links to ${link}, outside app/`, { path: name });
      }
    }
    return null;
  }
}

function isPackagePath(name: string): boolean {
  if (name.startsWith('/') || name.includes('\\') || name.includes('\0')) return false;
  const segments = name.split('/');
  if (segments.some((s) => s === '..' || s === '')) return false;
  const clean = segments.filter((s) => s !== '.').join('/');
  return clean === MANIFEST || isInsideApp(clean);
}

function isInsideApp(relative: string): boolean {
  const normal = path.posix.normalize(relative);
  return normal === APP || (normal.startsWith(`${APP}/`) && !normal.split('/').includes('..'));
}

/**
 * After unpacking: only files, directories and symlinks (tar's own output, checked again), readable by the
 * unprivileged sandbox user and writable by nobody but root; set-id bits are dropped.
 */
async function checkTree(dir: string): Promise<void> {
  const stat = await lstat(dir).catch(() => null);
  if (!stat?.isDirectory()) throw invalid('no-app-dir', 'the package has no app/ directory');
  await chmod(dir, 0o755);
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const file = path.join(dir, entry.name);
    if (entry.isDirectory()) await checkTree(file);
    else if (entry.isFile()) await chmod(file, ((await lstat(file)).mode & 0o111) !== 0 ? 0o755 : 0o644);
    else if (!entry.isSymbolicLink()) throw invalid('special-file', `${entry.name} is not a regular file`);
  }
}

async function readManifest(dir: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path.join(dir, MANIFEST), 'utf8');
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new CloudletError('INVALID_MANIFEST', 'the package has no manifest.json at its top');
    throw err;
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new CloudletError('INVALID_MANIFEST', `manifest.json is not valid JSON: ${(err as Error).message}`);
  }
}

async function head(tarball: string): Promise<Buffer> {
  if (!path.isAbsolute(tarball)) throw new CloudletError('INVALID_PARAMETER', `package path must be absolute: ${tarball}`);
  const stat = await lstat(tarball).catch((err: NodeJS.ErrnoException) => {
    throw new CloudletError('INVALID_PARAMETER', `cannot read ${tarball}: ${err.code ?? err.message}`);
  });
  if (!stat.isFile()) throw new CloudletError('INVALID_PARAMETER', `${tarball} is not a regular file`);
  const file = await open(tarball, 'r');
  try {
    const buffer = Buffer.alloc(4);
    const { bytesRead } = await file.read(buffer, 0, 4, 0);
    return buffer.subarray(0, bytesRead);
  } finally {
    await file.close();
  }
}

function sniff(magic: Buffer): Compression | null {
  if (magic[0] === 0x1f && magic[1] === 0x8b) return 'gzip';
  if (magic.equals(Buffer.from([0x28, 0xb5, 0x2f, 0xfd]))) return 'zstd';
  return null;
}

function tap(observe: (chunk: Buffer) => void): Transform {
  return new Transform({
    transform(chunk: Buffer, _encoding, done: TransformCallback) {
      observe(chunk);
      done(null, chunk);
    },
  });
}

function byteLimit(limit: number, tooMuch: () => Error): Transform {
  let seen = 0;
  return new Transform({
    transform(chunk: Buffer, _encoding, done: TransformCallback) {
      seen += chunk.length;
      done(seen > limit ? tooMuch() : null, chunk);
    },
  });
}
