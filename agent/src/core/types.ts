/**
 * The core's vocabulary: what the HTTP faces, the mechanisms and the registry exchange.
 * Wire shapes (KD-Cloudlet JSON, /v1 JSON) are built from these by the faces, not stored here.
 */

export type ReadinessProbe =
  | { type: 'http'; path: string; timeout_ms: number }
  /** TCP: the connection must be accepted and stay open (SLIRP accepts on the host side before the guest does). */
  | { type: 'tcp'; timeout_ms: number };

export interface DirectBoot {
  kernel: string;
  initrd: string | null;
  cmdline: string;
}

/** manifest.json of a cached service directory (format 1). File names are relative to the directory. */
export interface ServiceManifest {
  format: 1;
  service_id: string;
  version: string;
  description: string;
  tags: string[];
  /** The port the service listens on inside the guest. */
  port: number;
  memory_mib: number;
  vcpus: number;
  /** Whether several clients may share (join) one instance. */
  shareable: boolean;
  readiness: ReadinessProbe;
  disk: string;
  /** A saved memory state (libvirt save image) of the service's VM, or null for cold boot. */
  state: string | null;
  boot: DirectBoot | null;
  /**
   * Paused VMs restored ahead of time for instant starts (docs/warm-pool.md); absent: 1 with a memory state, else 0.
   * The agent's `pool.sizes` overrides it.
   */
  pool_size?: number;
}

/** A service's warm pool as the API shows it. */
export interface PoolStatus {
  /** Pooled VMs kept for the service when nobody is starting it (manifest, config or default). */
  size: number;
  /** What the pool aims at now: `size`, grown with the recent rate of starts, within the memory budget. */
  target: number;
  /** Paused VMs ready to be handed to a start. */
  ready: number;
  /** Being restored into the pool. */
  filling: number;
}

export interface Service {
  id: string;
  manifest: ServiceManifest;
  /** The service's directory inside the catalog. */
  dir: string;
  importedAt: string;
  /** Its warm pool, when the facade lists it (docs/warm-pool.md). */
  pool?: PoolStatus;
}

/** manifest.json of an app package (format 1): a self-contained server run in a sandbox (docs/app-packages.md). */
export interface PackageManifest {
  format: 1;
  /** Acts as a service id: start, stop, list and the KD-Cloudlet face take it like one. */
  app_id: string;
  version: string;
  description: string;
  tags: string[];
  /** argv inside the sandbox, where the package's files are at /app. */
  command: string[];
  /** The port the app listens on inside its sandbox. */
  port: number;
  env: Record<string, string>;
  memory_mib: number;
  /** CPU time as a number of CPUs (0.5 = half of one). */
  cpus: number;
  /** Processes and threads at once (the cgroup pids limit; the agent's `packages.maxPids` caps it). */
  pids: number;
  /** Size of the private /data, a tmpfs that counts against memory_mib. */
  data_mib: number;
  shareable: boolean;
  readiness: ReadinessProbe;
}

/** An imported app package: content-addressed by the SHA-256 of its tarball. */
export interface Package {
  id: string;
  sha256: string;
  manifest: PackageManifest;
  /** The package's directory in the store: manifest.json and app/. */
  dir: string;
  importedAt: string;
}

/** Where an app package comes from: a tarball on this machine, or one uploaded in the request. */
/** An uploaded tarball comes with its length (Content-Length), so a full data directory refuses it before reading. */
export type PackageSource = { path: string } | { stream: import('node:stream').Readable; length: number };

/** What the registry needs of anything it launches: a cached service (Service) or an app package (Package). */
export interface Workload {
  id: string;
  manifest: { port: number; shareable: boolean; readiness: ReadinessProbe; state?: string | null };
}

export type MechanismName = 'cached-vm' | 'app-virt' | 'on-demand' | 'synthesis';

export type InstanceState = 'starting' | 'ready' | 'stopping';

