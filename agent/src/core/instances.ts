import { randomUUID } from 'node:crypto';
import { access, mkdir, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { CloudletError, asCloudletError, withDetails } from '../errors';
import { noSpaceError } from '../system/disk-space';
import { faultPoint } from '../system/fault-points';
import type { Logger } from '../log';
import type { InstanceEnding, InstanceRuntime, Mechanism } from '../mechanisms/mechanism';
import { EventBus, type InstanceLifecycleState, type LaunchPhase } from './events';
import type { PortAllocator } from './ports';
import { boundedProbe, waitUntilReady } from './readiness';
import type { LaunchGate } from './launch-gate';
import { AnonymousQuota, holdersOf, withUse, withoutOneUse, type AnonymousLimits, type UseHolders } from './instance-uses';
import { PhaseTimer } from './timing';
import type { Instance, InstanceRecord, MechanismName, StartResult, StopResult, Stopper, Workload } from './types';

const LAUNCH_ATTEMPTS = 3;

/** Probing a wildcard bind goes through loopback. */
const probeHost = (bindAddress: string) => (bindAddress === '0.0.0.0' || bindAddress === '::' ? '127.0.0.1' : bindAddress);

/** Serializes async work per key (one instance's users count must not be updated by two requests at once). */
class KeyedQueue {
  private readonly tails = new Map<string, Promise<unknown>>();

  run<T>(key: string, work: () => Promise<T>): Promise<T> {
    const result = (this.tails.get(key) ?? Promise.resolve()).then(work, work);
    const tail = result.catch(() => {});
    this.tails.set(key, tail);
    void tail.then(() => { if (this.tails.get(key) === tail) this.tails.delete(key); });
    return result;
  }
}

/**
 * Every instance the cloudlet runs, whatever the mechanism. The registry is rebuilt from the runtimes (libvirt
 * domains with our metadata) at start, so an agent restart neither kills nor forgets an instance; the only state it
 * keeps in memory is what it can re-derive.
 */
export class InstanceRegistry {
  private readonly instances = new Map<string, InstanceRecord>();
  /**
   * Instances being launched (by this agent, or adopted while starting): the reconciler must not take them for dead
   * before their runtime lists them, and their console can be read while they start.
   */
  private readonly starting = new Map<string, InstanceRecord>();
  /** Launches in flight per shareable service, so concurrent joiners share one VM instead of each starting one. */
  private readonly pendingShared = new Map<string, Promise<InstanceRecord>>();
  private readonly queue = new KeyedQueue();
  private reconcileTimer: NodeJS.Timeout | undefined;
  /**
   * Uses of devices whose authorization ended that could not be released yet (the runtime was unreachable): instance
   * id → owner → uses. The reconciler retries them, so the VM does not keep serving a revoked device.
   */
  private readonly unreleased = new Map<string, Map<string, number>>();
  /** Whether a device may still hold its uses (see setOwnerStanding); every owner may until told otherwise. */
  private ownerInGoodStanding: (owner: string) => boolean = () => true;
  /** Every state change and launch progress of the instances, for the API's event stream and telemetry. */
  readonly events = new EventBus();
  private readonly anonymousQuota: AnonymousQuota;

  private readonly mechanisms: Map<MechanismName, Mechanism<Workload>>;

  constructor(
    mechanisms: Mechanism<Workload>[],
    private readonly ports: PortAllocator,
    private readonly instancesDir: string,
    /** Where unfinished work lives (captures); an instance found there at start is a leftover. */
    private readonly stagingDir: string,
    private readonly bindAddress: string,
    private readonly log: Logger,
    /** Bounds the launches in flight, whatever the mechanism (captures go through it too: `admit`). */
    private readonly gate: LaunchGate,
    anonymousLimits: AnonymousLimits = { perAddress: Infinity, total: Infinity },
  ) {
    this.mechanisms = new Map(mechanisms.map((m) => [m.name, m]));
    this.anonymousQuota = new AnonymousQuota(anonymousLimits, () => [...this.instances.values()].filter((meta) => !this.starting.has(meta.id)));
  }

  private get runtimes(): InstanceRuntime[] {
    return [...new Set([...this.mechanisms.values()].map((m) => m.runtime))];
  }

  private runtimeOf(record: InstanceRecord): InstanceRuntime {
    const mechanism = this.mechanisms.get(record.mechanism);
    if (!mechanism) throw new CloudletError('INTERNAL', `no mechanism ${record.mechanism} for instance ${record.id}`);
    return mechanism.runtime;
  }

  private async isRunning(record: InstanceRecord): Promise<boolean> {
    return (await this.runtimeOf(record).running()).has(record.id);
  }

  list(): Instance[] {
    return [...this.instances.values()].map(publicView).sort((a, b) => a.createdAt.localeCompare(b.createdAt));
  }

  get(id: string): Instance {
    return publicView(this.record(id));
  }

  /** The end of an instance's console output, also while it is still starting. */
  async consoleTail(id: string, maxBytes: number): Promise<string> {
    const record = this.instances.get(id) ?? this.starting.get(id) ?? this.record(id);
    const runtime = this.runtimeOf(record);
    if (!runtime.consoleTail) throw new CloudletError('NOT_FOUND', `instance ${id} (${record.mechanism}) has no console`);
    return runtime.consoleTail(record.dir, maxBytes);
  }

  /** The instance's own directory: its disk, console log and whatever files its mechanism keeps there. */
  dirOf(id: string): string {
    return this.record(id).dir;
  }

  countFor(serviceId: string): number {
    return [...this.instances.values()].filter((i) => i.serviceId === serviceId).length;
  }

  private record(id: string): InstanceRecord {
    const meta = this.instances.get(id);
    if (!meta) throw new CloudletError('INSTANCE_NOT_FOUND', `no instance with id ${id}`, { details: { instance_id: id } });
    return meta;
  }

  /** Adopt the instances libvirt still runs, resume the ones that were starting, and sweep leftovers. */
  async adopt(): Promise<void> {
    await mkdir(this.instancesDir, { recursive: true, mode: 0o755 });
    for (const runtime of this.runtimes) {
      for (const meta of await runtime.listInstances()) {
        if (isInside(this.instancesDir, meta.dir) && this.mechanisms.has(meta.mechanism)) {
          // Records written before instances had owners have none.
          this.adoptOne({ ...meta, owners: meta.owners ?? [] });
        } else if (isInside(this.stagingDir, meta.dir)) {
          // Work that never finished (a state capture cut by a restart): its files went with the staging area.
          this.log(`ending unfinished instance ${meta.id} (${meta.serviceId})`);
          await runtime.destroy(meta.id);
        }
        // Anything else belongs to another agent sharing this libvirt (another data directory): not ours to touch.
      }
    }
    for (const entry of await readdir(this.instancesDir)) {
      if (!this.instances.has(entry)) await rm(path.join(this.instancesDir, entry), { recursive: true, force: true });
    }
  }

  private adoptOne(meta: InstanceRecord): void {
    this.instances.set(meta.id, meta);
    this.ports.claim(meta.hostPort);
    this.log(`adopted instance ${meta.id} of ${meta.serviceId} on port ${meta.hostPort} (${meta.state})`);
    if (meta.state === 'starting') void this.finishAdoptedLaunch(meta);
  }

  /**
   * Watch for instances that ended outside the agent (killed, crashed, destroyed by hand): through the runtimes'
   * own events when they have them and `useEvents` is set (noticed within milliseconds), and by polling every
   * `intervalMs` as the safety net for anything an event could not tell (a lost connection, an agent restart).
   */
  startReconciling(intervalMs: number, useEvents = true): void {
    for (const runtime of this.runtimes) {
      runtime.onReconnected?.(() => {
        this.resync(runtime).catch((err: Error) => this.log(`converging with the runtime after reconnecting failed: ${err.message}`));
      });
    }
    if (useEvents) {
      for (const runtime of this.runtimes) {
        runtime.watchEnded?.((id, ending) => {
          this.endIfGone(id, ending).catch((err: Error) => this.log(`handling the end of ${id} failed: ${err.message}`));
        }).catch((err: Error) => this.log(`no lifecycle events, polling only: ${err.message}`));
      }
    }
    let lastProblem: string | null = null;
    const tick = async () => {
      try {
        await this.reconcile();
        lastProblem = null;
      } catch (err) {
        // Once per distinct problem: a hypervisor that is down fails every poll the same way until it is back.
        if ((err as Error).message !== lastProblem) this.log(`reconcile failed: ${(err as Error).message}`);
        lastProblem = (err as Error).message;
      }
      this.reconcileTimer = setTimeout(tick, intervalMs);
      this.reconcileTimer.unref();
    };
    this.reconcileTimer = setTimeout(tick, intervalMs);
    this.reconcileTimer.unref();
  }

  stopReconciling(): void {
    clearTimeout(this.reconcileTimer);
  }

  async reconcile(): Promise<void> {
    const running = new Set<string>();
    for (const runtime of this.runtimes) for (const id of await runtime.running()) running.add(id);
    for (const meta of [...this.instances.values()]) {
      if (!running.has(meta.id)) await this.endIfGone(meta.id, { state: 'stopped', reason: 'vanished' });
    }
    await this.releaseEndedOwners();
  }

  /**
   * How the reconciler tells a device whose authorization ended (revoked, expired, removed): its uses are released at
   * the next reconcile even when the release at its end was missed (an agent restart between the two).
   */
  setOwnerStanding(inGoodStanding: (owner: string) => boolean): void {
    this.ownerInGoodStanding = inGoodStanding;
  }

  /** Retry the releases that failed, and release every use still held by an owner no longer in good standing. */
  private async releaseEndedOwners(): Promise<void> {
    for (const [id, owners] of [...this.unreleased]) {
      for (const [owner, uses] of [...owners]) await this.releaseUses(id, owner, uses);
    }
    for (const owner of new Set([...this.instances.values()].flatMap((meta) => meta.owners))) {
      if (!this.ownerInGoodStanding(owner)) await this.releaseOwner(owner);
    }
  }

  /**
   * After a runtime's connection came back: release the instances that ended while it was away (with their events),
   * end domains of ours that nobody tracks any more (a launch that failed while the runtime was unreachable could not
   * end its own), and delete instance directories that belong to no instance.
   */
  async resync(runtime: InstanceRuntime): Promise<void> {
    for (const meta of await runtime.listInstances()) {
      const untracked = isInside(this.instancesDir, meta.dir) && !this.instances.has(meta.id) && !this.starting.has(meta.id);
      // A capture in the staging area owns its directory until it is done; one whose directory is gone is over.
      const abandonedCapture = isInside(this.stagingDir, meta.dir) && !(await exists(meta.dir));
      if (!untracked && !abandonedCapture) continue;
      this.log(`ending instance ${meta.id} of ${meta.serviceId}, which no launch or capture owns any more`);
      await runtime.destroy(meta.id);
      if (untracked) await rm(meta.dir, { recursive: true, force: true });
    }
    await this.reconcile();
    for (const entry of await readdir(this.instancesDir)) {
      if (!this.instances.has(entry) && !this.starting.has(entry)) await rm(path.join(this.instancesDir, entry), { recursive: true, force: true });
    }
  }

  /** An instance that is no longer running (and not being launched) is released: its port, files and record. */
  private endIfGone(id: string, ending: InstanceEnding): Promise<void> {
    return this.queue.run(id, async () => {
      const meta = this.instances.get(id);
      if (!meta || this.starting.has(id) || (await this.isRunning(meta))) return;
      this.log(`instance ${id} of ${meta.serviceId} ended outside the agent (${ending.reason}); releasing its port and files`);
      await this.forget(meta, ending);
    });
  }

  /**
   * `user`: who starts or joins it, recorded as the holder of the use (a device's ends with its authorization, see
   * releaseOwner; an anonymous caller's counts against the anonymous limits).
   */
  start<W extends Workload>(service: W, join: boolean, mechanism: Mechanism<W>, user: Stopper = 'operator'): Promise<Omit<StartResult, 'endpoint'>> {
    if (typeof user === 'object' && 'anonymous' in user) return this.anonymousQuota.run(user.anonymous, () => this.startFor(service, join, mechanism, user));
    return this.startFor(service, join, mechanism, user);
  }

  private async startFor<W extends Workload>(service: W, join: boolean, mechanism: Mechanism<W>, owner: Stopper): Promise<Omit<StartResult, 'endpoint'>> {
    const shareable = service.manifest.shareable;
    if (join && shareable) {
      const joined = await this.tryJoin(service.id, owner);
      if (joined) return { instance: joined, joined: true };
      const pending = this.pendingShared.get(service.id);
      if (pending) {
        const shared = await pending.catch(() => null);
        const rejoined = shared && (await this.tryJoin(service.id, owner));
        if (rejoined) return { instance: rejoined, joined: true };
      }
    }
    // Timed from admission: the timings describe the launch, not the wait for a slot (a mechanism that admits itself
    // is timed from its start: its wait for bytes is part of it).
    const slot = this.gate.slot();
    let timer = new PhaseTimer();
    const launch = (mechanism.admitsItself ? Promise.resolve() : slot.admit().then(() => { timer = new PhaseTimer(); }))
      .then(() => this.launch(service, mechanism, timer, slot.admit, owner)).finally(slot.release);
    if (shareable) {
      this.pendingShared.set(service.id, launch);
      void launch.catch(() => {}).then(() => { if (this.pendingShared.get(service.id) === launch) this.pendingShared.delete(service.id); });
    }
    return { instance: publicView(await launch), joined: false, timings: timer.summary() };
  }

  /** Runs a VM launch made outside the registry (a state capture) under the same bound as the registry's own. */
  admit<T>(launch: () => Promise<T>): Promise<T> {
    return this.gate.run(launch);
  }

  /** Add a user to the least-shared ready instance of the service, if there is one. */
  private async tryJoin(serviceId: string, owner: Stopper): Promise<Instance | null> {
    const candidates = [...this.instances.values()]
      .filter((i) => i.serviceId === serviceId && i.state === 'ready' && i.shareable)
      .sort((a, b) => a.users - b.users);
    for (const candidate of candidates) {
      const joined = await this.queue.run(candidate.id, async () => {
        const current = this.instances.get(candidate.id);
        if (!current || current.state !== 'ready') return null;
        const updated = { ...current, users: current.users + 1, ...withUse(holdersOf(current), owner) };
        await this.runtimeOf(updated).writeRecord(updated);
        this.instances.set(updated.id, updated);
        this.announce(updated, 'ready');
        return publicView(updated);
      });
      if (joined) return joined;
    }
    return null;
  }

  private async launch<W extends Workload>(service: W, mechanism: Mechanism<W>, timer: PhaseTimer, admit: () => Promise<void>, owner: Stopper): Promise<InstanceRecord> {
    const id = randomUUID();
    const dir = path.join(this.instancesDir, id);
    let meta: InstanceRecord = {
      id,
      serviceId: service.id,
      mechanism: mechanism.name,
      state: 'starting',
      bindAddress: this.bindAddress,
      hostPort: 0,
      guestPort: service.manifest.port,
      shareable: service.manifest.shareable,
      users: 1,
      ...withUse({ owners: [], anonymous: [] }, owner),
      launch: service.manifest.state ? 'memory-state' : 'cold-boot',
      createdAt: new Date().toISOString(),
      readyAt: null,
      dir,
      readiness: boundedProbe(service.manifest.readiness, this.gate.limits.readyWithinMs),
    };
    this.announce(meta, 'starting');
    this.starting.set(id, meta);
    try {
      await mkdir(dir, { mode: 0o755 });
      meta = await this.launchWithFreePort(service, mechanism, meta, timer, admit);
      this.instances.set(id, meta);
      // Already taken, unless the mechanism admits itself and did not: waiting for readiness always holds a slot.
      await admit();
      await this.waitReady(meta, timer);
      return this.instances.get(id) ?? meta;
    } catch (err) {
      // Read before the files go: what the guest printed is often the only clue to why it failed.
      const error = await withConsoleTail(asCloudletError(await noSpaceError(err, this.instancesDir, `start an instance of ${service.id}`)), mechanism.runtime, dir);
      this.log(`starting ${service.id} (${id}) failed: ${error.code}: ${error.message}`);
      await this.forget(meta, { state: 'stopped', reason: 'launch-failed' }, { evenIfUnreachable: true }).catch((cleanupErr) => this.log(`cleanup of ${id} failed: ${(cleanupErr as Error).message}`));
      throw error;
    } finally {
      this.starting.delete(id);
    }
  }

  /** Reserve a port and launch; a port some other program grabbed in the meantime costs one more attempt. */
  private async launchWithFreePort<W extends Workload>(service: W, mechanism: Mechanism<W>, base: InstanceRecord, timer: PhaseTimer,
    admit: () => Promise<void>): Promise<InstanceRecord> {
    for (let attempt = 1; ; attempt++) {
      faultPoint('launch:before-port');
      const meta: InstanceRecord = { ...base, hostPort: await this.ports.reserve() };
      faultPoint('launch:after-port');
      try {
        const progress = (phase: LaunchPhase, bytes?: { done: number; total: number }) => this.progress(meta, phase, bytes);
        const launch = await mechanism.launch({ service, domainName: domainName(service.id, meta.id), record: meta, timer, progress, admit });
        return { ...meta, launch };
      } catch (err) {
        await mechanism.runtime.destroy(meta.id).finally(() => this.ports.release(meta.hostPort));
        if (!(err instanceof CloudletError && err.code === 'NO_FREE_PORT') || attempt >= LAUNCH_ATTEMPTS) throw err;
        this.log(`port ${meta.hostPort} was taken meanwhile; retrying ${service.id} on another port`);
        await rm(meta.dir, { recursive: true, force: true });
        await mkdir(meta.dir, { mode: 0o755 });
      }
    }
  }

  /** Also for an adopted launch, whose record may carry a timeout from before the bound was lowered. */
  private async waitReady(meta: InstanceRecord, timer = new PhaseTimer()): Promise<void> {
    const probe = boundedProbe(meta.readiness, this.gate.limits.readyWithinMs);
    const remaining = Date.parse(meta.createdAt) + probe.timeout_ms - Date.now();
    this.progress(meta, 'waiting-ready');
    await timer.time('guest', () => waitUntilReady(probe, probeHost(meta.bindAddress), meta.hostPort, {
      timeoutMs: Math.max(remaining, 0),
      // While the runtime is unreachable the VM is presumed alive: the probe itself still tells when it serves.
      stillAlive: () => this.isRunning(meta).catch((err: unknown) => err instanceof CloudletError && err.code === 'HYPERVISOR_UNAVAILABLE'),
    }));
    faultPoint('launch:before-ready-record');
    await this.queue.run(meta.id, async () => {
      const current = this.instances.get(meta.id) ?? meta;
      const ready: InstanceRecord = { ...current, state: 'ready', readyAt: new Date().toISOString() };
      await timer.time('libvirt', () => this.runtimeOf(ready).writeRecord(ready));
      faultPoint('launch:after-ready-record');
      this.instances.set(meta.id, ready);
      this.progress(ready, 'ready');
      this.announce(ready, 'ready');
    });
  }

  /** An instance adopted while it was starting: finish the wait, or clean it up if it never becomes ready. */
  private async finishAdoptedLaunch(meta: InstanceRecord): Promise<void> {
    this.starting.set(meta.id, meta);
    try {
      await this.waitReady(meta);
    } catch (err) {
      this.log(`adopted instance ${meta.id} did not become ready (${(err as Error).message}); removing it`);
      await this.forget(meta, { state: 'stopped', reason: 'not-ready' }, { evenIfUnreachable: true }).catch(() => {});
    } finally {
      this.starting.delete(meta.id);
    }
  }

  /** Release one use of an instance (who may release which: instance-uses.ts); the last one ends it. */
  async stop(id: string, by: Stopper): Promise<StopResult> {
    return this.queue.run(id, async () => {
      const meta = this.record(id);
      const left = withoutOneUse(meta, by);
      if (left === null && typeof by === 'object' && 'device' in by) {
        throw new CloudletError('FORBIDDEN', `instance ${id} is not used by device ${by.device}`, { details: { instance_id: id } });
      }
      // No anonymous use: to an anonymous caller the instance (the operator's, a device's) is one that does not exist.
      if (left === null) throw new CloudletError('INSTANCE_NOT_FOUND', `no instance with id ${id}`, { details: { instance_id: id } });
      return this.release(meta, 1, left, 'requested');
    });
  }

  /**
   * A device's authorization ended (revoked, removed, expired): every use it holds is released, and the instances
   * nobody else uses are stopped.
   */
  async releaseOwner(owner: string): Promise<void> {
    for (const candidate of [...this.instances.values()].filter((i) => i.owners.includes(owner))) {
      await this.releaseUses(candidate.id, owner, candidate.owners.filter((o) => o === owner).length);
    }
  }

  /**
   * Release `uses` of `owner`'s uses of instance `id`. One that fails is kept and retried by the reconciler: counted,
   * so a device paired again under the same id meanwhile loses only the old device's uses, not ones of its own.
   */
  private async releaseUses(id: string, owner: string, uses: number): Promise<void> {
    try {
      await this.queue.run(id, async () => {
        const meta = this.instances.get(id);
        if (!meta || meta.state === 'stopping') return;
        const kept = withoutUses(meta.owners, owner, uses);
        if (kept.length === meta.owners.length) return;
        this.log(`device ${owner} may no longer use instance ${meta.id} of ${meta.serviceId}; releasing its ${meta.owners.length - kept.length} use(s)`);
        await this.release(meta, meta.owners.length - kept.length, { ...holdersOf(meta), owners: kept }, 'authorization-ended');
      });
      this.unreleased.get(id)?.delete(owner);
      if (this.unreleased.get(id)?.size === 0) this.unreleased.delete(id);
    } catch (err) {
      this.log(`releasing device ${owner}'s use of ${id} failed (retried by the reconciler): ${(err as Error).message}`);
      this.unreleased.set(id, (this.unreleased.get(id) ?? new Map<string, number>()).set(owner, uses));
    }
  }

  /** Drop `uses` users (leaving `holders`); an instance left with none is ended. Runs in the instance's queue. */
  private async release(meta: InstanceRecord, uses: number, holders: UseHolders, reason: 'requested' | 'authorization-ended'): Promise<StopResult> {
    const id = meta.id;
    if (meta.users > uses) {
      const updated = { ...meta, users: meta.users - uses, ...holders };
      await this.runtimeOf(updated).writeRecord(updated);
      this.instances.set(id, updated);
      this.announce(updated, 'ready');
      return { destroyed: false, users: updated.users };
    }
    const stopping: InstanceRecord = { ...meta, state: 'stopping' };
    this.instances.set(id, stopping);
    this.announce(stopping, 'stopping');
    await this.forget(stopping, { state: 'stopped', reason }).catch((err: unknown) => {
      // Not ended (libvirt unreachable): it still runs and serves, so it stays as it was.
      this.instances.set(id, meta);
      this.announce(meta, meta.state === 'ready' ? 'ready' : 'starting');
      throw err;
    });
    return { destroyed: true, users: 0 };
  }

  /**
   * Destroy the domain (if any), delete the instance's files, release its port, drop it from the registry. A launch
   * cleaning up after itself (`evenIfUnreachable`) goes on when the runtime cannot be reached: the domain, if it
   * survived, is ended when the runtime is back (resync), and a port it may still hold fails the allocator's test bind.
   */
  private async forget(meta: InstanceRecord, ending: InstanceEnding, { evenIfUnreachable = false } = {}): Promise<void> {
    try {
      await this.runtimeOf(meta).destroy(meta.id);
    } catch (err) {
      if (!(evenIfUnreachable && err instanceof CloudletError && err.code === 'HYPERVISOR_UNAVAILABLE')) throw err;
      this.log(`instance ${meta.id} is released without ending its domain (${err.message}); it is ended on reconnect`);
    }
    await rm(meta.dir, { recursive: true, force: true });
    if (meta.hostPort) this.ports.release(meta.hostPort);
    this.instances.delete(meta.id);
    this.announce(meta, ending.state, ending.reason);
  }

  private announce(meta: InstanceRecord, state: InstanceLifecycleState, reason?: InstanceEnding['reason']): void {
    this.events.emit({ type: 'instance', state, instance: publicView(meta), ...(reason ? { reason } : {}), at: new Date().toISOString() });
  }

  private progress(meta: InstanceRecord, phase: LaunchPhase, bytes?: { done: number; total: number }): void {
    this.events.emit({
      type: 'progress', instanceId: meta.id, serviceId: meta.serviceId, phase, percent: launchPercent(phase, bytes),
      ...(bytes ? { bytes } : {}), at: new Date().toISOString(),
    });
  }
}

/** Bytes of console output attached to a failed launch's error (`details.console_tail`). */
const FAILURE_CONSOLE_BYTES = 4096;

/** The error of a failed launch with the end of the instance's console output, when its runtime keeps one. */
export async function withConsoleTail(error: CloudletError, runtime: InstanceRuntime, dir: string): Promise<CloudletError> {
  const tail = await runtime.consoleTail?.(dir, FAILURE_CONSOLE_BYTES).catch(() => undefined);
  return tail ? withDetails(error, { console_tail: tail }) : error;
}

/**
 * Where each phase starts in the launch's 0–100; streaming a memory state fills the restoring share by bytes, and
 * applying an overlay fills the share before restoring.
 */
const PHASE_PERCENT: Record<LaunchPhase, number> = { synthesizing: 0, cloning: 0, restoring: 10, booting: 10, provisioning: 30, 'waiting-ready': 70, ready: 100 };

function launchPercent(phase: LaunchPhase, bytes?: { done: number; total: number }): number {
  if (!bytes || bytes.total === 0) return PHASE_PERCENT[phase];
  const end = phase === 'synthesizing' ? PHASE_PERCENT.restoring : PHASE_PERCENT['waiting-ready'];
  return Math.round(PHASE_PERCENT[phase] + (end - PHASE_PERCENT[phase]) * (bytes.done / bytes.total));
}

const isInside = (dir: string, file: string) => file.startsWith(dir + path.sep);

const exists = (file: string) => access(file).then(() => true, () => false);

/** libvirt domain names must be unique; the service id keeps them readable in `virsh list`. */
function domainName(serviceId: string, id: string): string {
  return `cloudlet-${serviceId}-${id.slice(0, 8)}`;
}

function publicView(meta: InstanceRecord): Instance {
  const { dir: _dir, readiness: _readiness, anonymous: _anonymous, ...instance } = meta;
  return instance;
}

/** `owners` without the first `uses` entries of `owner`. */
function withoutUses(owners: string[], owner: string, uses: number): string[] {
  let left = uses;
  return owners.filter((o) => o !== owner || left-- <= 0);
}
