/**
 * A full data directory answers NO_SPACE (507) with what was needed and what is free, never a 500 and never a
 * half-written file. Writes whose size is known up front (an upload's Content-Length, a source file's size) are
 * checked against the file system's free space first (one statfs), so the common case fails before anything is
 * written; a write that still runs out (the size was not known, or something else filled the disk meanwhile) is
 * recognised by `isNoSpace` and reported the same way by `noSpaceError`.
 */
import { statfs } from 'node:fs/promises';
import { CloudletError, isNoSpace } from '../errors';

/** Bytes an unprivileged writer may still use on the file system holding `dir`; null when it cannot be asked. */
export async function freeBytes(dir: string): Promise<number | null> {
  try {
    const fs = await statfs(dir);
    return fs.bavail * fs.bsize;
  } catch {
    return null;
  }
}

/** Refuses with NO_SPACE, before anything is written, when `neededBytes` will not fit on the file system of `dir`. */
export async function requireFreeSpace(dir: string, neededBytes: number, what: string): Promise<void> {
  const free = await freeBytes(dir);
  if (free !== null && neededBytes > free) throw noSpace(what, dir, neededBytes, free);
}

/**
 * `err` as NO_SPACE (with the free space now) when it is a full disk, else `err` unchanged: for the catch of a write
 * to the data directory. `neededBytes` when the caller knows the size it was writing.
 */
export async function noSpaceError(err: unknown, dir: string, what: string, neededBytes?: number): Promise<unknown> {
  if (!isNoSpace(err) && !(err instanceof CloudletError && err.code === 'NO_SPACE')) return err;
  return noSpace(what, dir, neededBytes, await freeBytes(dir), err);
}

function noSpace(what: string, dir: string, needed: number | undefined, free: number | null, cause?: unknown): CloudletError {
  const sizes = [needed === undefined ? '' : `${mib(needed)} needed`, free === null ? '' : `${mib(free)} free`].filter(Boolean).join(', ');
  return new CloudletError(
    'NO_SPACE',
    `Cannot ${what}: the cloudlet's data directory is full (${dir}${sizes ? `: ${sizes}` : ''}); free some space and retry`,
    {
      ...(cause === undefined ? {} : { cause }),
      details: { path: dir, ...(needed === undefined ? {} : { needed_bytes: needed }), ...(free === null ? {} : { free_bytes: free }) },
    },
  );
}

function mib(bytes: number): string {
  return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}