export interface Instance {
  /** Also the libvirt domain UUID. */
  id: string;
  serviceId: string;
  mechanism: MechanismName;
  state: InstanceState;
  /** Where the forwarded port is bound on the cloudlet (0.0.0.0 on an appliance). */
  bindAddress: string;
  hostPort: number;
  guestPort: number;
  shareable: boolean;
  /** Clients currently sharing the instance; the instance is destroyed when the last one stops it. */
  users: number;
  /** The paired devices among those users, one entry per use (users without a device, e.g. the operator, are not listed). */
  owners: string[];
  /**
   * 'memory-state' when restored from the service's saved state, 'warm-pool' when it was a VM of the service's warm
   * pool (restored paused ahead of time), 'handoff' when it arrived running from another cloudlet (docs/handoff.md),
   * 'cold-boot' otherwise.
   */
  launch: 'memory-state' | 'warm-pool' | 'cold-boot' | 'handoff';
  createdAt: string;
  readyAt: string | null;
}

/**
 * What the cloudlet keeps about an instance, stored with the instance itself (a VM's libvirt <metadata>, a
 * sandbox's state file) so that an agent restart can adopt it: the instance as the API shows it, plus where its
 * files are and how to tell that it is ready.
 */
export interface InstanceRecord extends Instance {
  dir: string;
  readiness: ReadinessProbe;
  /**
   * The anonymous callers of the plain KD face among the users, by address (addressKey), one entry per use; the
   * users neither listed here nor in `owners` are the operator's. Absent in records written before it existed.
   */
  anonymous?: string[];
  /**
   * Set on a VM of a warm pool, not (yet) an instance: paused, without a forward, never listed. `source` names the
   * service files it was restored from (a service updated since makes it stale); `memoryMib` what it takes of the
   * pool's memory budget.
   */
  pooled?: { source: string; memoryMib: number };
}

export interface StartRequest {
  serviceId: string;
  /** Join a ready instance of a shareable service instead of starting a new one, when there is one. */
  join: boolean;
  /** The host the client used to reach the API (from the Host header); the endpoint address when bound to all. */
  clientHost?: string;
  /** The authenticated device starting or joining it: recorded as an owner, whose end releases its use. */
  deviceId?: string;
  /**
   * An anonymous caller of the plain KD face (no device): its address (addressKey). Its use counts against the open
   * face's quotas, and only an anonymous caller may release it.
   */
  anonymousFrom?: string;
}

export interface Endpoint {
  address: string;
  port: number;
}

export interface StartResult {
  instance: Instance;
  joined: boolean;
  endpoint: Endpoint;
  /** Where this start spent its time (absent for a join, which launches nothing). */
  timings?: import('./timing').LaunchTimings;
}

/**
 * Who holds or releases a use of an instance: a paired device (releases only a use it holds), an anonymous caller of
 * the plain KD face by its address (releases only a use an anonymous caller holds), or the operator (any use: its
 * own first, then an anonymous one, then a device's).
 */
export type Stopper = { device: string } | { anonymous: string } | 'operator';

export interface StopResult {
  /** True when the VM was destroyed; false when other users still share it. */
  destroyed: boolean;
  users: number;
}

export interface SystemInfo {
  hostname: string;
  agentVersion: string;
  cpu: { cores: number; usagePercent: number; speedMhz: string; cacheKb: number };
  memory: { totalBytes: number; freeBytes: number };
  hypervisor: { uri: string; domainType: 'kvm' | 'qemu'; libvirtVersion: string };
  instances: number;
  discovery: DiscoveryStatus;
}

/** Where mDNS publication stands, and the instance name actually published (Avahi may have renamed it). */
export interface DiscoveryStatus {
  state: 'disabled' | 'unavailable' | 'registering' | 'published' | 'failed';
  name: string | null;
  detail?: string;
}

