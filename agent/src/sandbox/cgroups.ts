/**
 * Cgroups for sandboxes, on cgroup v2 (the appliance) and v1 (older hosts, these test machines). Each sandbox gets
 * `cloudlet/<id>` with two leaves: `app` (the sandboxed processes, where the memory, CPU and pids limits apply) and
 * `net` (its pasta forwarder and log cap, which must not eat the app's budget, under fixed limits of their own). The whole subtree is the unit of destruction:
 * killing everything in it ends the sandbox however its processes are related. Only agent/src/sandbox/ uses this.
 */
import { access, chown, mkdir, readFile, rmdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { CloudletError, isErrno } from '../errors';

const CGROUP_ROOT = '/sys/fs/cgroup';
const PARENT = 'cloudlet';
const CPU_PERIOD_US = 100000;
const CONTROLLERS = '+memory +cpu +pids';
/**
 * pasta and the log cap: pasta holds about 30 MiB; a few processes (the chain that starts the app passes through
 * `net` on its way to `app`). Without these a flood of connections to the forward could grow pasta without bound.
 */
export const NET_LIMITS = { memoryBytes: 128 * 1024 * 1024, pids: 16 };

export type SandboxPart = 'app' | 'net';

export interface CgroupLayout {
  version: 1 | 2;
  /** Where the per-sandbox cgroups live: one directory on v2, one per controller hierarchy (memory, cpu, pids) on v1. */
  parents: string[];
}

export interface SandboxLimits {
  memoryBytes: number;
  /** CPUs' worth of time per period (0.5 = half a CPU). */
  cpus: number;
  /** Processes and threads at once: a fork bomb stops here instead of taking the host's pids from QEMU and libvirt. */
  pids: number;
}

/** Find the cgroup hierarchy and prepare `cloudlet/` in it. */
export async function openCgroups(): Promise<CgroupLayout> {
  if (await exists(path.join(CGROUP_ROOT, 'cgroup.controllers'))) {
    const parent = path.join(CGROUP_ROOT, PARENT);
    await mkdir(parent, { recursive: true });
    // Controllers reach a cgroup only when every ancestor delegates them.
    await writeFile(path.join(CGROUP_ROOT, 'cgroup.subtree_control'), CONTROLLERS);
    await writeFile(path.join(parent, 'cgroup.subtree_control'), CONTROLLERS);
    return { version: 2, parents: [parent] };
  }
  const mounts = await v1Mounts();
  const memory = mounts.get('memory');
  const cpu = mounts.get('cpu');
  const pids = mounts.get('pids');
  if (!memory || !cpu || !pids) {
    throw new CloudletError('SANDBOX_UNAVAILABLE', 'sandboxes need the memory, cpu and pids cgroup controllers (cgroup v2, or v1 hierarchies for each)');
  }
  const parents = [...new Set([memory, cpu, pids])].map((m) => path.join(m, PARENT));
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

  constructor(
    private readonly layout: CgroupLayout,
    instanceId: string,
  ) {
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
    if (this.layout.version === 2) {
      const [top] = this.dirs() as [string];
      await writeFile(path.join(top, 'cgroup.subtree_control'), CONTROLLERS);
      await chown(path.join(top, 'cgroup.procs'), uid, uid);
    }
    await this.limit('app', limits);
    await this.limit('net', NET_LIMITS);
    for (const file of this.procsFiles('app')) await chown(file, uid, uid);
  }

  /** Write the limits of one part in every hierarchy (v1: each file only where its controller is mounted). */
  private async limit(part: SandboxPart, limits: Omit<SandboxLimits, 'cpus'> & { cpus?: number }): Promise<void> {
    const quota = limits.cpus === undefined ? undefined : String(Math.max(1000, Math.round(limits.cpus * CPU_PERIOD_US)));
    const pids = String(limits.pids);
    const memory = String(limits.memoryBytes);
    if (this.layout.version === 2) {
      const [dir] = this.dirs(part) as [string];
      await writeFile(path.join(dir, 'memory.max'), memory);
      await writeOptional(path.join(dir, 'memory.swap.max'), '0');
      // An OOM kill ends the whole sandbox, not just its largest process: the same outcome as on v1 (see oomKills).
      await writeFile(path.join(dir, 'memory.oom.group'), '1');
      await writeFile(path.join(dir, 'pids.max'), pids);
      if (quota) await writeFile(path.join(dir, 'cpu.max'), `${quota} ${CPU_PERIOD_US}`);
      return;
    }
    for (const dir of this.dirs(part)) {
      if (await exists(path.join(dir, 'memory.limit_in_bytes'))) {
        await writeFile(path.join(dir, 'memory.limit_in_bytes'), memory);
        // Without swap accounting this file is absent; with it, swap must not extend the limit.
        await writeOptional(path.join(dir, 'memory.memsw.limit_in_bytes'), memory);
      }
      if (await exists(path.join(dir, 'pids.max'))) await writeFile(path.join(dir, 'pids.max'), pids);
      if (quota && (await exists(path.join(dir, 'cpu.cfs_quota_us')))) {
        await writeFile(path.join(dir, 'cpu.cfs_period_us'), String(CPU_PERIOD_US));
        await writeFile(path.join(dir, 'cpu.cfs_quota_us'), quota);
      }
    }
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
    const file = this.layout.version === 2 ? path.join(this.dirs('app')[0]!, 'memory.events') : path.join(this.dirs('app')[0]!, 'memory.oom_control');
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
  return access(file).then(
    () => true,
    () => false,
  );
}
