import { createReadStream } from 'node:fs';
import { copyFile, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { CloudletError, asCloudletError } from '../errors';
import { convertImage } from '../images/qemu-img';
import type { Logger } from '../log';
import type { OverlayConsumer, OverlayUploads, ServiceOnBase, VmSynthesis } from './adapters';
import type { BaseStore } from './bases';
import type { Catalog } from './catalog';
import { requireFreeSpace } from '../system/disk-space';
import type { InstanceStarts } from './instance-starts';
import type { InstanceRegistry } from './instances';
import { SERVICE_ID } from './manifest';
import type { AppendOutcome, SynthesisOptions, SynthesisResult, UploadView } from './types';

export interface SynthesisRequestsParts {
  /** Where the free space for overlays and what they expand to is checked. */
  dataDir: string;
  catalog: Catalog;
  bases: BaseStore;
  registry: InstanceRegistry;
  starts: InstanceStarts;
  vmSynthesis: VmSynthesis;
  /** The upload store, given what synthesizes an upload as its bytes arrive. */
  uploads: (synthesize: OverlayConsumer) => OverlayUploads;
  log: Logger;
}

/**
 * VM Synthesis as clients ask for it: from an overlay file on this machine or a resumable upload, launched on behalf
 * of whoever asks, and kept as a Cached VM service when asked to.
 */
export class SynthesisRequests {
  private readonly uploads: OverlayUploads;

  constructor(private readonly parts: SynthesisRequestsParts) {
    this.uploads = parts.uploads((stream, bytes, options, arrived) => this.synthesize(stream, bytes, options, arrived));
  }

  /** Take up the uploads an earlier agent left: only once the registry has adopted (and swept) its instances. */
  resumeUploads(): Promise<void> {
    return this.uploads.load();
  }

  async synthesizeFile(file: string, options: SynthesisOptions): Promise<SynthesisResult> {
    if (!path.isAbsolute(file)) throw new CloudletError('INVALID_PARAMETER', `overlay path must be absolute: ${file}`, { details: { parameter: 'path' } });
    const overlayFile = await stat(file).catch((err: Error) => {
      throw new CloudletError('INVALID_PARAMETER', `cannot read overlay ${file}: ${err.message}`, { details: { parameter: 'path' } });
    });
    // A directory or a device would fail only once read (EISDIR), or never end (/dev/zero).
    if (!overlayFile.isFile()) throw new CloudletError('INVALID_PARAMETER', `overlay ${file} is not a regular file`, { details: { parameter: 'path' } });
    const { size } = overlayFile;
    this.refuseKeepingAs(options.keepAs);
    return this.synthesize(createReadStream(file), size, options);
  }

  async createUpload(bytes: number, options: SynthesisOptions): Promise<UploadView<SynthesisResult>> {
    if (!Number.isSafeInteger(bytes) || bytes <= 0)
      throw new CloudletError('INVALID_PARAMETER', 'bytes must be a positive integer', { details: { parameter: 'bytes' } });
    const limit = this.parts.vmSynthesis.maxOverlayBytes;
    if (bytes > limit) throw new CloudletError('PAYLOAD_TOO_LARGE', `an overlay may have at most ${limit} bytes`, { details: { limit } });
    this.refuseKeepingAs(options.keepAs);
    // Room for this upload and for what the unfinished ones still announce, before anything is written.
    await requireFreeSpace(this.parts.dataDir, bytes + this.uploads.outstandingBytes(), `receive an overlay upload of ${bytes} bytes`);
    return this.uploads.create(bytes, options);
  }

  upload(id: string, deviceId?: string): UploadView<SynthesisResult> {
    return this.uploads.get(id, uploadOf(deviceId));
  }

  appendUpload(id: string, offset: number, body: Readable, deviceId?: string): Promise<AppendOutcome<SynthesisResult>> {
    return this.uploads.append(id, offset, body, uploadOf(deviceId));
  }

  /** A synthesis is kept only as a new service: refused before any byte is sent, rather than after the VM runs. */
  private refuseKeepingAs(serviceId: string | undefined): void {
    if (serviceId === undefined) return;
    if (!SERVICE_ID.test(serviceId))
      throw new CloudletError('INVALID_PARAMETER', `invalid service id ${JSON.stringify(serviceId)}`, { details: { parameter: 'keep_as' } });
    if (this.parts.catalog.has(serviceId))
      throw new CloudletError('SERVICE_EXISTS', `service ${serviceId} is already in the catalog`, { details: { service_id: serviceId } });
  }

  /**
   * Check the overlay's header, manifest and signature and find its base before anything is made, then launch it as
   * an instance (the registry cleans up everything if applying or starting it fails). `arrived` resolves once every
   * byte of the overlay is on the cloudlet (a file's at once, an upload's when its last byte is in).
   */
  private async synthesize(stream: Readable, bytes: number, options: SynthesisOptions, arrived = async () => {}): Promise<SynthesisResult> {
    const { vmSynthesis, bases, dataDir, starts, log } = this.parts;
    const opened = await vmSynthesis.open(stream, bytes, (ref) => bases.get(ref), options.keepAs !== undefined, arrived);
    try {
      const { service } = opened;
      // Room for all the overlay can expand to, not only for what was sent, before anything is written.
      await requireFreeSpace(dataDir, opened.expandedBytes + this.uploads.outstandingBytes(), `synthesize ${service.id}`);
      const result = await starts.start(service, false, vmSynthesis.mechanism, { deviceId: options.deviceId, clientHost: options.clientHost });
      log(`synthesized ${service.id} from a ${bytes}-byte overlay on base ${service.base.name}`);
      return options.keepAs === undefined ? result : { ...result, ...(await this.keepSynthesized(service, result.instance.id, options.keepAs)) };
    } finally {
      await opened.close();
    }
  }

  /**
   * Keep a synthesized VM, once it is ready, as the Cached VM service `serviceId`: its disk as synthesized (flattened)
   * and the memory state it was restored from, through the same import as a recipe's cached result. The instance
   * keeps running; a failure loses only the keeping, and is reported with the start result.
   */
  private async keepSynthesized(service: ServiceOnBase, instanceId: string, serviceId: string): Promise<Pick<SynthesisResult, 'keptAs' | 'keepError'>> {
    const { catalog, registry, vmSynthesis, log } = this.parts;
    const synthesized = vmSynthesis.synthesizedFiles(registry.dirOf(instanceId), service);
    const work = await catalog.workDir();
    try {
      this.refuseKeepingAs(serviceId);
      const disk = path.join(work, 'captured.qcow2');
      await convertImage(synthesized.disk, disk, 'qcow2');
      const state = synthesized.memory && path.join(work, 'state.sav');
      if (synthesized.memory && state) await copyFile(synthesized.memory, state);
      const keptAs = await catalog.importCaptured({ dir: work, disk, state }, { ...service.manifest, service_id: serviceId }, service.base);
      log(`kept the synthesized ${service.id} as the service ${serviceId}`);
      return { keptAs };
    } catch (err) {
      const keepError = asCloudletError(err);
      log(`keeping the synthesized ${service.id} as ${serviceId} failed: ${keepError.message}`);
      return { keepError };
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  }
}

/** Which uploads a caller may see and continue: a device only its own; the operator (no device) every one. */
function uploadOf(deviceId: string | undefined): (options: SynthesisOptions) => boolean {
  return (options) => deviceId === undefined || options.deviceId === deviceId;
}
