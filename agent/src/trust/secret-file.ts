import { chmod, mkdir } from 'node:fs/promises';
import path from 'node:path';
import { replaceFile } from '../system/atomic-file';

/**
 * Files that hold credentials: readable by their owner only, replaced atomically (written aside, fsynced, renamed
 * in, the directory fsynced), so a crash leaves the old file or the new one, never a torn or world-readable one.
 */
export async function writeSecretFile(file: string, content: string): Promise<void> {
  await ensureSecretDir(path.dirname(file));
  await replaceFile(file, content, 0o600);
}

/** A directory only its owner may enter (an existing one is tightened). */
export async function ensureSecretDir(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
}
