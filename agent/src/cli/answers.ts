/**
 * Checks on what a cloudlet answers before the CLI acts on it: a cloudlet found by mDNS may be anyone's, and even a
 * named one only chooses data, never where on this machine it goes.
 */
import { CliError } from './errors';

/**
 * A file name the cloudlet proposes, accepted only as a plain name in the directory the CLI writes to: no path
 * (no `/`, no `..`), no hidden file (`.bashrc`, `.ssh`), no control characters, at most 255 bytes.
 */
export function bareFileName(name: unknown, what: string): string {
  if (
    typeof name !== 'string' ||
    name === '' ||
    name.startsWith('.') ||
    name.includes('/') ||
    name.includes('\\') ||
    /[\u0000-\u001f\u007f-\u009f]/.test(name) ||
    Buffer.byteLength(name) > 255
  ) {
    throw new CliError(
      'UNSAFE_FILE_NAME',
      `the cloudlet named ${what} ${JSON.stringify(String(name)).slice(0, 100)}, not a plain file name; nothing was written`,
    );
  }
  return name;
}

/** A path on the cloudlet to GET (an answer's `download`): absolute on the same server, never another host. */
export function serverPath(value: unknown, what: string): string {
  if (typeof value !== 'string' || !value.startsWith('/') || value.startsWith('//') || /[\s\u0000-\u001f\u007f-\u009f]/.test(value)) {
    throw new CliError('BAD_ANSWER', `the cloudlet gave ${what} a download path that is not a path on it: ${JSON.stringify(String(value)).slice(0, 100)}`);
  }
  return value;
}

/** A size in bytes and a SHA-256 as hex, what a download is checked against. */
export function checkedDigest(value: { bytes: unknown; sha256: unknown }, what: string): { size: number; sha256: string } {
  if (!Number.isSafeInteger(value.bytes) || (value.bytes as number) < 0 || typeof value.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(value.sha256)) {
    throw new CliError('BAD_ANSWER', `the cloudlet gave ${what} no valid size and SHA-256`);
  }
  return { size: value.bytes as number, sha256: value.sha256 };
}
