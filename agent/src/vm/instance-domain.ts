import path from 'node:path';
import type { LaunchPlan } from '../core/mechanism';
import type { PhaseTimer } from '../core/timing';
import type { InstanceRecord, Service } from '../core/types';
import { CloudletError } from '../errors';
import { faultPoint } from '../system/fault-points';
import { buildDomainXml, retargetSavedDomainXml, type DomainSpec } from './domain-xml';
import type { Hypervisor } from './hypervisor';
import { readSaveImageHeader, type LiveMigrationStream, type SaveImageHeader } from './save-image';

/** Where an instance keeps its files; the directory is removed whole when the instance ends. */
export const instanceFiles = (dir: string) => ({
  disk: path.join(dir, 'disk.qcow2'),
  consoleLog: path.join(dir, 'console.log'),
  /** The cloud-init config drive of an on-demand provisioning. */
  configDrive: path.join(dir, 'cidata.iso'),
});

/** The domain of one instance of a service: shared by every mechanism that launches a VM. */
export function instanceDomainSpec(service: Service, domainName: string, record: InstanceRecord, type: 'kvm' | 'qemu'): DomainSpec {
  const m = service.manifest;
  const files = instanceFiles(record.dir);
  return {
    name: domainName,
    uuid: record.id,
    type,
    memoryMib: m.memory_mib,
    vcpus: m.vcpus,
    disk: files.disk,
    boot: m.boot && {
      kernel: path.join(service.dir, m.boot.kernel),
      initrd: m.boot.initrd && path.join(service.dir, m.boot.initrd),
      cmdline: m.boot.cmdline,
    },
    consoleLog: files.consoleLog,
    forward: { bindAddress: record.bindAddress, hostPort: record.hostPort, guestPort: record.guestPort },
    record,
  };
}

/**
 * Bring an instance's domain to life: restored from a saved memory state when there is one, else cold-booted. The
 * state is a save image (its embedded XML retargeted to this instance, devices untouched) or one being synthesized
 * while it is read, with the domain XML the cloudlet chose for it. Shared by the VM mechanisms.
 */
export async function restoreOrBoot(
  hypervisor: Hypervisor,
  spec: DomainSpec,
  state: string | { header: SaveImageHeader; stream: LiveMigrationStream; xml: string } | null,
  instanceDir: string,
  timer: PhaseTimer,
  progress: LaunchPlan['progress'],
  /** Restore with the vCPUs stopped (a warm pool's VM); a cold boot cannot be. */
  paused = false,
): Promise<'memory-state' | 'cold-boot'> {
  if (state) {
    const header = typeof state === 'string' ? await readSaveImageHeader(state) : state.header;
    const xml = typeof state === 'string' ? retargetSavedDomainXml(header.xml, spec) : state.xml;
    progress('restoring');
    await timer.time('libvirt', () =>
      hypervisor.restore(
        { image: typeof state === 'string' ? state : state.stream, header },
        xml,
        instanceDir,
        (done, total) => {
          if (done * 2 >= total) faultPoint('vm:mid-restore');
          progress('restoring', { done, total });
        },
        paused,
      ),
    );
    return 'memory-state';
  }
  if (paused) throw new CloudletError('INTERNAL', `${spec.name} has no memory state to restore paused`);
  const xml = buildDomainXml(spec);
  progress('booting');
  await timer.time('libvirt', () => hypervisor.boot(xml));
  return 'cold-boot';
}
