import { constants as fsConstants } from 'node:fs';
import { access, copyFile, rm, stat } from 'node:fs/promises';
import { createReadStream } from 'node:fs';
import { randomUUID } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import type { Readable } from 'node:stream';
import type { AgentConfig } from '../config';
import { CloudletError, asCloudletError } from '../errors';
import { convertImage } from '../images/qemu-img';
import type { Logger } from '../log';
import { AppVirtMechanism } from '../mechanisms/app-virt';
import { CachedVmMechanism } from '../mechanisms/cached-vm';
import type { Mechanism } from '../mechanisms/mechanism';
import { OnDemandMechanism, recipeService } from '../mechanisms/on-demand';
import { SynthesisMechanism, synthesisService, synthesizedFiles, type SynthesisService } from '../mechanisms/synthesis';
import { expandedBytes, openOverlay } from '../synthesis/apply';
import { trustedOverlayKeys } from '../synthesis/keys';
import { OVERLAY_LIMITS } from '../synthesis/overlay-format';
import { UploadSessions, type AppendOutcome, type UploadView } from '../synthesis/uploads';
import { DEFAULT_PACKAGE_LIMITS, PackageStore } from '../packages/store';
import { SandboxRuntime } from '../sandbox/sandbox-runtime';
import { Hypervisor } from '../vm/hypervisor';
import { faultPoint } from '../system/fault-points';
import { checkReachableByQemu, makeDataDir } from '../system/data-dir';
import { instanceFiles } from '../vm/instance-domain';
import { AppStore } from './apps';
import { BaseStore, type BaseFile, type BaseVm } from './bases';
import { Catalog, copyRegularFile, writeManifest } from './catalog';
import { noSpaceError, requireFreeSpace } from '../system/disk-space';
import { InstanceRegistry, withConsoleTail } from './instances';
import { LaunchGate } from './launch-gate';
import { PortAllocator } from './ports';
import { boundedProbe, waitUntilReady } from './readiness';
import { SERVICE_ID } from './manifest';
import { RECIPE_TAG_PREFIX, parseRecipe, recipeTag, type Recipe } from './recipe';
import { RecipeStore } from './recipes';
import { HostMonitor } from './system-info';
import { PhaseTimer } from './timing';
import type { EventListener } from './events';
import type {
  App, AppFilter, CloudletApi, DiscoveryView, Endpoint, HealthCheck, HealthReport, Instance, InstanceRecord, NewApp, Package,
  PackageSource, Peer, ProvisioningApi, Service, ServiceManifest, StartRequest, StartResult, StopResult, Stopper, SynthesisOptions, SynthesisResult, SystemInfo, Workload,
} from './types';

// From dist/agent/src/core/ up to the repository (or installed package) root.
export const AGENT_VERSION: string = (require('../../../../package.json') as { version: string }).version;

const WILDCARD = new Set(['0.0.0.0', '::', '']);
/** An overlay upload that gets no bytes for this long is abandoned; a finished one is remembered this long. */
const OVERLAY_UPLOAD_IDLE_MS = 10 * 60_000;
const OVERLAY_UPLOAD_KEEP_MS = 10 * 60_000;
/** Unfinished overlay uploads one device may have at a time (the operator's are not limited). */
const OVERLAY_UPLOADS_PER_DEVICE = 2;

/** How a device's authorization stands: null while it may act, else how it ended (trust/devices.ts). */
type DeviceStanding = 'not-paired' | 'revoked' | 'expired' | null;

/**
 * The core: the catalog of cached services, the registry of running instances and the mechanisms that launch
 * them. The HTTP faces call only this (through CloudletApi).
 */
export class Cloudlet implements CloudletApi, ProvisioningApi {
  private readonly host = new HostMonitor();
  private discovery: DiscoveryView | null = null;
  /** Recipe results being cached, so concurrent requests share one capture. */
  private readonly caching = new Map<string, Promise<Service>>();
  private readonly overlayUploads: UploadSessions<SynthesisResult, SynthesisOptions>;
  /** See attachDeviceStanding; every device is in good standing until told otherwise. */
  private deviceStanding: (deviceId: string) => DeviceStanding = () => null;

