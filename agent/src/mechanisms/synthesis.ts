import path from 'node:path';
import type { BaseVm } from '../core/bases';
import type { Service } from '../core/types';
import { createLinkedClone } from '../images/qemu-img';
import { applyOverlay, type OpenedOverlay } from '../synthesis/apply';
import { invalid } from '../synthesis/overlay-format';
import { synthesizedDomainXml, type DomainSpec } from '../vm/domain-xml';
import type { Hypervisor } from '../vm/hypervisor';
import { instanceDomainSpec, instanceFiles, restoreOrBoot } from '../vm/instance-domain';
import { readSaveImageHeader } from '../vm/save-image';
import type { LaunchPlan, Mechanism } from '../core/mechanism';
import { faultPoint } from '../system/fault-points';

/** The synthesized memory state, next to the instance's disk. */
const MEMORY_STATE = 'memory.sav';
/** The disk as synthesized, when the instance runs on a linked clone of it (a synthesis that is kept). */
const SYNTHESIZED_DISK = 'synthesized.qcow2';

/** What a synthesis launches: the overlay's service, on its base's files, with the overlay still to be read. */
export interface SynthesisService extends Service {
  overlay: OpenedOverlay;
  base: BaseVm;
  /** Leave the disk as synthesized (the instance runs on a linked clone of it), so it can be kept as a service. */
  keep: boolean;
  /** Resolves once every byte of the overlay is on the cloudlet; fails when they stop coming (a paused upload). */
  arrived: () => Promise<void>;
}

/** The service an opened overlay describes, on `base` (the base the overlay names). */
export function synthesisService(overlay: OpenedOverlay, base: BaseVm, keep: boolean, arrived: () => Promise<void>): SynthesisService {
  const manifest = overlay.manifest.service;
  // The VM boots or resumes on the base's kernel and initrd: the overlay can only change the disk and memory.
  if (JSON.stringify(manifest.boot) !== JSON.stringify(base.manifest.boot)) throw invalid('the service does not boot the way its base does');
  // The operator sized the base when importing it; a phone's overlay may not ask the box for more than that.
  for (const field of ['memory_mib', 'vcpus'] as const) {
    if (manifest[field] > base.manifest[field]) throw invalid(`the service asks for ${field} ${manifest[field]}, more than its base's ${base.manifest[field]}`);
  }
  return { id: manifest.service_id, dir: base.dir, importedAt: new Date().toISOString(), manifest, overlay, base, keep, arrived };
}

/**
 * The files of a kept synthesis as synthesized, in its instance directory: the disk (a qcow2 on the base's disk) and
 * the memory state it was restored from. The VM never writes to either.
 */
export function synthesizedFiles(instanceDir: string, service: SynthesisService): { disk: string; memory: string | null } {
  return { disk: path.join(instanceDir, SYNTHESIZED_DISK), memory: service.manifest.state ? path.join(instanceDir, MEMORY_STATE) : null };
}

/**
 * The domain a synthesized memory state is restored with: the base's saved domain, never the XML in the overlay's
 * memory state (the phone's bytes), which must match it device by device (vm/domain-xml.ts).
 */
async function synthesizedXml(base: BaseVm, overlayXml: string, spec: DomainSpec): Promise<string> {
  if (!base.manifest.state) throw invalid("it has a memory state, but its base has none to take the VM's devices from");
  const baseHeader = await readSaveImageHeader(path.join(base.dir, base.manifest.state));
  return synthesizedDomainXml(baseHeader.xml, overlayXml, spec, (message) => invalid(`its memory state's domain XML ${message}`));
}

/**
 * VM Synthesis: the Service VM is rebuilt from an overlay on a Base VM while the overlay arrives. The instance's disk
 * is a qcow2 overlay on the base's disk holding only the changed blocks; its memory state is rebuilt next to it and
 * restored with the instance's own identity (name, UUID, port forward), like a Cached VM start. The restore starts
 * once the disk is complete and reads the memory state while it is being rebuilt (synthesis/apply.ts says why that
 * is safe). The disk is rebuilt as the overlay arrives, without a launch slot: one is taken only once every byte of
 * the overlay is on the cloudlet, so a client that sends slowly holds no slot another launch could use.
 */
export class SynthesisMechanism implements Mechanism<SynthesisService> {
  readonly name = 'synthesis' as const;
  readonly admitsItself = true;
  /** The overlay is read once, as it arrives. */
  readonly launchesOnce = true;

  constructor(private readonly hypervisor: Hypervisor) {}

  get runtime(): Hypervisor {
    return this.hypervisor;
  }

  async launch({ service, domainName, record, timer, progress, admit }: LaunchPlan<SynthesisService>): Promise<'memory-state' | 'cold-boot'> {
    const { disk: synthesizedDisk, memory } = synthesizedFiles(record.dir, service);
    const disk = service.keep ? synthesizedDisk : instanceFiles(record.dir).disk;
    progress('synthesizing', { done: 0, total: service.overlay.bytes });
    const spec = instanceDomainSpec(service, domainName, record, this.hypervisor.domainType);
    return applyOverlay(
      service.overlay,
      service.base,
      { disk, memory },
      (done, total) => progress('synthesizing', { done, total }),
      async (liveMemory) => {
        const state = liveMemory && { ...liveMemory, xml: await synthesizedXml(service.base, liveMemory.header.xml, spec) };
        if (service.keep) await createLinkedClone(disk, instanceFiles(record.dir).disk, 'qcow2');
        await service.arrived();
        await admit();
        faultPoint('synthesis:after-apply');
        return restoreOrBoot(this.hypervisor, spec, state, record.dir, timer, progress);
      },
    );
  }
}
