import path from 'node:path';
import type { BaseVm } from '../core/bases';
import type { Service } from '../core/types';
import { CloudletError } from '../errors';
import { applyOverlay, type OpenedOverlay } from '../synthesis/apply';
import { invalid } from '../synthesis/overlay-format';
import type { Hypervisor } from '../vm/hypervisor';
import { instanceDomainSpec, instanceFiles } from '../vm/instance-domain';
import { restoreOrBoot } from './cached-vm';
import type { LaunchPlan, Mechanism } from './mechanism';

/** The synthesized memory state, next to the instance's disk. */
const MEMORY_STATE = 'memory.sav';

/** What a synthesis launches: the overlay's service, on its base's files, with the overlay still to be read. */
export interface SynthesisService extends Service {
  overlay: OpenedOverlay;
  base: BaseVm;
}

/** The service an opened overlay describes, on `base` (the base the overlay names). */
export function synthesisService(overlay: OpenedOverlay, base: BaseVm): SynthesisService {
  const manifest = overlay.manifest.service;
  // The VM boots or resumes on the base's kernel and initrd: the overlay can only change the disk and memory.
  if (JSON.stringify(manifest.boot) !== JSON.stringify(base.manifest.boot)) throw invalid('the service does not boot the way its base does');
  return { id: manifest.service_id, dir: base.dir, importedAt: new Date().toISOString(), manifest, overlay, base };
}

/**
 * VM Synthesis: the Service VM is rebuilt from an overlay on a Base VM while the overlay arrives. The instance's disk
 * is a qcow2 overlay on the base's disk holding only the changed blocks; its memory state is rebuilt next to it and
 * restored with the instance's own identity (name, UUID, port forward), like a Cached VM start.
 */
export class SynthesisMechanism implements Mechanism<SynthesisService> {
  readonly name = 'synthesis' as const;

  constructor(private readonly hypervisor: Hypervisor) {}

  get runtime(): Hypervisor {
    return this.hypervisor;
  }

  async launch({ service, domainName, record, timer, progress }: LaunchPlan<SynthesisService>): Promise<'memory-state' | 'cold-boot'> {
    const disk = instanceFiles(record.dir).disk;
    const memory = service.manifest.state ? path.join(record.dir, MEMORY_STATE) : null;
    progress('synthesizing', { done: 0, total: service.overlay.bytes });
    await applyOverlay(service.overlay, service.base, { disk, memory }, (done, total) => progress('synthesizing', { done, total }));
    const spec = instanceDomainSpec(service, domainName, record, this.hypervisor.domainType);
    try {
      return await restoreOrBoot(this.hypervisor, spec, memory, record.dir, timer, progress);
    } catch (err) {
      // The overlay was read once and is gone: a port taken meanwhile cannot be retried with another like other launches.
      if (err instanceof CloudletError && err.code === 'NO_FREE_PORT') throw new CloudletError('LAUNCH_FAILED', err.message, { cause: err });
      throw err;
    }
  }
}
