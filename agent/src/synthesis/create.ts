/**
 * Overlay creation, for the app's developer: from a customized VM (its disk, backed by the base or standalone, and
 * its saved memory state) and the Base VM it was made from, write the overlay (docs/overlay-format.md).
 *
 * Every 4 KiB block of the disk that differs from the base, and every guest page of the memory state, becomes a
 * record: zeros are elided, a block or page whose bytes are already in the base disk, the base memory, or earlier in
 * the overlay is a copy, and only the rest is carried, in independent zstd frames. The target disk is indexed at
 * 1 KiB steps too: a guest's page cache holds the files its disk gained at 4 KiB file offsets, which a 1 KiB-block
 * ext4 places at 1 KiB-aligned disk offsets.
 */
import { createPrivateKey, sign } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdtemp, readFile, rename, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { digestOf } from '../core/bases';
import { parseManifest } from '../core/manifest';
import type { ServiceManifest } from '../core/types';
import { CloudletError } from '../errors';
import { convertImage } from '../images/qemu-img';
import { CHUNK_INDEX_FILE, chunkHash, readChunkIndex, readSaveImageChunks } from '../vm/chunk-index';
import type { RamPage } from '../vm/migration-stream';
import {
  BLOCK_BYTES,
  encodeHeader,
  encodeRecord,
  hasData,
  OVERLAY_FORMAT,
  OVERLAY_LIMITS,
  sha256,
  Source,
  Target,
  type FrameEntry,
  type OverlayManifest,
  type OverlayRecord,
} from './overlay-format';
import { compressFrame, zstdReference, type ZstdReference } from '../images/zstd';

/** Raw bytes per frame: large enough to compress well, small enough to decode in step with the upload. */
const FRAME_RAW_BYTES = 8 << 20;
const MAX_LITERAL_RECORD = 1 << 20;
/** Filesystem block size the target disk is also indexed at (see above). */
const DISK_INDEX_STEP = 1024;
const ZERO_BLOCK = Buffer.alloc(BLOCK_BYTES);
/** A changed block or page is carried as an XOR with its old bytes when at least this many of its bytes are unchanged. */
const XOR_MIN_UNCHANGED = BLOCK_BYTES / 2;

export interface CreateOptions {
  /** A base's directory: its manifest.json (a service manifest, or an exported base's {name, manifest}) and files. */
  baseDir: string;
  disk: string;
  /** The customized VM's saved memory state (libvirt save image), or null for a cold-booting service. */
  state: string | null;
  /** The Service VM's manifest (port, readiness, memory, …); disk, state and boot are set by the overlay. */
  service: ServiceManifest;
  out: string;
  /** PEM ed25519 private key to sign the manifest with. */
  signingKey?: string;
  level: number;
  parallelism: number;
}

export interface CreateStats {
  overlay_bytes: number;
  disk_changed_blocks: number;
  memory_pages: number;
  /** Blocks and pages by how they are carried. */
  zero: number;
  from_base_disk: number;
  from_base_memory: number;
  from_overlay: number;
  /** Carried as an XOR with the base's block at the same offset or the base's page at the same guest address. */
  xor: number;
  literal: number;
  literal_bytes: number;
  raw_frame_bytes: number;
  frames: number;
}

interface Location {
  source: Source;
  offset: number;
}

/**
 * Content → where those 4 KiB first are, verified byte for byte on a hit (the key is only a hash, and a base's stored
 * index could be stale: a wrong entry costs a copy, never correctness).
 */
class ContentIndex {
  private readonly map = new Map<string, Location>();

  constructor(private readonly bytesAt: (loc: Location) => Buffer) {}

  add(chunk: Buffer, loc: Location): void {
    this.addHash(chunkHash(chunk), loc);
  }

  /** A chunk known by its hash (from the base's chunk index). */
  addHash(hash: Buffer, loc: Location): void {
    const key = hash.toString('base64');
    if (!this.map.has(key)) this.map.set(key, loc);
  }

  find(chunk: Buffer): Location | undefined {
    const loc = this.map.get(chunkHash(chunk).toString('base64'));
    return loc && this.bytesAt(loc).equals(chunk) ? loc : undefined;
  }
}