  private constructor(
    private readonly config: AgentConfig,
    private readonly hypervisor: Hypervisor,
    private readonly catalog: Catalog,
    private readonly ports: PortAllocator,
    private readonly registry: InstanceRegistry,
    private readonly cachedVm: CachedVmMechanism,
    private readonly log: Logger,
    private readonly apps: AppStore,
    private readonly packages: PackageStore,
    /** Why app packages cannot run here, when the host lacks what sandboxes need. */
    private readonly appVirt: AppVirtMechanism | CloudletError,
    private readonly bases: BaseStore,
    private readonly recipes: RecipeStore,
    private readonly onDemand: OnDemandMechanism,
    private readonly synthesis: SynthesisMechanism,
  ) {
    this.overlayUploads = new UploadSessions(path.join(config.dataDir, 'uploads'), (stream, bytes, options, arrived) => this.synthesize(stream, bytes, options, arrived),
      OVERLAY_UPLOAD_IDLE_MS, OVERLAY_UPLOAD_KEEP_MS, log, { ownerOf: (options) => options.deviceId, max: OVERLAY_UPLOADS_PER_DEVICE });
  }

  static async open(config: AgentConfig, log: Logger): Promise<Cloudlet> {
    // QEMU runs as its own user and must reach the images below the data directory.
    await makeDataDir(config.dataDir);
    const hypervisor = await Hypervisor.connect(config.libvirtUri, config.domainType, log);
    await checkReachableByQemu(config.dataDir, await hypervisor.qemuIdentity(), log);
    const staging = path.join(config.dataDir, 'tmp');
    const catalog = new Catalog(path.join(config.dataDir, 'services'), staging, log);
    await catalog.load();
    if (config.seedDir) await catalog.importSeeds(config.seedDir);
    const ports = new PortAllocator(config.forward.bindAddress, config.forward.portRange);
    const cachedVm = new CachedVmMechanism(hypervisor);
    const packages = new PackageStore(path.join(config.dataDir, 'packages'), staging, (id) => catalog.has(id), log,
      { ...DEFAULT_PACKAGE_LIMITS, maxBytes: config.packages.maxUploadBytes });
    await packages.load();
    const instancesDir = path.join(config.dataDir, 'instances');
    // Without cgroups (a container, a private mount namespace) the agent still serves VMs; packages just cannot start.
    const appVirt = await SandboxRuntime.open(instancesDir, config.packages, log).then((runtime) => new AppVirtMechanism(runtime), (err: unknown) => {
      log(`app packages cannot run on this host: ${(err as Error).message}`);
      return asCloudletError(err);
    });
    const onDemand = new OnDemandMechanism(hypervisor);
    const synthesis = new SynthesisMechanism(hypervisor);
    const registry = new InstanceRegistry([cachedVm, ...(appVirt instanceof AppVirtMechanism ? [appVirt] : []), onDemand, synthesis], ports, instancesDir, staging, config.forward.bindAddress, log,
      new LaunchGate({ concurrent: config.limits.concurrentLaunches, queue: config.limits.queuedLaunches, readyWithinMs: config.limits.readinessTimeoutMs }),
      { perAddress: config.limits.anonymousInstancesPerAddress, total: config.limits.anonymousInstances });
    await registry.adopt();
    registry.startReconciling(config.reconcileIntervalMs, config.libvirtEvents);
    const apps = new AppStore(path.join(config.dataDir, 'apps'), staging, config.apps.maxUploadBytes, log);
    await apps.load();
    const bases = new BaseStore(path.join(config.dataDir, 'bases'), () => catalog.workDir(), log);
    await bases.load();
    const recipes = new RecipeStore(path.join(config.dataDir, 'recipes'), log);
    await recipes.load();
    const cloudlet = new Cloudlet(config, hypervisor, catalog, ports, registry, cachedVm, log, apps, packages, appVirt, bases, recipes, onDemand, synthesis);
    // After adopt(): an upload's synthesis cut by the restart left an instance directory, swept by now; it starts over.
    await cloudlet.overlayUploads.load();
    return cloudlet;
  }

