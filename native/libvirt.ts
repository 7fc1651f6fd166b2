/**
 * libvirt for the agent, through the C shim native/build/libcloudlet_virt.so (see native/README.md).
 *
 * Every libvirt call runs on the libuv threadpool (ffi-rs runInNewThread), so none blocks the event loop.
 * Each shim call returns a heap result holding its value or the error libvirt reported on that very
 * thread; it is read here and freed at once.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DataType, load, open as openLibrary } from 'ffi-rs';

/** Oldest libvirt accepted: the support floor (Ubuntu 20.04's 6.0.0). The newest thing actually used is
 * VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA (5.6.0); every function resolved exists since 1.2.7. Tested on 9.0.0. */
const MIN_LIBVIRT_VERSION = 6_000_000;
const LIBVIRT_SONAME = 'libvirt.so.0';
const LIBVIRT_DEBIAN_PACKAGE = 'libvirt0';
/** The library name ffi-rs knows the shim by. */
const SHIM_LIBRARY = 'cloudlet_virt';
/** clv_init reports a failed dlopen in this error domain. */
const SHIM_ERROR_DOMAIN = -1;

const VIR_ERR_NAMES: Readonly<Record<number, string>> = {
  1: 'INTERNAL_ERROR',
  2: 'NO_MEMORY',
  3: 'NO_SUPPORT',
  5: 'NO_CONNECT',
  6: 'INVALID_CONN',
  7: 'INVALID_DOMAIN',
  8: 'INVALID_ARG',
  9: 'OPERATION_FAILED',
  27: 'XML_ERROR',
  28: 'DOM_EXIST',
  29: 'OPERATION_DENIED',
  30: 'OPEN_FAILED',
  31: 'READ_FAILED',
  34: 'WRITE_FAILED',
  35: 'XML_DETAIL',
  38: 'SYSTEM_ERROR',
  39: 'RPC',
  42: 'NO_DOMAIN',
  43: 'NO_NETWORK',
  45: 'AUTH_FAILED',
  55: 'OPERATION_INVALID',
  67: 'CONFIG_UNSUPPORTED',
  68: 'OPERATION_TIMEOUT',
  74: 'ARGUMENT_UNSUPPORTED',
  78: 'OPERATION_ABORTED',
  80: 'NO_DOMAIN_METADATA',
  84: 'OPERATION_UNSUPPORTED',
  86: 'AGENT_UNRESPONSIVE',
  87: 'RESOURCE_BUSY',
  88: 'ACCESS_DENIED',
  91: 'CPU_INCOMPATIBLE',
  92: 'XML_INVALID_SCHEMA',
  99: 'DEVICE_MISSING',
  110: 'MULTIPLE_DOMAINS',
};

/** 'VIR_ERR_NO_DOMAIN' for 42, 'VIR_ERR_<n>' for codes not in the table. */
function virErrorCodeName(virCode: number): string {
  return `VIR_ERR_${VIR_ERR_NAMES[virCode] ?? virCode}`;
}

export class LibvirtError extends Error {
  /** 'LIBVIRT_UNAVAILABLE' | 'LIBVIRT_UNSUPPORTED' | 'NATIVE_SHIM_MISSING' | 'CONNECTION_CLOSED' | 'VIR_ERR_<NAME>' */
  readonly code: string;
  /** libvirt's virErrorNumber (0 when the error is not libvirt's). */
  readonly virCode: number;
  /** libvirt's virErrorDomain (0 when the error is not libvirt's). */
  readonly virDomain: number;
  /** The libvirt function that failed (e.g. 'virDomainCreateXML'), or the step of this module. */
  readonly operation: string;

  constructor(code: string, operation: string, detail: string, virCode = 0, virDomain = 0) {
    super(`${operation}: ${detail}`);
    this.name = 'LibvirtError';
    this.code = code;
    this.virCode = virCode;
    this.virDomain = virDomain;
    this.operation = operation;
  }
}

