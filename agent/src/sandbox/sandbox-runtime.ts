/**
 * Sandboxes for Application Virtualization: each instance is a bubblewrap sandbox inside its own network namespace,
 * which passt's pasta creates and forwards one host port into. Only this directory runs bwrap, pasta and setpriv or
 * touches cgroups.
 *
 * Process tree of one sandbox, started detached (own session) so that it outlives the agent:
 *
 *   pasta (joins cgroup <id>/net, runs as the sandbox user, relays <bind>:<hostPort> → <guestPort>)
 *     └ bwrap (joins cgroup <id>/app: the limits) → the app, in its own user, mount, PID, IPC, UTS and cgroup
 *       namespaces, inside pasta's network namespace
 *
 * Each instance directory holds sandbox.json: the instance record plus what identifies the running tree (pasta's
 * pid and start time, the cgroup), so a restarted agent finds and adopts its sandboxes, or cleans up dead ones.
 */
import { spawn } from 'node:child_process';
import { chown, mkdir, open, readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { replaceFile } from '../core/atomic-file';
import { CloudletError, isErrno } from '../errors';
import type { Logger } from '../log';
import type { InstanceRecord } from '../core/types';
import type { InstanceEnding, InstanceRuntime } from '../mechanisms/mechanism';
import { faultPoint } from '../system/fault-points';
import { SandboxCgroup, openCgroups, type CgroupLayout, type SandboxLimits } from './cgroups';

/** The unprivileged host user every sandbox (and its pasta) runs as: nobody. */
const SANDBOX_UID = 65534;
const STATE_FILE = 'sandbox.json';
const LOG_FILE = 'sandbox.log';
const SPAWN_TIMEOUT_MS = 10000;
const WATCH_INTERVAL_MS = 200;
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

  private constructor(private readonly layout: CgroupLayout, private readonly instancesDir: string, private readonly log: Logger) {}

  static async open(instancesDir: string, log: Logger): Promise<SandboxRuntime> {
    const layout = await openCgroups();
    log(`sandboxes use cgroup v${layout.version} under ${layout.parents.join(', ')}`);
    return new SandboxRuntime(layout, instancesDir, log);
  }

  private cgroup(id: string): SandboxCgroup {
    return new SandboxCgroup(this.layout, id);
  }

  /** Start the sandbox and return once the app's process is inside its cgroup (forwarding is set up by then). */
  async start(spec: SandboxSpec): Promise<void> {
    const { record } = spec;
    const dataDir = path.join(record.dir, 'data');
    await mkdir(dataDir, { mode: 0o700 });
    await chown(dataDir, SANDBOX_UID, SANDBOX_UID);
    const state: SandboxState = { record, pid: null, startTime: null };
    this.sandboxes.set(record.id, state);
    // Written before anything exists, so a crash from here on leaves a record that leads to the cleanup.
    await writeState(record.dir, state);
    const cgroup = this.cgroup(record.id);
    await cgroup.create(spec.limits, SANDBOX_UID);

    const logFile = await open(path.join(record.dir, LOG_FILE), 'a', 0o600);
    const argv = joinCgroupThenRun(cgroup.procsFiles('net'), [
      // No --no-new-privs here: it would stop bwrap from mapping the sandbox user; bwrap sets it for the app itself.
      'setpriv', `--reuid=${SANDBOX_UID}`, `--regid=${SANDBOX_UID}`, '--clear-groups', '--inh-caps=-all',
      'pasta', ...pastaArgs(record), '--',
      ...joinCgroupThenRun(cgroup.procsFiles('app'), bwrapArgs(spec, dataDir)),
    ]);
    let exited: number | null | undefined;
    try {
      const child = spawn(argv[0]!, argv.slice(1), { detached: true, stdio: ['ignore', logFile.fd, logFile.fd], env: {} });
      child.on('exit', (code) => {
        exited = code;
        void this.checkEnded().catch(() => {});
      });
      child.on('error', () => { exited = -1; });
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
    if (/bind|address already in use/i.test(tail)) return new CloudletError('NO_FREE_PORT', `port ${record.hostPort} is taken: ${tail}`);
    return new CloudletError('LAUNCH_FAILED', `the sandbox of ${record.serviceId} did not start: ${tail || 'no output'}`, { details: { log: tail } });
  }

  async running(): Promise<Set<string>> {
    await this.checkEnded();
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
      void this.checkEnded().catch((err: Error) => this.log(`checking sandboxes failed: ${err.message}`)).finally(() => {
        setTimeout(tick, WATCH_INTERVAL_MS).unref();
      });
    };
    setTimeout(tick, WATCH_INTERVAL_MS).unref();
  }

  /** Report every sandbox that ended since the last look (once each), with why. */
  private async checkEnded(): Promise<void> {
    for (const state of [...this.sandboxes.values()]) {
      if (state.pid === null || this.reported.has(state.record.id)) continue;
      const ending = await this.ending(state);
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
    if ((await this.cgroup(state.record.id).oomKills()) > 0) return { state: 'crashed', reason: 'out-of-memory' };
    const alive = state.pid !== null && state.startTime !== null && (await processStartTime(state.pid)) === state.startTime;
    return alive ? null : { state: 'crashed', reason: 'failed' };
  }
}

/** `sh` joins the cgroup parts (one cgroup.procs per hierarchy) itself, then becomes the command: nothing escapes the cgroup. */
function joinCgroupThenRun(procsFiles: string[], command: string[]): string[] {
  return ['/bin/sh', '-c', 'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; shift; exec "$@"',
    'join-cgroup', ...procsFiles, '--', ...command];
}

function pastaArgs(record: InstanceRecord): string[] {
  const wildcard = record.bindAddress === '0.0.0.0' || record.bindAddress === '::';
  const forward = `${wildcard ? '' : `${record.bindAddress}/`}${record.hostPort}:${record.guestPort}`;
  return [
    '--config-net', '--foreground', '--quiet',
    '--tcp-ports', forward, '--udp-ports', 'none',
    // The app must not reach the host's own services (the agent's API, other sandboxes' ports) through pasta.
    '--tcp-ns', 'none', '--udp-ns', 'none', '--no-map-gw',
  ];
}

function bwrapArgs(spec: SandboxSpec, dataDir: string): string[] {
  const env = { PATH: '/app/bin:/app/sbin:/app/usr/bin:/app/usr/sbin', HOME: '/data', TMPDIR: '/tmp', ...spec.env };
  return [
    'bwrap',
    '--unshare-user', '--unshare-ipc', '--unshare-pid', '--unshare-uts', '--unshare-cgroup-try',
    '--uid', String(SANDBOX_UID), '--gid', String(SANDBOX_UID),
    '--hostname', spec.record.serviceId.slice(0, 63),
    '--new-session', '--die-with-parent', '--cap-drop', 'ALL',
    '--ro-bind', spec.appDir, '/app',
    '--bind', dataDir, '/data',
    '--proc', '/proc', '--dev', '/dev', '--tmpfs', '/tmp',
    ...ROOT_LINKS.flatMap((dir) => ['--symlink', `/app/${dir}`, `/${dir}`]),
    // bwrap builds the root on a tmpfs; read-only, only /data (and the scratch /tmp) take writes.
    '--remount-ro', '/',
    '--chdir', '/app',
    '--clearenv', ...Object.entries(env).flatMap(([k, v]) => ['--setenv', k, v]),
    '--', ...spec.command,
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