  /** Stop watching and disconnect. Running instances keep running: the next agent adopts them. */
  async close(): Promise<void> {
    this.registry.stopReconciling();
    await this.hypervisor.close();
  }

  listServices(): Service[] {
    return this.catalog.list();
  }

  getService(id: string): Service {
    return this.catalog.get(id);
  }

  importService(dir: string): Promise<Service> {
    return this.catalog.import(dir);
  }

  async removeService(id: string): Promise<void> {
    this.catalog.get(id);
    this.refuseWhileInUse(id, 'removed');
    await this.catalog.remove(id);
  }

  listPackages(): Package[] {
    return this.packages.list();
  }

  getPackage(id: string): Package {
    return this.packages.get(id);
  }

  importPackage(source: PackageSource): Promise<Package> {
    return this.packages.import(source);
  }

  async removePackage(id: string): Promise<void> {
    this.packages.get(id);
    this.refuseWhileInUse(id, 'removed');
    await this.packages.remove(id);
  }

  private refuseWhileInUse(id: string, what: string): void {
    const running = this.registry.countFor(id);
    if (running > 0) throw new CloudletError('SERVICE_IN_USE', `service ${id} has ${running} running instance(s) and cannot be ${what}; stop them first`);
  }

  listInstances(): Instance[] {
    return this.registry.list();
  }

  getInstance(id: string): Instance {
    return this.registry.get(id);
  }

  /** An app package's id acts as a service id: the package store is asked first, then the catalog. */
  async startInstance(req: StartRequest): Promise<StartResult> {
    const appPackage = this.packages.find(req.serviceId);
    const started = appPackage
      ? await this.startFor(appPackage, req.join, this.runnableAppVirt(), req.deviceId, req.anonymousFrom)
      : await this.startFor(this.catalog.get(req.serviceId), req.join, this.cachedVm, req.deviceId, req.anonymousFrom);
    return { ...started, endpoint: this.endpointFor(started.instance, req.clientHost) };
  }

  private runnableAppVirt(): AppVirtMechanism {
    if (this.appVirt instanceof CloudletError) throw this.appVirt;
    return this.appVirt;
  }

  stopInstance(id: string, by: Stopper): Promise<StopResult> {
    return this.registry.stop(id, by);
  }

  /** A device's authorization ended: release every use it holds (instances nobody else uses are stopped). */
  releaseDevice(deviceId: string): Promise<void> {
    return this.registry.releaseOwner(deviceId);
  }

  /**
   * Which devices may still hold instances (null: in good standing, else how its authorization ended): the reconciler
   * releases the uses of any other (a release that failed at the device's end, libvirt being unreachable, is retried
   * until it succeeds), and a start for a device whose authorization ended while it launched is undone.
   */
  attachDeviceStanding(standing: (deviceId: string) => DeviceStanding): void {
    this.deviceStanding = standing;
    this.registry.setOwnerStanding((id) => standing(id) === null);
  }

  /**
   * Every start on a device's behalf (Cached VM, app package, on-demand, synthesis): the device's authorization may
   * have ended while its VM was launching, possibly before the registry listed the instance for releasing; its use is
   * then given back, and the start fails as the device's next request would.
   */
  private async startFor<W extends Workload>(workload: W, join: boolean, mechanism: Mechanism<W>, deviceId?: string, anonymousFrom?: string): Promise<Omit<StartResult, 'endpoint'>> {
    const user: Stopper = deviceId !== undefined ? { device: deviceId } : anonymousFrom !== undefined ? { anonymous: anonymousFrom } : 'operator';
    const started = await this.registry.start(workload, join, mechanism, user);
    const standing = deviceId === undefined ? null : this.deviceStanding(deviceId);
    if (deviceId !== undefined && standing) {
      // Already released (the registry listed it in time) is as good.
      await this.registry.stop(started.instance.id, { device: deviceId }).catch(() => {});
      throw new CloudletError(standing === 'expired' ? 'DEVICE_EXPIRED' : standing === 'revoked' ? 'DEVICE_REVOKED' : 'UNAUTHENTICATED',
        `the authorization of device ${deviceId} ended while its instance was starting`, { details: { device_id: deviceId } });
    }
    return started;
  }