/**
 * Records → frames: merges adjacent records, cuts frames (also where the memory records begin), compresses them in
 * parallel and writes them in order. Memory frames are compressed against the base's memory state when there is one.
 */
class FrameWriter {
  private records: Buffer[] = [];
  private rawBytes = 0;
  private pendingRecord: OverlayRecord | null = null;
  private readonly inFlight: { raw: number; frame: Promise<Buffer> }[] = [];
  readonly frames: FrameEntry[] = [];

  private frameTarget: Target | null = null;

  constructor(
    private readonly out: NodeJS.WritableStream,
    private readonly level: number,
    private readonly parallelism: number,
    private readonly memoryReference: ZstdReference | undefined,
  ) {}

  async add(r: OverlayRecord): Promise<void> {
    if (r.target !== this.frameTarget) {
      await this.flushRecord();
      await this.cutFrame();
      this.frameTarget = r.target;
    }
    const p = this.pendingRecord;
    if (p && p.target === r.target && p.source === r.source && p.offset + p.length === r.offset) {
      if (r.source === Source.Zero || (!hasData(r.source) && p.sourceOffset + p.length === r.sourceOffset)) {
        p.length += r.length;
        return;
      }
      if (hasData(r.source) && (r.source === Source.Literal || p.sourceOffset + p.length === r.sourceOffset) && p.length + r.length <= MAX_LITERAL_RECORD) {
        p.data = Buffer.concat([p.data!, r.data!]);
        p.length += r.length;
        return;
      }
    }
    await this.flushRecord();
    this.pendingRecord = { ...r };
  }

  private async flushRecord(): Promise<void> {
    if (!this.pendingRecord) return;
    const encoded = encodeRecord(this.pendingRecord);
    this.pendingRecord = null;
    this.records.push(encoded);
    this.rawBytes += encoded.length;
    if (this.rawBytes >= FRAME_RAW_BYTES) await this.cutFrame();
  }

  private async cutFrame(): Promise<void> {
    if (this.rawBytes === 0) return;
    const raw = Buffer.concat(this.records);
    this.records = [];
    this.rawBytes = 0;
    const reference = this.frameTarget === Target.Memory ? this.memoryReference : undefined;
    this.inFlight.push({ raw: raw.length, frame: compressFrame(raw, this.level, reference) });
    if (this.inFlight.length >= this.parallelism) await this.writeOldest();
  }

  private async writeOldest(): Promise<void> {
    const { raw, frame } = this.inFlight.shift()!;
    const bytes = await frame;
    this.frames.push({ bytes: bytes.length, raw_bytes: raw, sha256: sha256(bytes) });
    if (!this.out.write(bytes)) await new Promise((resolve) => this.out.once('drain', resolve));
  }

  async finish(): Promise<void> {
    await this.flushRecord();
    await this.cutFrame();
    while (this.inFlight.length > 0) await this.writeOldest();
  }
}

async function readBase(baseDir: string): Promise<{ manifest: ServiceManifest; digest: string }> {
  const json = JSON.parse(await readFile(path.join(baseDir, 'manifest.json'), 'utf8')) as { manifest?: unknown };
  // A base exported from a cloudlet wraps the service manifest as {name, manifest}; a base's source dir has it bare.
  const manifest = parseManifest(json.manifest ?? json);
  return { manifest, digest: await digestOf(baseDir, manifest) };
}

/** `bytes` XOR `old`, if that keeps at least XOR_MIN_UNCHANGED zero bytes. */
function xorIfSimilar(bytes: Buffer, old: Buffer): Buffer | null {
  const xor = Buffer.allocUnsafe(BLOCK_BYTES);
  let unchanged = 0;
  for (let i = 0; i < BLOCK_BYTES; i++) {
    xor[i] = bytes[i]! ^ old[i]!;
    if (xor[i] === 0) unchanged++;
  }
  return unchanged >= XOR_MIN_UNCHANGED ? xor : null;
}

