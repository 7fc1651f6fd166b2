import { stat } from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import type { AgentConfig } from '../config';
import { CloudletError } from '../errors';
import type { Logger } from '../log';
import type { CapturingMechanism, Mechanism } from './mechanism';
import type { HypervisorLink, OverlayConsumer, OverlayUploads, PackageShelf, VmSynthesis } from './adapters';
import type { AppStore } from './apps';
import type { BaseFile, BaseStore, BaseVm } from './bases';
import type { Catalog } from './catalog';
import { requireFreeSpace } from '../system/disk-space';
import { HostStatus } from './host-status';
import type { OptionalPart } from './optional-parts';
import { InstanceStarts, type DeviceStanding } from './instance-starts';
import type { InstanceRegistry } from './instances';
import { RECIPE_TAG_PREFIX, parseRecipe, recipeService, recipeTag, type Recipe, type RecipeService } from './recipe';
import type { RecipeStore } from './recipes';
import { SynthesisRequests } from './synthesis-requests';
import type { EventListener } from './events';
import type {
  App,
  AppendOutcome,
  AppFilter,
  CloudletApi,
  DiscoveryView,
  Endpoint,
  HealthReport,
  Instance,
  NewApp,
  Package,
  PackageSource,
  Peer,
  ProvisioningApi,
  Service,
  StartRequest,
  StartResult,
  StopResult,
  Stopper,
  SynthesisOptions,
  SynthesisResult,
  SystemInfo,
  UploadView,
} from './types';

/** What the composition root (compose.ts) hands the core: its stores, the registry, the mechanisms and their adapters. */
export interface CloudletParts {
  config: AgentConfig;
  log: Logger;
  hypervisor: HypervisorLink;
  catalog: Catalog;
  packages: PackageShelf;
  apps: AppStore;
  bases: BaseStore;
  recipes: RecipeStore;
  /** Already adopted what runs, and reconciling. */
  registry: InstanceRegistry;
  cachedVm: CapturingMechanism<Service>;
  onDemand: CapturingMechanism<RecipeService>;
  /** Why app packages cannot run here, when the host lacks what sandboxes need. */
  appVirt: Mechanism<Package> | CloudletError;
  vmSynthesis: VmSynthesis;
  /** The store of resumable overlay uploads, given what synthesizes an upload as its bytes arrive. */
  overlayUploads: (synthesize: OverlayConsumer) => OverlayUploads;
}

/**
 * The core's facade: what the HTTP faces, telemetry and discovery call (CloudletApi, ProvisioningApi). The catalog,
 * the package, app, base and recipe stores and the registry do the work; starts on someone's behalf go through
 * InstanceStarts, VM Synthesis requests through SynthesisRequests, the box's own facts through HostStatus.
 */
export class Cloudlet implements CloudletApi, ProvisioningApi {
  private readonly config: AgentConfig;
  private readonly log: Logger;
  private readonly hypervisor: HypervisorLink;
  private readonly catalog: Catalog;
  private readonly packages: PackageShelf;
  private readonly apps: AppStore;
  private readonly bases: BaseStore;
  private readonly recipes: RecipeStore;
  private readonly registry: InstanceRegistry;
  private readonly cachedVm: CapturingMechanism<Service>;
  private readonly onDemand: CapturingMechanism<RecipeService>;
  private readonly appVirt: Mechanism<Package> | CloudletError;
  private readonly starts: InstanceStarts;
  private readonly synthesisRequests: SynthesisRequests;
  private readonly status: HostStatus;
  /** Recipe results being cached, so concurrent requests share one capture. */
  private readonly caching = new Map<string, Promise<Service>>();

  private constructor(parts: CloudletParts) {
    ({ config: this.config, log: this.log, hypervisor: this.hypervisor, catalog: this.catalog, packages: this.packages, apps: this.apps } = parts);
    ({ bases: this.bases, recipes: this.recipes, registry: this.registry } = parts);
    ({ cachedVm: this.cachedVm, onDemand: this.onDemand, appVirt: this.appVirt } = parts);
    this.starts = new InstanceStarts(this.registry);
    this.synthesisRequests = new SynthesisRequests({
      dataDir: this.config.dataDir,
      catalog: this.catalog,
      bases: this.bases,
      registry: this.registry,
      starts: this.starts,
      vmSynthesis: parts.vmSynthesis,
      uploads: parts.overlayUploads,
      log: this.log,
    });
    this.status = new HostStatus({
      hypervisor: this.hypervisor,
      dataDir: this.config.dataDir,
      instances: () => this.registry.list().length,
      sandboxProblem: this.appVirt instanceof CloudletError ? this.appVirt : null,
      reconcileCost: () => this.registry.reconcileCost(),
    });
  }

  static async open(parts: CloudletParts): Promise<Cloudlet> {
    const cloudlet = new Cloudlet(parts);
    // After adopt(): an upload's synthesis cut by the restart left an instance directory, swept by now; it starts over.
    await cloudlet.synthesisRequests.resumeUploads();
    return cloudlet;
  }

