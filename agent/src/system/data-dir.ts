/**
 * The data directory, made so that QEMU can reach it. QEMU does not run as the agent: under qemu:///system it is
 * libvirt's QEMU user (Debian: libvirt-qemu), and libvirt refuses to start a VM whose disk lies below a directory that
 * user may not search ("Cannot access storage file ... Permission denied"). The directories the agent creates are
 * made searchable here; a directory it did not create (a `mktemp -d`, /root) is the operator's, and its mode is not
 * changed behind their back: the agent refuses to start, naming the directory and the fix. With sandbox/, the only user of setpriv.
 */
import { execFile } from 'node:child_process';
import { constants as fsc } from 'node:fs';
import { access, chmod, mkdir } from 'node:fs/promises';
import path from 'node:path';
import { CloudletError } from '../errors';
import type { Logger } from '../log';

/** Creates the data directory (and missing parents) searchable by every user, as QEMU must find images inside it. */
export async function makeDataDir(dataDir: string): Promise<void> {
  const firstCreated = await mkdir(dataDir, { recursive: true, mode: 0o755 });
  // mkdir's mode passes through the umask (0077 makes 0700): the ones made here are set explicitly.
  const created = firstCreated === undefined ? [dataDir] : ancestry(dataDir).filter((dir) => dir === firstCreated || dir.startsWith(firstCreated + path.sep));
  for (const dir of created) await chmod(dir, 0o755);
}

/**
 * Refuses (DATA_DIR_UNREACHABLE, one line naming the directory and the fix) when QEMU, running as `qemu`, could not
 * search down to the data directory. QEMU running as root, or as no user libvirt names, needs nothing.
 */
export async function checkReachableByQemu(dataDir: string, qemu: { uid: number; gid: number } | null, log: Logger): Promise<void> {
  if (!qemu || qemu.uid === 0) return;
  const reachable = async (dir: string) => (qemu.uid === process.getuid?.() ? canSearchAsSelf(dir) : canSearchAs(dir, qemu));
  let first: boolean | null;
  try {
    first = await reachable(dataDir);
  } catch (err) {
    // An agent that is not root cannot act as another user: libvirt's own check at the first start still tells.
    log(`cannot check that QEMU (uid ${qemu.uid}) reaches ${dataDir}: ${(err as Error).message}`);
    return;
  }
  if (first) return;
  let blocking = dataDir;
  for (const dir of ancestry(dataDir)) {
    if (!(await reachable(dir))) {
      blocking = dir;
      break;
    }
  }
  throw new CloudletError(
    'DATA_DIR_UNREACHABLE',
    `QEMU (uid ${qemu.uid}, gid ${qemu.gid}) cannot reach the data directory ${dataDir}: it may not search ${blocking}. ` +
      `Fix: chmod o+x ${blocking} (search only, not listing), or set CLOUDLET_DATA_DIR to a directory outside it (e.g. /var/lib/cloudlet)`,
    { details: { path: dataDir, blocking, uid: qemu.uid, gid: qemu.gid } },
  );
}

/** `/a/b/c` → [`/a`, `/a/b`, `/a/b/c`]. */
function ancestry(dir: string): string[] {
  const parts = path.resolve(dir).split(path.sep).filter(Boolean);
  return parts.map((_, i) => path.sep + parts.slice(0, i + 1).join(path.sep));
}

function canSearchAsSelf(dir: string): Promise<boolean> {
  return access(dir, fsc.X_OK).then(
    () => true,
    () => false,
  );
}

/**
 * Whether the user (with its supplementary groups, as libvirt starts QEMU) may search `dir`, asked of the kernel
 * itself, so ACLs count too. Throws when the check cannot run at all (no setpriv, an agent that is not root).
 */
function canSearchAs(dir: string, user: { uid: number; gid: number }): Promise<boolean> {
  return new Promise((resolve, reject) => {
    execFile(
      'setpriv',
      [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--init-groups', '--', 'test', '-x', dir],
      { encoding: 'utf8' },
      (err, _stdout, stderr) => {
        if (!err) resolve(true);
        // test(1) answers "no" with status 1 and says nothing; setpriv's own failures say why.
        else if (err.code === 1 && stderr.trim() === '') resolve(false);
        else reject(new Error(stderr.trim() || err.message));
      },
    );
  });
}