export async function createOverlay(options: CreateOptions): Promise<CreateStats> {
  const base = await readBase(options.baseDir);
  const work = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-overlay-'));
  const framesFile = path.join(work, 'frames');
  try {
    await convertImage(path.join(options.baseDir, base.manifest.disk), path.join(work, 'base.raw'), 'raw');
    await convertImage(options.disk, path.join(work, 'target.raw'), 'raw');
    const baseDisk = await readFile(path.join(work, 'base.raw'));
    const targetDisk = await readFile(path.join(work, 'target.raw'));
    await rm(path.join(work, 'base.raw'));
    await rm(path.join(work, 'target.raw'));
    if (targetDisk.length % BLOCK_BYTES !== 0) throw new CloudletError('INVALID_IMAGE', `${options.disk}: the disk size is not a multiple of 4 KiB`);
    // A base exported from a cloudlet comes with its chunk index: its hashes need not be computed again.
    const stored = await readChunkIndex(path.join(options.baseDir, CHUNK_INDEX_FILE)).catch(() => null);
    const baseState = base.manifest.state && path.join(options.baseDir, base.manifest.state);
    const baseMemory: { image: Buffer; chunks: (RamPage & { hash?: Buffer })[] } | null = !baseState
      ? null
      : stored?.memory
        ? { image: await readFile(baseState), chunks: stored.memory }
        : await readSaveImageChunks(baseState);
    const targetMemory = options.state ? await readSaveImageChunks(options.state) : null;

    const files: Record<number, Buffer> = {
      [Source.BaseDisk]: baseDisk,
      [Source.BaseMemory]: baseMemory?.image ?? Buffer.alloc(0),
      [Source.TargetDisk]: targetDisk,
      [Source.TargetMemory]: targetMemory?.image ?? Buffer.alloc(0),
    };
    const index = new ContentIndex((loc) => files[loc.source]!.subarray(loc.offset, loc.offset + BLOCK_BYTES));
    const baseByAddress = new Map<string, number>();
    for (const chunk of baseMemory?.chunks ?? []) {
      const loc = { source: Source.BaseMemory, offset: chunk.offset };
      if (chunk.hash) index.addHash(chunk.hash, loc);
      else index.add(baseMemory!.image.subarray(chunk.offset, chunk.offset + BLOCK_BYTES), loc);
      baseByAddress.set(chunk.guestAddress, chunk.offset);
    }
    if (stored) {
      for (const { offset, hash } of stored.disk) index.addHash(hash, { source: Source.BaseDisk, offset });
    } else {
      for (let offset = 0; offset + BLOCK_BYTES <= baseDisk.length; offset += BLOCK_BYTES) {
        const block = baseDisk.subarray(offset, offset + BLOCK_BYTES);
        if (!block.equals(ZERO_BLOCK)) index.add(block, { source: Source.BaseDisk, offset });
      }
    }

    const stats: CreateStats = {
      overlay_bytes: 0,
      disk_changed_blocks: 0,
      memory_pages: 0,
      zero: 0,
      from_base_disk: 0,
      from_base_memory: 0,
      from_overlay: 0,
      xor: 0,
      literal: 0,
      literal_bytes: 0,
      raw_frame_bytes: 0,
      frames: 0,
    };
    const out = createWriteStream(framesFile);
    // Kernel data that moved in guest memory matches the base's memory state at byte offsets only: zstd finds it there.
    const memoryReference = (baseState && targetMemory && zstdReference(baseState, baseMemory!.image.length, OVERLAY_LIMITS.frameRawBytes)) || undefined;
    const writer = new FrameWriter(out, options.level, options.parallelism, memoryReference);
    /**
     * One 4 KiB chunk of the target: elided if zero, a copy if known, an XOR with its `old` version (the base's at
     * the same place) if similar, else literal (and known from now on).
     */
    const chunk = (target: Target, offset: number, bytes: Buffer, old: Location | null) => {
      if (bytes.equals(ZERO_BLOCK)) {
        stats.zero++;
        return writer.add({ target, source: Source.Zero, offset, length: BLOCK_BYTES, sourceOffset: 0 });
      }
      const found = index.find(bytes);
      if (found) {
        if (found.source === Source.BaseDisk) stats.from_base_disk++;
        else if (found.source === Source.BaseMemory) stats.from_base_memory++;
        else stats.from_overlay++;
        return writer.add({ target, source: found.source, offset, length: BLOCK_BYTES, sourceOffset: found.offset });
      }
      index.add(bytes, { source: target === Target.Disk ? Source.TargetDisk : Source.TargetMemory, offset });
      const before = old ? files[old.source]!.subarray(old.offset, old.offset + BLOCK_BYTES) : ZERO_BLOCK;
      const xor = old && !before.equals(ZERO_BLOCK) ? xorIfSimilar(bytes, before) : null;
      if (old && xor) {
        stats.xor++;
        const source = old.source === Source.BaseDisk ? Source.XorBaseDisk : Source.XorBaseMemory;
        return writer.add({ target, source, offset, length: BLOCK_BYTES, sourceOffset: old.offset, data: xor });
      }
      stats.literal++;
      stats.literal_bytes += BLOCK_BYTES;
      return writer.add({ target, source: Source.Literal, offset, length: BLOCK_BYTES, sourceOffset: 0, data: bytes });
    };

    const changed: number[] = [];
    for (let offset = 0; offset < targetDisk.length; offset += BLOCK_BYTES) {
      const block = targetDisk.subarray(offset, offset + BLOCK_BYTES);
      const before = offset < baseDisk.length ? baseDisk.subarray(offset, offset + BLOCK_BYTES) : ZERO_BLOCK;
      if (block.equals(before)) continue;
      changed.push(offset);
      await chunk(Target.Disk, offset, block, offset < baseDisk.length ? { source: Source.BaseDisk, offset } : null);
    }
    stats.disk_changed_blocks = changed.length;
    for (const offset of changed) {
      for (let at = offset + DISK_INDEX_STEP; at < offset + BLOCK_BYTES && at + BLOCK_BYTES <= targetDisk.length; at += DISK_INDEX_STEP) {
        index.add(targetDisk.subarray(at, at + BLOCK_BYTES), { source: Source.TargetDisk, offset: at });
      }
    }

    if (targetMemory) {
      const { image, chunks } = targetMemory;
      let at = 0;
      const literal = async (end: number) => {
        for (; at < end; at = Math.min(end, at + MAX_LITERAL_RECORD)) {
          const data = image.subarray(at, Math.min(end, at + MAX_LITERAL_RECORD));
          await writer.add({ target: Target.Memory, source: Source.Literal, offset: at, length: data.length, sourceOffset: 0, data });
        }
      };
      for (const page of chunks) {
        await literal(page.offset);
        const old = baseByAddress.get(page.guestAddress);
        await chunk(
          Target.Memory,
          page.offset,
          image.subarray(page.offset, page.offset + BLOCK_BYTES),
          old === undefined ? null : { source: Source.BaseMemory, offset: old },
        );
        at = page.offset + BLOCK_BYTES;
      }
      await literal(image.length);
      stats.memory_pages = chunks.length;
    }
    await writer.finish();
    await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));

    const manifest: OverlayManifest = {
      format: OVERLAY_FORMAT,
      base: base.digest,
      disk: { virtual_size: targetDisk.length },
      memory: targetMemory ? { bytes: targetMemory.image.length } : null,
      service: { ...options.service, disk: 'disk.qcow2', state: targetMemory ? 'memory.sav' : null, boot: base.manifest.boot },
      reference: memoryReference ? 'base-memory' : null,
      frames: writer.frames,
    };
    const manifestBytes = Buffer.from(JSON.stringify(manifest));
    const signature = options.signingKey ? sign(null, manifestBytes, createPrivateKey(await readFile(options.signingKey))) : null;
    const tmp = `${options.out}.${process.pid}.tmp`;
    try {
      const file = createWriteStream(tmp);
      file.write(encodeHeader(manifestBytes, signature));
      await pipeline(createReadStream(framesFile), file);
      await rename(tmp, options.out);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
    stats.frames = writer.frames.length;
    stats.raw_frame_bytes = writer.frames.reduce((sum, f) => sum + f.raw_bytes, 0);
    stats.overlay_bytes = (await stat(options.out)).size;
    return stats;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
