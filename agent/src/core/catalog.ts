import { randomUUID } from 'node:crypto';
import { constants as fsc } from 'node:fs';
import { chmod, copyFile, lstat, mkdir, readdir, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { CloudletError, isErrno } from '../errors';
import { checkImage, convertImage, imageInfo } from '../images/qemu-img';
import { replaceFile } from '../system/atomic-file';
import { noSpaceError, requireFreeSpace } from '../system/disk-space';
import { faultPoint } from '../system/fault-points';
import { readSaveImageHeader } from '../vm/save-image';
import type { BaseVm } from './bases';
import { manifestFiles, parseManifest } from './manifest';
import { RevisedMap } from './revised-map';
import type { Service, ServiceManifest } from './types';

const MANIFEST = 'manifest.json';

/**
 * The Cached VM catalog: one directory per service under `<data>/services`. A directory only ever appears there
 * complete (built in `<data>/tmp` and renamed in), and manifest.json is the commit point of every change to it, so
 * a crash at any moment leaves either the old service or the new one, never half of one.
 */
export class Catalog {
  private readonly services = new RevisedMap<string, Service>();

  constructor(
    private readonly root: string,
    private readonly staging: string,
    private readonly log: (line: string) => void = () => {},
  ) {}

  /** Read every service directory; a broken one is reported and skipped, never deleted. */
  async load(): Promise<void> {
    await mkdir(this.root, { recursive: true, mode: 0o755 });
    await rm(this.staging, { recursive: true, force: true });
    await mkdir(this.staging, { recursive: true, mode: 0o755 });
    for (const entry of await readdir(this.root, { withFileTypes: true })) {
      if (!entry.isDirectory()) continue;
      const dir = path.join(this.root, entry.name);
      try {
        const manifest = await readManifest(dir);
        if (manifest.service_id !== entry.name) throw new CloudletError('INVALID_MANIFEST', `service_id ${manifest.service_id} does not match its directory`);
        this.services.set(manifest.service_id, {
          id: manifest.service_id,
          manifest,
          dir,
          importedAt: (await lstat(path.join(dir, MANIFEST))).mtime.toISOString(),
        });
      } catch (err) {
        this.log(`catalog: skipping ${dir}: ${(err as Error).message}`);
      }
    }
  }

  /** Import every service directory under `seedDir` that the catalog does not have yet; problems are logged. */
  async importSeeds(seedDir: string): Promise<void> {
    const entries = await readdir(seedDir, { withFileTypes: true }).catch(() => []);
    for (const entry of entries) {
      if (!entry.isDirectory() || this.services.has(entry.name)) continue;
      try {
        const service = await this.import(path.join(seedDir, entry.name));
        this.log(`catalog: imported ${service.id} from ${seedDir}`);
      } catch (err) {
        if (!(err instanceof CloudletError && err.code === 'SERVICE_EXISTS'))
          this.log(`catalog: cannot import ${entry.name} from ${seedDir}: ${(err as Error).message}`);
      }
    }
  }

  list(): Service[] {
    return [...this.services.values()].sort((a, b) => a.id.localeCompare(b.id));
  }

  /** Changes whenever a service is imported, replaced or removed. */
  get revision(): number {
    return this.services.revision;
  }

  get(id: string): Service {
    const service = this.services.get(id);
    if (!service) throw new CloudletError('SERVICE_NOT_FOUND', `no service with id ${id}`, { details: { service_id: id } });
    return service;
  }

  has(id: string): boolean {
    return this.services.has(id);
  }

  /** Validate a service directory on this machine and copy it into the catalog. */
  async import(sourceDir: string): Promise<Service> {
    if (!path.isAbsolute(sourceDir)) throw new CloudletError('INVALID_PARAMETER', `import path must be absolute: ${sourceDir}`);
    const manifest = await readManifest(sourceDir);
    if (this.services.has(manifest.service_id)) {
      throw new CloudletError('SERVICE_EXISTS', `service ${manifest.service_id} is already in the catalog`, { details: { service_id: manifest.service_id } });
    }
    const what = `import service ${manifest.service_id}`;
    const bytes = await sourceBytes(sourceDir, manifestFiles(manifest));
    await requireFreeSpace(this.staging, bytes, what);
    const work = await this.workDir().catch(async (err) => {
      throw await noSpaceError(err, this.staging, what, bytes);
    });
    try {
      for (const name of manifestFiles(manifest)) await copyRegularFile(sourceDir, name, work);
      const imported = await normalizeDisk(work, manifest);
      await verifyFiles(work, imported);
      await writeManifest(work, imported);
      const dir = path.join(this.root, imported.service_id);
      faultPoint('catalog:before-rename');
      await rename(work, dir).catch((err) => {
        throw isErrno(err, 'ENOTEMPTY') || isErrno(err, 'EEXIST')
          ? new CloudletError('SERVICE_EXISTS', `service ${imported.service_id} is already in the catalog`)
          : err;
      });
      faultPoint('catalog:after-rename');
      const service: Service = { id: imported.service_id, manifest: imported, dir, importedAt: new Date().toISOString() };
      this.services.set(service.id, service);
      return service;
    } catch (err) {
      throw await noSpaceError(err, this.staging, what, bytes);
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  }

  async remove(id: string): Promise<void> {
    const service = this.get(id);
    this.services.delete(id);
    // Move it out of the catalog in one step; deleting the files afterwards may take a while.
    const trash = await this.workDir();
    await rename(service.dir, path.join(trash, 'service'));
    await rm(trash, { recursive: true, force: true });
  }

  /**
   * Replace a service's disk and memory state with a consistent pair captured from its running VM (the files are
   * moved from `captured`). New files get fresh names, the manifest switches to them, then the old files go.
   */
  async replaceDiskAndState(id: string, captured: { disk: string; state: string }): Promise<Service> {
    const service = this.get(id);
    const generation = Date.now().toString(36);
    const diskName = `disk-${generation}.qcow2`;
    const stateName = `state-${generation}.sav`;
    await rename(captured.disk, path.join(service.dir, diskName));
    await rename(captured.state, path.join(service.dir, stateName));
    await chmod(path.join(service.dir, diskName), 0o644);
    await chmod(path.join(service.dir, stateName), 0o644);
    faultPoint('capture:before-commit');
    const manifest: ServiceManifest = { ...service.manifest, disk: diskName, state: stateName };
    await writeManifest(service.dir, manifest);
    const updated: Service = { ...service, manifest };
    this.services.set(id, updated);
    for (const old of [service.manifest.disk, service.manifest.state]) {
      if (old && old !== diskName && old !== stateName) await rm(path.join(service.dir, old), { force: true });
    }
    return updated;
  }

  /**
   * A captured disk and memory state in the work directory `dir`, with the base's kernel and initrd, imported as the
   * Cached VM service `manifest` describes: how a recipe's result and a kept synthesis become services.
   */
  async importCaptured({ dir, disk, state }: { dir: string; disk: string; state: string | null }, manifest: ServiceManifest, base: BaseVm): Promise<Service> {
    const boot = base.manifest.boot;
    for (const file of [boot?.kernel, boot?.initrd]) if (file) await copyRegularFile(base.dir, file, dir);
    await writeManifest(dir, { ...manifest, disk: path.basename(disk), state: state && path.basename(state), boot });
    return this.import(dir);
  }

  /** A fresh private directory under staging, for work that must not be seen until it is complete. */
  async workDir(): Promise<string> {
    const dir = path.join(this.staging, randomUUID());
    await mkdir(dir, { mode: 0o755 });
    return dir;
  }
}

async function readManifest(dir: string): Promise<ServiceManifest> {
  let text: string;
  try {
    text = await readFile(path.join(dir, MANIFEST), 'utf8');
  } catch (err) {
    throw new CloudletError(
      isErrno(err, 'ENOENT') || isErrno(err, 'ENOTDIR') ? 'INVALID_MANIFEST' : 'INVALID_PARAMETER',
      `cannot read ${path.join(dir, MANIFEST)}: ${(err as Error).message}`,
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new CloudletError('INVALID_MANIFEST', `manifest.json is not valid JSON: ${(err as Error).message}`);
  }
  return parseManifest(json);
}

export async function writeManifest(dir: string, manifest: object): Promise<void> {
  await replaceFile(path.join(dir, MANIFEST), JSON.stringify(manifest, null, 2) + '\n', 0o644);
}

/** What copying the named files takes: their sizes (a copy is not sparse); unreadable ones are left to the copy to report. */
async function sourceBytes(sourceDir: string, names: string[]): Promise<number> {
  const sizes = await Promise.all(
    names.map((name) =>
      lstat(path.join(sourceDir, name)).then(
        (s) => s.size,
        () => 0,
      ),
    ),
  );
  return sizes.reduce((sum, size) => sum + size, 0);
}

/** Copy one file named by the manifest; links and special files are refused (they could point anywhere). */
export async function copyRegularFile(sourceDir: string, name: string, destDir: string): Promise<void> {
  const source = path.join(sourceDir, name);
  const stat = await lstat(source).catch((err) => {
    throw new CloudletError(
      'INVALID_MANIFEST',
      `manifest.json names ${name}, which cannot be read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
    );
  });
  if (!stat.isFile()) throw new CloudletError('INVALID_MANIFEST', `manifest.json names ${name}, which is not a regular file`);
  // FICLONE shares blocks on filesystems that can (btrfs, xfs) and falls back to a copy elsewhere.
  await copyFile(source, path.join(destDir, name), fsc.COPYFILE_FICLONE);
  await chmod(path.join(destDir, name), 0o644);
}

/** Linked clones need a qcow2 template: a raw disk is converted once, at import. */
async function normalizeDisk(dir: string, manifest: ServiceManifest): Promise<ServiceManifest> {
  const disk = path.join(dir, manifest.disk);
  const info = await imageInfo(disk);
  if (info.backingFile) throw new CloudletError('INVALID_IMAGE', `${manifest.disk} has a backing file; import a standalone image`);
  if (info.format === 'qcow2') return manifest;
  if (info.format !== 'raw') throw new CloudletError('INVALID_IMAGE', `${manifest.disk} is ${info.format}; qcow2 or raw expected`);
  const converted = manifest.disk.replace(/(\.[^.]*)?$/, '.qcow2');
  const target = converted === manifest.disk ? `${manifest.disk}.qcow2` : converted;
  await convertImage(disk, path.join(dir, target), 'qcow2');
  await rm(disk);
  return { ...manifest, disk: target };
}

async function verifyFiles(dir: string, manifest: ServiceManifest): Promise<void> {
  // The format is named: left to guess, qemu-img takes a qcow2 with a garbled header for a raw image.
  await checkImage(path.join(dir, manifest.disk), 'qcow2');
  if (manifest.state) await readSaveImageHeader(path.join(dir, manifest.state));
}
