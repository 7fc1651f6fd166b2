// The instance registry over a runtime of its own, for unit tests of its concurrency (no libvirt): each "instance" is
// a record the runtime keeps plus, once its service answers, a TCP listener on its forwarded port that the registry's
// readiness probe connects to. Every launch waits until the test says how it goes, so a test orders concurrent
// launches itself instead of sleeping.
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { Test } from 'tap';
import type { CloudletEvent } from '../../agent/src/core/events';
import { InstanceRegistry } from '../../agent/src/core/instances';
import { LaunchGate, type LaunchLimits } from '../../agent/src/core/launch-gate';
import { PortAllocator } from '../../agent/src/core/ports';
import type { Instance, InstanceRecord, Stopper, Workload } from '../../agent/src/core/types';
import { CloudletError } from '../../agent/src/errors';
import type { LaunchPlan, Mechanism } from '../../agent/src/core/mechanism';
import type { InstanceEnding, InstanceRuntime } from '../../agent/src/core/runtime';

interface Deferred<T> {
  promise: Promise<T>;
  resolve(value: T): void;
  reject(error: Error): void;
}

/** A promise the test settles itself. */
function deferred<T = void>(): Deferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (error: Error) => void;
  const promise = new Promise<T>((ok, fail) => {
    resolve = ok;
    reject = fail;
  });
  return { promise, resolve, reject };
}

/**
 * How long a test waits for what the registry should do at once before it calls that a hang: a failure with its name
 * rather than a test file stalled until the runner kills it. Never a measure of speed.
 */
const HANG_MS = 10_000;

/** `waiter`'s promise, rejected as a hang of `what` if the test has not seen it settle within HANG_MS. */
function unlessHung<T>(waiter: Deferred<T>, what: string): Promise<T> {
  // Unref'd: a test may leave a wait for what must not happen; should the file have nothing else to wait for, it ends.
  const guard = setTimeout(() => waiter.reject(new Error(`hung: ${what}`)), HANG_MS).unref();
  return waiter.promise.finally(() => clearTimeout(guard));
}

/** Lets everything that can run now run (pending callbacks, I/O already due), without waiting for any time to pass. */
export async function idle(): Promise<void> {
  for (let turn = 0; turn < 5; turn++) await new Promise((resolve) => setImmediate(resolve));
}

/** A launch the registry asked the runtime for, waiting for the test to say how it goes. */
export class PendingLaunch {
  constructor(
    private readonly runtime: FakeRuntime,
    private readonly plan: LaunchPlan<Workload>,
    private readonly outcome: Deferred<InstanceRecord['launch']>,
  ) {}

  /** The instance as the registry planned it (its id, its reserved port). */
  get record(): InstanceRecord {
    return this.plan.record;
  }

  /** The VM comes up and its service answers: the launch returns and the readiness probe passes. */
  async succeed(): Promise<void> {
    await this.serve();
    this.boot();
  }

  /** The VM comes up but its service does not answer yet: the registry goes on to wait for readiness. */
  boot(): void {
    this.outcome.resolve('cold-boot');
  }

  /** Its service answers on the forwarded port from now on. */
  serve(): Promise<void> {
    return this.runtime.serve(this.record);
  }

  /** The launch fails; its domain, defined at the launch's first call, is left for the registry to end. */
  fail(error: Error): void {
    this.outcome.reject(error);
  }

  /** Takes a launch slot, as a mechanism that admits itself does before its first hypervisor call. */
  admit(): Promise<void> {
    return this.plan.admit();
  }
}

export class FakeRuntime implements InstanceRuntime {
  /** What runs now, each instance with the record stored with it: what an agent finds after a restart. */
  readonly instances = new Map<string, InstanceRecord>();
  /** Every launch the registry asked for, in order. */
  readonly launches: PendingLaunch[] = [];
  /** While set, the registry's calls fail as libvirt's do when it cannot be reached. */
  unreachable = false;
  /** A Cached VM launch: the registry takes its slot before it runs. */
  readonly vm = this.mechanism('cached-vm', false);
  /** A VM Synthesis launch, which admits itself (`PendingLaunch.admit`) once the overlay's bytes are all there. */
  readonly synthesis = this.mechanism('synthesis', true);

