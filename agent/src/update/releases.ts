/**
 * The agent's installed releases on the appliance, under one home directory (/var/lib/cloudlet-agent):
 *
 *   current            symlink to the release the unit runs (absent: the factory release in the image)
 *   releases/<name>/   releases installed from bundles, <version>-<first 12 hex of the payload's SHA-256>
 *   update.json        the last update: verifying (switched, not yet confirmed healthy), committed or rolled-back
 *   update.json.unreadable  a record found torn or empty, set aside by the recovery
 *   update.lock        held by the updater while it runs: {pid, bootId}
 *
 * The factory release lives in the read-only image, so a box can always go back to it.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, readdir, readlink, rename, rm, symlink, unlink, writeFile } from 'node:fs/promises';
import { replaceFile } from '../system/atomic-file';
import path from 'node:path';
import { CloudletError, isErrno } from '../errors';
import { unpackBundle, type VerifiedBundle } from './bundle';

export interface UpdateRecord {
  state: 'verifying' | 'committed' | 'rolled-back';
  version: string;
  /** The release dirs switched from and to. */
  from: string;
  to: string;
  at: string;
  /** Why it was rolled back. */
  reason?: string;
}

interface LockOwner {
  pid: number;
  bootId: string;
}

export class ReleaseStore {
  readonly currentLink: string;
  readonly releasesDir: string;
  private readonly stateFile: string;
  private readonly lockFile: string;

  constructor(
    readonly home: string,
    readonly factoryDir: string,
  ) {
    this.currentLink = path.join(home, 'current');
    this.releasesDir = path.join(home, 'releases');
    this.stateFile = path.join(home, 'update.json');
    this.lockFile = path.join(home, 'update.lock');
  }

  /** The release directory the agent runs from. */
  async current(): Promise<string> {
    try {
      return await readlink(this.currentLink);
    } catch (err) {
      if (isErrno(err, 'ENOENT')) return this.factoryDir;
      throw err;
    }
  }

  /** Unpack a verified bundle next to the running release; returns its directory. Nothing is switched yet. */
  async install(bundle: VerifiedBundle): Promise<string> {
    const dir = path.join(this.releasesDir, `${bundle.header.version}-${bundle.header.sha256.slice(0, 12)}`);
    const staging = path.join(this.releasesDir, `.staging-${randomBytes(6).toString('hex')}`);
    await mkdir(staging, { recursive: true, mode: 0o755 });
    try {
      await unpackBundle(bundle, staging);
      const version = await releaseVersion(staging).catch(() => null);
      if (version !== bundle.header.version) {
        throw new CloudletError('BUNDLE_INVALID', `${bundle.file} holds version ${version ?? '(no package.json)'}, its header says ${bundle.header.version}`);
      }
      await rm(dir, { recursive: true, force: true });
      await rename(staging, dir);
      return dir;
    } finally {
      // Retried: a payload that fails half-way may still have files being written when the error arrives.
      await rm(staging, { recursive: true, force: true, maxRetries: 5 });
    }
  }

  /** Point `current` at dir, atomically (a new link renamed over the old one): a crash leaves one or the other. */
  async switchTo(dir: string): Promise<void> {
    const next = `${this.currentLink}.next`;
    await unlink(next).catch(() => {});
    await symlink(dir, next);
    await rename(next, this.currentLink);
  }

  /** Delete installed releases other than `keep` (the factory release is never under releases/). */
  async prune(keep: string[]): Promise<void> {
    const names = await readdir(this.releasesDir).catch(() => [] as string[]);
    for (const name of names) {
      const dir = path.join(this.releasesDir, name);
      if (!keep.includes(dir)) await rm(dir, { recursive: true, force: true });
    }
  }

  /** The last update's record: null when there is none, 'unreadable' when the file is torn, empty or not one. */
  async record(): Promise<UpdateRecord | null | 'unreadable'> {
    let text: string;
    try {
      text = await readFile(this.stateFile, 'utf8');
    } catch (err) {
      if (isErrno(err, 'ENOENT')) return null;
      throw err;
    }
    return parseRecord(text) ?? 'unreadable';
  }

  /** Durably (written aside, fsynced, renamed in): a power cut leaves the previous record or this one, whole. */
  async writeRecord(record: UpdateRecord): Promise<void> {
    await replaceFile(this.stateFile, JSON.stringify(record, null, 2) + '\n', 0o644);
  }

  /** Keep an unreadable record for a look later, out of the way of the next one. */
  async setAsideRecord(): Promise<void> {
    await rename(this.stateFile, `${this.stateFile}.unreadable`);
  }

  /**
   * Take the update lock; throws UPDATE_IN_PROGRESS while a live updater holds it. A lock left by an updater that
   * died (or by an earlier boot) is taken over.
   */
  async lock(): Promise<() => Promise<void>> {
    await mkdir(this.home, { recursive: true });
    const owner: LockOwner = { pid: process.pid, bootId: await bootId() };
    for (;;) {
      try {
        await writeFile(this.lockFile, JSON.stringify(owner), { flag: 'wx' });
        return () => unlink(this.lockFile).catch(() => {});
      } catch (err) {
        if (!isErrno(err, 'EEXIST')) throw err;
      }
      const holder = await this.lockHolder();
      if (holder) throw new CloudletError('UPDATE_IN_PROGRESS', `an update is already running (pid ${holder.pid})`);
      await unlink(this.lockFile).catch(() => {});
    }
  }

  /** The live updater holding the lock, or null. */
  async lockHolder(): Promise<LockOwner | null> {
    let owner: LockOwner;
    try {
      owner = JSON.parse(await readFile(this.lockFile, 'utf8')) as LockOwner;
    } catch {
      return null;
    }
    // Same boot and a live pid: after a reboot pids start over, so an old lock's pid may be anyone's.
    return owner.bootId === (await bootId()) && isAlive(owner.pid) ? owner : null;
  }
}

const STATES: readonly string[] = ['verifying', 'committed', 'rolled-back'] satisfies UpdateRecord['state'][];

/** The record in `text`, or null when it is not one (torn by a power cut before records were synced, or damaged). */
function parseRecord(text: string): UpdateRecord | null {
  let value: Partial<Record<keyof UpdateRecord, unknown>>;
  try {
    value = JSON.parse(text) as typeof value;
  } catch {
    return null;
  }
  if (typeof value !== 'object' || value === null || !STATES.includes(value.state as string)) return null;
  const { version, from, to, at, reason } = value;
  if (![version, from, to, at].every((field) => typeof field === 'string') || (reason !== undefined && typeof reason !== 'string')) return null;
  return value as UpdateRecord;
}

/** The version in a release directory's package.json. */
export async function releaseVersion(dir: string): Promise<string> {
  const pkg = JSON.parse(await readFile(path.join(dir, 'package.json'), 'utf8')) as { version?: unknown };
  if (typeof pkg.version !== 'string') throw new CloudletError('BUNDLE_INVALID', `${dir}/package.json has no version`);
  return pkg.version;
}

async function bootId(): Promise<string> {
  return (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim();
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return isErrno(err, 'EPERM');
  }
}
