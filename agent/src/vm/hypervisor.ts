import { constants as fsc } from 'node:fs';
import { access, readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  Connection,
  DomainEvent,
  DomainFlags,
  DomainState,
  LibvirtError,
  StoppedDetail,
  libvirtInfo,
  type CallObserver,
  type JobStats,
  type MigrationTarget,
} from '../../../native/libvirt';
import { CloudletError, isNoSpace } from '../errors';
import type { Logger } from '../log';
import type { InstanceRecord } from '../core/types';
import type { InstanceEnding, InstanceRuntime, SavedInstance } from '../core/runtime';
import { convertImage } from '../images/qemu-img';
import { faultPoint } from '../system/fault-points';
import { readConsoleTail } from './console-log';
import { METADATA_KEY, METADATA_URI, NETDEV_ID, hostfwdRule, metadataElement, parseMetadataElement, type Forward } from './domain-xml';
import { instanceFiles } from './instance-domain';
import { headerReadsOf, prepareRestoreSource, type LiveMigrationStream, type SaveImageHeader, type StreamProgress } from './save-image';

/**
 * libvirt failures become HYPERVISOR_ERROR carrying libvirt's own code and message; QEMU refusing a forward whose
 * host port is taken becomes PORT_TAKEN, which the registry answers by launching again on another port.
 */
function hypervisorError(err: unknown): unknown {
  if (!(err instanceof LibvirtError)) return err;
  if (/Could not set up host forwarding rule/i.test(err.message)) return new CloudletError('PORT_TAKEN', err.message, { cause: err });
  const unreachable = /Cannot access storage file '([^']+)' \(as uid:(\d+), gid:(\d+)\): Permission denied/.exec(err.message);
  if (unreachable) {
    const [, file, uid, gid] = unreachable;
    return new CloudletError(
      'DATA_DIR_UNREACHABLE',
      `QEMU (uid ${uid}, gid ${gid}) may not read ${file}: a directory above it is not searchable by that user (the agent checks this at start; was a mode changed since?)`,
      { cause: err, details: { libvirt_code: err.code, path: file, uid: Number(uid), gid: Number(gid) } },
    );
  }
  // Saving a memory state or writing a console log into a full data directory.
  if (isNoSpace(err)) return new CloudletError('NO_SPACE', err.message, { cause: err, details: { libvirt_code: err.code } });
  const code =
    err.code === 'LIBVIRT_UNAVAILABLE' || err.code === 'LIBVIRT_UNSUPPORTED' || err.code === 'NATIVE_SHIM_MISSING' || err.code === 'CONNECTION_CLOSED'
      ? 'HYPERVISOR_UNAVAILABLE'
      : 'HYPERVISOR_ERROR';
  return new CloudletError(code, err.message, { cause: err, details: { libvirt_code: err.code } });
}

/** libvirt's own error code behind a mapped error, if there is one. */
function libvirtCodeOf(err: unknown): string | undefined {
  return err instanceof CloudletError ? (err.details as { libvirt_code?: string } | undefined)?.libvirt_code : undefined;
}

/**
 * A restore's libvirt call holds a libuv pool thread until QEMU has read the whole memory state, and the lifecycle watch
 * holds one for good: restores may take at most half of the rest, so the agent's own file work (a synthesis feeding its
 * stream, requests, records) always finds a thread. A cached restore's feed needs none (save-image.ts).
 */
/** How often a migration's progress is read. */
const PROGRESS_INTERVAL_MS = 500;

const RESTORES_AT_ONCE = Math.max(1, Math.floor(((Number(process.env.UV_THREADPOOL_SIZE) || 4) - 1) / 2));

/** At most `free` runs at once; the others wait their turn, in order. */
class Turnstile {
  private readonly waiting: (() => void)[] = [];
  constructor(private free: number) {}

  async run<T>(work: () => Promise<T>): Promise<T> {
    if (this.free > 0) this.free--;
    else await new Promise<void>((resolve) => this.waiting.push(resolve));
    try {
      return await work();
    } finally {
      const next = this.waiting.shift();
      if (next) next();
      else this.free++;
    }
  }
}

async function mapped<T>(call: Promise<T>): Promise<T> {
  try {
    return await call;
  } catch (err) {
    throw hypervisorError(err);
  }
}

/**
 * KVM only when it really works: /dev/kvm alone is not proof (nested or paravirtualised KVM expose it without
 * hardware virtualisation), so the CPU must advertise vmx/svm and libvirt must offer the kvm domain type.
 */
