import { randomUUID } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../log';
import { domainName, type Launcher } from './instance-launch';
import type { LaunchGate } from './launch-gate';
import type { Mechanism, WarmStart } from './mechanism';
import { PhaseTimer } from './timing';
import type { InstanceRecord, PoolStatus, Service, Workload } from './types';

/** The agent's `pool` settings (config.ts). */
export interface PoolSizing {
  memoryBudgetMib: number;
  hostReserveMib: number;
  sizes: Record<string, number>;
  maxPerService: number;
}

/** A mechanism that can keep its workloads warm: what a pool fills with. */
export type WarmMechanism = Mechanism<Service> & { readonly warm: WarmStart<Service> };

export interface WarmPoolParts {
  mechanism: WarmMechanism;
  launcher: Launcher;
  gate: LaunchGate;
  instancesDir: string;
  sizing: PoolSizing;
  /** Bytes of memory the host can still give a new VM (MemAvailable). */
  availableMemory: () => Promise<number>;
  log: Logger;
}

/** The starts of this last stretch of time are the demand a pool grows to. */
const DEMAND_WINDOW_MS = 60_000;
/** A service whose pool could not be filled is left alone this long: a broken memory state must not loop restores. */
const FILL_RETRY_MS = 30_000;
const MIB = 2 ** 20;

/** Which files of a service a pooled VM was restored from: one made before the service changed is stale. */
const sourceOf = (service: Service) => `${service.dir}/${service.manifest.disk}|${service.manifest.state ?? ''}`;

type PooledRecord = InstanceRecord & { pooled: NonNullable<InstanceRecord['pooled']> };

/**
 * The warm pools of the services (docs/warm-pool.md): VMs restored paused, with no forward, before anyone asks, so
 * that a start only gives one its forward and resumes it. Filled one VM at a time, at the lowest priority (a slot the
 * launch gate lends and launches never wait for), within a memory budget and the host's available memory. Pooled VMs
 * are instances of their own kind in their runtime (`record.pooled`): never listed, adopted again after an agent
 * restart, replaced when they die, discarded when their service changes or goes.
 */
export class WarmPool {
  /** Paused, ready to be handed to a start. */
  private readonly ready = new Map<string, PooledRecord>();
  /** Being restored into the pool, with the promise of that fill. */
  private readonly filling = new Map<string, { record: PooledRecord; done: Promise<void> }>();
  /** Start times per service within the demand window. */
  private readonly starts = new Map<string, number[]>();
  private readonly failedAt = new Map<string, number>();
  /** Services whose pool is kept empty while their files change (drained), with how many changes hold it. */
  private readonly held = new Map<string, number>();
  private services: () => Service[] = () => [];
  private timer: NodeJS.Timeout | undefined;
  private stopWatchingGate: (() => void) | undefined;
  private rounding = false;
  private lastProblem: string | null = null;

  constructor(private readonly parts: WarmPoolParts) {}

  get mechanism(): WarmMechanism {
    return this.parts.mechanism;
  }

  /** Keep the pools of `services` filled: now, whenever a launch slot is given back, and every `intervalMs`. */
  start(services: () => Service[], intervalMs: number): void {
    this.services = services;
    this.stopWatchingGate = this.parts.gate.onFreed(() => this.kick());
    const tick = () => {
      this.kick();
      this.timer = setTimeout(tick, intervalMs).unref();
    };
    tick();
  }

  /** Stop filling; the pooled VMs stay (the next agent adopts them). */
  stop(): void {
    clearTimeout(this.timer);
    this.stopWatchingGate?.();
    this.services = () => [];
  }

  tracks(id: string): boolean {
    return this.ready.has(id) || this.filling.has(id);
  }

  /** A pooled VM found running at start: it stays pooled (the next round discards it if its service changed). */
  adopt(record: InstanceRecord): void {
    if (!record.pooled) return;
    this.ready.set(record.id, record as PooledRecord);
    this.parts.log(`adopted pooled VM ${record.id} of ${record.serviceId}`);
  }

