/**
 * The VM overlay format, version 2 (docs/overlay-format.md): a fixed header, a JSON manifest, an optional ed25519
 * signature over the manifest, then independent zstd frames (optionally compressed against the base's memory state). Each frame holds records that write bytes of the
 * target disk or the target memory state, from the frame itself (literal), as zeros, or copied from the base disk,
 * the base memory state, or what the overlay already wrote. This module only encodes and decodes; it does no I/O.
 */
import { createHash, verify, type KeyObject } from 'node:crypto';
import { CloudletError } from '../errors';
import { parseManifest } from '../core/manifest';
import type { ServiceManifest } from '../core/types';

export const OVERLAY_MAGIC = 'CLOVRLAY';
export const OVERLAY_FORMAT = 2;
/** magic[8], u32 format, u32 manifest bytes, u32 signature bytes, sha256(manifest)[32]; big-endian. */
export const HEADER_BYTES = 52;
/** Disk records are whole 4 KiB blocks: the synthesized qcow2 has 4 KiB clusters. */
export const BLOCK_BYTES = 4096;
const SIGNATURE_BYTES = 64;

export const OVERLAY_LIMITS = {
  overlayBytes: 2 ** 36,
  manifestBytes: 1 << 20,
  frameRawBytes: 16 << 20,
  frames: 1 << 16,
  diskBytes: 2 ** 40,
  /** A save image holds at most the guest's RAM plus device state and headers. */
  memorySlackBytes: 64 << 20,
};

/** What the frames may have been compressed against (zstd --patch-from): null, or the base's memory state file. */
export type FrameReference = 'base-memory' | null;

export interface FrameEntry {
  /** Compressed bytes in the overlay. */
  bytes: number;
  raw_bytes: number;
  sha256: string;
}

export interface OverlayManifest {
  format: typeof OVERLAY_FORMAT;
  /** Digest of the Base VM the overlay applies to. */
  base: string;
  disk: { virtual_size: number };
  /** The saved memory state's size, or null for a service that cold-boots. */
  memory: { bytes: number } | null;
  /** The Service VM's manifest: disk `disk.qcow2`, state `memory.sav` (or null), boot files of the base. */
  service: ServiceManifest;
  reference: FrameReference;
  frames: FrameEntry[];
}

export const enum Target {
  Disk = 1,
  Memory = 2,
}
/**
 * Where a record's bytes come from. The copies read `length` bytes at `sourceOffset` of the base disk (guest
 * offset), the base memory state (file offset), the target disk or the target memory state (as written so far). The
 * XOR sources carry `length` bytes that are XORed with the base's bytes at `sourceOffset`: a page or block that
 * changed a little is mostly zeros that way, and compresses to almost nothing.
 */
export const enum Source {
  Literal = 0,
  Zero = 1,
  BaseDisk = 2,
  BaseMemory = 3,
  TargetDisk = 4,
  TargetMemory = 5,
  XorBaseDisk = 6,
  XorBaseMemory = 7,
}

export interface OverlayRecord {
  target: Target;
  source: Source;
  /** Where the bytes go: a disk byte offset, or a byte offset in the memory state file. */
  offset: number;
  length: number;
  /** Where they come from, for the copying sources. */
  sourceOffset: number;
  /** The bytes, for Literal and the XOR sources. */
  data?: Buffer;
}

const RECORD_HEAD = 16;
const REF_BYTES = 8;
const hasSourceOffset = (source: Source) => source >= Source.BaseDisk;
export const hasData = (source: Source) => source === Source.Literal || source >= Source.XorBaseDisk;