/** Another cloudlet seen on the local network (DNS-SD `_cloudlet._tcp`). */
export interface Peer {
  name: string;
  host: string;
  address: string;
  port: number;
  txt: Record<string, string>;
  interface: string;
  seenAt: string;
}

/** What discovery lets the core show: its status and the peers it sees. */
export interface DiscoveryView {
  status(): DiscoveryStatus;
  peers(): Peer[];
}

export interface HealthCheck {
  name: string;
  ok: boolean;
  detail?: string;
  /** A failing optional check (e.g. discovery without Avahi) is reported but leaves the report ok. */
  optional?: boolean;
}

export interface HealthReport {
  ok: boolean;
  checks: HealthCheck[];
  /** Where each optional part stands (core/optional-parts.ts); absent where the agent does not track them. */
  parts?: import('./optional-parts').OptionalPart[];
  /** What the agent's own work costs it now: figures for the operator and the scale benchmark, not health checks. */
  load?: AgentLoad;
}

export interface AgentLoad {
  /** The reconcile poll's wall time: the last tick's, and the median and most of the last ten (null before the first tick). */
  reconcileMs: { last: number; median: number; max: number } | null;
  /** How late the event loop ran its callbacks over the last complete 10 s (null for the first 10 s). */
  eventLoopDelayMs: { p50: number; p99: number; max: number } | null;
}

/** Cloudlet Push: an Android APK or a web-app bundle (a zip) that goes with a service. */
export type AppKind = 'android' | 'web';

/** What describes an app, as its operator gave it. */
export interface AppDescription {
  kind: AppKind;
  serviceId: string;
  name: string;
  description: string;
  packageName: string;
  version: string;
  /** The lowest OS version the app runs on (Android's for APKs), dotted numbers; '0' when any. */
  minOsVersion: string;
  tags: string[];
  /** The name the file is offered under. */
  fileName: string;
}

export interface App extends AppDescription {
  /** 24 hex digits (the shape of pycloud's Mongo ids). */
  id: string;
  size: number;
  md5: string;
  sha256: string;
  addedAt: string;
}

/** What an operator gives when adding an app; the checksums and size come from the file. */
export interface NewApp extends AppDescription {
  /** When given, the upload must hash to it (a damaged transfer is refused). */
  sha256?: string;
}

/** Every given field must match; `tags` matches an app sharing any one of them. */
export interface AppFilter {
  serviceId?: string;
  osName?: string;
  osVersion?: string;
  tags?: string[];
}

/** On-Demand VM Provisioning as the /v1 face offers it: Base VMs, recipes, provisioning, consoles. core/cloudlet.ts. */
export interface ProvisioningApi {
  listBases(): import('./bases').BaseVm[];
  /** By digest or name. */
  getBase(ref: string): import('./bases').BaseVm;
  importBase(dir: string, name: string): Promise<import('./bases').BaseVm>;
  /** One of the files a base consists of (to export it), by base reference and file name. */
  baseFile(ref: string, name: string): { file: import('./bases').BaseFile; path: string };
  listRecipes(): import('./recipe').Recipe[];
  getRecipe(id: string): import('./recipe').Recipe;
  /** Validate and store (or replace) a recipe sent by a client. */
  storeRecipe(json: unknown): Promise<import('./recipe').Recipe>;
  removeRecipe(id: string): Promise<void>;
  /** Start the recipe's service: from its cached result when there is one, else provisioned on demand. */
  /** `deviceId`: the device asking, recorded as the instance's owner (StartRequest). */
  provision(recipeId: string, req: { join: boolean; clientHost?: string; deviceId?: string }): Promise<StartResult>;
  /** Provision the recipe on a throwaway VM and keep the result as a Cached VM service. */
  cacheRecipe(recipeId: string): Promise<Service>;
  consoleTail(instanceId: string, maxBytes: number): Promise<string>;
  /** VM Synthesis from an overlay file on this machine: returns once the synthesized VM is ready. */
  synthesizeFile(path: string, options: SynthesisOptions): Promise<SynthesisResult>;
  /** A resumable upload of an overlay of `bytes` bytes; the synthesis runs as its bytes arrive. */
  createOverlayUpload(bytes: number, options: SynthesisOptions): Promise<UploadView<SynthesisResult>>;
  /** `deviceId`: the device asking; another device's upload is NOT_FOUND to it. */
  overlayUpload(id: string, deviceId?: string): UploadView<SynthesisResult>;
  /** Bytes of the upload from `offset`; the synthesis' result once the last byte is in. */
  appendOverlayUpload(id: string, offset: number, body: import('node:stream').Readable, deviceId?: string): Promise<AppendOutcome<SynthesisResult>>;
}

