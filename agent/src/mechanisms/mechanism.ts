import type { InstanceMetadata } from '../vm/domain-xml';
import type { PhaseTimer } from '../core/timing';
import type { MechanismName, Service } from '../core/types';

/**
 * What the registry has prepared before a mechanism runs: the instance's identity, its private directory, its
 * reserved forward and the metadata to embed. The registry owns everything around the launch (ports, readiness,
 * metadata updates, cleanup after a failure); a mechanism only decides how the Service VM comes to life.
 */
export interface LaunchPlan {
  service: Service;
  domainName: string;
  metadata: InstanceMetadata;
  /** Hypervisor calls are timed as 'libvirt' so the agent's own overhead can be told apart. */
  timer: PhaseTimer;
}

export interface Mechanism {
  readonly name: MechanismName;
  /** Bring the workload up, serving on the plan's forward. Returns how it was started. Throws on failure. */
  launch(plan: LaunchPlan): Promise<InstanceMetadata['launch']>;
}