/** u8 target, u8 source, u16 0, u32 length, u64 offset, [u64 source offset: copies, XOR], [data: literal, XOR]; little-endian. */
export function encodeRecord(r: OverlayRecord): Buffer {
  const head = Buffer.alloc(RECORD_HEAD + (hasSourceOffset(r.source) ? REF_BYTES : 0));
  head.writeUInt8(r.target, 0);
  head.writeUInt8(r.source, 1);
  head.writeUInt32LE(r.length, 4);
  head.writeBigUInt64LE(BigInt(r.offset), 8);
  if (hasSourceOffset(r.source)) head.writeBigUInt64LE(BigInt(r.sourceOffset), RECORD_HEAD);
  return hasData(r.source) ? Buffer.concat([head, r.data!]) : head;
}

export function* decodeRecords(frame: Buffer): Generator<OverlayRecord> {
  let at = 0;
  while (at < frame.length) {
    if (frame.length - at < RECORD_HEAD) throw invalid('a frame ends inside a record');
    const target = frame.readUInt8(at) as Target;
    const source = frame.readUInt8(at + 1) as Source;
    if ((target !== Target.Disk && target !== Target.Memory) || source > Source.XorBaseMemory || frame.readUInt16LE(at + 2) !== 0) {
      throw invalid(`unknown record type ${target}/${source}`);
    }
    const length = frame.readUInt32LE(at + 4);
    const offset = Number(frame.readBigUInt64LE(at + 8));
    at += RECORD_HEAD;
    let sourceOffset = 0;
    if (hasSourceOffset(source)) {
      if (frame.length - at < REF_BYTES) throw invalid('a frame ends inside a record');
      sourceOffset = Number(frame.readBigUInt64LE(at));
      at += REF_BYTES;
    }
    if (hasData(source)) {
      if (frame.length - at < length) throw invalid('a frame ends inside a record');
      yield { target, source, offset, length, sourceOffset, data: frame.subarray(at, at + length) };
      at += length;
    } else {
      yield { target, source, offset, length, sourceOffset };
    }
  }
}

export const sha256 = (data: Buffer) => createHash('sha256').update(data).digest('hex');

export function encodeHeader(manifest: Buffer, signature: Buffer | null): Buffer {
  const header = Buffer.alloc(HEADER_BYTES);
  header.write(OVERLAY_MAGIC, 0, 'latin1');
  header.writeUInt32BE(OVERLAY_FORMAT, 8);
  header.writeUInt32BE(manifest.length, 12);
  header.writeUInt32BE(signature?.length ?? 0, 16);
  createHash('sha256').update(manifest).digest().copy(header, 20);
  return Buffer.concat([header, manifest, signature ?? Buffer.alloc(0)]);
}

export interface DecodedHeader {
  manifestBytes: number;
  signatureBytes: number;
  manifestSha256: Buffer;
}

export function decodeHeader(header: Buffer): DecodedHeader {
  if (header.length < HEADER_BYTES) throw invalid(`truncated header (${header.length} of ${HEADER_BYTES} bytes)`);
  if (header.toString('latin1', 0, 8) !== OVERLAY_MAGIC) throw invalid('bad magic: not a VM overlay');
  const format = header.readUInt32BE(8);
  if (format !== OVERLAY_FORMAT) {
    throw new CloudletError('OVERLAY_UNSUPPORTED', `overlay format version ${format} is not supported (this cloudlet reads version ${OVERLAY_FORMAT})`, {
      details: { format },
    });
  }
  const manifestBytes = header.readUInt32BE(12);
  const signatureBytes = header.readUInt32BE(16);
  if (manifestBytes === 0 || manifestBytes > OVERLAY_LIMITS.manifestBytes) throw invalid(`bad manifest length ${manifestBytes}`);
  if (signatureBytes !== 0 && signatureBytes !== SIGNATURE_BYTES) throw invalid(`bad signature length ${signatureBytes}`);
  return { manifestBytes, signatureBytes, manifestSha256: header.subarray(20, HEADER_BYTES) };
}

/**
 * Checks the manifest's hash, its signature against `trustedKeys` (when any key is trusted, an overlay must be
 * signed by one of them), and its shape and limits.
 */
