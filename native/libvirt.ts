/**
 * libvirt for the agent: a Connection whose every call runs on the libuv threadpool through the C shim
 * (libvirt-shim.ts, see native/README.md), so none blocks the event loop; and the libvirt types and flags it speaks.
 * The one module the rest imports (vm/hypervisor.ts, tests, benchmarks).
 */
import { performance } from 'node:perf_hooks';
import { LibvirtError } from './libvirt-error';
import {
  callShim,
  formatVersion,
  libvirtInfo,
  readDetail,
  readNothing,
  readText,
  readValue,
  type ResultReader,
  type ShimArg,
  type ShimFunction,
} from './libvirt-shim';

export { LibvirtError } from './libvirt-error';
export { libvirtInfo, type LibvirtInfo } from './libvirt-shim';

export const enum DomainState {
  NoState = 0,
  Running = 1,
  Blocked = 2,
  Paused = 3,
  Shutdown = 4,
  Shutoff = 5,
  Crashed = 6,
  PMSuspended = 7,
}

/** virDomainEventType: what a lifecycle event says happened; `detail` refines it (e.g. StoppedDetail). */
export const enum DomainEvent {
  Defined = 0,
  Undefined = 1,
  Started = 2,
  Suspended = 3,
  Resumed = 4,
  Stopped = 5,
  Shutdown = 6,
  PMSuspended = 7,
  Crashed = 8,
}

/** virDomainEventStoppedDetailType */
export const enum StoppedDetail {
  Shutdown = 0,
  Destroyed = 1,
  Crashed = 2,
  Migrated = 3,
  Saved = 4,
  Failed = 5,
  FromSnapshot = 6,
}

export interface LifecycleEvent {
  uuid: string;
  event: DomainEvent;
  detail: number;
  /** When libvirt's event loop delivered it (epoch ms). */
  atMs: number;
}

export interface LifecycleWatch {
  /** Stops the callbacks; resolves once the last batch has been handed to the listener. */
  close(): Promise<void>;
}

/** Told of each call made on a connection: its method's name and how long it took, in seconds. */
export type CallObserver = (call: string, seconds: number) => void;

export interface DomainSummary {
  uuid: string;
  name: string;
  state: DomainState;
  reason: number;
  persistent: boolean;
  active: boolean;
}

/** libvirt flag values, named as in libvirt's headers; combine with `|`. */
export const DomainFlags = {
  // virDomainModificationImpact (setMetadata, getMetadata)
  VIR_DOMAIN_AFFECT_CURRENT: 0,
  VIR_DOMAIN_AFFECT_LIVE: 1 << 0,
  VIR_DOMAIN_AFFECT_CONFIG: 1 << 1,
  // virDomainXMLFlags (domainXml)
  VIR_DOMAIN_XML_SECURE: 1 << 0,
  VIR_DOMAIN_XML_INACTIVE: 1 << 1,
  VIR_DOMAIN_XML_MIGRATABLE: 1 << 3,
  // virDomainCreateFlags (createDomain)
  VIR_DOMAIN_START_PAUSED: 1 << 0,
  VIR_DOMAIN_START_AUTODESTROY: 1 << 1,
  VIR_DOMAIN_START_VALIDATE: 1 << 4,
  // virDomainSaveRestoreFlags (saveDomain, restoreDomain)
  VIR_DOMAIN_SAVE_BYPASS_CACHE: 1 << 0,
  VIR_DOMAIN_SAVE_RUNNING: 1 << 1,
  VIR_DOMAIN_SAVE_PAUSED: 1 << 2,
  // virDomainQemuMonitorCommandFlags (qemuMonitorCommand)
  VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP: 1 << 0,
  // virDomainUndefineFlagsValues (undefineDomain)
  VIR_DOMAIN_UNDEFINE_MANAGED_SAVE: 1 << 0,
  VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA: 1 << 1,
  VIR_DOMAIN_UNDEFINE_NVRAM: 1 << 2,
  VIR_DOMAIN_UNDEFINE_KEEP_NVRAM: 1 << 3,
  VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA: 1 << 4, // libvirt >= 5.6.0
  // virConnectListAllDomainsFlags (listDomains; 0 lists all)
  VIR_CONNECT_LIST_DOMAINS_ACTIVE: 1 << 0,
  VIR_CONNECT_LIST_DOMAINS_INACTIVE: 1 << 1,
  VIR_CONNECT_LIST_DOMAINS_PERSISTENT: 1 << 2,
  VIR_CONNECT_LIST_DOMAINS_TRANSIENT: 1 << 3,
  VIR_CONNECT_LIST_DOMAINS_RUNNING: 1 << 4,
  VIR_CONNECT_LIST_DOMAINS_PAUSED: 1 << 5,
  VIR_CONNECT_LIST_DOMAINS_SHUTOFF: 1 << 6,
  // virDomainMigrateFlags (migrateToUri3)
  VIR_MIGRATE_LIVE: 1 << 0,
  VIR_MIGRATE_PEER2PEER: 1 << 1,
  VIR_MIGRATE_PERSIST_DEST: 1 << 3,
  VIR_MIGRATE_UNDEFINE_SOURCE: 1 << 4,
  VIR_MIGRATE_NON_SHARED_INC: 1 << 7,
  VIR_MIGRATE_AUTO_CONVERGE: 1 << 13,
} as const;

