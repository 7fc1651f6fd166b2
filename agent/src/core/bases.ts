/**
 * Base VMs: generic VMs that services are made from at request time (On-Demand VM Provisioning builds on one with a
 * recipe; VM Synthesis applies an overlay to one). A base is a directory `<data>/bases/<digest>`: a qcow2 disk, an
 * optional saved memory state, the kernel/initrd it boots, and manifest.json in the service manifest format (its
 * port and readiness describe the base's stock service). The digest covers every file's bytes and the manifest, so
 * it names exactly one base; like services, a base directory only appears complete (built in staging, renamed in).
 *
 * Import also builds the base's chunk index (vm/chunk-index.ts) and records each file's size and SHA-256: a
 * base is exported file by file (GET /v1/bases/:ref/files/:name, resumable) to the developers who make overlays.
 */
import { createHash, type Hash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { access, mkdir, readdir, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { CloudletError, isErrno } from '../errors';
import { checkImage, imageInfo } from '../images/qemu-img';
import { buildChunkIndex, CHUNK_INDEX_FILE } from '../vm/chunk-index';
import { readSaveImageHeader } from '../vm/save-image';
import { copyRegularFile, writeManifest } from './catalog';
import { manifestFiles, parseManifest } from './manifest';
import type { ServiceManifest } from './types';

const MANIFEST = 'manifest.json';
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/;
const DIGEST = /^[0-9a-f]{64}$/;

export interface BaseVm {
  /** sha256 (hex) over the manifest and the bytes of every file it names. */
  digest: string;
  name: string;
  manifest: ServiceManifest;
  dir: string;
  /** The files it consists of: those the manifest names, and its chunk index. */
  files: BaseFile[];
}

export interface BaseFile {
  name: string;
  bytes: number;
  sha256: string;
}

/** manifest.json of a base directory. */
interface StoredBase {
  name: string;
  manifest: unknown;
  /** Absent in bases imported before there were chunk indexes: made at the next start. */
  files?: BaseFile[];
}

export class BaseStore {
  private readonly bases = new Map<string, BaseVm>();

  constructor(
    private readonly root: string,
    /** A fresh private directory under the agent's staging area. */
    private readonly workDir: () => Promise<string>,
    private readonly log: (line: string) => void,
  ) {}

  async load(): Promise<void> {
    await mkdir(this.root, { recursive: true, mode: 0o755 });
    for (const entry of await readdir(this.root)) {
      const dir = path.join(this.root, entry);
      try {
        const stored = JSON.parse(await readFile(path.join(dir, MANIFEST), 'utf8')) as StoredBase;
        if (!DIGEST.test(entry)) throw new Error('not a digest');
        const manifest = parseManifest(stored.manifest);
        const indexed =
          stored.files &&
          (await access(path.join(dir, CHUNK_INDEX_FILE)).then(
            () => true,
            () => false,
          ));
        let files = stored.files;
        if (!files || !indexed) {
          this.log(`bases: indexing ${stored.name} (${entry}), imported before bases had chunk indexes`);
          files = [...(await hashBase(dir, manifest)).files, await indexBase(dir, manifest)];
          await writeManifest(dir, { name: stored.name, manifest, files });
        }
        this.bases.set(entry, { digest: entry, name: stored.name, manifest, dir, files });
      } catch (err) {
        this.log(`bases: skipping ${dir}: ${(err as Error).message}`);
      }
    }
  }

  list(): BaseVm[] {
    return [...this.bases.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  /** By digest, or by name (names are unique among the bases). */
  get(ref: string): BaseVm {
    const base = this.bases.get(ref) ?? [...this.bases.values()].find((b) => b.name === ref);
    if (!base) throw new CloudletError('BASE_NOT_FOUND', `no base VM named or digested ${ref}`, { details: { base: ref } });
    return base;
  }

  /** Where one of the base's files is (for an export): only the files it consists of. */
  filePath(ref: string, name: string): { base: BaseVm; file: BaseFile; path: string } {
    const base = this.get(ref);
    const file = base.files.find((f) => f.name === name);
    if (!file) throw new CloudletError('NOT_FOUND', `base ${base.name} has no file ${name}`, { details: { base: base.digest, file: name } });
    return { base, file, path: path.join(base.dir, file.name) };
  }

  /**
   * Import a base from a directory on this machine holding manifest.json and the files it names (a service
   * directory, e.g. one made by build-guest.sh, is a valid base, and so is an exported base). Importing the same
   * bytes again returns the base.
   */
  async import(sourceDir: string, name: string): Promise<BaseVm> {
    if (!path.isAbsolute(sourceDir)) throw new CloudletError('INVALID_PARAMETER', `import path must be absolute: ${sourceDir}`);
    if (!NAME.test(name)) throw new CloudletError('INVALID_PARAMETER', `invalid base name ${JSON.stringify(name)}`, { details: { parameter: 'name' } });
    const json = (await readJson(path.join(sourceDir, MANIFEST))) as { manifest?: unknown };
    // A base's own directory, or one `cloudlet base export` wrote, wraps the service manifest as {name, manifest, …}.
    const manifest = parseManifest(json.manifest ?? json);
    if (manifestFiles(manifest).includes(CHUNK_INDEX_FILE)) throw new CloudletError('INVALID_MANIFEST', `a base's files cannot be named ${CHUNK_INDEX_FILE}`);
    const work = await this.workDir();
    try {
      for (const file of manifestFiles(manifest)) await copyRegularFile(sourceDir, file, work);
      const disk = await imageInfo(path.join(work, manifest.disk));
      if (disk.format !== 'qcow2' || disk.backingFile) throw new CloudletError('INVALID_IMAGE', `${manifest.disk}: a base disk must be a standalone qcow2`);
      await checkImage(path.join(work, manifest.disk), 'qcow2');
      if (manifest.state) await readSaveImageHeader(path.join(work, manifest.state));
      const { digest, files } = await hashBase(work, manifest);
      const existing = this.bases.get(digest);
      if (existing) {
        if (existing.name !== name) throw new CloudletError('CONFLICT', `this base is already imported as ${existing.name}`, { details: { digest } });
        return existing;
      }
      if ([...this.bases.values()].some((b) => b.name === name)) {
        throw new CloudletError('CONFLICT', `another base is already named ${name}`, { details: { name } });
      }
      files.push(await indexBase(work, manifest));
      await writeManifest(work, { name, manifest, files });
      const dir = path.join(this.root, digest);
      await rename(work, dir);
      const base: BaseVm = { digest, name, manifest, dir, files };
      this.bases.set(digest, base);
      return base;
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  }
}

async function readJson(file: string): Promise<unknown> {
  try {
    return JSON.parse(await readFile(file, 'utf8'));
  } catch (err) {
    throw new CloudletError(isErrno(err, 'ENOENT') ? 'INVALID_MANIFEST' : 'INVALID_PARAMETER', `cannot read ${file}: ${(err as Error).message}`);
  }
}

export async function digestOf(dir: string, manifest: ServiceManifest): Promise<string> {
  const hash = createHash('sha256').update(JSON.stringify(manifest));
  for (const file of manifestFiles(manifest)) await readThrough(path.join(dir, file), [hash]);
  return hash.digest('hex');
}

/** The base's digest, and the size and SHA-256 of each file the manifest names, in one read of each. */
async function hashBase(dir: string, manifest: ServiceManifest): Promise<{ digest: string; files: BaseFile[] }> {
  const digest = createHash('sha256').update(JSON.stringify(manifest));
  const files: BaseFile[] = [];
  for (const name of manifestFiles(manifest)) files.push(await describeFile(dir, name, digest));
  return { digest: digest.digest('hex'), files };
}

/** Build the base's chunk index beside its files. */
async function indexBase(dir: string, manifest: ServiceManifest): Promise<BaseFile> {
  await buildChunkIndex(path.join(dir, manifest.disk), manifest.state && path.join(dir, manifest.state), path.join(dir, CHUNK_INDEX_FILE));
  return describeFile(dir, CHUNK_INDEX_FILE);
}

async function describeFile(dir: string, name: string, alsoInto?: Hash): Promise<BaseFile> {
  const hash = createHash('sha256');
  const bytes = await readThrough(path.join(dir, name), alsoInto ? [hash, alsoInto] : [hash]);
  return { name, bytes, sha256: hash.digest('hex') };
}

/** Feed a file's bytes to the hashes; its size. */
async function readThrough(file: string, hashes: Hash[]): Promise<number> {
  let bytes = 0;
  for await (const chunk of createReadStream(file)) {
    for (const hash of hashes) hash.update(chunk as Buffer);
    bytes += (chunk as Buffer).length;
  }
  return bytes;
}
