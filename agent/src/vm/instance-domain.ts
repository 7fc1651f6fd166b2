import path from 'node:path';
import type { Service } from '../core/types';
import type { InstanceRecord } from '../core/types';
import type { DomainSpec } from './domain-xml';

/** Where an instance keeps its files; the directory is removed whole when the instance ends. */
export const instanceFiles = (dir: string) => ({
  disk: path.join(dir, 'disk.qcow2'),
  consoleLog: path.join(dir, 'console.log'),
  /** The cloud-init config drive of an on-demand provisioning. */
  configDrive: path.join(dir, 'cidata.iso'),
});

/** The domain of one instance of a service: shared by every mechanism that launches a VM. */
export function instanceDomainSpec(service: Service, domainName: string, meta: InstanceRecord, type: 'kvm' | 'qemu'): DomainSpec {
  const m = service.manifest;
  const files = instanceFiles(meta.dir);
  return {
    name: domainName,
    uuid: meta.id,
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
    forward: { bindAddress: meta.bindAddress, hostPort: meta.hostPort, guestPort: meta.guestPort },
    metadata: meta,
  };
}
