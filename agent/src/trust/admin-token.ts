import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { isErrno } from '../errors';
import { writeSecretFile } from './secret-file';

/**
 * The operator's credential: `<dataDir>/trust/admin-token` (0600), made at the agent's first start. Only someone
 * who can read the data directory on the box has it, and the agent accepts it only from loopback.
 */
export const ADMIN_TOKEN_PREFIX = 'cla_';

export function adminTokenFile(dataDir: string): string {
  return path.join(dataDir, 'trust', 'admin-token');
}

/** The admin token, made on first use. */
export async function loadOrCreateAdminToken(dataDir: string): Promise<string> {
  const existing = await readAdminToken(dataDir);
  if (existing) return existing;
  const token = ADMIN_TOKEN_PREFIX + randomBytes(32).toString('base64url');
  await writeSecretFile(adminTokenFile(dataDir), `${token}\n`);
  return token;
}

/** The admin token if the file exists and this user may read it, else null (the CLI on the box uses it). */
export async function readAdminToken(dataDir: string): Promise<string | null> {
  try {
    const token = (await readFile(adminTokenFile(dataDir), 'utf8')).trim();
    return token === '' ? null : token;
  } catch (err) {
    if (isErrno(err, 'ENOENT') || isErrno(err, 'EACCES') || isErrno(err, 'ENOTDIR')) return null;
    throw err;
  }
}
