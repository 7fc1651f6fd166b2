import { createPublicKey, type KeyObject } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { isErrno } from '../errors';

/**
 * The ed25519 public keys (PEM files `*.pem`) in `dir` that overlays may be signed with. Read at every synthesis, so
 * adding or removing a key needs no restart. No directory or no key: unsigned overlays are accepted; once a key is
 * there, every overlay must carry a signature by one of them.
 */
export async function trustedOverlayKeys(dir: string, log: (line: string) => void): Promise<KeyObject[]> {
  const entries = await readdir(dir).catch((err: unknown) => {
    if (isErrno(err, 'ENOENT')) return [] as string[];
    throw err;
  });
  const keys: KeyObject[] = [];
  for (const entry of entries.filter((name) => name.endsWith('.pem')).sort()) {
    try {
      const key = createPublicKey(await readFile(path.join(dir, entry)));
      if (key.asymmetricKeyType !== 'ed25519') throw new Error(`not an ed25519 key (${key.asymmetricKeyType})`);
      keys.push(key);
    } catch (err) {
      log(`overlay keys: skipping ${entry}: ${(err as Error).message}`);
    }
  }
  return keys;
}
