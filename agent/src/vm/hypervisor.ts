import { constants as fsc } from 'node:fs';
import { access, readFile } from 'node:fs/promises';
import { Connection, DomainEvent, DomainFlags, LibvirtError, StoppedDetail, libvirtInfo } from '../../../native/libvirt';
import { CloudletError } from '../errors';
import type { Logger } from '../log';
import type { InstanceRecord } from '../core/types';
import type { InstanceEnding, InstanceRuntime } from '../mechanisms/mechanism';
import { readConsoleTail } from './console-log';
import { METADATA_KEY, METADATA_URI, metadataElement, parseMetadataElement } from './domain-xml';
import { instanceFiles } from './instance-domain';
import { prepareRestoreSource, type SaveImageHeader, type StreamProgress } from './save-image';

/**
 * libvirt failures become HYPERVISOR_ERROR carrying libvirt's own code and message; QEMU refusing a forward whose
 * host port is taken becomes NO_FREE_PORT, which the registry answers by retrying on another port.
 */
function hypervisorError(err: unknown): unknown {
  if (!(err instanceof LibvirtError)) return err;
  if (/Could not set up host forwarding rule/i.test(err.message)) return new CloudletError('NO_FREE_PORT', err.message, { cause: err });
  const code = err.code === 'LIBVIRT_UNAVAILABLE' || err.code === 'LIBVIRT_UNSUPPORTED' || err.code === 'NATIVE_SHIM_MISSING' || err.code === 'CONNECTION_CLOSED'
    ? 'HYPERVISOR_UNAVAILABLE' : 'HYPERVISOR_ERROR';
  return new CloudletError(code, err.message, { cause: err, details: { libvirt_code: err.code } });
}

async function mapped<T>(call: Promise<T>): Promise<T> {
  try {
    return await call;
  } catch (err) {
    throw hypervisorError(err);
  }
}


/**
 * KVM only when it really works: /dev/kvm alone is not proof (nested or paravirtualised KVM expose it without
 * hardware virtualisation), so the CPU must advertise vmx/svm and libvirt must offer the kvm domain type.
 */
async function kvmWorks(conn: Connection): Promise<boolean> {
  try {
    await access('/dev/kvm', fsc.R_OK | fsc.W_OK);
    if (!/^flags\s*:.*\b(vmx|svm)\b/m.test(await readFile('/proc/cpuinfo', 'utf8'))) return false;
    return /<domain>kvm<\/domain>/.test(await conn.domainCapabilities('kvm'));
  } catch {
    return false;
  }
}

/** The agent's view of libvirt: Service VM domains identified by our <metadata>. Only this module uses native/. */
export class Hypervisor implements InstanceRuntime {
  private constructor(
    private readonly conn: Connection,
    readonly domainType: 'kvm' | 'qemu',
    readonly libvirtVersion: string,
    private readonly log: Logger,
  ) {}

  static async connect(uri: string, requested: 'auto' | 'kvm' | 'qemu', log: Logger): Promise<Hypervisor> {
    const libvirtVersion = mappedSync(() => libvirtInfo().libraryVersion);
    const conn = await mapped(Connection.open(uri));
    const domainType = requested === 'auto' ? ((await kvmWorks(conn)) ? 'kvm' : 'qemu') : requested;
    log(`connected to ${uri} (libvirt ${libvirtVersion}); Service VMs run as domain type ${domainType}`);
    return new Hypervisor(conn, domainType, libvirtVersion, log);
  }

  get uri(): string {
    return this.conn.uri;
  }

  /** Start a transient domain: it disappears from libvirt when it stops, so nothing is left defined. */
  async boot(xml: string): Promise<void> {
    await mapped(this.conn.createDomain(xml));
  }

  /** Restore a new transient domain from a service's saved memory state, with the instance's own XML. */
  async restore(state: { path: string; header: SaveImageHeader }, xml: string, workDir: string, onProgress?: StreamProgress): Promise<void> {
    const source = await prepareRestoreSource(state.path, state.header, xml, workDir, onProgress);
    try {
      await Promise.all([mapped(this.conn.restoreDomain(source.path, null, DomainFlags.VIR_DOMAIN_SAVE_RUNNING)), source.done()]);
    } finally {
      await source.dispose();
    }
  }

