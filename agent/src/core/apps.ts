/**
 * Cloudlet Push: the app catalog. Android APKs and web-app bundles, each tied to a service id, stored under
 * `<data>/apps/<app id>/` as `app.json` (the record) plus the file itself, named by its SHA-256. An upload is streamed
 * into a private staging directory while its MD5 and SHA-256 are computed, verified, and only then renamed into the
 * catalog, so a refused or interrupted upload leaves nothing behind and a listed app always has its whole file.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { CloudletError, asCloudletError, isErrno } from '../errors';
import { noSpaceError, requireFreeSpace } from '../system/disk-space';
import type { App, AppDescription, AppFilter, AppKind, NewApp } from './types';
import { faultPoint } from '../system/fault-points';

const RECORD = 'app.json';

/** What each kind of app is served as. The KD face offers only Android apps (client-lib installs what it downloads). */
export const APP_KINDS: Record<AppKind, { osName: string; contentType: string; extension: string }> = {
  android: { osName: 'Android', contentType: 'application/vnd.android.package-archive', extension: '.apk' },
  web: { osName: 'web', contentType: 'application/zip', extension: '.zip' },
};

/** File names offered to clients: a plain name, no directories, nothing a shell or a Content-Disposition trips on. */
const FILE_NAME = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$/;
const SERVICE_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/;
const APP_ID = /^[0-9a-f]{24}$/;
const VERSION = /^\d+(\.\d+)*$/;

export class AppStore {
  private readonly apps = new Map<string, App>();

  constructor(
    private readonly root: string,
    private readonly staging: string,
    /** Largest accepted app file, in bytes. */
    readonly maxBytes: number,
    private readonly log: (line: string) => void = () => {},
  ) {}

  /** Read every app record; a broken one is reported and skipped, never deleted. */
  async load(): Promise<void> {
    await mkdir(this.root, { recursive: true, mode: 0o755 });
    for (const entry of await readdir(this.root, { withFileTypes: true })) {
      if (!entry.isDirectory()) continue;
      const dir = path.join(this.root, entry.name);
      try {
        const app = JSON.parse(await readFile(path.join(dir, RECORD), 'utf8')) as App;
        if (app.id !== entry.name) throw new Error(`its id ${app.id} does not match its directory`);
        const file = await stat(path.join(dir, storedFileName(app)));
        if (file.size !== app.size) throw new Error(`its file has ${file.size} bytes, ${app.size} expected`);
        this.apps.set(app.id, app);
      } catch (err) {
        this.log(`apps: skipping ${dir}: ${(err as Error).message}`);
      }
    }
  }

  list(filter: AppFilter = {}): App[] {
    return [...this.apps.values()].filter((app) => matches(app, filter)).sort((a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id));
  }

  get(id: string): App {
    const app = APP_ID.test(id) ? this.apps.get(id) : undefined;
    if (!app) throw new CloudletError('APP_NOT_FOUND', `no app with id ${id}`, { details: { app_id: id } });
    return app;
  }

  /** Where the app's bytes are, to be streamed to a client. */
  filePath(app: App): string {
    return path.join(this.root, app.id, storedFileName(app));
  }