async function kvmWorks(conn: Connection): Promise<boolean> {
  try {
    await access('/dev/kvm', fsc.R_OK | fsc.W_OK);
    if (!/^flags\s*:.*\b(vmx|svm)\b/m.test(await readFile('/proc/cpuinfo', 'utf8'))) return false;
    return /<domain>kvm<\/domain>/.test(await conn.domainCapabilities('kvm'));
  } catch {
    return false;
  }
}

/** libvirt errors that can mean the connection itself is gone (then its liveness decides). */
const CONNECTION_ERRORS = new Set(['VIR_ERR_INTERNAL_ERROR', 'VIR_ERR_NO_CONNECT', 'VIR_ERR_INVALID_CONN', 'VIR_ERR_SYSTEM_ERROR', 'VIR_ERR_RPC']);
/** How often the connection's liveness is checked (a local check in libvirt's client, no round trip). */
const LIVENESS_INTERVAL_MS = 1000;
/** Reconnect attempts back off from the first delay to the last, then keep trying at the last. */
const RECONNECT_DELAYS_MS = [250, 500, 1000, 2000, 5000];

/**
 * The agent's view of libvirt: Service VM domains identified by our <metadata>. Only this module uses native/.
 *
 * The connection is watched (liveness every second, and at once when a call fails the way a dead connection makes
 * calls fail). When it is lost (libvirtd restarted or killed), calls fail fast with HYPERVISOR_UNAVAILABLE while the
 * connection is reopened with backoff; then lifecycle events are registered again and the reconnect listeners (the
 * registry, which converges with libvirt's view) are told.
 */
export class Hypervisor implements InstanceRuntime {
  /** null while disconnected. */
  private conn: Connection | null;
  private readonly reconnectListeners: Array<() => void> = [];
  private endedListener: ((id: string, ending: InstanceEnding) => void) | undefined;
  private livenessTimer: NodeJS.Timeout | undefined;
  private reconnecting: Promise<void> | undefined;
  private closed = false;
  private readonly restores = new Turnstile(RESTORES_AT_ONCE);

  private constructor(
    conn: Connection,
    readonly uri: string,
    readonly domainType: 'kvm' | 'qemu',
    readonly libvirtVersion: string,
    private readonly log: Logger,
    private readonly observer: CallObserver | undefined,
  ) {
    this.conn = conn;
    this.watchLiveness();
  }

  /** `observer` is told of every libvirt call's duration (metrics), on this connection and any reconnected one. */
  static async connect(uri: string, requested: 'auto' | 'kvm' | 'qemu', log: Logger, observer?: CallObserver): Promise<Hypervisor> {
    const libvirtVersion = mappedSync(() => libvirtInfo().libraryVersion);
    const conn = await mapped(Connection.open(uri, observer));
    const domainType = requested === 'auto' ? ((await kvmWorks(conn)) ? 'kvm' : 'qemu') : requested;
    log(`connected to ${uri} (libvirt ${libvirtVersion}); Service VMs run as domain type ${domainType}`);
    return new Hypervisor(conn, uri, domainType, libvirtVersion, log, observer);
  }

  /**
   * The user and group QEMU runs as, from the DAC security model of libvirt's capabilities (`+64055:+64055` for
   * Debian's libvirt-qemu, `+0:+0` when QEMU runs as root, the caller's own ids on a session URI); null when libvirt
   * names none.
   */
  async qemuIdentity(): Promise<{ uid: number; gid: number } | null> {
    const capabilities = await this.call((c) => c.capabilities());
    const dac = /<secmodel>\s*<model>dac<\/model>[\s\S]*?<\/secmodel>/.exec(capabilities)?.[0] ?? '';
    const label = new RegExp(`<baselabel type='${this.domainType}'>\\+(\\d+):\\+(\\d+)</baselabel>`).exec(dac);
    return label ? { uid: Number(label[1]), gid: Number(label[2]) } : null;
  }

  /** Call listener each time the connection is back after it was lost. */
  onReconnected(listener: () => void): void {
    this.reconnectListeners.push(listener);
  }

  /** Start a transient domain: it disappears from libvirt when it stops, so nothing is left defined. */
  async boot(xml: string): Promise<void> {
    await this.call((c) => c.createDomain(xml));
  }

