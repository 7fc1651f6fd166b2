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
}

export interface Service {
  id: string;
  manifest: ServiceManifest;
  /** The service's directory inside the catalog. */
  dir: string;
  importedAt: string;
}

export type MechanismName = 'cached-vm';

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
  /** 'memory-state' when restored from the service's saved state, 'cold-boot' otherwise. */
  launch: 'memory-state' | 'cold-boot';
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
}

export interface StartRequest {
  serviceId: string;
  /** Join a ready instance of a shareable service instead of starting a new one, when there is one. */
  join: boolean;
  /** The host the client used to reach the API (from the Host header); the endpoint address when bound to all. */
  clientHost?: string;
  deviceId?: string;
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
}

export interface HealthCheck {
  name: string;
  ok: boolean;
  detail?: string;
}

export interface HealthReport {
  ok: boolean;
  checks: HealthCheck[];
}

/** What the HTTP faces (and later the CLI) call. One implementation: core/cloudlet.ts. */
export interface CloudletApi {
  listServices(): Service[];
  getService(id: string): Service;
  importService(dir: string): Promise<Service>;
  removeService(id: string): Promise<void>;
  /** Boot the service's VM, wait until it is ready, and keep its saved memory state so later starts restore it. */
  captureServiceState(id: string): Promise<Service>;
  listInstances(): Instance[];
  getInstance(id: string): Instance;
  startInstance(req: StartRequest): Promise<StartResult>;
  stopInstance(id: string): Promise<StopResult>;
  endpointFor(instance: Instance, clientHost?: string): Endpoint;
  systemInfo(): Promise<SystemInfo>;
  health(): Promise<HealthReport>;
}