  /** Save the domain's memory state to `path`; the domain stops. */
  async save(uuid: string, path: string): Promise<void> {
    await mapped(this.conn.saveDomain(uuid, path, null, 0));
  }

  /** Destroy a domain; one that is already gone counts as destroyed. */
  async destroy(uuid: string): Promise<void> {
    try {
      await this.conn.destroyDomain(uuid);
    } catch (err) {
      if (err instanceof LibvirtError && (err.code === 'VIR_ERR_NO_DOMAIN' || err.code === 'VIR_ERR_OPERATION_INVALID')) return;
      throw hypervisorError(err);
    }
  }

  /** UUIDs of every running domain: the cheap call the registry polls to notice VMs that ended outside the agent. */
  async running(): Promise<Set<string>> {
    const domains = await mapped(this.conn.listDomains(DomainFlags.VIR_CONNECT_LIST_DOMAINS_ACTIVE));
    return new Set(domains.map((d) => d.uuid));
  }

  async writeRecord(meta: InstanceRecord): Promise<void> {
    await mapped(this.conn.setMetadata(meta.id, metadataElement(meta), METADATA_KEY, METADATA_URI, DomainFlags.VIR_DOMAIN_AFFECT_LIVE));
  }

  /** Every running domain that carries our metadata: the instances to adopt after an agent restart. */
  async listInstances(): Promise<InstanceRecord[]> {
    const found: InstanceRecord[] = [];
    for (const uuid of await this.running()) {
      try {
        const element = await this.conn.getMetadata(uuid, METADATA_URI, DomainFlags.VIR_DOMAIN_AFFECT_LIVE);
        const meta = element ? parseMetadataElement(element) : null;
        if (meta) found.push(meta);
      } catch (err) {
        // A domain that vanished between the list and the read is simply not ours to adopt.
        if (!(err instanceof LibvirtError && err.code === 'VIR_ERR_NO_DOMAIN')) this.log(`cannot read metadata of ${uuid}: ${(err as Error).message}`);
      }
    }
    return found;
  }

  /** libvirt's lifecycle events, reduced to the one the registry needs: a domain stopped, and why. */
  async watchEnded(listener: (id: string, ending: InstanceEnding) => void): Promise<void> {
    await mapped(this.conn.watchLifecycle((events) => {
      for (const e of events) {
        if (e.event === DomainEvent.Stopped) listener(e.uuid, STOPPED_ENDINGS[e.detail as StoppedDetail] ?? { state: 'stopped', reason: 'vanished' });
      }
    }));
  }

  /** The guest's serial console, which every instance domain logs to a file in its directory. */
  consoleTail(dir: string, maxBytes: number): Promise<string> {
    return readConsoleTail(instanceFiles(dir).consoleLog, maxBytes);
  }

  async isAlive(): Promise<boolean> {
    return this.conn.isAlive().catch(() => false);
  }

  async close(): Promise<void> {
    await this.conn.close();
  }
}

/** virDomainEventStoppedDetailType → how the instance ended. QEMU killed from outside is Failed (monitor EOF). */
const STOPPED_ENDINGS: Record<StoppedDetail, InstanceEnding> = {
  [StoppedDetail.Shutdown]: { state: 'stopped', reason: 'shutdown' },
  [StoppedDetail.Destroyed]: { state: 'stopped', reason: 'destroyed' },
  [StoppedDetail.Crashed]: { state: 'crashed', reason: 'crashed' },
  [StoppedDetail.Migrated]: { state: 'stopped', reason: 'migrated' },
  [StoppedDetail.Saved]: { state: 'stopped', reason: 'saved' },
  [StoppedDetail.Failed]: { state: 'crashed', reason: 'failed' },
  [StoppedDetail.FromSnapshot]: { state: 'stopped', reason: 'vanished' },
};

function mappedSync<T>(fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw hypervisorError(err);
  }
}