  /**
   * Restore a new transient domain from a service's saved memory state, with the instance's own XML; `paused` leaves
   * its vCPUs stopped (a warm pool's VM, resumed by forwardAndResume).
   */
  restore(
    state: { image: string | LiveMigrationStream; header: SaveImageHeader },
    xml: string,
    workDir: string,
    onProgress?: StreamProgress,
    paused = false,
  ): Promise<void> {
    return this.restores.run(() => this.restoreNow(state, xml, workDir, paused, onProgress));
  }

  private async restoreNow(
    state: { image: string | LiveMigrationStream; header: SaveImageHeader },
    xml: string,
    workDir: string,
    paused: boolean,
    onProgress?: StreamProgress,
  ): Promise<void> {
    const conn = this.connection();
    const source = await prepareRestoreSource(state.image, state.header, xml, workDir, headerReadsOf(this.libvirtVersion), onProgress);
    const flags = paused ? DomainFlags.VIR_DOMAIN_SAVE_PAUSED : DomainFlags.VIR_DOMAIN_SAVE_RUNNING;
    const restoring = this.call(() => conn.restoreDomain(source.path, null, flags));
    restoring.catch(() => {}); // observed below
    try {
      await Promise.all([restoring, source.done()]);
    } catch (err) {
      // When QEMU or libvirt fails, libvirt's own error says what failed, rather than the stream's.
      // Ending the source first lets a restore still waiting for it fail rather than hang.
      await source.dispose();
      throw (
        (await restoring.then(
          () => null,
          (restoreErr: unknown) => restoreErr,
        )) ?? err
      );
    } finally {
      await source.dispose();
    }
  }

  /** Save the domain's memory state (the domain stops) and its disk, flattened so that it no longer needs its backing file. */
  async save(record: InstanceRecord, into: string): Promise<SavedInstance> {
    const saved = { state: path.join(into, 'state.sav'), disk: path.join(into, 'captured.qcow2') };
    // The save goes on in libvirtd: a kill right after it was asked for stops the agent mid-save.
    const saving = this.call((c) => c.saveDomain(record.id, saved.state, null, 0));
    faultPoint('capture:mid-save');
    await saving;
    await convertImage(instanceFiles(record.dir).disk, saved.disk, 'qcow2');
    return saved;
  }

  /**
   * Give a paused domain restored without a forward its forward, then run it: `hostfwd_add` on its user-mode netdev
   * through QEMU's human monitor (one native call), and virDomainResume. The monitor answers a failed command with
   * text, not an error: a host port that cannot be bound is PORT_TAKEN (the domain is still paused and forwards
   * nothing), anything else HYPERVISOR_ERROR.
   */
  async forwardAndResume(id: string, forward: Forward): Promise<void> {
    if (isIP(forward.bindAddress) === 0) throw new CloudletError('INTERNAL', `forward address ${JSON.stringify(forward.bindAddress)} is not an IP address`);
    const command = `hostfwd_add ${NETDEV_ID} ${hostfwdRule(forward)}`;
    const reply = (await this.call((c) => c.qemuMonitorCommand(id, command, DomainFlags.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP))).trim();
    if (/Could not set up host forwarding rule/i.test(reply)) throw new CloudletError('PORT_TAKEN', reply, { details: { host_port: forward.hostPort } });
    if (reply) throw new CloudletError('HYPERVISOR_ERROR', `QEMU refused ${command}: ${reply.slice(0, 500)}`);
    await this.call((c) => c.resumeDomain(id));
  }

  /** The domain as a live migration describes it (libvirt's migratable XML): what a handoff's target checks and retargets. */
  migratableXml(uuid: string): Promise<string> {
    return this.call((c) => c.domainXml(uuid, DomainFlags.VIR_DOMAIN_XML_MIGRATABLE));
  }