  /** The address a client should connect to: the forward's own address, or the one the client reached us on. */
  endpointFor(instance: Instance, clientHost?: string): Endpoint {
    const address = WILDCARD.has(instance.bindAddress) ? clientHost ?? os.hostname() : instance.bindAddress;
    return { address, port: instance.hostPort };
  }

  /**
   * Boot the service's VM on a throwaway clone, wait until its service answers, save its memory state, and make
   * that clone (flattened) plus the state the service's new disk and state. Later starts restore it in about a
   * quarter of a cold boot.
   */
  async captureServiceState(id: string): Promise<Service> {
    const service = this.catalog.get(id);
    this.refuseWhileInUse(id, 'captured');
    // A cold boot even if the service already has a state: the new state must come from the current disk.
    const coldService: Service = { ...service, manifest: { ...service.manifest, state: null } };
    // The memory state takes up to the VM's memory, the flattened disk about what the service's disk does.
    const diskBytes = (await stat(path.join(service.dir, service.manifest.disk))).size;
    await requireFreeSpace(service.dir, service.manifest.memory_mib * 2 ** 20 + diskBytes, `capture the state of ${id}`);
    const captured = await this.registry.admit(() => this.captureRunning(coldService, this.cachedVm, ({ disk, state }) => this.catalog.replaceDiskAndState(id, { disk, state })));
    this.log(`captured the memory state of ${id}`);
    return captured;
  }

  /**
   * Launch `service` with `mechanism` as a throwaway instance in the staging area, wait until it answers, save its
   * memory state and flatten its disk; `keep` turns that pair (files in the instance's directory, to be moved or
   * copied) into the service to return. Whatever happens, the VM, its files and its port are gone afterwards.
   */
  private async captureRunning<W extends Service>(service: W, mechanism: Mechanism<W>,
    keep: (captured: { dir: string; disk: string; state: string }) => Promise<Service>): Promise<Service> {
    const work = await this.catalog.workDir();
    const hostPort = await this.ports.reserve();
    const probe = boundedProbe(service.manifest.readiness, this.config.limits.readinessTimeoutMs);
    const meta: InstanceRecord = {
      id: randomUUID(), serviceId: service.id, mechanism: mechanism.name, state: 'starting', bindAddress: this.config.forward.bindAddress,
      hostPort, guestPort: service.manifest.port, shareable: false, users: 0, owners: [], launch: 'cold-boot',
      createdAt: new Date().toISOString(), readyAt: null, dir: work, readiness: probe,
    };
    try {
      // Captures run inside registry.admit(): the slot is already held.
      await mechanism.launch({ service, domainName: `cloudlet-capture-${meta.id.slice(0, 8)}`, record: meta, timer: new PhaseTimer(), progress: () => {},
        admit: async () => {} });
      await waitUntilReady(probe, WILDCARD.has(meta.bindAddress) ? '127.0.0.1' : meta.bindAddress, hostPort, {
        timeoutMs: probe.timeout_ms,
        stillAlive: async () => (await this.hypervisor.running()).has(meta.id),
      });
      const state = path.join(work, 'state.sav');
      // The save goes on in libvirtd: a kill right after it was asked for stops the agent mid-save.
      const saving = this.hypervisor.save(meta.id, state);
      faultPoint('capture:mid-save');
      await saving;
      const disk = path.join(work, 'captured.qcow2');
      await convertImage(instanceFiles(work).disk, disk, 'qcow2');
      return await keep({ dir: work, disk, state });
    } catch (err) {
      throw await withConsoleTail(asCloudletError(await noSpaceError(err, work, `capture the state of ${service.id}`)), this.hypervisor, work);
    } finally {
      // With libvirt away the VM cannot be ended now: its files and port still go, and the reconnect ends the VM
      // (a capture domain whose directory is gone is over).
      await this.hypervisor.destroy(meta.id).catch((err: Error) => this.log(`capture VM ${meta.id} is not ended yet: ${err.message}`));
      await rm(work, { recursive: true, force: true });
      this.ports.release(hostPort);
    }
  }