export interface LibvirtInfo {
  /** e.g. "9.0.0" */
  libraryVersion: string;
}

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
} as const;

// ---- shim calls ----

const STR = DataType.String;
const FLAGS = DataType.U32;
/**
 * Native pointers (virConnectPtr, clv_result*) travel as 64-bit integers, never as ffi-rs Externals:
 * ffi-rs leaks ~200 bytes for every External it creates. A user-space address fits a JS number exactly.
 */
const POINTER = DataType.U64;

/** Parameter types of every clv_* function that returns a clv_result (C signatures in cloudlet_virt.c). */
const SHIM_SIGNATURES = {
  clv_open: [STR],
  clv_close: [POINTER],
  clv_is_alive: [POINTER],
  clv_hypervisor_version: [POINTER],
  clv_capabilities: [POINTER],
  clv_domain_capabilities: [POINTER, STR, STR],
  clv_define_domain: [POINTER, STR],
  clv_create_domain: [POINTER, STR, FLAGS],
  clv_lookup_by_name: [POINTER, STR],
  clv_lookup_by_uuid: [POINTER, STR],
  clv_start_domain: [POINTER, STR],
  clv_destroy_domain: [POINTER, STR],
  clv_undefine_domain: [POINTER, STR, FLAGS],
  clv_domain_state: [POINTER, STR],
  clv_domain_xml: [POINTER, STR, FLAGS],
  clv_get_metadata: [POINTER, STR, STR, FLAGS],
  clv_set_metadata: [POINTER, STR, STR, STR, STR, FLAGS],
  clv_list_domains: [POINTER, FLAGS],
  clv_save_domain: [POINTER, STR, STR, STR, FLAGS],
  clv_restore_domain: [POINTER, STR, STR, FLAGS],
  clv_watch_lifecycle: [POINTER],
  clv_watch_next: [POINTER, DataType.U32],
  clv_watch_close: [POINTER, POINTER],
} as const;
type ShimFunction = keyof typeof SHIM_SIGNATURES;
type ShimArg = string | number;

/** The address of a clv_result. */
type ResultPtr = number;
/** Reads what a call produced out of its clv_result (before the result is freed). */
type ResultReader<T> = (result: ResultPtr) => T;

/** Calls a cheap shim function synchronously, on the JS thread. */
function callSync(funcName: string, retType: DataType, paramsType: DataType[], paramsValue: unknown[]): unknown {
  return load({ library: SHIM_LIBRARY, funcName, retType, paramsType, paramsValue });
}
const readInt = (accessor: string, result: ResultPtr) => callSync(accessor, DataType.I64, [POINTER], [result]) as number;
const readString = (accessor: string, result: ResultPtr) => callSync(accessor, STR, [POINTER], [result]) as string;

const readValue: ResultReader<number> = (result) => readInt('clv_result_value', result);
const readDetail: ResultReader<number> = (result) => readInt('clv_result_detail', result);
const readText: ResultReader<string> = (result) => readString('clv_result_text', result);
const readNothing: ResultReader<void> = () => undefined;

/** The error a failed clv_result carries, or null if it succeeded. */
function resultError(result: ResultPtr): LibvirtError | null {
  if (!readInt('clv_result_failed', result)) return null;
  const virCode = readInt('clv_result_error_code', result);
  return new LibvirtError(
    virErrorCodeName(virCode),
    readString('clv_result_operation', result),
    readString('clv_result_error_message', result),
    virCode,
    readInt('clv_result_error_domain', result),
  );
}

/** Reads a clv_result with read (or turns it into its LibvirtError) and frees it. */
function takeResult<T>(result: ResultPtr, read: ResultReader<T>): T {
  try {
    const error = resultError(result);
    if (error) throw error;
    return read(result);
  } finally {
    freeResult(result);
  }
}

function freeResult(result: ResultPtr): void {
  callSync('clv_result_free', DataType.Void, [POINTER], [result]);
}

