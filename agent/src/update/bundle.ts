/**
 * Signed agent bundles: one file that carries a release of the agent (dist/, native/build/, production
 * node_modules, package.json) for a field update.
 *
 *   line 1   "cloudlet-bundle 1"
 *   line 2   the header, one line of JSON: {"version", "sha256", "size"} of the payload
 *   line 3   the ed25519 signature of line 2's bytes, base64
 *   rest     the payload: a gzipped tar of the release directory
 *
 * Only the small header is signed, so checking a signature needs no pass over the payload; the payload is then bound
 * to it by its SHA-256, checked over the whole payload before anything of it is unpacked.
 */
import { createHash, createPublicKey, sign, verify, type KeyObject } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdtemp, open, readdir, readFile, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { create as packTar, extract as unpackTar } from 'tar';
import { CloudletError } from '../errors';

const MAGIC = 'cloudlet-bundle 1';
/** The three text lines are far smaller than this; reading more than it finds no end means not a bundle. */
const PREAMBLE_MAX_BYTES = 8192;

export interface BundleHeader {
  version: string;
  sha256: string;
  size: number;
}

/** A bundle whose header is signed by a trusted key; its payload is checked against the header when unpacked. */
export interface VerifiedBundle {
  file: string;
  header: BundleHeader;
  payloadOffset: number;
}

function invalid(file: string, why: string): CloudletError {
  return new CloudletError('BUNDLE_INVALID', `${file} is not a valid agent bundle: ${why}`);
}

/** Pack a release directory into a bundle signed with `key` (an ed25519 private key). */
export async function createBundle(releaseDir: string, version: string, key: KeyObject, out: string): Promise<BundleHeader> {
  const work = await mkdtemp(`${out}.work-`);
  try {
    const payload = path.join(work, 'payload.tar.gz');
    const hash = createHash('sha256');
    await pipeline(packTar({ gzip: true, cwd: releaseDir, portable: true }, ['.']), hashing(hash), createWriteStream(payload));
    const header: BundleHeader = { version, sha256: hash.digest('hex'), size: (await stat(payload)).size };
    const headerLine = JSON.stringify(header);
    const signature = sign(null, Buffer.from(headerLine), key).toString('base64');
    const bundle = createWriteStream(out, { mode: 0o644 });
    bundle.write(`${MAGIC}\n${headerLine}\n${signature}\n`);
    await pipeline(createReadStream(payload), bundle);
    return header;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/**
 * Read a bundle's header and check its signature against the trusted public keys. Throws BUNDLE_UNTRUSTED when it is
 * unsigned or signed by no trusted key, BUNDLE_INVALID when it is not a bundle at all.
 */
export async function openBundle(file: string, trustedKeys: KeyObject[]): Promise<VerifiedBundle> {
  const handle = await open(file, 'r').catch((err: Error) => {
    throw invalid(file, err.message);
  });
  let preamble: string;
  try {
    const buffer = Buffer.alloc(PREAMBLE_MAX_BYTES);
    const { bytesRead } = await handle.read(buffer, 0, buffer.length, 0);
    preamble = buffer.subarray(0, bytesRead).toString('latin1');
  } finally {
    await handle.close();
  }
  const lines = preamble.split('\n');
  if (lines[0] !== MAGIC || lines.length < 4) throw invalid(file, `it does not start with "${MAGIC}" and its header`);
  const [, headerLine = '', signatureLine = ''] = lines;
  const payloadOffset = MAGIC.length + headerLine.length + signatureLine.length + 3;
  const signature = Buffer.from(signatureLine, 'base64');
  if (signature.length === 0) throw new CloudletError('BUNDLE_UNTRUSTED', `${file} is not signed`);
  if (!trustedKeys.some((key) => verify(null, Buffer.from(headerLine, 'latin1'), key, signature))) {
    throw new CloudletError('BUNDLE_UNTRUSTED', `${file} is not signed by a trusted key (${trustedKeys.length} trusted)`);
  }
  const header = parseHeader(file, headerLine);
  const size = (await stat(file)).size - payloadOffset;
  if (size !== header.size) throw invalid(file, `its payload has ${size} bytes, its header says ${header.size}`);
  return { file, header, payloadOffset };
}

function parseHeader(file: string, line: string): BundleHeader {
  let header: Partial<BundleHeader>;
  try {
    header = JSON.parse(line) as Partial<BundleHeader>;
  } catch {
    throw invalid(file, 'its header is not JSON');
  }
  if (typeof header.version !== 'string' || !/^[0-9A-Za-z.+-]{1,64}$/.test(header.version)) throw invalid(file, 'its header has no valid version');
  if (typeof header.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(header.sha256)) throw invalid(file, 'its header has no valid sha256');
  if (typeof header.size !== 'number' || !Number.isSafeInteger(header.size) || header.size <= 0) throw invalid(file, 'its header has no valid size');
  return { version: header.version, sha256: header.sha256, size: header.size };
}

/**
 * Unpack the payload into `dir` (which must exist), failing with BUNDLE_INVALID if it is not the signed one. The whole
 * payload is first copied next to `dir` and hashed, so not one byte of a payload that is not the signed one is ever
 * unpacked, and a bundle file changed meanwhile changes nothing. Files are unpacked as the updater's own, without the
 * tar's owners and without setuid/setgid bits: a release needs neither, and the updater runs as root.
 */
export async function unpackBundle(bundle: VerifiedBundle, dir: string): Promise<void> {
  const payload = `${dir}.payload`;
  try {
    const hash = createHash('sha256');
    await pipeline(createReadStream(bundle.file, { start: bundle.payloadOffset }), hashing(hash), createWriteStream(payload, { flags: 'wx', mode: 0o600 }));
    const digest = hash.digest('hex');
    if (digest !== bundle.header.sha256) throw invalid(bundle.file, `its payload's SHA-256 is ${digest}, the signed header says ${bundle.header.sha256}`);
    try {
      await pipeline(createReadStream(payload), unpackTar({ cwd: dir, strict: true, preserveOwner: false, filter: withoutPrivilegeBits }));
    } catch (err) {
      throw invalid(bundle.file, `its payload cannot be unpacked (${(err as Error).message})`);
    }
  } finally {
    await rm(payload, { force: true });
  }
}

/** A tar filter that keeps every entry, clearing its setuid and setgid bits. */
function withoutPrivilegeBits(_path: string, entry: { mode?: number }): boolean {
  if (typeof entry.mode === 'number') entry.mode &= ~0o6000;
  return true;
}

function hashing(hash: ReturnType<typeof createHash>): Transform {
  return new Transform({
    transform(chunk: Buffer, _encoding, done) {
      hash.update(chunk);
      done(null, chunk);
    },
  });
}

/** The public keys (PEM files, *.pem) in a directory; none found is an error, since nothing could then be trusted. */
export async function loadTrustedKeys(dir: string): Promise<KeyObject[]> {
  const names = (await readdir(dir).catch(() => [] as string[])).filter((n) => n.endsWith('.pem')).sort();
  const keys = await Promise.all(names.map(async (n) => createPublicKey(await readFile(path.join(dir, n)))));
  if (keys.length === 0) throw new CloudletError('BUNDLE_UNTRUSTED', `no trusted update keys (*.pem) in ${dir}`);
  return keys;
}