  /**
   * Live-migrate the running domain peer-to-peer (docs/handoff.md): only the top layer of its disk travels (the target
   * holds the same backing image), and the domain stays transient there as here. Resolves once it runs there; on any
   * failure libvirt cancels the migration and the domain runs on here. `progress` is told the job's statistics every
   * PROGRESS_INTERVAL_MS meanwhile.
   */
  async migrate(uuid: string, target: MigrationTarget, progress: (stats: JobStats) => void): Promise<void> {
    const { VIR_MIGRATE_LIVE, VIR_MIGRATE_PEER2PEER, VIR_MIGRATE_NON_SHARED_INC, VIR_MIGRATE_AUTO_CONVERGE } = DomainFlags;
    const migrating = this.call((c) =>
      c.migrateToUri3(uuid, target, VIR_MIGRATE_LIVE | VIR_MIGRATE_PEER2PEER | VIR_MIGRATE_NON_SHARED_INC | VIR_MIGRATE_AUTO_CONVERGE),
    );
    // The watcher's sleep is cut short when the migration ends: the VM is down until the caller hears of it.
    const ended = new AbortController();
    // A stats call still under way when it ends is not waited for (its answer is dropped).
    void (async () => {
      while (!ended.signal.aborted) {
        await sleep(PROGRESS_INTERVAL_MS, undefined, { signal: ended.signal }).catch(() => {});
        if (ended.signal.aborted) return;
        const stats = await this.call((c) => c.jobStats(uuid)).catch(() => null);
        if (stats && !ended.signal.aborted) progress(stats);
      }
    })();
    try {
      await migrating;
    } finally {
      ended.abort();
    }
  }

  /** Whether the domain runs unpaused: an incoming migration's domain is paused until the migration is complete. */
  async runsUnpaused(uuid: string): Promise<boolean> {
    try {
      return (await this.call((c) => c.domainState(uuid))).state === DomainState.Running;
    } catch (err) {
      if (libvirtCodeOf(err) === 'VIR_ERR_NO_DOMAIN') return false;
      throw err;
    }
  }

  /** Cancels the domain's migration under way (libvirt ends it on both sides; the domain runs on here). */
  abortMigration(uuid: string): Promise<void> {
    return this.call((c) => c.abortJob(uuid));
  }

  /** The UNIX socket this (system) libvirtd listens on: the `socket` parameter of the URI, or libvirt's default. */
  get socketPath(): string {
    return new URL(this.uri).searchParams.get('socket') ?? '/run/libvirt/libvirt-sock';
  }

  /** Destroy a domain; one that is already gone counts as destroyed. */
  async destroy(uuid: string): Promise<void> {
    try {
      await this.call((c) => c.destroyDomain(uuid));
    } catch (err) {
      const code = libvirtCodeOf(err);
      if (code === 'VIR_ERR_NO_DOMAIN' || code === 'VIR_ERR_OPERATION_INVALID') return;
      throw err;
    }
  }

  /** UUIDs of every running domain: the cheap call the registry polls to notice VMs that ended outside the agent. */
  async running(): Promise<Set<string>> {
    const domains = await this.call((c) => c.listDomains(DomainFlags.VIR_CONNECT_LIST_DOMAINS_ACTIVE));
    return new Set(domains.map((d) => d.uuid));
  }

  async writeRecord(record: InstanceRecord): Promise<void> {
    await this.call((c) => c.setMetadata(record.id, metadataElement(record), METADATA_KEY, METADATA_URI, DomainFlags.VIR_DOMAIN_AFFECT_LIVE));
  }

  /** Every running domain that carries our metadata: the instances to adopt after an agent restart. */
  async listInstances(): Promise<InstanceRecord[]> {
    const found: InstanceRecord[] = [];
    for (const uuid of await this.running()) {
      try {
        const element = await this.call((c) => c.getMetadata(uuid, METADATA_URI, DomainFlags.VIR_DOMAIN_AFFECT_LIVE));
        const record = element ? parseMetadataElement(element) : null;
        if (record) found.push(record);
      } catch (err) {
        // A domain that vanished between the list and the read is simply not ours to adopt.
        if (libvirtCodeOf(err) !== 'VIR_ERR_NO_DOMAIN') this.log(`cannot read metadata of ${uuid}: ${(err as Error).message}`);
      }
    }
    return found;
  }

  /** libvirt's lifecycle events, reduced to the one the registry needs: a domain stopped, and why. Kept across reconnects. */
  async watchEnded(listener: (id: string, ending: InstanceEnding) => void): Promise<void> {
    this.endedListener = listener;
    await this.registerLifecycle(this.connection());
  }

  private async registerLifecycle(conn: Connection): Promise<void> {
    const listener = this.endedListener;
    if (!listener) return;
    await this.call(() =>
      conn.watchLifecycle((events) => {
        for (const e of events) {
          if (e.event === DomainEvent.Stopped) listener(e.uuid, STOPPED_ENDINGS[e.detail as StoppedDetail] ?? { state: 'stopped', reason: 'vanished' });
        }
      }),
    );
  }

