/**
 * `cloudlet base export`: copy a cloudlet's Base VM to a directory, as an app developer needs it to make overlays
 * for that cloudlet (`cloudlet-overlay create --base DIR`): its disk, memory state, kernel and initrd, its chunk index
 * and manifest.json. Every file comes over HTTP (GET /v1/bases/:ref/files/:name), resumed from `FILE.part` after an
 * interruption and checked against its SHA-256; a file already complete in DIR is not fetched again.
 */
import { mkdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { replaceFile } from '../core/atomic-file';
import type { CloudletClient } from './client';

export interface BaseJson {
  digest: string;
  name: string;
  memory_mib: number;
  disk: string;
  state: string | null;
  manifest: unknown;
  files: { name: string; bytes: number; sha256: string; download: string }[];
}

/** `onProgress`: bytes of the whole base in `outDir` so far, of `total`. */
export async function exportBase(client: CloudletClient, ref: string, outDir: string, onProgress: (done: number, total: number) => void)
  : Promise<{ base: BaseJson; fetched: number; resumedFrom: number }> {
  const base = await client.call<BaseJson>('GET', `/v1/bases/${encodeURIComponent(ref)}`);
  await mkdir(outDir, { recursive: true });
  const total = base.files.reduce((sum, f) => sum + f.bytes, 0);
  let done = 0;
  let fetched = 0;
  let resumedFrom = 0;
  for (const file of base.files) {
    const dest = path.join(outDir, file.name);
    // A file only takes its name once its SHA-256 matched (client.download): one of the right size is complete.
    const have = await stat(dest).then((s) => s.size, () => -1);
    if (have !== file.bytes) {
      const result = await client.download(file.download, dest, { size: file.bytes, sha256: file.sha256 }, (fileDone) => onProgress(done + fileDone, total));
      fetched += result.bytes;
      resumedFrom += result.resumedFrom;
    }
    done += file.bytes;
    onProgress(done, total);
  }
  // The same manifest.json as in the cloudlet's own base directory: `cloudlet-overlay create` reads either.
  const manifest = path.join(outDir, 'manifest.json');
  await replaceFile(manifest, `${JSON.stringify({ name: base.name, digest: base.digest, manifest: base.manifest }, null, 2)}\n`, 0o644);
  return { base, fetched, resumedFrom };
}