export function decodeManifest(header: DecodedHeader, manifest: Buffer, signature: Buffer, trustedKeys: KeyObject[]): OverlayManifest {
  if (!createHash('sha256').update(manifest).digest().equals(header.manifestSha256)) throw invalid('the manifest does not match its SHA-256');
  if (signature.length > 0 || trustedKeys.length > 0) {
    if (signature.length === 0) throw new CloudletError('OVERLAY_UNTRUSTED', 'the overlay is not signed, and this cloudlet only accepts signed overlays');
    if (!trustedKeys.some((key) => verify(null, manifest, key, signature))) {
      throw new CloudletError('OVERLAY_UNTRUSTED', 'the overlay signature does not verify against any key this cloudlet trusts');
    }
  }
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(manifest.toString('utf8')) as Record<string, unknown>;
  } catch (err) {
    throw invalid(`the manifest is not JSON: ${(err as Error).message}`);
  }
  return checkManifest(json);
}

function checkManifest(json: Record<string, unknown>): OverlayManifest {
  if (json.format !== OVERLAY_FORMAT) throw new CloudletError('OVERLAY_UNSUPPORTED', `overlay manifest format ${String(json.format)} is not supported`);
  const base = json.base;
  if (typeof base !== 'string' || !/^[0-9a-f]{64}$/.test(base)) throw invalid('manifest: base must be a sha256 digest');
  const disk = json.disk as { virtual_size?: unknown } | undefined;
  const diskSize = disk?.virtual_size;
  if (!isCount(diskSize) || diskSize % BLOCK_BYTES !== 0) throw invalid('manifest: disk.virtual_size must be a multiple of 4096');
  if (diskSize > OVERLAY_LIMITS.diskBytes) throw tooLarge(`a disk of ${diskSize} bytes`);
  let service: ServiceManifest;
  try {
    service = parseManifest(json.service);
  } catch (err) {
    throw invalid(`manifest: service: ${(err as Error).message}`);
  }
  const memory = json.memory as { bytes?: unknown } | null | undefined;
  if (memory !== null && !isCount(memory?.bytes)) throw invalid('manifest: memory must be null or {bytes}');
  if ((memory === null) !== (service.state === null)) throw invalid('manifest: memory and service.state must both be present or both be null');
  if (memory && (memory.bytes as number) > service.memory_mib * 2 ** 20 + OVERLAY_LIMITS.memorySlackBytes) {
    throw tooLarge(`a memory state of ${memory.bytes as number} bytes for a ${service.memory_mib} MiB guest`);
  }
  const reference = json.reference;
  if (reference !== null && reference !== 'base-memory') throw invalid('manifest: reference must be null or "base-memory"');
  const frames = json.frames;
  if (!Array.isArray(frames) || frames.length > OVERLAY_LIMITS.frames) throw invalid('manifest: frames must be a list');
  for (const f of frames as FrameEntry[]) {
    if (!isCount(f?.bytes) || !isCount(f.raw_bytes) || typeof f.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(f.sha256))
      throw invalid('manifest: bad frame entry');
    if (f.raw_bytes > OVERLAY_LIMITS.frameRawBytes) throw tooLarge(`a frame of ${f.raw_bytes} bytes`);
  }
  return {
    format: OVERLAY_FORMAT,
    base,
    disk: { virtual_size: diskSize },
    memory: memory ? { bytes: memory.bytes as number } : null,
    service,
    reference,
    frames: frames as FrameEntry[],
  };
}

/** Bytes of the whole overlay file its header and manifest describe. */
export function overlayBytes(header: DecodedHeader, manifest: OverlayManifest): number {
  return HEADER_BYTES + header.manifestBytes + header.signatureBytes + manifest.frames.reduce((sum, f) => sum + f.bytes, 0);
}

const isCount = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

export function invalid(message: string): CloudletError {
  return new CloudletError('OVERLAY_INVALID', `overlay: ${message}`);
}

function tooLarge(what: string): CloudletError {
  return new CloudletError('OVERLAY_TOO_LARGE', `overlay: ${what} is over this cloudlet's limit`);
}
