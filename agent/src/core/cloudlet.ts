import { chmod, mkdir, rm } from 'node:fs/promises';
import { randomUUID } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import type { AgentConfig } from '../config';
import { CloudletError } from '../errors';
import { convertImage, createLinkedClone } from '../images/qemu-img';
import type { Logger } from '../log';
import { CachedVmMechanism } from '../mechanisms/cached-vm';
import { buildDomainXml } from '../vm/domain-xml';
import { Hypervisor } from '../vm/hypervisor';
import { instanceDomainSpec, instanceFiles } from '../vm/instance-domain';
import { Catalog } from './catalog';
import { InstanceRegistry } from './instances';
import { PortAllocator } from './ports';
import { waitUntilReady } from './readiness';
import { HostMonitor } from './system-info';
import type { CloudletApi, Endpoint, HealthReport, Instance, InstanceRecord, Service, StartRequest, StartResult, StopResult, SystemInfo } from './types';

// From dist/agent/src/core/ up to the repository (or installed package) root.
export const AGENT_VERSION: string = (require('../../../../package.json') as { version: string }).version;

const WILDCARD = new Set(['0.0.0.0', '::', '']);

/**
 * The core: the catalog of cached services, the registry of running instances and the mechanisms that launch
 * them. The HTTP faces call only this (through CloudletApi).
 */
export class Cloudlet implements CloudletApi {
  private readonly host = new HostMonitor();

  private constructor(
    private readonly config: AgentConfig,
    private readonly hypervisor: Hypervisor,
    private readonly catalog: Catalog,
    private readonly ports: PortAllocator,
    private readonly registry: InstanceRegistry,
    private readonly cachedVm: CachedVmMechanism,
    private readonly log: Logger,
  ) {}

  static async open(config: AgentConfig, log: Logger): Promise<Cloudlet> {
    // QEMU runs as its own user and must reach the images below the data directory.
    await mkdir(config.dataDir, { recursive: true, mode: 0o755 });
    await chmod(config.dataDir, 0o755);
    const hypervisor = await Hypervisor.connect(config.libvirtUri, config.domainType, log);
    const staging = path.join(config.dataDir, 'tmp');
    const catalog = new Catalog(path.join(config.dataDir, 'services'), staging, log);
    await catalog.load();
    if (config.seedDir) await catalog.importSeeds(config.seedDir);
    const ports = new PortAllocator(config.forward.bindAddress, config.forward.portRange);
    const cachedVm = new CachedVmMechanism(hypervisor);
    const registry = new InstanceRegistry([cachedVm], ports, path.join(config.dataDir, 'instances'), staging, config.forward.bindAddress, log);
    await registry.adopt();
    registry.startReconciling(config.reconcileIntervalMs);
    return new Cloudlet(config, hypervisor, catalog, ports, registry, cachedVm, log);
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

  async startInstance(req: StartRequest): Promise<StartResult> {
    const service = this.catalog.get(req.serviceId);
    const started = await this.registry.start(service, req.join, this.cachedVm);
    return { ...started, endpoint: this.endpointFor(started.instance, req.clientHost) };
  }

  stopInstance(id: string): Promise<StopResult> {
    return this.registry.stop(id);
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
    const work = await this.catalog.workDir();
    const hostPort = await this.ports.reserve();
    const meta: InstanceRecord = {
      id: randomUUID(), serviceId: id, mechanism: 'cached-vm', state: 'starting', bindAddress: this.config.forward.bindAddress,
      hostPort, guestPort: service.manifest.port, shareable: false, users: 0, launch: 'cold-boot',
      createdAt: new Date().toISOString(), readyAt: null, dir: work, readiness: service.manifest.readiness,
    };
    const files = instanceFiles(work);
    try {
      await createLinkedClone(path.join(service.dir, service.manifest.disk), files.disk);
      // A cold boot even if the service already has a state: the new state must come from the current disk.
      const coldService: Service = { ...service, manifest: { ...service.manifest, state: null } };
      await this.hypervisor.boot(buildDomainXml(instanceDomainSpec(coldService, `cloudlet-capture-${meta.id.slice(0, 8)}`, meta, this.hypervisor.domainType)));
      await waitUntilReady(service.manifest.readiness, WILDCARD.has(meta.bindAddress) ? '127.0.0.1' : meta.bindAddress, hostPort, {
        stillAlive: async () => (await this.hypervisor.running()).has(meta.id),
      });
      const state = path.join(work, 'state.sav');
      await this.hypervisor.save(meta.id, state);
      const flat = path.join(work, 'captured.qcow2');
      await convertImage(files.disk, flat, 'qcow2');
      this.log(`captured the memory state of ${id}`);
      return await this.catalog.replaceDiskAndState(id, { disk: flat, state });
    } finally {
      await this.hypervisor.destroy(meta.id);
      await rm(work, { recursive: true, force: true });
      this.ports.release(hostPort);
    }
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
    };
  }

  async health(): Promise<HealthReport> {
    const libvirt = await this.hypervisor.isAlive();
    const checks = [{ name: 'libvirt', ok: libvirt, ...(libvirt ? {} : { detail: `connection to ${this.hypervisor.uri} is not alive` }) }];
    return { ok: checks.every((c) => c.ok), checks };
  }
}