/** A live migration: where the other libvirtd is, and the parameters of virDomainMigrateToURI3 the agent uses. */
export interface MigrationTarget {
  /** The other libvirtd's URI, as this libvirtd connects to it (peer-to-peer). */
  dconnuri: string;
  /** VIR_MIGRATE_PARAM_URI: where QEMU's migration stream goes. */
  migrateUri: string;
  /** VIR_MIGRATE_PARAM_DISKS_URI: where the disk copy (NBD) goes. */
  disksUri: string;
  /** VIR_MIGRATE_PARAM_DEST_XML: the domain as the other side defines it. */
  destXml: string;
  /** VIR_MIGRATE_PARAM_MIGRATE_DISKS: the one disk (target name) whose top layer is copied. */
  disk: string;
}

/** A job's progress (virDomainGetJobStats); absent fields are ones libvirt did not report. */
export interface JobStats {
  /** virDomainJobType: 0 none, 1 bounded, 2 unbounded, 3 completed, 4 failed, 5 cancelled. */
  type: number;
  data_total?: number;
  data_processed?: number;
  data_remaining?: number;
  memory_total?: number;
  memory_processed?: number;
  disk_total?: number;
  disk_processed?: number;
  time_elapsed_ms?: number;
  downtime_ms?: number;
}

/** Resolves to null instead of rejecting when the call fails with libvirt error virCode. */
async function nullWhen<T>(virCode: number, call: Promise<T>): Promise<T | null> {
  try {
    return await call;
  } catch (err) {
    if (err instanceof LibvirtError && err.virCode === virCode) return null;
    throw err;
  }
}
const VIR_ERR_NO_DOMAIN = 42;
const VIR_ERR_NO_DOMAIN_METADATA = 80;

// ---- connection ----

/** How long one clv_watch_next call may block a pool thread before it returns empty-handed and is called again. */
const WATCH_WAIT_MS = 1000;

export class Connection {
  readonly uri: string;
  /** virConnectPtr as an integer. */
  readonly #handle: number;
  readonly #inFlight = new Set<Promise<unknown>>();
  readonly #watches = new Set<LifecycleWatch>();
  readonly #observer: CallObserver | undefined;
  #closed: Promise<void> | undefined;

  private constructor(uri: string, handle: number, observer: CallObserver | undefined) {
    this.uri = uri;
    this.#handle = handle;
    this.#observer = observer;
  }

  /** `observer` is told how long each call on the connection took (metrics), failed ones included. */
  static async open(uri: string, observer?: CallObserver): Promise<Connection> {
    libvirtInfo();
    return new Connection(uri, await callShim(readValue, 'clv_open', uri), observer);
  }

