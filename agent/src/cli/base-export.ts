/**
 * `cloudlet base export`: copy a cloudlet's Base VM to a directory, as an app developer needs it to make overlays
 * for that cloudlet (`cloudlet-overlay create --base DIR`): its disk, memory state, kernel and initrd, its chunk index
 * and manifest.json. Every file comes over HTTP (GET /v1/bases/:ref/files/:name), resumed from `FILE.part` after an
 * interruption and checked against its SHA-256; a file already complete in DIR is not fetched again. The names of
 * the files come from the cloudlet: only plain file names are accepted, so nothing is written outside DIR.
 */
import { mkdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { replaceFile } from '../system/atomic-file';
import { bareFileName, checkedDigest, serverPath } from './answers';
import type { CloudletClient } from './client';
import { CliError } from './errors';

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
export async function exportBase(
  client: CloudletClient,
  ref: string,
  outDir: string,
  onProgress: (done: number, total: number) => void,
): Promise<{ base: BaseJson; fetched: number; resumedFrom: number }> {
  const base = await client.call<BaseJson>('GET', `/v1/bases/${encodeURIComponent(ref)}`);
  if (!Array.isArray(base.files)) throw new CliError('BAD_ANSWER', `the cloudlet described the base ${JSON.stringify(ref)} without its files`);
  // Every file is checked before the first byte is written: a bad entry leaves OUT_DIR untouched.
  const files = base.files.map((f) => {
    const name = bareFileName(f.name, 'a file of the base');
    if (name === 'manifest.json')
      throw new CliError('UNSAFE_FILE_NAME', 'the cloudlet named a file of the base manifest.json, the name the export writes itself');
    return { name, ...checkedDigest(f, `the base's file ${name}`), download: serverPath(f.download, `the base's file ${name}`) };
  });
  await mkdir(outDir, { recursive: true });
  const total = files.reduce((sum, f) => sum + f.size, 0);
  let done = 0;
  let fetched = 0;
  let resumedFrom = 0;
  for (const file of files) {
    const dest = path.join(outDir, file.name);
    // A file only takes its name once its SHA-256 matched (client.download): one of the right size is complete.
    const have = await stat(dest).then(
      (s) => s.size,
      () => -1,
    );
    if (have !== file.size) {
      const result = await client.download(file.download, dest, file, (fileDone) => onProgress(done + fileDone, total));
      fetched += result.bytes;
      resumedFrom += result.resumedFrom;
    }
    done += file.size;
    onProgress(done, total);
  }
  // The same manifest.json as in the cloudlet's own base directory: `cloudlet-overlay create` reads either.
  const manifest = path.join(outDir, 'manifest.json');
  await replaceFile(manifest, `${JSON.stringify({ name: base.name, digest: base.digest, manifest: base.manifest }, null, 2)}\n`, 0o644);
  return { base, fetched, resumedFrom };
}
