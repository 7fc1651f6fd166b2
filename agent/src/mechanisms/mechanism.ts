import type { EndReason, LaunchPhase } from '../core/events';
import type { PhaseTimer } from '../core/timing';
import type { InstanceRecord, MechanismName, Service, Workload } from '../core/types';

/**
 * What the registry has prepared before a mechanism runs: the instance's identity, its private directory, its
 * reserved forward and the metadata to embed. The registry owns everything around the launch (ports, readiness,
 * metadata updates, cleanup after a failure); a mechanism only decides how the Service VM comes to life.
 */
export interface LaunchPlan<W extends Workload = Service> {
  /** What to launch: a cached service for the VM mechanisms, an app package for app-virt. */
  service: W;
  domainName: string;
  record: InstanceRecord;
  /** Hypervisor calls are timed as 'libvirt' so the agent's own overhead can be told apart. */
  timer: PhaseTimer;
  /** Report reaching a phase of the launch (and the bytes of it done so far, where a mechanism knows them). */
  progress(phase: LaunchPhase, bytes?: { done: number; total: number }): void;
  /**
   * Take one of the box's launch slots (waiting in its queue; BUSY when that is full), held until the launch ends;
   * once taken, calling it again does nothing. The registry takes it before `launch` unless the mechanism admits itself.
   */
  admit(): Promise<void>;
}

/** How an instance ended, as far as its runtime can tell. */
export interface InstanceEnding {
  state: 'stopped' | 'crashed';
  reason: EndReason;
}

/**
 * Where a mechanism's instances run (libvirt domains for the VM mechanisms) and how the registry finds, labels and
 * ends them. Each runtime stores an instance's record with the instance itself, so the registry can be rebuilt.
 */
export interface InstanceRuntime {
  /** Ids of this runtime's instances that are running now (cheap: the registry polls it). */
  running(): Promise<Set<string>>;
  /** Every running instance that carries a record: what an agent adopts after a restart. */
  listInstances(): Promise<InstanceRecord[]>;
  writeRecord(record: InstanceRecord): Promise<void>;
  /** End it; an instance that is already gone counts as ended. */
  destroy(id: string): Promise<void>;
  /**
   * Call listener as soon as one of the runtime's instances ends, however it ended (runtimes that can tell).
   * Resolves once watching; rejects when the runtime cannot deliver such events (then the registry only polls).
   */
  watchEnded?(listener: (id: string, ending: InstanceEnding) => void): Promise<void>;
  /** Call listener each time the runtime is reachable again after it was lost (runtimes that can lose it). */
  onReconnected?(listener: () => void): void;
  /** The last `maxBytes` of the console output of the instance whose directory is `dir` (runtimes that have one). */
  consoleTail?(dir: string, maxBytes: number): Promise<string>;
}

export interface Mechanism<W extends Workload = Service> {
  readonly name: MechanismName;
  readonly runtime: InstanceRuntime;
  /**
   * The mechanism calls `plan.admit()` itself, before its first hypervisor call: it first prepares from bytes a client
   * may still be sending (VM Synthesis), and a launch slot is taken only once they are all there.
   */
  readonly admitsItself?: boolean;
  /**
   * Bring the workload up, serving on the plan's forward. Returns how it was started. Throws on failure; a
   * NO_FREE_PORT error means the reserved port was taken meanwhile and the registry retries with another.
   */
  launch(plan: LaunchPlan<W>): Promise<InstanceRecord['launch']>;
}