  /** Waits for the calls in flight, then closes the libvirt connection. Idempotent. */
  close(): Promise<void> {
    this.#closed ??= (async () => {
      await Promise.allSettled([...this.#watches].map((w) => w.close()));
      await Promise.allSettled(this.#inFlight);
      await callShim(readNothing, 'clv_close', this.#handle);
    })();
    return this.#closed;
  }

  async isAlive(): Promise<boolean> {
    return (await this.#call('isAlive', readValue, 'clv_is_alive')) === 1;
  }

  /** e.g. "7.2.0" for QEMU 7.2.0 */
  async hypervisorVersion(): Promise<string> {
    return formatVersion(await this.#call('hypervisorVersion', readValue, 'clv_hypervisor_version'));
  }

  capabilities(): Promise<string> {
    return this.#call('capabilities', readText, 'clv_capabilities');
  }

  /** Emulator and machine are left for libvirt to choose. */
  domainCapabilities(virttype: string, arch?: string): Promise<string> {
    return this.#call('domainCapabilities', readText, 'clv_domain_capabilities', virttype, arch ?? '');
  }

  /** Defines a persistent domain; resolves to its UUID. */
  defineDomain(xml: string): Promise<string> {
    return this.#call('defineDomain', readText, 'clv_define_domain', xml);
  }

  /** Creates and starts a transient domain (virDomainCreateXML); resolves to its UUID. */
  createDomain(xml: string, flags = 0): Promise<string> {
    return this.#call('createDomain', readText, 'clv_create_domain', xml, flags);
  }

  startDomain(uuid: string): Promise<void> {
    return this.#call('startDomain', readNothing, 'clv_start_domain', uuid);
  }

  destroyDomain(uuid: string): Promise<void> {
    return this.#call('destroyDomain', readNothing, 'clv_destroy_domain', uuid);
  }

  undefineDomain(uuid: string, flags = 0): Promise<void> {
    return this.#call('undefineDomain', readNothing, 'clv_undefine_domain', uuid, flags);
  }

  /** The UUID of the domain called name, or null when there is none. */
  lookupByName(name: string): Promise<string | null> {
    return nullWhen(VIR_ERR_NO_DOMAIN, this.#call('lookupByName', readText, 'clv_lookup_by_name', name));
  }

  async domainExists(uuid: string): Promise<boolean> {
    const found = await nullWhen(
      VIR_ERR_NO_DOMAIN,
      this.#call('domainExists', () => true, 'clv_lookup_by_uuid', uuid),
    );
    return found === true;
  }

  domainState(uuid: string): Promise<{ state: DomainState; reason: number }> {
    return this.#call('domainState', (result) => ({ state: readValue(result), reason: readDetail(result) }), 'clv_domain_state', uuid);
  }

  domainXml(uuid: string, flags = 0): Promise<string> {
    return this.#call('domainXml', readText, 'clv_domain_xml', uuid, flags);
  }

  /** The <metadata> element in namespace uri, or null when the domain has none. */
  getMetadata(uuid: string, uri: string, flags = 0): Promise<string | null> {
    return nullWhen(VIR_ERR_NO_DOMAIN_METADATA, this.#call('getMetadata', readText, 'clv_get_metadata', uuid, uri, flags));
  }

  /** Sets (or with xmlElement null, removes) the <metadata> element in namespace uri, prefixed key. */
  setMetadata(uuid: string, xmlElement: string | null, key: string, uri: string, flags = 0): Promise<void> {
    return this.#call('setMetadata', readNothing, 'clv_set_metadata', uuid, xmlElement ?? '', key, uri, flags);
  }

  listDomains(flags = 0): Promise<DomainSummary[]> {
    return this.#call('listDomains', (result) => JSON.parse(readText(result)) as DomainSummary[], 'clv_list_domains', flags);
  }

  /** Saves the running domain's memory to path and stops it (virDomainSaveFlags). */
  saveDomain(uuid: string, path: string, dxml: string | null = null, flags = 0): Promise<void> {
    return this.#call('saveDomain', readNothing, 'clv_save_domain', uuid, path, dxml ?? '', flags);
  }

  /** Starts a domain from a save file, optionally with a replacement XML (virDomainRestoreFlags). */
  restoreDomain(path: string, dxml: string | null = null, flags = 0): Promise<void> {
    return this.#call('restoreDomain', readNothing, 'clv_restore_domain', path, dxml ?? '', flags);
  }

  /** Resumes a paused domain's vCPUs (virDomainResume). */
  resumeDomain(uuid: string): Promise<void> {
    return this.#call('resumeDomain', readNothing, 'clv_resume_domain', uuid);
  }

  /**
   * Sends a command to the domain's QEMU monitor (virDomainQemuMonitorCommand, from libvirt-qemu.so.0, loaded on first
   * use); resolves to QEMU's reply. With VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP the command is a human monitor command,
   * whose failures come back as text in the reply, not as an error. libvirt marks the domain tainted (custom-monitor).
   */
  qemuMonitorCommand(uuid: string, command: string, flags = 0): Promise<string> {
    return this.#call('qemuMonitorCommand', readText, 'clv_qemu_monitor_command', uuid, command, flags);
  }

  /** Live-migrates the domain to another libvirtd (virDomainMigrateToURI3); resolves when the migration ended. */
  migrateToUri3(uuid: string, target: MigrationTarget, flags: number): Promise<void> {
    const { dconnuri, migrateUri, disksUri, destXml, disk } = target;
    return this.#call('migrateToUri3', readNothing, 'clv_migrate_to_uri3', uuid, dconnuri, migrateUri, disksUri, destXml, disk, flags);
  }

  /** The progress of the domain's current job (a migration). */
  jobStats(uuid: string): Promise<JobStats> {
    return this.#call('jobStats', (result) => JSON.parse(readText(result)) as JobStats, 'clv_job_stats', uuid);
  }

  /** Cancels the domain's current job (virDomainAbortJob). */
  abortJob(uuid: string): Promise<void> {
    return this.#call('abortJob', readNothing, 'clv_abort_job', uuid);
  }

  /**
   * Every domain's lifecycle events, in order, as libvirt's event loop (a thread of the shim) receives them. One
   * pool thread waits for them while the watch is open.
   */
  async watchLifecycle(listener: (events: LifecycleEvent[]) => void): Promise<LifecycleWatch> {
    const handle = await this.#call('watchLifecycle', readValue, 'clv_watch_lifecycle');
    const next = () =>
      callShim(
        (result) => ({
          closed: readValue(result) === 1,
          events: (JSON.parse(readText(result)) as Array<{ uuid: string; event: number; detail: number; at_ms: number }>).map(
            ({ uuid, event, detail, at_ms }) => ({ uuid, event, detail, atMs: at_ms }),
          ),
        }),
        'clv_watch_next',
        handle,
        WATCH_WAIT_MS,
      );
    const drained = (async () => {
      for (;;) {
        const batch = await next();
        if (batch.events.length) listener(batch.events);
        if (batch.closed) return;
      }
    })();
    let closing: Promise<void> | undefined;
    const watch: LifecycleWatch = {
      close: () =>
        (closing ??= (async () => {
          await callShim(readNothing, 'clv_watch_close', this.#handle, handle).catch(() => {});
          await drained;
          this.#watches.delete(watch);
        })()),
    };
    this.#watches.add(watch);
    return watch;
  }

  /** Calls a shim function on this connection, tracked so close() can wait for it. */
  #call<T>(method: string, read: ResultReader<T>, funcName: ShimFunction, ...args: ShimArg[]): Promise<T> {
    if (this.#closed) {
      return Promise.reject(new LibvirtError('CONNECTION_CLOSED', method, `connection to ${this.uri} is closed`));
    }
    const startedAt = performance.now();
    const call = callShim(read, funcName, this.#handle, ...args);
    this.#inFlight.add(call);
    const settled = () => {
      this.#inFlight.delete(call);
      this.#observer?.(method, (performance.now() - startedAt) / 1000);
    };
    call.then(settled, settled);
    return call;
  }
}