/** A resumable overlay upload as its client sees it (synthesis/uploads.ts keeps them). */
export interface UploadView<T> {
  id: string;
  bytes: number;
  received: number;
  state: 'receiving' | 'synthesizing' | 'done' | 'failed';
  /** The synthesis' result once done, its error once failed: for a client whose last answer was lost. */
  result: T | null;
  error: import('../errors').CloudletError | null;
}

export type AppendOutcome<T> = { complete: false; upload: UploadView<T> } | { complete: true; result: T };

/** How a synthesis is asked for: the client's host (for the endpoint), who asks, and a service id to keep the VM as. */
export interface SynthesisOptions {
  clientHost?: string;
  /** The paired device asking: it owns the instance (and the upload: no other device sees or continues it). */
  deviceId?: string;
  /** After the VM is ready, keep it as the Cached VM service of this id (disk and memory state as synthesized). */
  keepAs?: string;
}

/** A synthesis' start result, and the Cached VM service its VM was kept as, or why keeping it failed. */
export interface SynthesisResult extends StartResult {
  keptAs?: Service;
  keepError?: import('../errors').CloudletError;
}

/** What the HTTP faces (and later the CLI) call. One implementation: core/cloudlet.ts. */
export interface CloudletApi {
  listServices(): Service[];
  /**
   * Changes whenever a service or an app package is imported, replaced or removed: what a list of them shows can be
   * kept (serialized) while it is the same.
   */
  catalogRevision(): string;
  getService(id: string): Service;
  importService(dir: string): Promise<Service>;
  removeService(id: string): Promise<void>;
  /** Boot the service's VM, wait until it is ready, and keep its saved memory state so later starts restore it. */
  captureServiceState(id: string): Promise<Service>;
  listPackages(): Package[];
  getPackage(id: string): Package;
  importPackage(source: PackageSource): Promise<Package>;
  /** Refused while instances of the package run. */
  removePackage(id: string): Promise<void>;
  listInstances(): Instance[];
  getInstance(id: string): Instance;
  startInstance(req: StartRequest): Promise<StartResult>;
  /**
   * A device releases only a use it holds (FORBIDDEN otherwise); an anonymous caller only a use an anonymous caller
   * holds (INSTANCE_NOT_FOUND otherwise); the operator any.
   */
  stopInstance(id: string, by: Stopper): Promise<StopResult>;
  endpointFor(instance: Instance, clientHost?: string): Endpoint;
  systemInfo(): Promise<SystemInfo>;
  health(): Promise<HealthReport>;
  /** Instance state changes and launch progress as they happen; returns the unsubscribe function. */
  subscribe(listener: import('./events').EventListener): () => void;
  /** Other cloudlets discovered on the local network. */
  peers(): Peer[];
  listApps(filter?: AppFilter): App[];
  getApp(id: string): App;
  /** The app and where its file is, for streaming it to a client. */
  appFile(id: string): { app: App; path: string };
  /** Store an app from an upload of `length` bytes (refused up front above the configured limit). */
  addApp(meta: NewApp, content: import('node:stream').Readable, length: number): Promise<App>;
  removeApp(id: string): Promise<void>;
}
