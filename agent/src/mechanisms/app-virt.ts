import path from 'node:path';
import type { Package } from '../core/types';
import type { SandboxRuntime } from '../sandbox/sandbox-runtime';
import type { LaunchPlan, Mechanism } from '../core/mechanism';

/**
 * Application Virtualization: the service is a self-contained app package, run in a sandbox (namespaces, cgroup
 * limits, a forwarded port) instead of a VM. The fastest start and the smallest footprint, with weaker isolation.
 */
export class AppVirtMechanism implements Mechanism<Package> {
  readonly name = 'app-virt' as const;

  constructor(readonly runtime: SandboxRuntime) {}

  async launch({ service, record, progress }: LaunchPlan<Package>): Promise<'cold-boot'> {
    const m = service.manifest;
    progress('booting');
    await this.runtime.start({
      record,
      appDir: path.join(service.dir, 'app'),
      command: m.command,
      env: m.env,
      limits: { memoryBytes: m.memory_mib * 1024 * 1024, cpus: m.cpus, pids: m.pids },
      dataBytes: m.data_mib * 1024 * 1024,
    });
    // A sandbox always starts its app afresh: there is no memory state to restore.
    return 'cold-boot';
  }
}
