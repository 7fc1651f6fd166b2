/**
 * SHA-256 digests of files the agent keeps (a service's disk image), read as a stream off the event loop's back and
 * remembered while the file's size and modification time stay the same: asking again costs one stat.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';

export class FileDigests {
  private readonly known = new Map<string, { stamp: string; digest: Promise<string> }>();

  /** The file's SHA-256 in hex; concurrent asks for one file share one read. */
  async sha256(file: string): Promise<string> {
    const info = await stat(file);
    const stamp = `${info.size}/${info.mtimeMs}/${info.ino}`;
    const cached = this.known.get(file);
    if (cached?.stamp === stamp) return cached.digest;
    const hash = createHash('sha256');
    const digest = pipeline(createReadStream(file), hash).then(() => hash.digest('hex'));
    this.known.set(file, { stamp, digest });
    digest.catch(() => this.known.delete(file));
    return digest;
  }
}
