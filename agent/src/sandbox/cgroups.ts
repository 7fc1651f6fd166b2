/**
 * Cgroups for sandboxes, on cgroup v2 (the appliance) and v1 (older hosts, these test machines). Each sandbox gets
 * `cloudlet/<id>` with two leaves: `app` (the sandboxed processes, where the memory and CPU limits apply) and `net`
 * (its pasta forwarder, which must not eat the app's memory budget). The whole subtree is the unit of destruction:
 * killing everything in it ends the sandbox however its processes are related. Only agent/src/sandbox/ uses this.
 */
import { access, chown, mkdir, readFile, rmdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { CloudletError, isErrno } from '../errors';

const CGROUP_ROOT = '/sys/fs/cgroup';
const PARENT = 'cloudlet';
const CPU_PERIOD_US = 100000;

export type SandboxPart = 'app' | 'net';

export interface CgroupLayout {
  version: 1 | 2;
  /** Where the per-sandbox cgroups live: one directory on v2, one per controller hierarchy (memory, cpu) on v1. */
  parents: string[];
}

export interface SandboxLimits {
  memoryBytes: number;
  /** CPUs' worth of time per period (0.5 = half a CPU). */
  cpus: number;
}

/** Find the cgroup hierarchy and prepare `cloudlet/` in it. */
export async function openCgroups(): Promise<CgroupLayout> {
  if (await exists(path.join(CGROUP_ROOT, 'cgroup.controllers'))) {
    const parent = path.join(CGROUP_ROOT, PARENT);
    await mkdir(parent, { recursive: true });
    // Controllers reach a cgroup only when every ancestor delegates them.
    await writeFile(path.join(CGROUP_ROOT, 'cgroup.subtree_control'), '+memory +cpu');
    await writeFile(path.join(parent, 'cgroup.subtree_control'), '+memory +cpu');
    return { version: 2, parents: [parent] };
  }
  const mounts = await v1Mounts();
  const memory = mounts.get('memory');
  const cpu = mounts.get('cpu');
  if (!memory || !cpu) {
    throw new CloudletError('SANDBOX_UNAVAILABLE', 'sandboxes need the memory and cpu cgroup controllers (cgroup v2, or v1 hierarchies for both)');
  }
  const parents = [...new Set([memory, cpu])].map((m) => path.join(m, PARENT));
  for (const parent of parents) await mkdir(parent, { recursive: true });
  return { version: 1, parents };
}

/** v1 controller name → mount point, from the mount table (cpu is often co-mounted as "cpu,cpuacct"). */
async function v1Mounts(): Promise<Map<string, string>> {
  const mounts = new Map<string, string>();
  for (const line of (await readFile('/proc/self/mountinfo', 'utf8')).split('\n')) {
    const [mountFields, superFields] = line.split(' - ');
    if (!mountFields || !superFields?.startsWith('cgroup ')) continue;
    const mountPoint = mountFields.split(' ')[4]!;
    for (const option of superFields.split(' ')[2]!.split(',')) if (!mounts.has(option)) mounts.set(option, mountPoint);
  }
  return mounts;
}

/** One sandbox's cgroup subtree (`cloudlet/sandbox-<instance id>`) in every hierarchy of the layout. */
export class SandboxCgroup {
  readonly name: string;

  constructor(private readonly layout: CgroupLayout, instanceId: string) {
    this.name = `sandbox-${instanceId}`;
  }

  private dirs(part?: SandboxPart): string[] {
    return this.layout.parents.map((p) => (part ? path.join(p, this.name, part) : path.join(p, this.name)));
  }

  /** The files a process writes its pid to, to join the part in every hierarchy. */
  procsFiles(part: SandboxPart): string[] {
    return this.dirs(part).map((d) => path.join(d, 'cgroup.procs'));
  }

  /**
   * Create the subtree with the limits on `app`, and let `uid` (the unprivileged sandbox user) move its own
   * process from `net` into `app`: v2 asks for write access to the common ancestor's cgroup.procs as well.
   */
  async create(limits: SandboxLimits, uid: number): Promise<void> {
    for (const part of ['app', 'net'] as const) for (const dir of this.dirs(part)) await mkdir(dir, { recursive: true });
    const [app] = this.dirs('app') as [string];
    const quota = String(Math.max(1000, Math.round(limits.cpus * CPU_PERIOD_US)));
    if (this.layout.version === 2) {
      const [top] = this.dirs() as [string];
      await writeFile(path.join(top, 'cgroup.subtree_control'), '+memory +cpu');
      await writeFile(path.join(app, 'memory.max'), String(limits.memoryBytes));
      await writeOptional(path.join(app, 'memory.swap.max'), '0');
      // An OOM kill ends the whole sandbox, not just its largest process: the same outcome as on v1 (see oomKills).
      await writeFile(path.join(app, 'memory.oom.group'), '1');
      await writeFile(path.join(app, 'cpu.max'), `${quota} ${CPU_PERIOD_US}`);
      await chown(path.join(top, 'cgroup.procs'), uid, uid);
    } else {
      for (const dir of this.dirs('app')) {
        if (await exists(path.join(dir, 'memory.limit_in_bytes'))) {
          await writeFile(path.join(dir, 'memory.limit_in_bytes'), String(limits.memoryBytes));
          // Without swap accounting this file is absent; with it, swap must not extend the limit.
          await writeOptional(path.join(dir, 'memory.memsw.limit_in_bytes'), String(limits.memoryBytes));
        }
        if (await exists(path.join(dir, 'cpu.cfs_quota_us'))) {
          await writeFile(path.join(dir, 'cpu.cfs_period_us'), String(CPU_PERIOD_US));
          await writeFile(path.join(dir, 'cpu.cfs_quota_us'), quota);
        }
      }
    }
    for (const file of this.procsFiles('app')) await chown(file, uid, uid);
  }

  /** Processes in a part (the first hierarchy is enough: every process joins all of them). */
  async pids(part: SandboxPart): Promise<number[]> {
    const text = await readFile(this.procsFiles(part)[0]!, 'utf8').catch((err) => {
      if (isErrno(err, 'ENOENT')) return '';
      throw err;
    });
    return text.split('\n').filter(Boolean).map(Number);
  }

  /** How many processes the memory limit has killed. */
  async oomKills(): Promise<number> {
    const file = this.layout.version === 2
      ? path.join(this.dirs('app')[0]!, 'memory.events')
      : path.join(this.dirs('app')[0]!, 'memory.oom_control');
    const text = await readFile(file, 'utf8').catch(() => '');
    return Number(/^oom_kill (\d+)$/m.exec(text)?.[1] ?? 0);
  }

  /** Kill every process in the subtree (repeatedly: a process may fork while we kill) and remove it. */
  async destroy(): Promise<void> {
    for (let round = 0; ; round++) {
      const pids = [...(await this.pids('app')), ...(await this.pids('net'))];
      if (pids.length === 0) break;
      if (round === 200) throw new CloudletError('INTERNAL', `cgroup ${this.name} still has processes ${pids.join(' ')} after SIGKILL`);
      for (const pid of pids) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch (err) {
          if (!isErrno(err, 'ESRCH')) throw err;
        }
      }
      await sleep(5);
    }
    for (const dir of [...this.dirs('app'), ...this.dirs('net'), ...this.dirs()]) await removeCgroupDir(dir);
  }
}

/** rmdir answers EBUSY for a moment after the last process died (it is still being torn down). */
async function removeCgroupDir(dir: string): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      await rmdir(dir);
      return;
    } catch (err) {
      if (isErrno(err, 'ENOENT')) return;
      if (!isErrno(err, 'EBUSY') || attempt >= 100) throw err;
      await sleep(10);
    }
  }
}

async function writeOptional(file: string, value: string): Promise<void> {
  await writeFile(file, value).catch((err) => {
    if (!isErrno(err, 'ENOENT')) throw err;
  });
}

async function exists(file: string): Promise<boolean> {
  return access(file).then(() => true, () => false);
}
