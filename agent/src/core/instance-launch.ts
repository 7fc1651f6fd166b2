import { mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { CloudletError, asCloudletError, withDetails } from '../errors';
import { noSpaceError } from '../system/disk-space';
import type { Logger } from '../log';
import { faultPoint } from '../system/fault-points';
import type { LaunchPhase } from './events';
import type { CapturingMechanism, LaunchPlan, Mechanism, WarmStart } from './mechanism';
import type { PortAllocator } from './ports';
import { boundedProbe, waitUntilReady } from './readiness';
import type { InstanceRuntime, SavedInstance } from './runtime';
import { PhaseTimer } from './timing';
import type { InstanceRecord, MechanismName, Workload } from './types';

/** Launches of one instance that end with its port taken before the registry gives up. */
const LAUNCH_ATTEMPTS = 3;
/** Bytes of console output attached to a failed launch's error (`details.console_tail`). */
const FAILURE_CONSOLE_BYTES = 4096;

/** Probing a wildcard bind goes through loopback. */
const probeHost = (bindAddress: string) => (bindAddress === '0.0.0.0' || bindAddress === '::' ? '127.0.0.1' : bindAddress);

/**
 * The steps of every launch, an instance's start and a memory-state capture alike: the record of the new instance, a
 * forwarded port (another one when some program took it meanwhile), the mechanism bringing the workload up on it, the
 * wait until its service answers there. What the registry does around them (listing the instance, its events, its
 * cleanup) is the registry's.
 */
export class Launcher {
  constructor(
    private readonly ports: PortAllocator,
    private readonly bindAddress: string,
    /** The longest any launch waits for its service to answer. */
    private readonly readyWithinMs: number,
    private readonly log: Logger,
  ) {}

  /** A capture's throwaway instance in `dir` (InstanceRegistry.capture, which holds a launch slot for it). */
  async capture<W extends Workload, T>(
    dir: string,
    service: W,
    mechanism: CapturingMechanism<W>,
    keep: (saved: SavedInstance & { dir: string }) => Promise<T>,
  ): Promise<T> {
    const id = path.basename(dir);
    let record = this.newRecord(service, mechanism.name, id, dir);
    try {
      await mkdir(dir, { mode: 0o755 });
      record = await this.bringUp(mechanism, record, {
        service,
        domainName: `cloudlet-capture-${id.slice(0, 8)}`,
        timer: new PhaseTimer(),
        progress: () => {},
        admit: async () => {},
      });
      await this.untilServing(record, mechanism.runtime, new PhaseTimer());
      return await keep({ dir, ...(await mechanism.runtime.save(record, dir)) });
    } catch (err) {
      throw await withConsoleTail(asCloudletError(await noSpaceError(err, dir, `capture the state of ${service.id}`)), mechanism.runtime, dir);
    } finally {
      // With the runtime away the instance cannot be ended now: its files and port still go, and the reconnect ends
      // it (a capture whose directory is gone is over).
      await mechanism.runtime.destroy(id).catch((err: Error) => this.log(`capture instance ${id} is not ended yet: ${err.message}`));
      await rm(dir, { recursive: true, force: true });
      if (record.hostPort) this.ports.release(record.hostPort);
    }
  }

  /** A new instance of `service` in `dir`, with no port and no users yet. */
  newRecord(service: Workload, mechanism: MechanismName, id: string, dir: string): InstanceRecord {
    return {
      id,
      serviceId: service.id,
      mechanism,
      state: 'starting',
      bindAddress: this.bindAddress,
      hostPort: 0,
      guestPort: service.manifest.port,
      shareable: service.manifest.shareable,
      users: 0,
      owners: [],
      launch: service.manifest.state ? 'memory-state' : 'cold-boot',
      createdAt: new Date().toISOString(),
      readyAt: null,
      dir,
      readiness: boundedProbe(service.manifest.readiness, this.readyWithinMs),
    };
  }

  /**
   * Reserve a port and have the mechanism bring the workload up on it: the record as launched. PORT_TAKEN (some other
   * program bound the port after the test bind) costs one more attempt on another port, unless the workload can only
   * be launched once. A failed attempt leaves no domain, no port and an empty directory.
   */
  async bringUp<W extends Workload>(mechanism: Mechanism<W>, base: InstanceRecord, plan: Omit<LaunchPlan<W>, 'record'>): Promise<InstanceRecord> {
    for (let attempt = 1; ; attempt++) {
      faultPoint('launch:before-port');
      const record: InstanceRecord = { ...base, hostPort: await this.ports.reserve() };
      faultPoint('launch:after-port');
      try {
        return { ...record, launch: await mechanism.launch({ ...plan, record }) };
      } catch (err) {
        // The launch's error is what the caller must see; a clean-up that fails too (libvirt gone meanwhile) is
        // logged, and what it left is ended by the reconcile poll once libvirt answers again.
        await mechanism.runtime
          .destroy(record.id)
          .catch((cleanup: Error) => this.log(`could not end ${record.id} after its failed launch: ${cleanup.message}`))
          .finally(() => this.ports.release(record.hostPort));
        if (!(err instanceof CloudletError && err.code === 'PORT_TAKEN') || mechanism.launchesOnce || attempt >= LAUNCH_ATTEMPTS) throw err;
        this.log(`port ${record.hostPort} was taken meanwhile; launching ${record.serviceId} again on another port`);
        await rm(record.dir, { recursive: true, force: true });
        await mkdir(record.dir, { mode: 0o755 });
      }
    }
  }

  /**
   * Hand a VM of a warm pool (paused, no forward) to a start. The start's record goes into its runtime first, so an
   * agent killed from then on finds an instance being started (ready in time or ended), never a pooled VM with a
   * forward; then a port, the forward, and its vCPUs run. PORT_TAKEN costs another port. null when it could not be
   * assigned: the pooled VM is destroyed and its directory emptied, never handed to anyone, and the start restores.
   */
  async assign(mechanism: Mechanism<Workload>, warm: WarmStart<Workload>, base: InstanceRecord, timer: PhaseTimer): Promise<InstanceRecord | null> {
    for (let attempt = 1; ; attempt++) {
      const record: InstanceRecord = { ...base, hostPort: await this.ports.reserve(), launch: 'warm-pool' };
      try {
        await timer.time('libvirt', async () => {
          await mechanism.runtime.writeRecord(record);
          faultPoint('pool:after-assigned-record');
          await warm.assign(record);
        });
        return record;
      } catch (err) {
        this.ports.release(record.hostPort);
        if (err instanceof CloudletError && err.code === 'PORT_TAKEN' && attempt < LAUNCH_ATTEMPTS) continue;
        this.log(`pooled VM ${base.id} of ${base.serviceId} could not be assigned (${(err as Error).message}); destroyed, the start restores instead`);
        await mechanism.runtime.destroy(base.id);
        await rm(base.dir, { recursive: true, force: true });
        await mkdir(base.dir, { mode: 0o755 });
        return null;
      }
    }
  }

  /**
   * Wait until the instance's service answers through its forward, by the record's deadline (its probe's timeout from
   * its creation, never more than the box allows: an adopted record may carry a timeout from before the bound was lowered).
   */
  async untilServing(record: InstanceRecord, runtime: InstanceRuntime, timer: PhaseTimer): Promise<void> {
    const probe = boundedProbe(record.readiness, this.readyWithinMs);
    const remaining = Date.parse(record.createdAt) + probe.timeout_ms - Date.now();
    await timer.time('guest', () =>
      waitUntilReady(probe, probeHost(record.bindAddress), record.hostPort, {
        timeoutMs: Math.max(remaining, 0),
        // While the runtime is unreachable the instance is presumed alive: the probe itself still tells when it serves.
        stillAlive: () =>
          runtime.running().then(
            (ids) => ids.has(record.id),
            (err: unknown) => err instanceof CloudletError && err.code === 'HYPERVISOR_UNAVAILABLE',
          ),
      }),
    );
  }
}

/** libvirt domain names must be unique; the service id keeps them readable in `virsh list`. */
export function domainName(serviceId: string, id: string): string {
  return `cloudlet-${serviceId}-${id.slice(0, 8)}`;
}

/** The error of a failed launch with the end of the instance's console output, when its runtime keeps one. */
export async function withConsoleTail(error: CloudletError, runtime: InstanceRuntime, dir: string): Promise<CloudletError> {
  const tail = await runtime.consoleTail?.(dir, FAILURE_CONSOLE_BYTES).catch(() => undefined);
  return tail ? withDetails(error, { console_tail: tail }) : error;
}

/**
 * Where each phase starts in the launch's 0–100; streaming a memory state fills the restoring share by bytes, and
 * applying an overlay fills the share before restoring.
 */
const PHASE_PERCENT: Record<LaunchPhase, number> = {
  synthesizing: 0,
  cloning: 0,
  restoring: 10,
  booting: 10,
  provisioning: 30,
  'waiting-ready': 70,
  ready: 100,
};

export function launchPercent(phase: LaunchPhase, bytes?: { done: number; total: number }): number {
  if (!bytes || bytes.total === 0) return PHASE_PERCENT[phase];
  const end = phase === 'synthesizing' ? PHASE_PERCENT.restoring : PHASE_PERCENT['waiting-ready'];
  return Math.round(PHASE_PERCENT[phase] + (end - PHASE_PERCENT[phase]) * (bytes.done / bytes.total));
}
