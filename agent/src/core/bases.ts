/**
 * Base VMs: generic VMs that services are made from at request time (On-Demand VM Provisioning builds on one with a
 * recipe; VM Synthesis applies an overlay to one). A base is a directory `<data>/bases/<digest>`: a qcow2 disk, an
 * optional saved memory state, the kernel/initrd it boots, and manifest.json in the service manifest format (its
 * port and readiness describe the base's stock service). The digest covers every file's bytes and the manifest, so
 * it names exactly one base; like services, a base directory only appears complete (built in staging, renamed in).
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { CloudletError, isErrno } from '../errors';
import { checkImage, imageInfo } from '../images/qemu-img';
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
        const { name, manifest } = JSON.parse(await readFile(path.join(dir, MANIFEST), 'utf8')) as { name: string; manifest: unknown };
        if (!DIGEST.test(entry)) throw new Error('not a digest');
        this.bases.set(entry, { digest: entry, name, manifest: parseManifest(manifest), dir });
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

  /**
   * Import a base from a directory on this machine holding manifest.json and the files it names (a service
   * directory, e.g. one made by build-guest.sh, is a valid base). Importing the same bytes again returns the base.
   */
  async import(sourceDir: string, name: string): Promise<BaseVm> {
    if (!path.isAbsolute(sourceDir)) throw new CloudletError('INVALID_PARAMETER', `import path must be absolute: ${sourceDir}`);
    if (!NAME.test(name)) throw new CloudletError('INVALID_PARAMETER', `invalid base name ${JSON.stringify(name)}`, { details: { parameter: 'name' } });
    const manifest = parseManifest(await readJson(path.join(sourceDir, MANIFEST)));
    const work = await this.workDir();
    try {
      for (const file of manifestFiles(manifest)) await copyRegularFile(sourceDir, file, work);
      const disk = await imageInfo(path.join(work, manifest.disk));
      if (disk.format !== 'qcow2' || disk.backingFile) throw new CloudletError('INVALID_IMAGE', `${manifest.disk}: a base disk must be a standalone qcow2`);
      await checkImage(path.join(work, manifest.disk), 'qcow2');
      if (manifest.state) await readSaveImageHeader(path.join(work, manifest.state));
      const digest = await digestOf(work, manifest);
      const existing = this.bases.get(digest);
      if (existing) {
        if (existing.name !== name) throw new CloudletError('CONFLICT', `this base is already imported as ${existing.name}`, { details: { digest } });
        return existing;
      }
      if ([...this.bases.values()].some((b) => b.name === name)) {
        throw new CloudletError('CONFLICT', `another base is already named ${name}`, { details: { name } });
      }
      await writeManifest(work, { name, manifest });
      const dir = path.join(this.root, digest);
      await rename(work, dir);
      const base: BaseVm = { digest, name, manifest, dir };
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
  for (const file of manifestFiles(manifest)) {
    for await (const chunk of createReadStream(path.join(dir, file))) hash.update(chunk as Buffer);
  }
  return hash.digest('hex');
}
