/**
 * How the CLI fails: a stable code (the cloudlet's own error code when it answered one) and the exit status scripts
 * test. docs/cli.md lists the statuses.
 */
export const EXIT = {
  OK: 0,
  /** The cloudlet refused or failed the request (any error code without a status of its own below). */
  FAILED: 1,
  USAGE: 2,
  /** No such service, instance, app or route. */
  NOT_FOUND: 3,
  /** No cloudlet reachable: connection refused or timed out, or none discovered. */
  UNREACHABLE: 4,
  /** A download did not match its checksum. */
  INTEGRITY: 5,
} as const;

const EXIT_FOR_CODE: Record<string, number> = {
  USAGE: EXIT.USAGE,
  NOT_FOUND: EXIT.NOT_FOUND,
  SERVICE_NOT_FOUND: EXIT.NOT_FOUND,
  INSTANCE_NOT_FOUND: EXIT.NOT_FOUND,
  APP_NOT_FOUND: EXIT.NOT_FOUND,
  DEVICE_NOT_FOUND: EXIT.NOT_FOUND,
  RECIPE_NOT_FOUND: EXIT.NOT_FOUND,
  BASE_NOT_FOUND: EXIT.NOT_FOUND,
  UNREACHABLE: EXIT.UNREACHABLE,
  NO_CLOUDLET: EXIT.UNREACHABLE,
  UNAVAILABLE: EXIT.UNREACHABLE,
  CHECKSUM_MISMATCH: EXIT.INTEGRITY,
  // An acting verb with a cloudlet only discovered, not named or paired: name one (a usage matter).
  UNTRUSTED_CLOUDLET: EXIT.USAGE,
};

export class CliError extends Error {
  readonly exitCode: number;

  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'CliError';
    this.exitCode = EXIT_FOR_CODE[code] ?? EXIT.FAILED;
  }
}
