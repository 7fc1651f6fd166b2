import path from 'node:path';
import { createLinkedClone } from '../images/qemu-img';
import type { PhaseTimer } from '../core/timing';
import { buildDomainXml, retargetSavedDomainXml, type DomainSpec } from '../vm/domain-xml';
import type { Hypervisor } from '../vm/hypervisor';
import { instanceDomainSpec, instanceFiles } from '../vm/instance-domain';
import { readSaveImageHeader, type LiveMigrationStream, type SaveImageHeader } from '../vm/save-image';
import type { LaunchPlan, Mechanism } from './mechanism';
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

/**
 * Bring an instance's domain to life: restored from a saved memory state when there is one, else cold-booted. The
 * state is a save image (its embedded XML retargeted to this instance, devices untouched) or one being synthesized
 * while it is read, with the domain XML the cloudlet chose for it. Shared by the VM mechanisms.
 */
export async function restoreOrBoot(hypervisor: Hypervisor, spec: DomainSpec,
  state: string | { header: SaveImageHeader; stream: LiveMigrationStream; xml: string } | null, instanceDir: string, timer: PhaseTimer,
  progress: LaunchPlan['progress']): Promise<'memory-state' | 'cold-boot'> {
  if (state) {
    const header = typeof state === 'string' ? await readSaveImageHeader(state) : state.header;
    const xml = typeof state === 'string' ? retargetSavedDomainXml(header.xml, spec) : state.xml;
    progress('restoring');
    await timer.time('libvirt', () => hypervisor.restore({ image: typeof state === 'string' ? state : state.stream, header }, xml, instanceDir,
      (done, total) => {
        if (done * 2 >= total) faultPoint('vm:mid-restore');
        progress('restoring', { done, total });
      }));
    return 'memory-state';
  }
  const xml = buildDomainXml(spec);
  progress('booting');
  await timer.time('libvirt', () => hypervisor.boot(xml));
  return 'cold-boot';
}