  /**
   * A pooled VM of `service` for a start by `mechanism`, taken out of the pool (the caller assigns it or destroys it),
   * or null. Either way the start counts as demand.
   */
  take(workload: Workload, mechanism: Mechanism<never>): InstanceRecord | null {
    if (mechanism !== this.parts.mechanism) return null;
    // The pool's own mechanism launches services.
    const service = workload as Service;
    const now = Date.now();
    this.starts.set(service.id, [...this.recentStarts(service.id, now), now]);
    const source = sourceOf(service);
    // A drained pool hands out nothing: its VMs run on files being replaced.
    const pooled = this.held.has(service.id) ? null : ([...this.ready.values()].find((r) => r.serviceId === service.id && r.pooled.source === source) ?? null);
    if (pooled) this.ready.delete(pooled.id);
    this.kick();
    return pooled;
  }

  /** A pooled VM ended outside the agent (its runtime said so): forgotten, and replaced by the next round. */
  async ended(id: string): Promise<void> {
    const record = this.ready.get(id);
    if (!record || (await this.mechanism.runtime.running()).has(id)) return;
    this.ready.delete(id);
    this.parts.log(`pooled VM ${id} of ${record.serviceId} ended outside the agent; it is replaced`);
    await rm(record.dir, { recursive: true, force: true });
    this.kick();
  }

  status(service: Service): PoolStatus {
    const of = (records: Iterable<PooledRecord>) => [...records].filter((r) => r.serviceId === service.id).length;
    return {
      size: this.sizeOf(service),
      target: this.targetOf(service),
      ready: of(this.ready.values()),
      filling: of([...this.filling.values()].map((f) => f.record)),
    };
  }

  /**
   * Run `work` (an update or removal of the service) with the service's pool empty: its pooled VMs run on the files
   * `work` replaces, so they are destroyed first, fills under way are awaited (and discard what they made), and none
   * starts until `work` is done.
   */
  async drained<T>(serviceId: string, work: () => Promise<T>): Promise<T> {
    this.held.set(serviceId, (this.held.get(serviceId) ?? 0) + 1);
    try {
      await Promise.all([...this.filling.values()].filter((f) => f.record.serviceId === serviceId).map((f) => f.done));
      for (const record of [...this.ready.values()].filter((r) => r.serviceId === serviceId)) await this.discard(record, 'its service changes');
      return await work();
    } finally {
      const holds = (this.held.get(serviceId) ?? 1) - 1;
      if (holds > 0) this.held.set(serviceId, holds);
      else this.held.delete(serviceId);
      this.kick();
    }
  }

  /** Pooled VMs the service keeps when nobody starts it: config, then manifest, then 1 with a memory state. */
  private sizeOf(service: Service): number {
    if (this.parts.sizing.memoryBudgetMib === 0 || !this.mechanism.warm.poolable(service)) return 0;
    return this.parts.sizing.sizes[service.id] ?? service.manifest.pool_size ?? 1;
  }

  /** The size, grown to the starts of the demand window (at most `maxPerService`); a pool of size 0 never grows. */
  private targetOf(service: Service): number {
    const size = this.sizeOf(service);
    if (size === 0) return 0;
    return Math.max(size, Math.min(this.recentStarts(service.id, Date.now()).length, this.parts.sizing.maxPerService));
  }

  private recentStarts(serviceId: string, now: number): number[] {
    return (this.starts.get(serviceId) ?? []).filter((at) => at > now - DEMAND_WINDOW_MS);
  }

  /** One more round soon: sweep, then start a fill if one is due and a slot is free. */
  private kick(): void {
    if (this.rounding) return;
    this.rounding = true;
    void this.round()
      .then(
        () => (this.lastProblem = null),
        (err: Error) => {
          // Once per distinct problem: an unreachable hypervisor fails every round the same way until it is back.
          if (err.message !== this.lastProblem) this.parts.log(`warm pool: ${err.message}`);
          this.lastProblem = err.message;
        },
      )
      .finally(() => (this.rounding = false));
  }

  private async round(): Promise<void> {
    await this.sweep();
    if (this.filling.size > 0) return; // one fill at a time: a 2-core box has no CPU for two background restores
    const service = await this.nextToFill();
    const release = service && this.parts.gate.tryLend();
    if (service && release) this.fill(service, release);
  }

