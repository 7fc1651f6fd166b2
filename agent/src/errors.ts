/**
 * Typed errors with stable string codes. Callers (the HTTP faces, the CLI) match on `code`, never on messages;
 * docs/api.md lists every code. `status` is the HTTP status the /v1 face answers with.
 */
export type ErrorCode =
  // request problems (4xx)
  | 'BAD_REQUEST'
  | 'MISSING_PARAMETER'
  | 'INVALID_PARAMETER'
  | 'NOT_FOUND'
  | 'SERVICE_NOT_FOUND'
  | 'INSTANCE_NOT_FOUND'
  | 'APP_NOT_FOUND'
  | 'FORBIDDEN'
  | 'LENGTH_REQUIRED'
  | 'METHOD_NOT_ALLOWED'
  | 'PAYLOAD_TOO_LARGE'
  | 'INVALID_MANIFEST'
  | 'INVALID_IMAGE'
  | 'INVALID_PACKAGE'
  | 'INVALID_APP'
  | 'SERVICE_EXISTS'
  | 'SERVICE_IN_USE'
  | 'CONFLICT'
  | 'BUNDLE_INVALID'
  | 'BUNDLE_UNTRUSTED'
  | 'UPDATE_IN_PROGRESS'
  | 'INVALID_RECIPE'
  | 'RECIPE_NOT_FOUND'
  | 'BASE_NOT_FOUND'
  | 'OVERLAY_INVALID'
  | 'OVERLAY_UNSUPPORTED'
  | 'OVERLAY_UNTRUSTED'
  | 'OVERLAY_TOO_LARGE'
  | 'RATE_LIMITED'
  | 'TOO_MANY_UPLOADS'
  | 'TOO_MANY_CONNECTIONS'
  | 'REQUEST_TIMEOUT'
  | 'UNAUTHENTICATED'
  | 'DEVICE_REVOKED'
  | 'DEVICE_EXPIRED'
  | 'DEVICE_NOT_FOUND'
  | 'ADMIN_ONLY'
  | 'TLS_REQUIRED'
  | 'PAIRING_CLOSED'
  | 'PAIRING_CODE_INVALID'
  | 'PEER_NOT_ALLOWED'
  | 'PEER_NOT_FOUND'
  | 'HANDOFF_TARGET_UNKNOWN'
  | 'HANDOFF_TARGET_LACKS_SERVICE'
  | 'HANDOFF_IN_PROGRESS'
  | 'HANDOFF_REFUSED'
  | 'HANDOFF_NOT_FOUND'
  // the cloudlet could not do it (5xx)
  | 'NO_FREE_PORT'
  | 'PORT_TAKEN'
  | 'BUSY'
  | 'QUOTA_EXCEEDED'
  | 'DATA_DIR_UNREACHABLE'
  | 'READINESS_TIMEOUT'
  | 'PEER_UNREACHABLE'
  | 'PEER_REFUSED'
  | 'HANDOFF_FAILED'
  | 'LAUNCH_FAILED'
  | 'PROVISIONING_FAILED'
  | 'IMAGE_TOOL_FAILED'
  | 'HYPERVISOR_ERROR'
  | 'HYPERVISOR_UNAVAILABLE'
  | 'SANDBOX_UNAVAILABLE'
  | 'UPDATE_ROLLED_BACK'
  | 'ROLLBACK_FAILED'
  | 'NO_SPACE'
  | 'INTERNAL';