  listBases(): BaseVm[] {
    return this.bases.list();
  }

  getBase(ref: string): BaseVm {
    return this.bases.get(ref);
  }

  importBase(dir: string, name: string): Promise<BaseVm> {
    return this.bases.import(dir, name);
  }

  baseFile(ref: string, name: string): { file: BaseFile; path: string } {
    return this.bases.filePath(ref, name);
  }

  listRecipes(): Recipe[] {
    return this.recipes.list();
  }

  getRecipe(id: string): Recipe {
    return this.recipes.get(id);
  }

  async storeRecipe(json: unknown): Promise<Recipe> {
    const recipe = parseRecipe(json);
    this.bases.get(recipe.base); // a recipe for a base this cloudlet lacks is refused now, not at its first use
    await this.recipes.put(recipe);
    return recipe;
  }

  removeRecipe(id: string): Promise<void> {
    return this.recipes.remove(id);
  }

  /**
   * Start the recipe's service: from its cached result (a Cached VM start) when that was made from this very
   * recipe, else provisioned on demand from its base (and then cached too under the `after-first-use` policy).
   */
  async provision(id: string, req: { join: boolean; clientHost?: string; deviceId?: string }): Promise<StartResult> {
    const recipe = this.recipes.get(id);
    if (this.cachedResultOf(recipe)) return this.startInstance({ ...req, serviceId: id });
    const started = await this.startFor(recipeService(recipe, this.bases.get(recipe.base)), req.join, this.onDemand, req.deviceId);
    if (recipe.cache === 'after-first-use') {
      this.cacheRecipe(id).catch((err: Error) => this.log(`caching the result of recipe ${id} failed: ${err.message}`));
    }
    return { ...started, endpoint: this.endpointFor(started.instance, req.clientHost) };
  }

  private cachedResultOf(recipe: Recipe): Service | null {
    const service = this.catalog.has(recipe.service_id) ? this.catalog.get(recipe.service_id) : null;
    return service && service.manifest.tags.includes(recipeTag(recipe)) ? service : null;
  }

  /**
   * Provision the recipe on a throwaway VM and keep the result (disk + memory state, with the base's kernel and
   * initrd) as the Cached VM service of the recipe's id, replacing an older result of the recipe.
   */
  cacheRecipe(id: string): Promise<Service> {
    const inFlight = this.caching.get(id);
    if (inFlight) return inFlight;
    const recipe = this.recipes.get(id);
    const existing = this.catalog.has(id) ? this.catalog.get(id) : null;
    if (existing && !existing.manifest.tags.some((t) => t.startsWith(RECIPE_TAG_PREFIX))) {
      return Promise.reject(new CloudletError('SERVICE_EXISTS', `service ${id} exists and was not made from a recipe; it is not replaced`, { details: { service_id: id } }));
    }
    const service = recipeService(recipe, this.bases.get(recipe.base));
    const caching = this.registry.admit(() => this.captureRunning(service, this.onDemand, async ({ dir, disk, state }) => {
      if (this.catalog.has(id)) {
        this.refuseWhileInUse(id, 'replaced by a new cached result');
        await this.catalog.remove(id);
      }
      const cached = await this.importCaptured({ dir, disk, state }, service.manifest, service.base);
      this.log(`cached the result of recipe ${id}`);
      return cached;
    })).finally(() => this.caching.delete(id));
    this.caching.set(id, caching);
    return caching;
  }

