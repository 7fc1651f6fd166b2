import { randomUUID } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { CloudletError, asCloudletError } from '../errors';
import { noSpaceError } from '../system/disk-space';
import { faultPoint } from '../system/fault-points';
import type { Logger } from '../log';
import { EventBus, type InstanceLifecycleState, type LaunchPhase, type MovedTo } from './events';
import { Launcher, domainName, launchPercent, withConsoleTail } from './instance-launch';
import { RuntimeSync, type ReconcileCost } from './instance-sync';
import type { CapturingMechanism, Mechanism } from './mechanism';
import type { PortAllocator } from './ports';
import type { LaunchGate } from './launch-gate';
import type { InstanceEnding, InstanceRuntime, SavedInstance } from './runtime';
import { AnonymousQuota, holdersOf, withUse, withoutOneUse, withoutUses, type AnonymousLimits, type UseHolders } from './instance-uses';
import { KeyedQueue } from './keyed-queue';
import { WarmPool, type WarmPoolParts } from './warm-pool';
import { PhaseTimer } from './timing';
import type { Instance, InstanceRecord, MechanismName, StartResult, StopResult, Stopper, Workload } from './types';

/**
 * Every instance the cloudlet runs, whatever the mechanism, and the one pipeline that launches them: starts and
 * memory-state captures alike. The registry is rebuilt from the runtimes (libvirt domains with our metadata, sandbox
 * state files) at start, so an agent restart neither kills nor forgets an instance; the only state it keeps in
 * memory is what it can re-derive.
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
  private readonly launcher: Launcher;
  private readonly sync: RuntimeSync;
  readonly pool: WarmPool | undefined;

  constructor(
    mechanisms: Mechanism<Workload>[],
    private readonly ports: PortAllocator,
    private readonly instancesDir: string,
    /** Where unfinished work lives (captures); an instance found there at start is a leftover. */
    private readonly stagingDir: string,
    bindAddress: string,
    private readonly log: Logger,
    /** Bounds the launches in flight, whatever the mechanism, captures included. */
    private readonly gate: LaunchGate,
    anonymousLimits: AnonymousLimits = { perAddress: Infinity, total: Infinity },
    /** Keep warm pools of the mechanism's services (docs/warm-pool.md); filled once `pool.start` is called. */
    pool?: Pick<WarmPoolParts, 'mechanism' | 'sizing' | 'availableMemory'>,
  ) {
    this.mechanisms = new Map(mechanisms.map((m) => [m.name, m]));
    this.anonymousQuota = new AnonymousQuota(anonymousLimits, () => [...this.instances.values()].filter((record) => !this.starting.has(record.id)));
    this.launcher = new Launcher(ports, bindAddress, gate.limits.readyWithinMs, log);
    this.pool = pool && new WarmPool({ ...pool, launcher: this.launcher, gate, instancesDir, log });
    const runtimes = [...new Set(mechanisms.map((m) => m.runtime))];
    this.sync = new RuntimeSync(
      {
        listed: () => [...this.instances.values()],
        tracks: (id) => this.instances.has(id) || this.starting.has(id) || this.pool?.tracks(id) === true,
        knows: (record) => this.mechanisms.has(record.mechanism),
        adoptRecord: (record) => this.adoptRecord(record),
        endIfGone: (id, ending) => this.endIfGone(id, ending),
        releaseEndedOwners: () => this.releaseEndedOwners(),
      },
      runtimes,
      instancesDir,
      stagingDir,
      log,
    );
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
    const record = this.instances.get(id);
    if (!record) throw new CloudletError('INSTANCE_NOT_FOUND', `no instance with id ${id}`, { details: { instance_id: id } });
    return record;
  }

  /** Adopt the instances the runtimes still run, resume the ones that were starting, and sweep leftovers. */
  adopt(): Promise<void> {
    return this.sync.adopt();
  }

  /** See RuntimeSync.startReconciling. */
  startReconciling(intervalMs: number, useEvents = true): void {
    this.sync.startReconciling(intervalMs, useEvents);
  }

  stopReconciling(): void {
    this.sync.stopReconciling();
  }

  reconcileCost(): ReconcileCost | null {
    return this.sync.reconcileCost();
  }

  reconcile(): Promise<void> {
    return this.sync.reconcile();
  }

  resync(runtime: InstanceRuntime): Promise<void> {
    return this.sync.resync(runtime);
  }

  private adoptRecord(record: InstanceRecord): void {
    if (record.pooled) {
      if (this.pool) this.pool.adopt(record);
      else
        void this.runtimeOf(record)
          .destroy(record.id)
          .catch((err: Error) => this.log(`cannot end pooled VM ${record.id}: ${err.message}`));
      return;
    }
    this.instances.set(record.id, record);
    this.ports.claim(record.hostPort);
    this.log(`adopted instance ${record.id} of ${record.serviceId} on port ${record.hostPort} (${record.state})`);
    if (record.state === 'starting') void this.finishAdoptedLaunch(record);
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
    for (const owner of new Set([...this.instances.values()].flatMap((record) => record.owners))) {
      if (!this.ownerInGoodStanding(owner)) await this.releaseOwner(owner);
    }
  }

  /** An instance that is no longer running (and not being launched) is released: its port, files and record. */
  private endIfGone(id: string, ending: InstanceEnding): Promise<void> {
    if (this.pool?.tracks(id)) return this.pool.ended(id);
    return this.queue.run(id, async () => {
      const record = this.instances.get(id);
      if (!record || this.starting.has(id) || (await this.isRunning(record))) return;
      this.log(`instance ${id} of ${record.serviceId} ended outside the agent (${ending.reason}); releasing its port and files`);
      await this.forget(record, ending);
    });
  }

  /**
   * Start an instance of `service` with `mechanism`, or join a ready one (`join`, a shareable service). `user`: who
   * starts or joins it, recorded as the holder of the use (a device's ends with its authorization, see releaseOwner;
   * an anonymous caller's counts against the anonymous limits).
   */
  start<W extends Workload>(service: W, join: boolean, mechanism: Mechanism<W>, user: Stopper = 'operator'): Promise<Omit<StartResult, 'endpoint'>> {
    if (typeof user === 'object' && 'anonymous' in user)
      return this.anonymousQuota.run(user.anonymous, () => this.joinOrLaunch(service, join, mechanism, user));
    return this.joinOrLaunch(service, join, mechanism, user);
  }

  private async joinOrLaunch<W extends Workload>(service: W, join: boolean, mechanism: Mechanism<W>, owner: Stopper): Promise<Omit<StartResult, 'endpoint'>> {
    const shareable = service.manifest.shareable;
    if (join && shareable) {
      const joined = await this.tryJoin(service.id, owner);
      if (joined) return { instance: joined, joined: true };
      const pending = this.pendingShared.get(service.id);
      if (pending) {
        // Its failure is the joiners' too: were each to launch anew, the joiners of one service would start a VM each.
        await pending;
        const rejoined = await this.tryJoin(service.id, owner);
        if (rejoined) return { instance: rejoined, joined: true };
      }
    }
    // Timed from admission: the timings describe the launch, not the wait for a slot (a mechanism that admits itself
    // is timed from its start: its wait for bytes is part of it).
    const slot = this.gate.slot();
    let timer = new PhaseTimer();
    const launch = (
      mechanism.admitsItself
        ? Promise.resolve()
        : slot.admit().then(() => {
            timer = new PhaseTimer();
          })
    )
      .then(() => this.launchInstance(service, mechanism, timer, slot.admit, owner))
      .finally(slot.release);
    if (shareable) {
      this.pendingShared.set(service.id, launch);
      void launch
        .catch(() => {})
        .then(() => {
          if (this.pendingShared.get(service.id) === launch) this.pendingShared.delete(service.id);
        });
    }
    return { instance: publicView(await launch), joined: false, timings: timer.summary() };
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

  /** A new instance, listed from its first port on, ready when this resolves; one that fails is undone whole. */
  private async launchInstance<W extends Workload>(
    service: W,
    mechanism: Mechanism<W>,
    timer: PhaseTimer,
    admit: () => Promise<void>,
    owner: Stopper,
  ): Promise<InstanceRecord> {
    // A pooled VM lends the start its identity and directory (docs/warm-pool.md).
    const pooled = this.pool?.take(service, mechanism) ?? null;
    const id = pooled?.id ?? randomUUID();
    let record: InstanceRecord = {
      ...this.launcher.newRecord(service, mechanism.name, id, pooled?.dir ?? path.join(this.instancesDir, id)),
      users: 1,
      ...withUse({ owners: [], anonymous: [] }, owner),
    };
    this.announce(record, 'starting');
    this.starting.set(id, record);
    let listed = false;
    try {
      const warm = pooled && mechanism.warm && (await this.launcher.assign(mechanism, mechanism.warm, record, timer));
      if (!pooled) await mkdir(record.dir, { mode: 0o755 });
      const progress = (phase: LaunchPhase, bytes?: { done: number; total: number }) => this.progress(record, phase, bytes);
      record = warm || (await this.launcher.bringUp(mechanism, record, { service, domainName: domainName(service.id, id), timer, progress, admit }));
      this.instances.set(id, record);
      listed = true;
      // Already taken, unless the mechanism admits itself and did not: waiting for readiness always holds a slot.
      await admit();
      await this.waitReady(record, timer);
      return this.instances.get(id) ?? record;
    } catch (err) {
      // Read before the files go: what the guest printed is often the only clue to why it failed.
      const error = await withConsoleTail(
        asCloudletError(await noSpaceError(err, this.instancesDir, `start an instance of ${service.id}`)),
        mechanism.runtime,
        record.dir,
      );
      this.log(`starting ${service.id} (${id}) failed: ${error.code}: ${error.message}`);
      await this.queue
        .run(id, async () => {
          // A stop while it waited for readiness ended it already, and its port may be another start's by now.
          if (listed && !this.instances.has(id)) return;
          await this.forget(record, { state: 'stopped', reason: 'launch-failed' }, { evenIfUnreachable: true });
        })
        .catch((cleanupErr) => this.log(`cleanup of ${id} failed: ${(cleanupErr as Error).message}`));
      throw error;
    } finally {
      this.starting.delete(id);
    }
  }

  /** Wait until the instance serves, then record it ready. Also for an adopted launch. */
  private async waitReady(record: InstanceRecord, timer = new PhaseTimer()): Promise<void> {
    this.progress(record, 'waiting-ready');
    await this.launcher.untilServing(record, this.runtimeOf(record), timer);
    faultPoint('launch:before-ready-record');
    await this.queue.run(record.id, async () => {
      const current = this.instances.get(record.id) ?? record;
      const ready: InstanceRecord = { ...current, state: 'ready', readyAt: new Date().toISOString() };
      await timer.time('libvirt', () => this.runtimeOf(ready).writeRecord(ready));
      faultPoint('launch:after-ready-record');
      this.instances.set(record.id, ready);
      this.progress(ready, 'ready');
      this.announce(ready, 'ready');
    });
  }

  /** An instance adopted while it was starting: finish the wait, or clean it up if it never becomes ready. */
  private async finishAdoptedLaunch(record: InstanceRecord): Promise<void> {
    this.starting.set(record.id, record);
    try {
      await this.waitReady(record);
    } catch (err) {
      this.log(`adopted instance ${record.id} did not become ready (${(err as Error).message}); removing it`);
      await this.forget(record, { state: 'stopped', reason: 'not-ready' }, { evenIfUnreachable: true }).catch(() => {});
    } finally {
      this.starting.delete(record.id);
    }
  }

  /**
   * Capture a memory state: launch `service` with `mechanism` as a throwaway instance in the staging area (never
   * listed, no events; a launch slot held throughout), wait until it serves, save it through its runtime, and hand
   * the saved files to `keep` (which moves or copies them). Whatever happens, the instance, its files and its port are
   * gone afterwards; a restart in the middle leaves a staging leftover that the next adopt ends.
   */
  capture<W extends Workload, T>(service: W, mechanism: CapturingMechanism<W>, keep: (saved: SavedInstance & { dir: string }) => Promise<T>): Promise<T> {
    return this.gate.run(() => this.launcher.capture(path.join(this.stagingDir, randomUUID()), service, mechanism, keep));
  }

  /** Hand a ready instance to another cloudlet (docs/handoff.md): `move` runs in its queue, and resolves once it runs there. */
  handOff(id: string, move: (record: InstanceRecord) => Promise<MovedTo>): Promise<MovedTo> {
    return this.queue.run(id, async () => {
      const record = this.record(id);
      if (record.state !== 'ready') throw new CloudletError('HANDOFF_IN_PROGRESS', `instance ${id} is ${record.state}`, { details: { instance_id: id } });
      const movedTo = await move(record);
      await this.forget(record, { state: 'moved', reason: 'handed-off', movedTo });
      return movedTo;
    });
  }

  /** An instance arriving from another cloudlet: tracked (never swept) from its offer (`record`) until it arrived or not (null). */
  expectArrival(id: string, record: InstanceRecord | null): void {
    if (record) this.starting.set(id, record);
    else this.starting.delete(id);
  }
  /** It runs here and serves: listed and announced as any instance (its port was reserved with the offer). */
  arrived(record: InstanceRecord): void {
    this.starting.delete(record.id);
    this.adoptRecord(record);
    this.announce(record, 'ready');
  }

  /** Release one use of an instance (who may release which: instance-uses.ts); the last one ends it. */
  async stop(id: string, by: Stopper): Promise<StopResult> {
    return this.queue.run(id, async () => {
      const record = this.record(id);
      const left = withoutOneUse(record, by);
      if (left === null && typeof by === 'object' && 'device' in by) {
        throw new CloudletError('FORBIDDEN', `instance ${id} is not used by device ${by.device}`, { details: { instance_id: id } });
      }
      // No anonymous use: to an anonymous caller the instance (the operator's, a device's) is one that does not exist.
      if (left === null) throw new CloudletError('INSTANCE_NOT_FOUND', `no instance with id ${id}`, { details: { instance_id: id } });
      return this.release(record, 1, left, 'requested');
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
        const record = this.instances.get(id);
        if (!record || record.state === 'stopping') return;
        const kept = withoutUses(record.owners, owner, uses);
        if (kept.length === record.owners.length) return;
        this.log(`device ${owner} may no longer use instance ${record.id} of ${record.serviceId}; releasing its ${record.owners.length - kept.length} use(s)`);
        await this.release(record, record.owners.length - kept.length, { ...holdersOf(record), owners: kept }, 'authorization-ended');
      });
      this.unreleased.get(id)?.delete(owner);
      if (this.unreleased.get(id)?.size === 0) this.unreleased.delete(id);
    } catch (err) {
      this.log(`releasing device ${owner}'s use of ${id} failed (retried by the reconciler): ${(err as Error).message}`);
      this.unreleased.set(id, (this.unreleased.get(id) ?? new Map<string, number>()).set(owner, uses));
    }
  }

  /** Drop `uses` users (leaving `holders`); an instance left with none is ended. Runs in the instance's queue. */
  private async release(record: InstanceRecord, uses: number, holders: UseHolders, reason: 'requested' | 'authorization-ended'): Promise<StopResult> {
    const id = record.id;
    if (record.users > uses) {
      const updated = { ...record, users: record.users - uses, ...holders };
      await this.runtimeOf(updated).writeRecord(updated);
      this.instances.set(id, updated);
      this.announce(updated, 'ready');
      return { destroyed: false, users: updated.users };
    }
    const stopping: InstanceRecord = { ...record, state: 'stopping' };
    this.instances.set(id, stopping);
    this.announce(stopping, 'stopping');
    await this.forget(stopping, { state: 'stopped', reason }).catch((err: unknown) => {
      // Not ended (libvirt unreachable): it still runs and serves, so it stays as it was.
      this.instances.set(id, record);
      this.announce(record, record.state === 'ready' ? 'ready' : 'starting');
      throw err;
    });
    return { destroyed: true, users: 0 };
  }

  /**
   * Destroy the domain (if any), delete the instance's files, release its port, drop it from the registry. A launch
   * cleaning up after itself (`evenIfUnreachable`) goes on when the runtime cannot be reached: the domain, if it
   * survived, is ended when the runtime is back (resync), and a port it may still hold fails the allocator's test bind.
   */
  private async forget(record: InstanceRecord, ending: InstanceEnding, { evenIfUnreachable = false } = {}): Promise<void> {
    try {
      await this.runtimeOf(record).destroy(record.id);
    } catch (err) {
      if (!(evenIfUnreachable && err instanceof CloudletError && err.code === 'HYPERVISOR_UNAVAILABLE')) throw err;
      this.log(`instance ${record.id} is released without ending its domain (${err.message}); it is ended on reconnect`);
    }
    await rm(record.dir, { recursive: true, force: true });
    if (record.hostPort) this.ports.release(record.hostPort);
    this.instances.delete(record.id);
    this.announce(record, ending.state, ending.reason, ending.movedTo);
  }

  private announce(record: InstanceRecord, state: InstanceLifecycleState, reason?: InstanceEnding['reason'], movedTo?: MovedTo): void {
    const at = new Date().toISOString();
    this.events.emit({ type: 'instance', state, instance: publicView(record), ...(reason ? { reason } : {}), ...(movedTo ? { movedTo } : {}), at });
  }

  private progress(record: InstanceRecord, phase: LaunchPhase, bytes?: { done: number; total: number }): void {
    this.events.emit({
      type: 'progress',
      instanceId: record.id,
      serviceId: record.serviceId,
      phase,
      percent: launchPercent(phase, bytes),
      ...(bytes ? { bytes } : {}),
      at: new Date().toISOString(),
    });
  }
}

function publicView(record: InstanceRecord): Instance {
  const { dir: _dir, readiness: _readiness, anonymous: _anonymous, ...instance } = record;
  return instance;
}