const STATUS: Record<ErrorCode, number> = {
  BAD_REQUEST: 400,
  MISSING_PARAMETER: 400,
  INVALID_PARAMETER: 400,
  NOT_FOUND: 404,
  SERVICE_NOT_FOUND: 404,
  INSTANCE_NOT_FOUND: 404,
  APP_NOT_FOUND: 404,
  FORBIDDEN: 403,
  LENGTH_REQUIRED: 411,
  METHOD_NOT_ALLOWED: 405,
  PAYLOAD_TOO_LARGE: 413,
  INVALID_MANIFEST: 422,
  INVALID_IMAGE: 422,
  INVALID_PACKAGE: 422,
  INVALID_APP: 422,
  SERVICE_EXISTS: 409,
  SERVICE_IN_USE: 409,
  CONFLICT: 409,
  BUNDLE_INVALID: 422,
  BUNDLE_UNTRUSTED: 403,
  UPDATE_IN_PROGRESS: 409,
  INVALID_RECIPE: 422,
  RECIPE_NOT_FOUND: 404,
  BASE_NOT_FOUND: 404,
  OVERLAY_INVALID: 422,
  OVERLAY_UNSUPPORTED: 422,
  OVERLAY_UNTRUSTED: 403,
  OVERLAY_TOO_LARGE: 413,
  RATE_LIMITED: 429,
  TOO_MANY_UPLOADS: 429,
  TOO_MANY_CONNECTIONS: 429,
  REQUEST_TIMEOUT: 408,
  UNAUTHENTICATED: 401,
  DEVICE_REVOKED: 401,
  DEVICE_EXPIRED: 401,
  DEVICE_NOT_FOUND: 404,
  ADMIN_ONLY: 403,
  TLS_REQUIRED: 403,
  PAIRING_CLOSED: 403,
  PAIRING_CODE_INVALID: 403,
  PEER_NOT_ALLOWED: 403,
  PEER_NOT_FOUND: 404,
  HANDOFF_TARGET_UNKNOWN: 404,
  HANDOFF_TARGET_LACKS_SERVICE: 409,
  HANDOFF_IN_PROGRESS: 409,
  HANDOFF_REFUSED: 409,
  HANDOFF_NOT_FOUND: 404,
  NO_FREE_PORT: 503,
  PORT_TAKEN: 503,
  BUSY: 503,
  QUOTA_EXCEEDED: 503,
  DATA_DIR_UNREACHABLE: 500,
  READINESS_TIMEOUT: 504,
  PEER_UNREACHABLE: 502,
  PEER_REFUSED: 502,
  HANDOFF_FAILED: 502,
  LAUNCH_FAILED: 500,
  PROVISIONING_FAILED: 500,
  IMAGE_TOOL_FAILED: 500,
  HYPERVISOR_ERROR: 500,
  HYPERVISOR_UNAVAILABLE: 503,
  SANDBOX_UNAVAILABLE: 503,
  UPDATE_ROLLED_BACK: 500,
  ROLLBACK_FAILED: 500,
  NO_SPACE: 507,
  INTERNAL: 500,
};

/** Every stable code, in the order of ErrorCode: what the OpenAPI document's `code` enum is made from. */
export const ERROR_CODES = Object.keys(STATUS) as ErrorCode[];

/** The HTTP status /v1 answers a code with. */
export function statusOfCode(code: ErrorCode): number {
  return STATUS[code];
}

export class CloudletError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  /** Extra machine-readable facts for the client (e.g. which parameter, the console tail). */
  readonly details?: Record<string, unknown>;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; details?: Record<string, unknown> }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'CloudletError';
    this.code = code;
    this.status = STATUS[code];
    if (options?.details) this.details = options.details;
  }

  toJSON(): { code: ErrorCode; message: string; details?: Record<string, unknown> } {
    return this.details ? { code: this.code, message: this.message, details: this.details } : { code: this.code, message: this.message };
  }
}

/** The same error with more details (e.g. the console tail of a VM whose launch failed). */
export function withDetails(err: CloudletError, details: Record<string, unknown>): CloudletError {
  return new CloudletError(err.code, err.message, { cause: err.cause ?? err, details: { ...err.details, ...details } });
}

/** The same error without one of its details (one the caller may not see). */
export function withoutDetail(err: CloudletError, name: string): CloudletError {
  const { [name]: _dropped, ...details } = err.details ?? {};
  return new CloudletError(err.code, err.message, { cause: err.cause ?? err, ...(Object.keys(details).length ? { details } : {}) });
}

/** Anything thrown that is not a CloudletError becomes INTERNAL, keeping the original as the cause. */
export function asCloudletError(err: unknown): CloudletError {
  if (err instanceof CloudletError) return err;
  const message = err instanceof Error ? err.message : String(err);
  // A full disk is the operator's to fix, not a bug: the one errno worth telling apart wherever it surfaces.
  if (isNoSpace(err)) return new CloudletError('NO_SPACE', `No space left in the cloudlet's data directory: ${message}`, { cause: err });
  return new CloudletError('INTERNAL', message, { cause: err });
}

export function isErrno(err: unknown, code: string): boolean {
  return typeof err === 'object' && err !== null && (err as NodeJS.ErrnoException).code === code;
}

/**
 * A write failed because the file system is full (ENOSPC) or the quota is used up (EDQUOT): a Node error's errno, or
 * the same condition in a tool's own words (qemu-img, genisoimage, libvirt report strerror's text).
 */
export function isNoSpace(err: unknown): boolean {
  if (isErrno(err, 'ENOSPC') || isErrno(err, 'EDQUOT')) return true;
  const text = typeof err === 'string' ? err : err instanceof Error ? err.message : '';
  return /No space left on device|Disk quota exceeded/i.test(text);
}