  /** The instances whose service answers: a TCP server on the forwarded port. */
  private readonly services = new Map<string, net.Server>();
  private readonly launchWaiters = new Map<number, Deferred<PendingLaunch>>();
  private handedOut = 0;
  private readonly destroyWaiters = new Map<string, Deferred<void>>();
  private readonly endedListeners: ((id: string, ending: InstanceEnding) => void)[] = [];
  private readonly reconnectedListeners: (() => void)[] = [];

  async running(): Promise<Set<string>> {
    this.reachable();
    return new Set(this.instances.keys());
  }

  async listInstances(): Promise<InstanceRecord[]> {
    this.reachable();
    return [...this.instances.values()];
  }

  async writeRecord(record: InstanceRecord): Promise<void> {
    this.reachable();
    // As libvirt's metadata of a domain that is gone (and a sandbox's state file): nothing to write it to.
    if (!this.instances.has(record.id)) throw new CloudletError('INSTANCE_NOT_FOUND', `no instance ${record.id} runs`);
    this.instances.set(record.id, record);
  }

  async destroy(id: string): Promise<void> {
    this.reachable();
    await this.vanish(id);
    this.destroyWaiters.get(id)?.resolve();
  }

  async watchEnded(listener: (id: string, ending: InstanceEnding) => void): Promise<void> {
    this.endedListeners.push(listener);
  }

  onReconnected(listener: () => void): void {
    this.reconnectedListeners.push(listener);
  }

  /** The next launch not yet handed to the test, as soon as the registry asks for it. */
  nextLaunch(): Promise<PendingLaunch> {
    const index = this.handedOut++;
    if (index < this.launches.length) return Promise.resolve(this.launches[index]!);
    const waiter = deferred<PendingLaunch>();
    this.launchWaiters.set(index, waiter);
    return unlessHung(waiter, `launch #${index + 1} was never asked for`);
  }

  /** Resolves when the registry next ends the instance `id` (ask before what should end it). */
  destroyed(id: string): Promise<void> {
    const waiter = deferred();
    this.destroyWaiters.set(id, waiter);
    return unlessHung(waiter, `instance ${id} was never ended`);
  }

  /** The instance ends outside the agent (killed, crashed) and nobody tells the registry. */
  async vanish(id: string): Promise<void> {
    this.instances.delete(id);
    const service = this.services.get(id);
    this.services.delete(id);
    if (service) await new Promise<void>((resolve) => service.close(() => resolve()));
  }

  /** The instance ends outside the agent and the runtime tells the registry at once (libvirt's lifecycle event). */
  async end(id: string, ending: InstanceEnding): Promise<void> {
    await this.vanish(id);
    for (const listener of this.endedListeners) listener(id, ending);
  }

  /** The runtime is reachable again after it was lost (libvirtd restarted). */
  reconnect(): void {
    this.unreachable = false;
    for (const listener of this.reconnectedListeners) listener();
  }

  /** Runs an instance launched before the test's registry existed (by the agent before a restart); its service is silent. */
  seed(record: InstanceRecord): void {
    this.instances.set(record.id, record);
  }

  /** The service of `record` answers on its forwarded port (it writes a line at once, which the TCP probe takes as up). */
  async serve(record: InstanceRecord): Promise<void> {
    const service = net.createServer((socket) => {
      socket.on('error', () => {});
      socket.end('ready\n');
    });
    await new Promise<void>((resolve) => service.listen(record.hostPort, record.bindAddress, resolve));
    this.services.set(record.id, service);
  }

  /** Ends every instance (the test's cleanup). */
  async close(): Promise<void> {
    await Promise.all([...this.instances.keys()].map((id) => this.vanish(id)));
  }

  private mechanism(name: 'cached-vm' | 'synthesis', admitsItself: boolean): Mechanism<Workload> {
    return {
      name,
      runtime: this,
      ...(admitsItself ? { admitsItself } : {}),
      launch: (plan) => {
        // The domain exists, with its record, from the launch's first hypervisor call.
        this.instances.set(plan.record.id, plan.record);
        const outcome = deferred<InstanceRecord['launch']>();
        const launch = new PendingLaunch(this, plan, outcome);
        this.launches.push(launch);
        this.launchWaiters.get(this.launches.length - 1)?.resolve(launch);
        return outcome.promise;
      },
    };
  }

  private reachable(): void {
    if (this.unreachable) throw new CloudletError('HYPERVISOR_UNAVAILABLE', 'libvirt is not reachable');
  }
}