  /** Stop watching and disconnect. Running instances keep running: the next agent adopts them. */
  async close(): Promise<void> {
    this.registry.stopReconciling();
    this.registry.pool?.stop();
    await this.hypervisor.close();
  }

  listServices(): Service[] {
    return this.catalog.list().map((service) => this.withPool(service));
  }

  catalogRevision(): string {
    return `${this.catalog.revision}.${this.packages.revision}`;
  }

  getService(id: string): Service {
    return this.withPool(this.catalog.get(id));
  }

  private withPool(service: Service): Service {
    return this.registry.pool ? { ...service, pool: this.registry.pool.status(service) } : service;
  }

  /** Run `work` on a service's files with its warm pool drained (its pooled VMs run on those files). */
  private drained<T>(id: string, work: () => Promise<T>): Promise<T> {
    return this.registry.pool ? this.registry.pool.drained(id, work) : work();
  }

  async importService(dir: string): Promise<Service> {
    return this.withPool(await this.catalog.import(dir));
  }

  async removeService(id: string): Promise<void> {
    this.catalog.get(id);
    this.refuseWhileInUse(id, 'removed');
    await this.drained(id, () => this.catalog.remove(id));
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
    return appPackage
      ? this.starts.start(appPackage, req.join, this.runnableAppVirt(), req)
      : this.starts.start(this.catalog.get(req.serviceId), req.join, this.cachedVm, req);
  }

  private runnableAppVirt(): Mechanism<Package> {
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

  /** See InstanceStarts.attachDeviceStanding. */
  attachDeviceStanding(standing: (deviceId: string) => DeviceStanding): void {
    this.starts.attachDeviceStanding(standing);
  }

  endpointFor(instance: Instance, clientHost?: string): Endpoint {
    return this.starts.endpointFor(instance, clientHost);
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
    const captured = await this.registry.capture(coldService, this.cachedVm, ({ disk, state }) =>
      this.drained(id, () => this.catalog.replaceDiskAndState(id, { disk, state })),
    );
    this.log(`captured the memory state of ${id}`);
    return this.withPool(captured);
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
    const started = await this.starts.start(recipeService(recipe, this.bases.get(recipe.base)), req.join, this.onDemand, req);
    if (recipe.cache === 'after-first-use') {
      this.cacheRecipe(id).catch((err: Error) => this.log(`caching the result of recipe ${id} failed: ${err.message}`));
    }
    return started;
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
      return Promise.reject(
        new CloudletError('SERVICE_EXISTS', `service ${id} exists and was not made from a recipe; it is not replaced`, { details: { service_id: id } }),
      );
    }
    const service = recipeService(recipe, this.bases.get(recipe.base));
    const caching = this.registry
      .capture(service, this.onDemand, async ({ dir, disk, state }) => {
        if (this.catalog.has(id)) {
          this.refuseWhileInUse(id, 'replaced by a new cached result');
          await this.drained(id, () => this.catalog.remove(id));
        }
        const cached = await this.catalog.importCaptured({ dir, disk, state }, service.manifest, service.base);
        this.log(`cached the result of recipe ${id}`);
        return cached;
      })
      .finally(() => this.caching.delete(id));
    this.caching.set(id, caching);
    return caching;
  }

  synthesizeFile(file: string, options: SynthesisOptions): Promise<SynthesisResult> {
    return this.synthesisRequests.synthesizeFile(file, options);
  }

  createOverlayUpload(bytes: number, options: SynthesisOptions): Promise<UploadView<SynthesisResult>> {
    return this.synthesisRequests.createUpload(bytes, options);
  }

  overlayUpload(id: string, deviceId?: string): UploadView<SynthesisResult> {
    return this.synthesisRequests.upload(id, deviceId);
  }

  appendOverlayUpload(id: string, offset: number, body: Readable, deviceId?: string): Promise<AppendOutcome<SynthesisResult>> {
    return this.synthesisRequests.appendUpload(id, offset, body, deviceId);
  }

  /** The end of an instance's console output, while it starts and while it runs. */
  consoleTail(id: string, maxBytes: number): Promise<string> {
    return this.registry.consoleTail(id, maxBytes);
  }

  systemInfo(): Promise<SystemInfo> {
    return this.status.systemInfo();
  }

  health(): Promise<HealthReport> {
    return this.status.health();
  }

  /** Discovery starts after the HTTP server (it publishes the port actually bound) and reports through this. */
  attachDiscovery(view: DiscoveryView): void {
    this.status.attachDiscovery(view);
  }

  /** Where the optional parts stand, for the health report. */
  attachParts(parts: { list(): OptionalPart[] }): void {
    this.status.attachParts(parts);
  }

  peers(): Peer[] {
    return this.status.peers();
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
}
