import path from 'node:path';
import { createLinkedClone } from '../images/qemu-img';
import type { LaunchPlan, Mechanism } from '../core/mechanism';
import type { Hypervisor } from '../vm/hypervisor';
import { instanceDomainSpec, instanceFiles, restoreOrBoot } from '../vm/instance-domain';
import { faultPoint } from '../system/fault-points';

/**
 * Cached VM: the service's VM is already on the cloudlet. Each instance runs on a linked clone of the cached disk
 * (never a copy) and is restored from the service's saved memory state when it has one, else cold-booted.
 */
export class CachedVmMechanism implements Mechanism {
  readonly name = 'cached-vm' as const;

  constructor(private readonly hypervisor: Hypervisor) {}

  get runtime(): Hypervisor {
    return this.hypervisor;
  }

  async launch({ service, domainName, record, timer, progress }: LaunchPlan): Promise<'memory-state' | 'cold-boot'> {
    const m = service.manifest;
    progress('cloning');
    // The catalog only holds qcow2 disks (a raw one is converted at import).
    await createLinkedClone(path.join(service.dir, m.disk), instanceFiles(record.dir).disk, 'qcow2');
    faultPoint('cached-vm:after-clone');
    const spec = instanceDomainSpec(service, domainName, record, this.hypervisor.domainType);
    const launched = await restoreOrBoot(this.hypervisor, spec, m.state && path.join(service.dir, m.state), record.dir, timer, progress);
    faultPoint('cached-vm:after-domain');
    return launched;
  }
}
