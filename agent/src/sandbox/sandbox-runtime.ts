/**
 * Sandboxes for Application Virtualization: each instance is a bubblewrap sandbox inside its own network namespace,
 * which passt's pasta creates and forwards one host port into. Only this directory runs bwrap and pasta or touches
 * cgroups; with system/data-dir.ts, it is the only user of setpriv.
 *
 * Process tree of one sandbox, started detached (own session) so that it outlives the agent:
 *
 *   pasta (joins cgroup <id>/net, runs as the sandbox user, relays <bind>:<hostPort> → <guestPort>)
 *     ├ cloudlet-logcap (<id>/net, the sandbox user): everything the tree prints → sandbox.log, capped
 *     └ bwrap (joins cgroup <id>/app: the limits; firewall set, inherited descriptors closed first) → the app, in
 *       its own user, mount, PID, IPC, UTS and cgroup namespaces, inside pasta's network namespace, under the
 *       seccomp filter (seccomp.ts) and unable to create user namespaces
 *
 * Each instance directory holds sandbox.json: the instance record plus what identifies the running tree (pasta's
 * pid and start time, the cgroup), so a restarted agent finds and adopts its sandboxes, or cleans up dead ones.
 */
import { spawn } from 'node:child_process';
import { constants } from 'node:fs';
import { access, open, readdir, readFile, writeFile } from 'node:fs/promises';
import { performance } from 'node:perf_hooks';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { replaceFile } from '../system/atomic-file';
import { CloudletError, isErrno } from '../errors';
import type { Logger } from '../log';
import type { InstanceRecord } from '../core/types';
import type { InstanceEnding, InstanceRuntime } from '../core/runtime';
import { faultPoint } from '../system/fault-points';
import { SandboxCgroup, openCgroups, type CgroupLayout, type SandboxLimits } from './cgroups';
import { sandboxSeccompFilter } from './seccomp';

/** The unprivileged host user every sandbox (and its pasta) runs as: nobody. */
const SANDBOX_UID = 65534;
const STATE_FILE = 'sandbox.json';
const LOG_FILE = 'sandbox.log';
const SECCOMP_FILE = 'seccomp.bpf';
const LOGCAP = path.resolve(__dirname, '../../../../native/build/cloudlet-logcap');
const DROP_TO_SANDBOX_USER = ['setpriv', `--reuid=${SANDBOX_UID}`, `--regid=${SANDBOX_UID}`, '--clear-groups', '--inh-caps=-all'];
/**
 * The sandbox's firewall, set in its network namespace before the app starts (nft, as the namespace's owner): the
 * app may answer connections that reach it through its forward and talk to itself on loopback, but opens nothing
 * outward. pasta would otherwise relay its connections to any address the host can reach, the host's own included
 * (the agent's API and MQTT on every address pasta did not copy, virbr0, docker0, second NICs): a sandbox now
 * reaches only its own forward, as a VM with restrict=on does.
 */
export const SANDBOX_FIREWALL = [
  'add table inet cloudlet',
  'add chain inet cloudlet out { type filter hook output priority 0; policy drop; }',
  'add rule inet cloudlet out oif lo accept',
  'add rule inet cloudlet out ct state established,related accept',
  // IPv6 replies need the neighbour's link address first.
  'add rule inet cloudlet out icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept',
  // Refused at once rather than dropped, so an app's attempt fails fast instead of hanging.
  'add rule inet cloudlet out reject',
].join('; ');
const SPAWN_TIMEOUT_MS = 10000;
const WATCH_INTERVAL_MS = 200;
/** How old the watch's last look may be for running() to answer with it: a few missed or slow looks, then it reads. */
const WATCH_ANSWER_MAX_AGE_MS = 5 * WATCH_INTERVAL_MS;
/** Directories of a CDE-style package that the sandbox also shows at the root, so its own /bin/sh, /lib... work. */
const ROOT_LINKS = ['bin', 'sbin', 'lib', 'lib64', 'usr', 'etc'];

export interface SandboxSpec {
  record: InstanceRecord;
  /** The package's files, shown read-only at /app. */
  appDir: string;
  /** argv inside the sandbox. */
  command: string[];
  env: Record<string, string>;
  limits: SandboxLimits;
  /** Size of the app's private /data: a tmpfs, so its pages count against the memory limit, never the disk. */
  dataBytes: number;
}

export interface SandboxOptions {
  /** sandbox.log stays at most this long (cloudlet-logcap keeps the newest half when it fills). */
  logBytes: number;
  /** The most processes a sandbox may have, whatever its manifest asks for. */
  maxPids: number;
}

