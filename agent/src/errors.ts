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
  | 'METHOD_NOT_ALLOWED'
  | 'PAYLOAD_TOO_LARGE'
  | 'INVALID_MANIFEST'
  | 'INVALID_IMAGE'
  | 'SERVICE_EXISTS'
  | 'SERVICE_IN_USE'
  | 'CONFLICT'
  // the cloudlet could not do it (5xx)
  | 'NO_FREE_PORT'
  | 'READINESS_TIMEOUT'
  | 'LAUNCH_FAILED'
  | 'IMAGE_TOOL_FAILED'
  | 'HYPERVISOR_ERROR'
  | 'HYPERVISOR_UNAVAILABLE'
  | 'INTERNAL';

const STATUS: Record<ErrorCode, number> = {
  BAD_REQUEST: 400,
  MISSING_PARAMETER: 400,
  INVALID_PARAMETER: 400,
  NOT_FOUND: 404,
  SERVICE_NOT_FOUND: 404,
  INSTANCE_NOT_FOUND: 404,
  METHOD_NOT_ALLOWED: 405,
  PAYLOAD_TOO_LARGE: 413,
  INVALID_MANIFEST: 422,
  INVALID_IMAGE: 422,
  SERVICE_EXISTS: 409,
  SERVICE_IN_USE: 409,
  CONFLICT: 409,
  NO_FREE_PORT: 503,
  READINESS_TIMEOUT: 504,
  LAUNCH_FAILED: 500,
  IMAGE_TOOL_FAILED: 500,
  HYPERVISOR_ERROR: 500,
  HYPERVISOR_UNAVAILABLE: 503,
  INTERNAL: 500,
};

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

/** Anything thrown that is not a CloudletError becomes INTERNAL, keeping the original as the cause. */
export function asCloudletError(err: unknown): CloudletError {
  if (err instanceof CloudletError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new CloudletError('INTERNAL', message, { cause: err });
}

export function isErrno(err: unknown, code: string): boolean {
  return typeof err === 'object' && err !== null && (err as NodeJS.ErrnoException).code === code;
}
