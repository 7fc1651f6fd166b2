import { randomUUID } from 'node:crypto';
import { mkdir, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { CloudletError, asCloudletError } from '../errors';
import type { Logger } from '../log';
import type { InstanceRuntime, Mechanism } from '../mechanisms/mechanism';
import type { PortAllocator } from './ports';
import { waitUntilReady } from './readiness';
import { PhaseTimer } from './timing';
import type { Instance, InstanceRecord, MechanismName, Service, StartResult, StopResult } from './types';

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
  /** Instances being launched (not yet in libvirt's list): the reconciler must not take them for dead. */
  private readonly launching = new Set<string>();
  /** Launches in flight per shareable service, so concurrent joiners share one VM instead of each starting one. */
  private readonly pendingShared = new Map<string, Promise<InstanceRecord>>();
  private readonly queue = new KeyedQueue();
  private reconcileTimer: NodeJS.Timeout | undefined;

  private readonly mechanisms: Map<MechanismName, Mechanism>;

  constructor(
    mechanisms: Mechanism[],
    private readonly ports: PortAllocator,
    private readonly instancesDir: string,
    /** Where unfinished work lives (captures); an instance found there at start is a leftover. */
    private readonly stagingDir: string,
    private readonly bindAddress: string,
    private readonly log: Logger,
  ) {
    this.mechanisms = new Map(mechanisms.map((m) => [m.name, m]));
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
          this.adoptOne(meta);
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

  /** Watch libvirt for instances that ended outside the agent (killed, crashed, destroyed by hand). */
  startReconciling(intervalMs: number): void {
    const tick = async () => {
      try {
        await this.reconcile();
      } catch (err) {
        this.log(`reconcile failed: ${(err as Error).message}`);
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
      if (running.has(meta.id) || this.launching.has(meta.id)) continue;
      await this.queue.run(meta.id, async () => {
        if (!this.instances.has(meta.id) || (await this.isRunning(meta))) return;
        this.log(`instance ${meta.id} of ${meta.serviceId} ended outside the agent; releasing its port and files`);
        await this.forget(meta);
      });
    }
  }

  async start(service: Service, join: boolean, mechanism: Mechanism): Promise<Omit<StartResult, 'endpoint'>> {
    const shareable = service.manifest.shareable;
    if (join && shareable) {
      const joined = await this.tryJoin(service.id);
      if (joined) return { instance: joined, joined: true };
      const pending = this.pendingShared.get(service.id);
      if (pending) {
        const shared = await pending.catch(() => null);
        const rejoined = shared && (await this.tryJoin(service.id));
        if (rejoined) return { instance: rejoined, joined: true };
      }
    }
    const timer = new PhaseTimer();
    const launch = this.launch(service, mechanism, timer);
    if (shareable) {
      this.pendingShared.set(service.id, launch);
      void launch.catch(() => {}).then(() => { if (this.pendingShared.get(service.id) === launch) this.pendingShared.delete(service.id); });
    }
    return { instance: publicView(await launch), joined: false, timings: timer.summary() };
  }

  /** Add a user to the least-shared ready instance of the service, if there is one. */
  private async tryJoin(serviceId: string): Promise<Instance | null> {
    const candidates = [...this.instances.values()]
      .filter((i) => i.serviceId === serviceId && i.state === 'ready' && i.shareable)
      .sort((a, b) => a.users - b.users);
    for (const candidate of candidates) {
      const joined = await this.queue.run(candidate.id, async () => {
        const current = this.instances.get(candidate.id);
        if (!current || current.state !== 'ready') return null;
        const updated = { ...current, users: current.users + 1 };
        await this.runtimeOf(updated).writeRecord(updated);
        this.instances.set(updated.id, updated);
        return publicView(updated);
      });
      if (joined) return joined;
    }
    return null;
  }

  private async launch(service: Service, mechanism: Mechanism, timer: PhaseTimer): Promise<InstanceRecord> {
    const id = randomUUID();
    const dir = path.join(this.instancesDir, id);
    this.launching.add(id);
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
      launch: service.manifest.state ? 'memory-state' : 'cold-boot',
      createdAt: new Date().toISOString(),
      readyAt: null,
      dir,
      readiness: service.manifest.readiness,
    };
    try {
      await mkdir(dir, { mode: 0o755 });
      meta = await this.launchWithFreePort(service, mechanism, meta, timer);
      this.instances.set(id, meta);
      await this.waitReady(meta, timer);
      return this.instances.get(id) ?? meta;
    } catch (err) {
      await this.forget(meta).catch((cleanupErr) => this.log(`cleanup of ${id} failed: ${(cleanupErr as Error).message}`));
      throw asCloudletError(err);
    } finally {
      this.launching.delete(id);
    }
  }

  /** Reserve a port and launch; a port some other program grabbed in the meantime costs one more attempt. */
  private async launchWithFreePort(service: Service, mechanism: Mechanism, base: InstanceRecord, timer: PhaseTimer): Promise<InstanceRecord> {
    for (let attempt = 1; ; attempt++) {
      const meta: InstanceRecord = { ...base, hostPort: await this.ports.reserve() };
      try {
        const launch = await mechanism.launch({ service, domainName: domainName(service.id, meta.id), record: meta, timer });
        return { ...meta, launch };
      } catch (err) {
        await mechanism.runtime.destroy(meta.id);
        this.ports.release(meta.hostPort);
        if (!(err instanceof CloudletError && err.code === 'NO_FREE_PORT') || attempt >= LAUNCH_ATTEMPTS) throw err;
        this.log(`port ${meta.hostPort} was taken meanwhile; retrying ${service.id} on another port`);
        await rm(meta.dir, { recursive: true, force: true });
        await mkdir(meta.dir, { mode: 0o755 });
      }
    }
  }

  private async waitReady(meta: InstanceRecord, timer = new PhaseTimer()): Promise<void> {
    const remaining = Date.parse(meta.createdAt) + meta.readiness.timeout_ms - Date.now();
    await timer.time('guest', () => waitUntilReady(meta.readiness, probeHost(meta.bindAddress), meta.hostPort, {
      timeoutMs: Math.max(remaining, 0),
      stillAlive: () => this.isRunning(meta),
    }));
    await this.queue.run(meta.id, async () => {
      const current = this.instances.get(meta.id) ?? meta;
      const ready: InstanceRecord = { ...current, state: 'ready', readyAt: new Date().toISOString() };
      await timer.time('libvirt', () => this.runtimeOf(ready).writeRecord(ready));
      this.instances.set(meta.id, ready);
    });
  }

  /** An instance adopted while it was starting: finish the wait, or clean it up if it never becomes ready. */
  private async finishAdoptedLaunch(meta: InstanceRecord): Promise<void> {
    this.launching.add(meta.id);
    try {
      await this.waitReady(meta);
    } catch (err) {
      this.log(`adopted instance ${meta.id} did not become ready (${(err as Error).message}); removing it`);
      await this.forget(meta).catch(() => {});
    } finally {
      this.launching.delete(meta.id);
    }
  }

  async stop(id: string): Promise<StopResult> {
    return this.queue.run(id, async () => {
      const meta = this.record(id);
      if (meta.users > 1) {
        const updated = { ...meta, users: meta.users - 1 };
        await this.runtimeOf(updated).writeRecord(updated);
        this.instances.set(id, updated);
        return { destroyed: false, users: updated.users };
      }
      this.instances.set(id, { ...meta, state: 'stopping' });
      await this.forget(meta);
      return { destroyed: true, users: 0 };
    });
  }

  /** Destroy the domain (if any), delete the instance's files, release its port, drop it from the registry. */
  private async forget(meta: InstanceRecord): Promise<void> {
    await this.runtimeOf(meta).destroy(meta.id);
    await rm(meta.dir, { recursive: true, force: true });
    if (meta.hostPort) this.ports.release(meta.hostPort);
    this.instances.delete(meta.id);
  }
}

const isInside = (dir: string, file: string) => file.startsWith(dir + path.sep);

/** libvirt domain names must be unique; the service id keeps them readable in `virsh list`. */
function domainName(serviceId: string, id: string): string {
  return `cloudlet-${serviceId}-${id.slice(0, 8)}`;
}

function publicView(meta: InstanceRecord): Instance {
  const { dir: _dir, readiness: _readiness, ...instance } = meta;
  return instance;
}