/** Every event of a registry from its construction on, so none is missed however early it comes. */
export class EventLog {
  readonly seen: CloudletEvent[] = [];
  private readonly waiters: { wanted: (event: CloudletEvent) => boolean; found: Deferred<CloudletEvent> }[] = [];

  constructor(registry: InstanceRegistry) {
    registry.events.subscribe((event) => {
      this.seen.push(event);
      for (const waiter of this.waiters.filter((w) => w.wanted(event))) waiter.found.resolve(event);
    });
  }

  /** The first instance event of `id` reaching `state`, seen already or to come. */
  instance(id: string, state: string): Promise<CloudletEvent> {
    return this.first(`instance ${id} never became ${state}`, (event) => event.type === 'instance' && event.instance.id === id && event.state === state);
  }

  /** The first progress event of `id` reaching `phase`, seen already or to come. */
  progress(id: string, phase: string): Promise<CloudletEvent> {
    return this.first(`instance ${id} never reached ${phase}`, (event) => event.type === 'progress' && event.instanceId === id && event.phase === phase);
  }

  private first(unseen: string, wanted: (event: CloudletEvent) => boolean): Promise<CloudletEvent> {
    const seen = this.seen.find(wanted);
    if (seen) return Promise.resolve(seen);
    const found = deferred<CloudletEvent>();
    this.waiters.push({ wanted, found });
    return unlessHung(found, unseen);
  }
}

export interface PortRange {
  first: number;
  last: number;
}

/**
 * Distinct ranges of forwarded ports from `first` on, one per test, so no test meets a port another one left. The
 * registry unit tests take theirs in 31000-31999, a block of their own (one hundred per file) below the kernel's
 * ephemeral ports (32768 on): a port there can be any process's outgoing or OS-chosen one at any moment.
 */
export function portRanges(first: number): (size: number) => PortRange {
  let next = first;
  return (size) => {
    const range = { first: next, last: next + size - 1 };
    next += size;
    return range;
  };
}

export interface FakeCloudlet {
  runtime: FakeRuntime;
  registry: InstanceRegistry;
  events: EventLog;
  instancesDir: string;
  stagingDir: string;
  /** A new registry over the same runtime and directories, adopting what runs: the agent after a restart. */
  restart(): Promise<{ registry: InstanceRegistry; events: EventLog }>;
}

/**
 * A registry over a fresh fake runtime, built and adopted as the agent builds it; everything it made (instances,
 * reconcile timers, files) is ended when the test ends. Limits default to plenty of slots and a readiness wait no
 * test reaches.
 */
export async function fakeCloudlet(tt: Test, { ports, limits = {} }: { ports: PortRange; limits?: Partial<LaunchLimits> }): Promise<FakeCloudlet> {
  const root = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-registry-'));
  const instancesDir = path.join(root, 'instances');
  const stagingDir = path.join(root, 'tmp');
  const runtime = new FakeRuntime();
  const registries: InstanceRegistry[] = [];
  const open = async () => {
    const registry = new InstanceRegistry(
      [runtime.vm, runtime.synthesis],
      new PortAllocator('127.0.0.1', ports),
      instancesDir,
      stagingDir,
      '127.0.0.1',
      () => {},
      new LaunchGate({ concurrent: 4, queue: 8, readyWithinMs: 60000, ...limits }),
    );
    registries.push(registry);
    const events = new EventLog(registry);
    await registry.adopt();
    return { registry, events };
  };
  tt.teardown(async () => {
    for (const registry of registries) registry.stopReconciling();
    await runtime.close();
    await rm(root, { recursive: true, force: true });
  });
  return { runtime, ...(await open()), instancesDir, stagingDir, restart: open };
}

/** A shareable service whose readiness wait no test reaches the end of. */
export const SHARED: Workload = { id: 'shared', manifest: { port: 80, shareable: true, readiness: { type: 'tcp', timeout_ms: 60000 } } };
/** The same, not shareable: never joined. */
export const PRIVATE: Workload = { id: 'private', manifest: { ...SHARED.manifest, shareable: false } };

/** A new instance of `service` that starts well: its launch succeeds as soon as the registry asks for it. */
export async function startReady(registry: InstanceRegistry, runtime: FakeRuntime, service: Workload, user: Stopper = 'operator'): Promise<Instance> {
  const start = registry.start(service, false, runtime.vm, user);
  await (await runtime.nextLaunch()).succeed();
  return (await start).instance;
}