interface SandboxState {
  record: InstanceRecord;
  /** pasta, the root of the tree; null until spawned. */
  pid: number | null;
  /** The pid's start time in clock ticks since boot (/proc/<pid>/stat field 22): a reused pid is not ours. */
  startTime: number | null;
}

export class SandboxRuntime implements InstanceRuntime {
  private readonly sandboxes = new Map<string, SandboxState>();
  /** Sandboxes already reported as ended, so each end is reported once. */
  private readonly reported = new Set<string>();
  private endedListener: ((id: string, ending: InstanceEnding) => void) | undefined;
  /** When the watch (watchEnded) last looked at every sandbox without failing (performance.now()); null: never. */
  private lookedAt: number | null = null;

  private constructor(
    private readonly layout: CgroupLayout,
    private readonly seccomp: Buffer,
    /** Whether bwrap can set user.max_user_namespaces (see open). */
    private readonly disableUserns: boolean,
    private readonly instancesDir: string,
    private readonly options: SandboxOptions,
    private readonly log: Logger,
  ) {}

  static async open(instancesDir: string, options: SandboxOptions, log: Logger): Promise<SandboxRuntime> {
    const seccomp = sandboxSeccompFilter();
    const layout = await openCgroups();
    log(`sandboxes use cgroup v${layout.version} under ${layout.parents.join(', ')}`);
    // bwrap --disable-userns writes the sysctl through the host's /proc, which a hardened service manager may
    // mount read-only (systemd's ProtectKernelTunables=); the seccomp filter alone already refuses every way to
    // create a user namespace (unshare, clone's namespace flags, clone3, setns), so it is a second lock, not the only.
    const disableUserns = await access('/proc/sys/user/max_user_namespaces', constants.W_OK).then(
      () => true,
      () => false,
    );
    if (!disableUserns) log('sandboxes: /proc/sys is read-only here, so bwrap --disable-userns is off; the seccomp filter keeps user namespaces out');
    return new SandboxRuntime(layout, seccomp, disableUserns, instancesDir, options, log);
  }

  private cgroup(id: string): SandboxCgroup {
    return new SandboxCgroup(this.layout, id);
  }

  /** Start the sandbox and return once the app's process is inside its cgroup (forwarding is set up by then). */
  async start(spec: SandboxSpec): Promise<void> {
    const { record } = spec;
    const state: SandboxState = { record, pid: null, startTime: null };
    this.sandboxes.set(record.id, state);
    // Written before anything exists, so a crash from here on leaves a record that leads to the cleanup.
    await writeState(record.dir, state);
    const cgroup = this.cgroup(record.id);
    await cgroup.create({ ...spec.limits, pids: Math.min(spec.limits.pids, this.options.maxPids) }, SANDBOX_UID);
    // Read by the (unprivileged) shell that starts bwrap, which hands it over as a descriptor.
    const seccompFile = path.join(record.dir, SECCOMP_FILE);
    await writeFile(seccompFile, this.seccomp, { mode: 0o644 });

    // Read and write: cloudlet-logcap keeps the newest half of the log when it fills.
    const logFile = await open(path.join(record.dir, LOG_FILE), 'a+', 0o600);
    const argv = netChain(cgroup.procsFiles('net'), this.options.logBytes, [
      // No --no-new-privs here: it would stop bwrap from mapping the sandbox user; bwrap sets it for the app itself.
      ...DROP_TO_SANDBOX_USER,
      'pasta',
      ...pastaArgs(record),
      '--',
      ...appChain(cgroup.procsFiles('app'), seccompFile, bwrapArgs(spec, this.disableUserns)),
    ]);
    let exited: number | null | undefined;
    try {
      const child = spawn(argv[0]!, argv.slice(1), { detached: true, stdio: ['ignore', logFile.fd, logFile.fd], env: {} });
      child.on('exit', (code) => {
        exited = code;
        void this.checkEnded().catch(() => {});
      });
      child.on('error', () => {
        exited = -1;
      });
      child.unref();
      if (child.pid === undefined) throw new CloudletError('LAUNCH_FAILED', `cannot start the sandbox of ${record.serviceId}`);
      faultPoint('app-virt:after-spawn');
      state.pid = child.pid;
      state.startTime = await processStartTime(child.pid);
      await writeState(record.dir, state);
      faultPoint('app-virt:after-state');
    } finally {
      await logFile.close();
    }

    const deadline = Date.now() + SPAWN_TIMEOUT_MS;
    while ((await cgroup.pids('app')).length === 0) {
      if (exited !== undefined || Date.now() > deadline) throw await this.spawnFailure(record);
      await sleep(5);
    }
  }

