import path from 'node:path';
import type { AgentConfig } from './config';
import { AppStore } from './core/apps';
import { BaseStore } from './core/bases';
import { Catalog } from './core/catalog';
import { Cloudlet } from './core/cloudlet';
import { InstanceRegistry } from './core/instances';
import { LaunchGate } from './core/launch-gate';
import { PortAllocator } from './core/ports';
import { RecipeStore } from './core/recipes';
import { availableMemory } from './core/system-info';
import { asCloudletError } from './errors';
import type { Logger } from './log';
import { AppVirtMechanism } from './mechanisms/app-virt';
import { CachedVmMechanism } from './mechanisms/cached-vm';
import { OnDemandMechanism } from './mechanisms/on-demand';
import { SynthesisMechanism } from './mechanisms/synthesis';
import { vmSynthesis } from './mechanisms/synthesis-overlays';
import { DEFAULT_PACKAGE_LIMITS, PackageStore } from './packages/store';
import { SandboxRuntime } from './sandbox/sandbox-runtime';
import { UploadSessions } from './synthesis/uploads';
import { checkReachableByQemu, makeDataDir } from './system/data-dir';
import { Hypervisor } from './vm/hypervisor';
import type { HandoffHost } from './fleet/handoff-target';

/** An overlay upload that gets no bytes for this long is abandoned; a finished one is remembered this long. */
const OVERLAY_UPLOAD_IDLE_MS = 10 * 60_000;
const OVERLAY_UPLOAD_KEEP_MS = 10 * 60_000;
/** Unfinished overlay uploads one device may have at a time (the operator's are not limited). */
const OVERLAY_UPLOADS_PER_DEVICE = 2;

/**
 * The composition root of the core: connect to libvirt, open the stores under the data directory, make the
 * mechanisms on their runtimes, rebuild the registry from what runs, and hand it all to the core's facade.
 * `libvirtCalls` is told how long each libvirt call took (metrics).
 */
export async function composeCloudlet(
  config: AgentConfig,
  log: Logger,
  libvirtCalls?: (call: string, seconds: number) => void,
): Promise<{ cloudlet: Cloudlet; handoffHost: HandoffHost }> {
  // QEMU runs as its own user and must reach the images below the data directory.
  await makeDataDir(config.dataDir);
  const hypervisor = await Hypervisor.connect(config.libvirtUri, config.domainType, log, libvirtCalls);
  await checkReachableByQemu(config.dataDir, await hypervisor.qemuIdentity(), log);
  const staging = path.join(config.dataDir, 'tmp');
  const catalog = new Catalog(path.join(config.dataDir, 'services'), staging, log);
  await catalog.load();
  if (config.seedDir) await catalog.importSeeds(config.seedDir);
  const ports = new PortAllocator(config.forward.bindAddress, config.forward.portRange);
  const packages = new PackageStore(path.join(config.dataDir, 'packages'), staging, (id) => catalog.has(id), log, {
    ...DEFAULT_PACKAGE_LIMITS,
    maxBytes: config.packages.maxUploadBytes,
  });
  await packages.load();
  const instancesDir = path.join(config.dataDir, 'instances');
  // Without cgroups (a container, a private mount namespace) the agent still serves VMs; packages just cannot start.
  const appVirt = await SandboxRuntime.open(instancesDir, config.packages, log).then(
    (runtime) => new AppVirtMechanism(runtime),
    (err: unknown) => {
      log(`app packages cannot run on this host: ${(err as Error).message}`);
      return asCloudletError(err);
    },
  );
  const cachedVm = new CachedVmMechanism(hypervisor);
  const onDemand = new OnDemandMechanism(hypervisor);
  const synthesis = new SynthesisMechanism(hypervisor);
  const registry = new InstanceRegistry(
    [cachedVm, ...(appVirt instanceof AppVirtMechanism ? [appVirt] : []), onDemand, synthesis],
    ports,
    instancesDir,
    staging,
    config.forward.bindAddress,
    log,
    new LaunchGate({ concurrent: config.limits.concurrentLaunches, queue: config.limits.queuedLaunches, readyWithinMs: config.limits.readinessTimeoutMs }),
    { perAddress: config.limits.anonymousInstancesPerAddress, total: config.limits.anonymousInstances },
    { mechanism: cachedVm, sizing: config.pool, availableMemory },
  );
  await registry.adopt();
  registry.startReconciling(config.reconcileIntervalMs, config.libvirtEvents);
  registry.pool?.start(() => catalog.list(), config.reconcileIntervalMs);
  const apps = new AppStore(path.join(config.dataDir, 'apps'), staging, config.apps.maxUploadBytes, log);
  await apps.load();
  const bases = new BaseStore(path.join(config.dataDir, 'bases'), () => catalog.workDir(), log);
  await bases.load();
  const recipes = new RecipeStore(path.join(config.dataDir, 'recipes'), log);
  await recipes.load();
  const handoffHost: HandoffHost = {
    hypervisor,
    registry,
    ports,
    services: catalog,
    instancesDir,
    bindAddress: config.forward.bindAddress,
    readyWithinMs: config.limits.readinessTimeoutMs,
  };
  const cloudlet = await Cloudlet.open({
    config,
    log,
    hypervisor,
    catalog,
    packages,
    apps,
    bases,
    recipes,
    registry,
    cachedVm,
    onDemand,
    appVirt,
    vmSynthesis: vmSynthesis(synthesis, config.dataDir, log),
    overlayUploads: (synthesize) =>
      new UploadSessions(path.join(config.dataDir, 'uploads'), synthesize, OVERLAY_UPLOAD_IDLE_MS, OVERLAY_UPLOAD_KEEP_MS, log, {
        ownerOf: (options) => options.deviceId,
        max: OVERLAY_UPLOADS_PER_DEVICE,
      }),
  });
  return { cloudlet, handoffHost };
}
