/**
 * The agent's only door to genisoimage (Debian package genisoimage): builds cloud-init NoCloud config drives, an
 * ISO9660 volume labelled `cidata` holding `user-data` and `meta-data`, which real cloud images read as well as the
 * test guest's /init. Async child process, no shell; the drive appears at its destination only when complete.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rename, rm, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { CloudletError, isNoSpace } from '../errors';

export interface ConfigDriveContent {
  /** What cloud-init runs: here always a `#!` script (NoCloud accepts scripts as user-data). */
  userData: string;
  /** NoCloud meta-data: the instance id (cloud-init runs user-data once per instance id) and a host name. */
  instanceId: string;
  hostname: string;
}

export async function buildConfigDrive(dest: string, content: ConfigDriveContent): Promise<void> {
  const stage = await mkdtemp(join(dirname(dest), '.cidata-'));
  const tmp = join(dirname(dest), `.${basename(dest)}.${randomBytes(6).toString('hex')}.tmp`);
  try {
    await writeFile(join(stage, 'user-data'), content.userData, { mode: 0o644 });
    await writeFile(join(stage, 'meta-data'), `instance-id: ${content.instanceId}\nlocal-hostname: ${content.hostname}\n`, { mode: 0o644 });
    // Joliet and Rock Ridge keep the names exactly `user-data` and `meta-data` (plain ISO9660 would mangle them).
    await genisoimage(['-quiet', '-output', tmp, '-volid', 'cidata', '-joliet', '-rock', join(stage, 'user-data'), join(stage, 'meta-data')]);
    await rename(tmp, dest);
  } finally {
    await rm(stage, { recursive: true, force: true });
    await rm(tmp, { force: true });
  }
}

function genisoimage(args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('genisoimage', args, { encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } }, (err, _stdout, stderr) => {
      if (!err) return resolve();
      const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
      reject(
        new CloudletError(
          isNoSpace(stderr) ? 'NO_SPACE' : 'IMAGE_TOOL_FAILED',
          missing
            ? 'genisoimage not found: install the Debian package genisoimage'
            : `cannot build the config drive: ${stderr.trim().split('\n').slice(-2).join(' / ') || err.message}`,
          { cause: err },
        ),
      );
    });
  });
}
