/**
 * The C shim native/build/libcloudlet_virt.so through ffi-rs (see native/README.md): loading it (and libvirt, whose
 * version it checks), and calling it. Every call that reaches libvirt runs on the libuv threadpool (ffi-rs
 * runInNewThread), so none blocks the event loop. Each returns a heap clv_result holding its value or the error
 * libvirt reported on that very thread; it is read here and freed at once. libvirt.ts builds its Connection on this.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DataType, load, open as openLibrary } from 'ffi-rs';
import { LibvirtError, virErrorCodeName } from './libvirt-error';

/** Oldest libvirt accepted: the support floor (Ubuntu 20.04's 6.0.0). The newest thing actually used is
 * VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA (5.6.0); every function resolved exists since 1.2.7. Tested on 9.0.0. */
const MIN_LIBVIRT_VERSION = 6_000_000;
const LIBVIRT_SONAME = 'libvirt.so.0';
const LIBVIRT_DEBIAN_PACKAGE = 'libvirt0';
/** The library name ffi-rs knows the shim by. */
const SHIM_LIBRARY = 'cloudlet_virt';
/** clv_init reports a failed dlopen in this error domain. */
const SHIM_ERROR_DOMAIN = -1;

export interface LibvirtInfo {
  /** e.g. "9.0.0" */
  libraryVersion: string;
}

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
  clv_resume_domain: [POINTER, STR],
  clv_qemu_monitor_command: [POINTER, STR, STR, FLAGS],
  clv_migrate_to_uri3: [POINTER, STR, STR, STR, STR, STR, STR, FLAGS],
  clv_job_stats: [POINTER, STR],
  clv_abort_job: [POINTER, STR],
  clv_watch_lifecycle: [POINTER],
  clv_watch_next: [POINTER, DataType.U32],
  clv_watch_close: [POINTER, POINTER],
} as const;
export type ShimFunction = keyof typeof SHIM_SIGNATURES;
export type ShimArg = string | number;

/** The address of a clv_result. */
type ResultPtr = number;
/** Reads what a call produced out of its clv_result (before the result is freed). */
export type ResultReader<T> = (result: ResultPtr) => T;

/** Calls a cheap shim function synchronously, on the JS thread. */
function callSync(funcName: string, retType: DataType, paramsType: DataType[], paramsValue: unknown[]): unknown {
  return load({ library: SHIM_LIBRARY, funcName, retType, paramsType, paramsValue });
}
const readInt = (accessor: string, result: ResultPtr) => callSync(accessor, DataType.I64, [POINTER], [result]) as number;
const readString = (accessor: string, result: ResultPtr) => callSync(accessor, STR, [POINTER], [result]) as string;

export const readValue: ResultReader<number> = (result) => readInt('clv_result_value', result);
export const readDetail: ResultReader<number> = (result) => readInt('clv_result_detail', result);
export const readText: ResultReader<string> = (result) => readString('clv_result_text', result);
export const readNothing: ResultReader<void> = () => undefined;

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
export async function callShim<T>(read: ResultReader<T>, funcName: ShimFunction, ...args: ShimArg[]): Promise<T> {
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

export function formatVersion(version: number): string {
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
