import type { LaunchPhase } from './events';
import type { InstanceRuntime } from './runtime';
import type { PhaseTimer } from './timing';
import type { InstanceRecord, MechanismName, Service, Workload } from './types';

/**
 * What the registry has prepared before a mechanism runs: the instance's identity, its private directory, its
 * reserved forward and the record to embed. The registry owns everything around the launch (ports, readiness,
 * record updates, cleanup after a failure); a mechanism only decides how the workload comes to life.
 */
export interface LaunchPlan<W extends Workload = Service> {
  /** What to launch: a cached service for the VM mechanisms, an app package for app-virt. */
  service: W;
  domainName: string;
  record: InstanceRecord;
  /** Hypervisor calls are timed as 'libvirt' so the agent's own overhead can be told apart. */
  timer: PhaseTimer;
  /** Report reaching a phase of the launch (and the bytes of it done so far, where a mechanism knows them). */
  progress: (phase: LaunchPhase, bytes?: { done: number; total: number }) => void;
  /**
   * Take one of the box's launch slots (waiting in its queue; BUSY when that is full), held until the launch ends;
   * once taken, calling it again does nothing. The registry takes it before `launch` unless the mechanism admits itself.
   */
  admit: () => Promise<void>;
}

/** A provisioning mechanism: how a workload comes to life in its runtime. The mechanisms (mechanisms/) are peers. */
export interface Mechanism<W extends Workload = Service> {
  readonly name: MechanismName;
  readonly runtime: InstanceRuntime;
  /**
   * The mechanism calls `plan.admit()` itself, before its first hypervisor call: it first prepares from bytes a client
   * may still be sending (VM Synthesis), and a launch slot is taken only once they are all there.
   */
  readonly admitsItself?: boolean;
  /**
   * The workload can be launched once only (VM Synthesis reads its overlay as it arrives): a port taken meanwhile
   * fails the start instead of being retried on another port.
   */
  readonly launchesOnce?: boolean;
  /**
   * Bring the workload up, serving on the plan's forward. Returns how it was started. Throws on failure; PORT_TAKEN
   * (the reserved port was taken by another program meanwhile) makes the registry launch again on another port.
   */
  launch(plan: LaunchPlan<W>): Promise<InstanceRecord['launch']>;
  /** How the workload is kept warm ahead of starts (mechanisms that restore memory states: docs/warm-pool.md). */
  readonly warm?: WarmStart<W>;
}

/**
 * Instances brought up before anyone asks, handed to a start later: a warm pool's VMs. Prepared, one is paused and
 * reachable by nobody (no forward); assigned, it has the start's forward and runs.
 */
export interface WarmStart<W extends Workload = Service> {
  /** Whether `service` can be kept warm (a Cached VM needs a memory state). */
  poolable(service: W): boolean;
  /** Bring the workload up paused and without a forward, the plan's record (marked pooled) in its runtime. */
  prepare(plan: LaunchPlan<W>): Promise<void>;
  /** Give the prepared instance the record's forward and let it run. PORT_TAKEN: the port was taken meanwhile, nothing changed. */
  assign(record: InstanceRecord): Promise<void>;
}

/** A mechanism whose runtime can save its instances: what a memory-state capture launches with. */
export type CapturingMechanism<W extends Workload = Service> = Mechanism<W> & { readonly runtime: Required<Pick<InstanceRuntime, 'save'>> };