  /** The guest's serial console, which every instance domain logs to a file in its directory. */
  consoleTail(dir: string, maxBytes: number): Promise<string> {
    return readConsoleTail(instanceFiles(dir).consoleLog, maxBytes);
  }

  async isAlive(): Promise<boolean> {
    return this.conn ? this.conn.isAlive().catch(() => false) : false;
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.livenessTimer);
    await this.conn?.close();
  }

  private connection(): Connection {
    if (!this.conn) throw new CloudletError('HYPERVISOR_UNAVAILABLE', `the connection to ${this.uri} is lost; reconnecting`);
    return this.conn;
  }

  /**
   * One libvirt call on the current connection, its failure mapped to a CloudletError. A failure that came from a
   * dead connection starts the reconnect and is reported as HYPERVISOR_UNAVAILABLE.
   */
  private async call<T>(operation: (conn: Connection) => Promise<T>): Promise<T> {
    const conn = this.connection();
    try {
      return await operation(conn);
    } catch (err) {
      if (err instanceof LibvirtError && CONNECTION_ERRORS.has(err.code) && !(await conn.isAlive().catch(() => false))) {
        this.lost(conn, err.message);
        throw new CloudletError('HYPERVISOR_UNAVAILABLE', `the connection to ${this.uri} was lost: ${err.message}`, {
          cause: err,
          details: { libvirt_code: err.code },
        });
      }
      throw hypervisorError(err);
    }
  }

  private watchLiveness(): void {
    const tick = async () => {
      const conn = this.conn;
      if (conn && !(await conn.isAlive().catch(() => false))) this.lost(conn, 'the connection is no longer alive');
      if (!this.closed) {
        this.livenessTimer = setTimeout(() => void tick(), LIVENESS_INTERVAL_MS);
        this.livenessTimer.unref();
      }
    };
    this.livenessTimer = setTimeout(() => void tick(), LIVENESS_INTERVAL_MS);
    this.livenessTimer.unref();
  }

  /** The connection `conn` is dead: drop it and reconnect (once, however many calls noticed). */
  private lost(conn: Connection, why: string): void {
    if (this.conn !== conn || this.closed) return;
    this.conn = null;
    this.log(`lost the connection to ${this.uri} (${why}); reconnecting`);
    void conn.close().catch(() => {});
    this.reconnecting ??= this.reconnect().finally(() => {
      this.reconnecting = undefined;
    });
  }

  private async reconnect(): Promise<void> {
    const lostAt = Date.now();
    let lastProblem = '';
    for (let attempt = 0; !this.closed; attempt++) {
      await sleep(RECONNECT_DELAYS_MS[Math.min(attempt, RECONNECT_DELAYS_MS.length - 1)]);
      let conn: Connection;
      try {
        conn = await Connection.open(this.uri, this.observer);
      } catch (err) {
        // Logged when the reason changes, not on every attempt.
        if ((err as Error).message !== lastProblem) this.log(`cannot reconnect to ${this.uri} yet: ${(err as Error).message}`);
        lastProblem = (err as Error).message;
        continue;
      }
      if (this.closed) {
        await conn.close();
        return;
      }
      this.conn = conn;
      await this.registerLifecycle(conn).catch((err: Error) => this.log(`no lifecycle events after reconnecting, polling only: ${err.message}`));
      this.log(`reconnected to ${this.uri} after ${Date.now() - lostAt} ms`);
      for (const listener of this.reconnectListeners) listener();
      return;
    }
  }
}

/** virDomainEventStoppedDetailType → how the instance ended. QEMU killed from outside is Failed (monitor EOF). */
const STOPPED_ENDINGS: Record<StoppedDetail, InstanceEnding> = {
  [StoppedDetail.Shutdown]: { state: 'stopped', reason: 'shutdown' },
  [StoppedDetail.Destroyed]: { state: 'stopped', reason: 'destroyed' },
  [StoppedDetail.Crashed]: { state: 'crashed', reason: 'crashed' },
  [StoppedDetail.Migrated]: { state: 'stopped', reason: 'migrated' },
  [StoppedDetail.Saved]: { state: 'stopped', reason: 'saved' },
  [StoppedDetail.Failed]: { state: 'crashed', reason: 'failed' },
  [StoppedDetail.FromSnapshot]: { state: 'stopped', reason: 'vanished' },
};

function mappedSync<T>(fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw hypervisorError(err);
  }
}