  /** Discard the pooled VMs that died, went stale, or are more than their service's pool wants now. */
  private async sweep(): Promise<void> {
    if (this.ready.size === 0) return;
    const running = await this.mechanism.runtime.running();
    const services = new Map(this.services().map((s) => [s.id, s]));
    const kept = new Map<string, number>();
    for (const record of [...this.ready.values()]) {
      const service = services.get(record.serviceId);
      const keep = service && !this.held.has(service.id) && sourceOf(service) === record.pooled.source ? this.targetOf(service) : 0;
      if (!running.has(record.id)) {
        this.ready.delete(record.id);
        this.parts.log(`pooled VM ${record.id} of ${record.serviceId} is gone; it is replaced`);
        await rm(record.dir, { recursive: true, force: true });
      } else if ((kept.get(record.serviceId) ?? 0) >= keep) {
        await this.discard(record, service ? 'its pool is smaller now, or its service changed' : 'its service is gone');
      } else {
        kept.set(record.serviceId, (kept.get(record.serviceId) ?? 0) + 1);
      }
    }
  }

  /** The service whose pool is furthest below its target and fits the memory budget and the host, if any. */
  private async nextToFill(): Promise<Service | null> {
    const { memoryBudgetMib, hostReserveMib } = this.parts.sizing;
    const pooled = [...this.ready.values(), ...[...this.filling.values()].map((f) => f.record)];
    const usedMib = pooled.reduce((sum, r) => sum + r.pooled.memoryMib, 0);
    const now = Date.now();
    const due = this.services()
      .filter((s) => !this.held.has(s.id) && now - (this.failedAt.get(s.id) ?? -Infinity) > FILL_RETRY_MS)
      .map((service) => ({ service, have: pooled.filter((r) => r.serviceId === service.id).length, target: this.targetOf(service) }))
      .filter(({ have, target }) => have < target && target > 0)
      .sort((a, b) => a.have / a.target - b.have / b.target);
    const next = due.find(({ service }) => usedMib + service.manifest.memory_mib <= memoryBudgetMib)?.service;
    if (!next) return null;
    const availableMib = (await this.parts.availableMemory()) / MIB;
    return availableMib - next.manifest.memory_mib >= hostReserveMib ? next : null;
  }

  private fill(service: Service, release: () => void): void {
    const id = randomUUID();
    const dir = path.join(this.parts.instancesDir, id);
    const record: PooledRecord = {
      ...this.parts.launcher.newRecord(service, this.mechanism.name, id, dir),
      pooled: { source: sourceOf(service), memoryMib: service.manifest.memory_mib },
    };
    const started = Date.now();
    const done = (async () => {
      try {
        await mkdir(dir, { mode: 0o755 });
        const plan = { service, domainName: domainName(service.id, id), record, timer: new PhaseTimer(), progress: () => {}, admit: async () => {} };
        await this.mechanism.warm.prepare(plan);
        const current = this.services().find((s) => s.id === service.id);
        if (!current || this.held.has(service.id) || sourceOf(current) !== record.pooled.source) {
          await this.discard(record, 'its service changed while it was restored');
          return;
        }
        this.ready.set(id, record);
        this.failedAt.delete(service.id);
        this.parts.log(`pooled VM ${id} of ${service.id} is ready (restored paused in ${Date.now() - started} ms)`);
      } catch (err) {
        this.failedAt.set(service.id, Date.now());
        this.parts.log(`filling the warm pool of ${service.id} failed, tried again in ${FILL_RETRY_MS / 1000} s: ${(err as Error).message}`);
        await this.discard(record, 'its restore failed');
      }
    })().finally(() => {
      this.filling.delete(id);
      release();
      this.kick();
    });
    this.filling.set(id, { record, done });
  }

  /** Destroy a pooled VM and delete its files; a runtime that cannot be reached ends it on reconnect (resync). */
  private async discard(record: PooledRecord, why: string): Promise<void> {
    this.ready.delete(record.id);
    this.parts.log(`discarding pooled VM ${record.id} of ${record.serviceId}: ${why}`);
    await this.mechanism.runtime.destroy(record.id).catch((err: Error) => this.parts.log(`pooled VM ${record.id} is not ended yet: ${err.message}`));
    await rm(record.dir, { recursive: true, force: true });
  }
}