/** Runs a shim function on the libuv threadpool; resolves to what read extracts, rejects with the LibvirtError it captured. */
async function callShim<T>(read: ResultReader<T>, funcName: ShimFunction, ...args: ShimArg[]): Promise<T> {
  const result = await load({
    library: SHIM_LIBRARY,
    funcName,
    retType: POINTER,
    paramsType: [...SHIM_SIGNATURES[funcName]],
    paramsValue: args,
    runInNewThread: true,
  });
  return takeResult(result, read);
}

// ---- loading ----

function formatVersion(version: number): string {
  return `${Math.floor(version / 1_000_000)}.${Math.floor(version / 1000) % 1000}.${version % 1000}`;
}

function loadShim(): LibvirtInfo {
  const shimPath = process.env.CLOUDLET_NATIVE_LIB ?? path.resolve(__dirname, '../../native/build/libcloudlet_virt.so');
  const shimMissing = (why: string) =>
    new LibvirtError('NATIVE_SHIM_MISSING', 'load', `native shim ${shimPath} ${why}; build it with ./build.sh (native/build.sh)`);
  if (!fs.existsSync(shimPath)) throw shimMissing('does not exist');
  try {
    openLibrary({ library: SHIM_LIBRARY, path: shimPath });
  } catch (err) {
    throw shimMissing(`cannot be loaded (${(err as Error).message})`);
  }

  // Overridable only so tests can simulate a missing or foreign libvirt.
  const libvirtPath = process.env.CLOUDLET_LIBVIRT_SO ?? LIBVIRT_SONAME;
  const init = callSync('clv_init', POINTER, [STR], [libvirtPath]) as ResultPtr;
  let error: LibvirtError | null, dlopenMessage: string, version: number, missingSymbols: string;
  try {
    error = resultError(init);
    dlopenMessage = readString('clv_result_error_message', init);
    version = readValue(init);
    missingSymbols = readText(init);
  } finally {
    freeResult(init);
  }
  if (error?.virDomain === SHIM_ERROR_DOMAIN) {
    throw new LibvirtError(
      'LIBVIRT_UNAVAILABLE',
      'dlopen',
      `cannot load the libvirt library ${libvirtPath} (${dlopenMessage}); install the Debian package ${LIBVIRT_DEBIAN_PACKAGE}`,
    );
  }
  const versionText = version ? formatVersion(version) : 'of unknown version';
  if (missingSymbols) {
    throw new LibvirtError('LIBVIRT_UNSUPPORTED', 'dlsym', `libvirt ${versionText} (${libvirtPath}) lacks ${missingSymbols}`);
  }
  if (version < MIN_LIBVIRT_VERSION) {
    throw new LibvirtError('LIBVIRT_UNSUPPORTED', 'virGetVersion', `libvirt ${versionText} is older than the required ${formatVersion(MIN_LIBVIRT_VERSION)}`);
  }
  if (error) throw error; // virInitialize failed
  return { libraryVersion: versionText };
}

let loaded: { info: LibvirtInfo } | { error: unknown } | undefined;

/** Loads and initialises the shim and libvirt on first use; throws LibvirtError when they are unusable. */
export function libvirtInfo(): LibvirtInfo {
  if (!loaded) {
    try {
      loaded = { info: loadShim() };
    } catch (error) {
      loaded = { error };
    }
  }
  if ('error' in loaded) throw loaded.error;
  return loaded.info;
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
  #closed: Promise<void> | undefined;

  private constructor(uri: string, handle: number) {
    this.uri = uri;
    this.#handle = handle;
  }

  static async open(uri: string): Promise<Connection> {
    libvirtInfo();
    return new Connection(uri, await callShim(readValue, 'clv_open', uri));
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
    const call = callShim(read, funcName, this.#handle, ...args);
    this.#inFlight.add(call);
    const untrack = () => this.#inFlight.delete(call);
    call.then(untrack, untrack);
    return call;
  }
}