  private async spawnFailure(record: InstanceRecord): Promise<CloudletError> {
    const tail = (await readFile(path.join(record.dir, LOG_FILE), 'utf8').catch(() => '')).trim().split('\n').slice(-5).join('\n');
    if (/bind|address already in use/i.test(tail)) return new CloudletError('PORT_TAKEN', `port ${record.hostPort} is taken: ${tail}`);
    return new CloudletError('LAUNCH_FAILED', `the sandbox of ${record.serviceId} did not start: ${tail || 'no output'}`, { details: { log: tail } });
  }

  /**
   * The watch's last answer while it is recent: the watch reads every sandbox's files every WATCH_INTERVAL_MS, and
   * reading them all again for the registry's poll doubled that work (tens of ms a poll at 50 sandboxes). A sandbox
   * started since is in the map already; one that ended since is reported by the watch within WATCH_INTERVAL_MS.
   */
  async running(): Promise<Set<string>> {
    if (this.lookedAt === null || performance.now() - this.lookedAt > WATCH_ANSWER_MAX_AGE_MS) await this.checkEnded();
    return new Set([...this.sandboxes.keys()].filter((id) => !this.reported.has(id)));
  }

  /** The sandboxes a previous agent left running; the ones that ended meanwhile are cleaned up here. */
  async listInstances(): Promise<InstanceRecord[]> {
    const records: InstanceRecord[] = [];
    for (const entry of await readdir(this.instancesDir).catch(() => [])) {
      const state = await readState(path.join(this.instancesDir, entry));
      if (!state) continue;
      const ending = await this.ending(state);
      if (ending) {
        this.log(`sandbox ${state.record.id} of ${state.record.serviceId} ended while the agent was away (${ending.reason})`);
        await this.cgroup(state.record.id).destroy();
        continue;
      }
      this.sandboxes.set(state.record.id, state);
      records.push(state.record);
    }
    return records;
  }

  async writeRecord(record: InstanceRecord): Promise<void> {
    const state = this.sandboxes.get(record.id);
    if (!state) throw new CloudletError('INSTANCE_NOT_FOUND', `no sandbox ${record.id}`);
    state.record = record;
    await writeState(record.dir, state);
  }

  async destroy(id: string): Promise<void> {
    await this.cgroup(id).destroy();
    this.sandboxes.delete(id);
    this.reported.delete(id);
  }

  /** Sandboxes end by themselves (the app exits, the memory limit kills it): noticed by polling, and at once for our own children. */
  async watchEnded(listener: (id: string, ending: InstanceEnding) => void): Promise<void> {
    this.endedListener = listener;
    const tick = () => {
      const started = performance.now();
      void this.checkEnded()
        .then(() => {
          this.lookedAt = started;
        })
        .catch((err: Error) => this.log(`checking sandboxes failed: ${err.message}`))
        .finally(() => {
          setTimeout(tick, WATCH_INTERVAL_MS).unref();
        });
    };
    setTimeout(tick, WATCH_INTERVAL_MS).unref();
  }

  /** Report every sandbox that ended since the last look (once each), with why. */
  private async checkEnded(): Promise<void> {
    const watched = [...this.sandboxes.values()].filter((state) => state.pid !== null && !this.reported.has(state.record.id));
    // All at once: one after another, each sandbox's two file reads would add up to tens of ms a look at 50 sandboxes.
    const endings = await Promise.all(watched.map((state) => this.ending(state)));
    for (const [i, state] of watched.entries()) {
      const ending = endings[i];
      if (!ending || this.reported.has(state.record.id)) continue;
      this.reported.add(state.record.id);
      const why = ending.reason === 'out-of-memory' ? `killed by its memory limit` : 'its processes exited';
      this.log(`sandbox ${state.record.id} of ${state.record.serviceId} ended: ${why}`);
      this.endedListener?.(state.record.id, ending);
    }
  }

  /**
   * Why a sandbox is over, or null while it runs. An OOM kill ends the sandbox even if other processes survive it
   * (v1 has no memory.oom.group): an app that lost a process to the limit is not trusted to keep serving.
   */
  private async ending(state: SandboxState): Promise<InstanceEnding | null> {
    const [oomKills, startTime] = await Promise.all([this.cgroup(state.record.id).oomKills(), state.pid === null ? null : processStartTime(state.pid)]);
    if (oomKills > 0) return { state: 'crashed', reason: 'out-of-memory' };
    const alive = state.startTime !== null && startTime === state.startTime;
    return alive ? null : { state: 'crashed', reason: 'failed' };
  }
}