  /**
   * Store a new app from `content` (`length` bytes, as announced by the uploader). The whole upload is refused up
   * front when it announces more than `maxBytes`, and fails when it delivers a different number of bytes or does not
   * match the `sha256` the uploader gave.
   */
  async add(meta: NewApp, content: Readable, length: number): Promise<App> {
    const checked = validateNewApp(meta);
    if (length > this.maxBytes) {
      throw new CloudletError('PAYLOAD_TOO_LARGE', `The app file has ${length} bytes; at most ${this.maxBytes} are accepted`, {
        details: { limit: this.maxBytes },
      });
    }
    await requireFreeSpace(this.staging, length, `store the app ${checked.name}`);
    const id = randomBytes(12).toString('hex');
    const work = path.join(this.staging, `app-${id}`);
    try {
      await mkdir(work, { recursive: true, mode: 0o755 });
      const md5 = createHash('md5');
      const sha256 = createHash('sha256');
      let size = 0;
      const hashing = new Transform({
        transform(chunk: Buffer, _encoding, callback) {
          size += chunk.length;
          md5.update(chunk);
          sha256.update(chunk);
          callback(null, chunk);
        },
      });
      const upload = path.join(work, 'upload');
      await pipeline(content, hashing, createWriteStream(upload, { mode: 0o644 }));
      if (size !== length) throw new CloudletError('BAD_REQUEST', `The upload ended after ${size} of ${length} bytes`);
      if (size === 0) throw new CloudletError('INVALID_APP', 'The app file is empty');
      const app: App = { ...checked, id, size, md5: md5.digest('hex'), sha256: sha256.digest('hex'), addedAt: new Date().toISOString() };
      if (meta.sha256 && meta.sha256.toLowerCase() !== app.sha256) {
        throw new CloudletError('INVALID_APP', `The upload's SHA-256 is ${app.sha256}, not ${meta.sha256}: it was damaged on the way`, {
          details: { sha256: app.sha256 },
        });
      }
      await rename(upload, path.join(work, storedFileName(app)));
      await writeFile(path.join(work, RECORD), JSON.stringify(app, null, 2) + '\n', { mode: 0o644 });
      // The record is written before the rename: the app appears in the catalog complete, in one step.
      faultPoint('apps:before-rename');
      await rename(work, path.join(this.root, id));
      this.apps.set(id, app);
      return app;
    } catch (err) {
      const error = asCloudletError(err);
      // A client that went away mid-upload surfaces as a premature close of the body stream.
      if (error.code === 'INTERNAL' && isErrno(err, 'ERR_STREAM_PREMATURE_CLOSE')) throw new CloudletError('BAD_REQUEST', 'The upload was interrupted');
      throw await noSpaceError(err, this.staging, `store the app ${checked.name}`, length);
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  }

  async remove(id: string): Promise<void> {
    const app = this.get(id);
    this.apps.delete(id);
    // Out of the catalog in one rename; a download already streaming keeps its open file.
    const trash = path.join(this.staging, `app-removed-${id}`);
    await rename(path.join(this.root, app.id), trash);
    await rm(trash, { recursive: true, force: true });
  }
}

/** The app's file on disk is content-addressed: its SHA-256 and its kind's extension. */
function storedFileName(app: App): string {
  return `${app.sha256}${APP_KINDS[app.kind].extension}`;
}

function matches(app: App, filter: AppFilter): boolean {
  if (filter.serviceId !== undefined && app.serviceId !== filter.serviceId) return false;
  if (filter.osName !== undefined && APP_KINDS[app.kind].osName.toLowerCase() !== filter.osName.toLowerCase()) return false;
  // A device runs an app when its OS version is at least the app's minimum; an unparsable version filters nothing out.
  if (filter.osVersion !== undefined && VERSION.test(filter.osVersion) && compareVersions(filter.osVersion, app.minOsVersion) < 0) return false;
  // Any one shared tag is enough, as pycloud's Mongo `$in` query.
  if (filter.tags !== undefined && filter.tags.length > 0 && !filter.tags.some((tag) => app.tags.includes(tag))) return false;
  return true;
}

/** Dotted numeric versions: "8.1" < "10", "7" = "7.0". */
export function compareVersions(a: string, b: string): number {
  const x = a.split('.').map(Number);
  const y = b.split('.').map(Number);
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    const d = (x[i] ?? 0) - (y[i] ?? 0);
    if (d !== 0) return Math.sign(d);
  }
  return 0;
}

function validateNewApp(meta: NewApp): AppDescription {
  const invalid = (field: string, why: string) => new CloudletError('INVALID_PARAMETER', `${field} ${why}`, { details: { parameter: field } });
  if (!Object.hasOwn(APP_KINDS, meta.kind)) throw invalid('kind', `must be one of ${Object.keys(APP_KINDS).join(', ')}`);
  if (!SERVICE_ID.test(meta.serviceId)) throw invalid('service_id', 'must be 1–100 of A-Z a-z 0-9 . _ -, starting with a letter or digit');
  if (!meta.name.trim() || meta.name.length > 200) throw invalid('name', 'must be 1–200 characters');
  if (!FILE_NAME.test(meta.fileName) || meta.fileName.includes('..')) {
    throw invalid('file_name', 'must be a plain file name (letters, digits, . _ + -; no directories, no "..")');
  }
  if (meta.minOsVersion !== '' && !VERSION.test(meta.minOsVersion)) throw invalid('min_os_version', 'must be a dotted number such as 8.1');
  if (meta.tags.some((tag) => !/^[^,\s]{1,50}$/.test(tag))) throw invalid('tags', 'must be words of 1–50 characters without commas or spaces');
  if (meta.sha256 !== undefined && !/^[0-9a-fA-F]{64}$/.test(meta.sha256)) throw invalid('sha256', 'must be 64 hexadecimal digits');
  return {
    kind: meta.kind,
    serviceId: meta.serviceId,
    name: meta.name.trim(),
    description: meta.description,
    packageName: meta.packageName,
    version: meta.version,
    minOsVersion: meta.minOsVersion || '0',
    tags: meta.tags,
    fileName: meta.fileName,
  };
}