  /**
   * A captured disk and memory state in the work directory `dir`, with the base's kernel and initrd, imported as the
   * Cached VM service `manifest` describes: how a recipe's result and a kept synthesis become services.
   */
  private async importCaptured({ dir, disk, state }: { dir: string; disk: string; state: string | null }, manifest: ServiceManifest, base: BaseVm): Promise<Service> {
    const boot = base.manifest.boot;
    for (const file of [boot?.kernel, boot?.initrd]) if (file) await copyRegularFile(base.dir, file, dir);
    await writeManifest(dir, { ...manifest, disk: path.basename(disk), state: state && path.basename(state), boot });
    return this.catalog.import(dir);
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

  async createOverlayUpload(bytes: number, options: SynthesisOptions): Promise<UploadView<SynthesisResult>> {
    if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new CloudletError('INVALID_PARAMETER', 'bytes must be a positive integer', { details: { parameter: 'bytes' } });
    if (bytes > OVERLAY_LIMITS.overlayBytes) {
      throw new CloudletError('PAYLOAD_TOO_LARGE', `an overlay may have at most ${OVERLAY_LIMITS.overlayBytes} bytes`, { details: { limit: OVERLAY_LIMITS.overlayBytes } });
    }
    this.refuseKeepingAs(options.keepAs);
    // Room for this upload and for what the unfinished ones still announce, before anything is written.
    await requireFreeSpace(this.config.dataDir, bytes + this.overlayUploads.outstandingBytes(), `receive an overlay upload of ${bytes} bytes`);
    return this.overlayUploads.create(bytes, options);
  }

  /** A synthesis is kept only as a new service: refused before any byte is sent, rather than after the VM runs. */
  private refuseKeepingAs(serviceId: string | undefined): void {
    if (serviceId === undefined) return;
    if (!SERVICE_ID.test(serviceId)) throw new CloudletError('INVALID_PARAMETER', `invalid service id ${JSON.stringify(serviceId)}`, { details: { parameter: 'keep_as' } });
    if (this.catalog.has(serviceId)) throw new CloudletError('SERVICE_EXISTS', `service ${serviceId} is already in the catalog`, { details: { service_id: serviceId } });
  }

  overlayUpload(id: string, deviceId?: string): UploadView<SynthesisResult> {
    return this.overlayUploads.get(id, uploadOf(deviceId));
  }

  appendOverlayUpload(id: string, offset: number, body: Readable, deviceId?: string): Promise<AppendOutcome<SynthesisResult>> {
    return this.overlayUploads.append(id, offset, body, uploadOf(deviceId));
  }

  /**
   * VM Synthesis: check the overlay's header, manifest and signature and find its base before anything is made,
   * then launch it as an instance (the registry cleans up everything if applying or starting it fails). `arrived`
   * resolves once every byte of the overlay is on the cloudlet (a file's at once, an upload's when its last byte is in).
   */
  private async synthesize(stream: Readable, bytes: number, options: SynthesisOptions, arrived = async () => {}): Promise<SynthesisResult> {
    const overlay = await openOverlay(stream, bytes, await trustedOverlayKeys(path.join(this.config.dataDir, 'overlay-keys'), this.log));
    try {
      const service = synthesisService(overlay, this.bases.get(overlay.manifest.base), options.keepAs !== undefined, arrived);
      // Room for all the overlay can expand to, not only for what was sent, before anything is written.
      await requireFreeSpace(this.config.dataDir, expandedBytes(overlay.manifest) + this.overlayUploads.outstandingBytes(), `synthesize ${service.id}`);
      const started = await this.startFor(service, false, this.synthesis, options.deviceId);
      this.log(`synthesized ${service.id} from a ${bytes}-byte overlay on base ${service.base.name}`);
      const result = { ...started, endpoint: this.endpointFor(started.instance, options.clientHost) };
      return options.keepAs === undefined ? result : { ...result, ...(await this.keepSynthesized(service, started.instance.id, options.keepAs)) };
    } finally {
      await overlay.reader.close();
    }
  }

  /**
   * Keep a synthesized VM, once it is ready, as the Cached VM service `serviceId`: its disk as synthesized (flattened)
   * and the memory state it was restored from, through the same import as a recipe's cached result. The instance
   * keeps running; a failure loses only the keeping, and is reported with the start result.
   */
  private async keepSynthesized(service: SynthesisService, instanceId: string, serviceId: string): Promise<Pick<SynthesisResult, 'keptAs' | 'keepError'>> {
    const synthesized = synthesizedFiles(this.registry.dirOf(instanceId), service);
    const work = await this.catalog.workDir();
    try {
      this.refuseKeepingAs(serviceId);
      const disk = path.join(work, 'captured.qcow2');
      await convertImage(synthesized.disk, disk, 'qcow2');
      const state = synthesized.memory && path.join(work, 'state.sav');
      if (synthesized.memory && state) await copyFile(synthesized.memory, state);
      const keptAs = await this.importCaptured({ dir: work, disk, state }, { ...service.manifest, service_id: serviceId }, service.base);
      this.log(`kept the synthesized ${service.id} as the service ${serviceId}`);
      return { keptAs };
    } catch (err) {
      const keepError = asCloudletError(err);
      this.log(`keeping the synthesized ${service.id} as ${serviceId} failed: ${keepError.message}`);
      return { keepError };
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  }

  /** The end of an instance's console output, while it starts and while it runs. */
  consoleTail(id: string, maxBytes: number): Promise<string> {
    return this.registry.consoleTail(id, maxBytes);
  }

  async systemInfo(): Promise<SystemInfo> {
    const h = await this.host.facts();
    return {
      hostname: os.hostname(),
      agentVersion: AGENT_VERSION,
      cpu: { cores: h.cores, usagePercent: h.usagePercent, speedMhz: h.speedMhz, cacheKb: h.cacheKb },
      memory: { totalBytes: h.totalBytes, freeBytes: h.freeBytes },
      hypervisor: { uri: this.hypervisor.uri, domainType: this.hypervisor.domainType, libvirtVersion: this.hypervisor.libvirtVersion },
      instances: this.registry.list().length,
      discovery: this.discovery?.status() ?? { state: 'disabled', name: null },
    };
  }

  /** Discovery starts after the HTTP server (it publishes the port actually bound) and reports through this. */
  attachDiscovery(view: DiscoveryView): void {
    this.discovery = view;
  }

  peers(): Peer[] {
    return this.discovery?.peers() ?? [];
  }

  listApps(filter?: AppFilter): App[] {
    return this.apps.list(filter);
  }

  getApp(id: string): App {
    return this.apps.get(id);
  }

  appFile(id: string): { app: App; path: string } {
    const app = this.apps.get(id);
    return { app, path: this.apps.filePath(app) };
  }

  addApp(meta: NewApp, content: Readable, length: number): Promise<App> {
    // An app goes with a service this cloudlet offers: a typo in the service id is caught here, not by a phone.
    this.getService(meta.serviceId);
    return this.apps.add(meta, content, length);
  }

  removeApp(id: string): Promise<void> {
    return this.apps.remove(id);
  }

  subscribe(listener: EventListener): () => void {
    return this.registry.events.subscribe(listener);
  }

  async health(): Promise<HealthReport> {
    const libvirt = await this.hypervisor.isAlive();
    const checks: HealthCheck[] = [{ name: 'libvirt', ok: libvirt, ...(libvirt ? {} : { detail: `connection to ${this.hypervisor.uri} is not alive` }) }];
    // A root file system gone read-only (ext4 errors=remount-ro) leaves the API up but every start failing.
    const dataDirProblem = await access(this.config.dataDir, fsConstants.W_OK).then(() => null, (err: Error) => err.message);
    checks.push({ name: 'data-dir', ok: dataDirProblem === null, ...(dataDirProblem ? { detail: dataDirProblem } : {}) });
    if (this.appVirt instanceof CloudletError) checks.push({ name: 'sandboxes', ok: false, optional: true, detail: this.appVirt.message });
    const discovery = this.discovery?.status();
    if (discovery && discovery.state !== 'disabled') {
      const ok = discovery.state === 'published' || discovery.state === 'registering';
      checks.push({ name: 'discovery', ok, optional: true, ...(ok || !discovery.detail ? {} : { detail: discovery.detail }) });
    }
    return { ok: checks.every((c) => c.ok || c.optional), checks };
  }
}

/** Which uploads a caller may see and continue: a device only its own; the operator (no device) every one. */
function uploadOf(deviceId: string | undefined): (options: SynthesisOptions) => boolean {
  return (options) => deviceId === undefined || options.deviceId === deviceId;
}
