/**
 * What the core needs of the adapters the composition root (compose.ts) makes and hands in. Declared here, so that
 * core/ imports none of vm/, sandbox/, packages/ or synthesis/, and each of those may build on core/.
 */
import type { Readable } from 'node:stream';
import type { Mechanism } from './mechanism';
import type { InstanceRuntime } from './runtime';
import type { BaseVm } from './bases';
import type { AppendOutcome, Package, PackageSource, Service, SynthesisOptions, SynthesisResult, UploadView } from './types';

/** The hypervisor (vm/hypervisor.ts): the VM mechanisms' runtime, and what the system facts and health report show. */
export interface HypervisorLink extends InstanceRuntime {
  readonly uri: string;
  readonly domainType: 'kvm' | 'qemu';
  readonly libvirtVersion: string;
  isAlive(): Promise<boolean>;
  close(): Promise<void>;
}

/** The app package store (packages/store.ts). */
export interface PackageShelf {
  list(): Package[];
  find(id: string): Package | undefined;
  get(id: string): Package;
  import(source: PackageSource): Promise<Package>;
  remove(id: string): Promise<void>;
}

/** A service that runs on a Base VM's files: what a recipe and an overlay launch, and how their results are kept. */
export interface ServiceOnBase extends Service {
  base: BaseVm;
}

/** VM Synthesis's own parts (synthesis/ reads overlays, mechanisms/synthesis.ts launches them). */
export interface VmSynthesis {
  readonly mechanism: Mechanism<ServiceOnBase>;
  /** The largest overlay accepted. */
  readonly maxOverlayBytes: number;
  /**
   * Check the overlay's header, manifest and signature, find its base with `baseOf`, and describe the service it
   * launches, before anything is written. `keep`: leave the disk as synthesized, to keep it as a service. `arrived`
   * resolves once every byte of the overlay is on the cloudlet.
   */
  open(stream: Readable, bytes: number, baseOf: (ref: string) => BaseVm, keep: boolean, arrived: () => Promise<void>): Promise<OpenedSynthesis>;
  /** The disk as synthesized and the memory state it was restored from, in the instance directory of a kept synthesis. */
  synthesizedFiles(instanceDir: string, service: ServiceOnBase): { disk: string; memory: string | null };
}

/** An overlay being read: the service it launches, and the reader to release whatever becomes of the launch. */
export interface OpenedSynthesis {
  service: ServiceOnBase;
  /** The most it can expand to on disk: the free space is checked against it before anything is written. */
  expandedBytes: number;
  close(): Promise<void>;
}

/** What reads an overlay upload as its bytes arrive: the synthesis. */
export type OverlayConsumer = (stream: Readable, bytes: number, options: SynthesisOptions, arrived: () => Promise<void>) => Promise<SynthesisResult>;

/** Resumable overlay uploads (synthesis/uploads.ts); `visible` says which of them the caller may see and continue. */
export interface OverlayUploads {
  /** Take up the uploads an earlier agent left. */
  load(): Promise<void>;
  /** Bytes the unfinished uploads still announce. */
  outstandingBytes(): number;
  create(bytes: number, options: SynthesisOptions): Promise<UploadView<SynthesisResult>>;
  get(id: string, visible: (options: SynthesisOptions) => boolean): UploadView<SynthesisResult>;
  append(id: string, offset: number, body: Readable, visible: (options: SynthesisOptions) => boolean): Promise<AppendOutcome<SynthesisResult>>;
}