/** The shell joins the cgroup part (one cgroup.procs per hierarchy) itself first: nothing escapes the cgroup. */
const JOIN_CGROUP = 'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; shift';

/** Root's start of the tree: join `net`, send all output through the log cap (as the sandbox user), become pasta. */
function netChain(procsFiles: string[], logBytes: number, command: string[]): string[] {
  const script = `${JOIN_CGROUP}; exec > >(exec ${DROP_TO_SANDBOX_USER.join(' ')} "$1" "$2") 2>&1; shift 2; exec "$@"`;
  return ['/bin/bash', '-c', script, 'sandbox-net', ...procsFiles, '--', LOGCAP, String(logBytes), ...command];
}

/**
 * Inside pasta's namespaces: join `app`, set the firewall, close every inherited descriptor above 2 (pasta's
 * host-side listening socket among them: the app could accept on it or cut its own forward), then become bwrap
 * with the seccomp filter on descriptor 3, which bwrap consumes.
 */
function appChain(procsFiles: string[], seccompFile: string, command: string[]): string[] {
  const script =
    `${JOIN_CGROUP}; nft "$1" || exit 125; filter=$2; shift 2; ` +
    'for fd in /proc/self/fd/*; do fd=${fd##*/}; [ "$fd" -gt 2 ] && [ -e "/proc/self/fd/$fd" ] && exec {fd}>&-; done; ' +
    'exec "$@" 3<"$filter"';
  return ['/bin/bash', '-c', script, 'sandbox-app', ...procsFiles, '--', SANDBOX_FIREWALL, seccompFile, ...command];
}

function pastaArgs(record: InstanceRecord): string[] {
  const wildcard = record.bindAddress === '0.0.0.0' || record.bindAddress === '::';
  const forward = `${wildcard ? '' : `${record.bindAddress}/`}${record.hostPort}:${record.guestPort}`;
  return [
    '--config-net',
    '--foreground',
    '--quiet',
    '--tcp-ports',
    forward,
    '--udp-ports',
    'none',
    // The app must not reach the host's own services (the agent's API, other sandboxes' ports) through pasta.
    '--tcp-ns',
    'none',
    '--udp-ns',
    'none',
    '--no-map-gw',
  ];
}

function bwrapArgs(spec: SandboxSpec, disableUserns: boolean): string[] {
  const env = { PATH: '/app/bin:/app/sbin:/app/usr/bin:/app/usr/sbin', HOME: '/data', TMPDIR: '/tmp', ...spec.env };
  return [
    'bwrap',
    '--unshare-user',
    '--unshare-ipc',
    '--unshare-pid',
    '--unshare-uts',
    '--unshare-cgroup-try',
    '--uid',
    String(SANDBOX_UID),
    '--gid',
    String(SANDBOX_UID),
    '--hostname',
    spec.record.serviceId.slice(0, 63),
    '--new-session',
    '--die-with-parent',
    '--cap-drop',
    'ALL',
    '--seccomp',
    '3',
    ...(disableUserns ? ['--disable-userns'] : []),
    '--ro-bind',
    spec.appDir,
    '/app',
    '--size',
    String(spec.dataBytes),
    '--tmpfs',
    '/data',
    '--proc',
    '/proc',
    '--dev',
    '/dev',
    '--tmpfs',
    '/tmp',
    ...ROOT_LINKS.flatMap((dir) => ['--symlink', `/app/${dir}`, `/${dir}`]),
    // bwrap builds the root on a tmpfs; read-only, only /data (and the scratch /tmp) take writes.
    '--remount-ro',
    '/',
    '--chdir',
    '/app',
    '--clearenv',
    ...Object.entries(env).flatMap(([k, v]) => ['--setenv', k, v]),
    '--',
    ...spec.command,
  ];
}

/** A live (not zombie) process's start time, or null when there is none with that pid. */
async function processStartTime(pid: number): Promise<number | null> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => null);
  if (!stat) return null;
  // Fields after the command name, which is in parentheses and may contain spaces.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  if (fields[0] === 'Z' || fields[0] === 'X') return null;
  return Number(fields[19]);
}

async function writeState(dir: string, state: SandboxState): Promise<void> {
  await replaceFile(path.join(dir, STATE_FILE), JSON.stringify(state) + '\n');
}

async function readState(dir: string): Promise<SandboxState | null> {
  try {
    return JSON.parse(await readFile(path.join(dir, STATE_FILE), 'utf8')) as SandboxState;
  } catch (err) {
    if (isErrno(err, 'ENOENT') || isErrno(err, 'ENOTDIR')) return null;
    throw err;
  }
}
