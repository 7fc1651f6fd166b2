import path from 'node:path';
import { createLinkedClone } from '../images/qemu-img';
import type { LaunchPlan, Mechanism, WarmStart } from '../core/mechanism';
import type { InstanceRecord, Service } from '../core/types';
import type { Hypervisor } from '../vm/hypervisor';
import { instanceDomainSpec, instanceFiles, restoreOrBoot } from '../vm/instance-domain';
import { faultPoint } from '../system/fault-points';

/**
 * Cached VM: the service's VM is already on the cloudlet. Each instance runs on a linked clone of the cached disk
 * (never a copy) and is restored from the service's saved memory state when it has one, else cold-booted. A service
 * with a memory state can also be kept warm: restored paused ahead of time, then given its forward and resumed.
 */
export class CachedVmMechanism implements Mechanism {
  readonly name = 'cached-vm' as const;

  readonly warm: WarmStart = {
    poolable: (service) => service.manifest.state !== null,
    prepare: (plan) => this.bringUp(plan, true).then(() => {}),
    assign: (record: InstanceRecord) =>
      this.hypervisor.forwardAndResume(record.id, { bindAddress: record.bindAddress, hostPort: record.hostPort, guestPort: record.guestPort }),
  };

  constructor(private readonly hypervisor: Hypervisor) {}

  get runtime(): Hypervisor {
    return this.hypervisor;
  }

  launch(plan: LaunchPlan): Promise<'memory-state' | 'cold-boot'> {
    return this.bringUp(plan, false);
  }

  /** The clone and the domain; `pooled`: restored paused, with no forward (a warm pool's VM). */
  private async bringUp({ service, domainName, record, timer, progress }: LaunchPlan<Service>, pooled: boolean): Promise<'memory-state' | 'cold-boot'> {
    const m = service.manifest;
    progress('cloning');
    // The catalog only holds qcow2 disks (a raw one is converted at import).
    await createLinkedClone(path.join(service.dir, m.disk), instanceFiles(record.dir).disk, 'qcow2');
    faultPoint('cached-vm:after-clone');
    const spec = { ...instanceDomainSpec(service, domainName, record, this.hypervisor.domainType), ...(pooled ? { forward: null } : {}) };
    const launched = await restoreOrBoot(this.hypervisor, spec, m.state && path.join(service.dir, m.state), record.dir, timer, progress, pooled);
    faultPoint('cached-vm:after-domain');
    return launched;
  }
}
