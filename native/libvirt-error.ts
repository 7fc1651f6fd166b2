/**
 * The error every libvirt call of native/ rejects with: libvirt's own (code VIR_ERR_<NAME>, as the shim captured it on
 * the thread that made the call) or one of this module's steps (loading, a closed connection).
 */
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
export function virErrorCodeName(virCode: number): string {
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
