/**
 * A Base VM's chunk index (docs/overlay-format.md): the MD5 of every non-zero 4 KiB block of its disk (guest view,
 * 4 KiB-aligned) and of every RAM page of its memory state, with where each one is. It is what overlay creation
 * deduplicates against: built once when the base is imported, stored beside it (`chunk-index.bin`), exported with it,
 * so a developer's `cloudlet-overlay create` reads it instead of hashing the base again.
 *
 * Layout, little-endian: magic "CLCHUNKS", u32 version, u32 J, J bytes of JSON ({block_bytes, hash, disk, memory}),
 * then `disk.entries` records (u64 guest offset, 16-byte MD5), then `memory.entries` records (u64 file offset, u64
 * guest address, u32 RAM block (index into `memory.ram_blocks`, or 0xffffffff for a fixed 4 KiB block of a stream
 * that was not understood, whose number is the address), u32 0, 16-byte MD5).
 *
 * Built in a worker thread: hashing a base (a second or two per 384 MiB) never holds up the agent's event loop.
 * It lives with the save-image readers, below both of its users: core/bases.ts builds it, synthesis/create.ts reads it.
 */
import { createHash } from 'node:crypto';
import { open, readFile, rename, rm } from 'node:fs/promises';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import { ImageReader } from '../images/qcow2-overlay';
import { readSaveImageHeader } from './save-image';
import { findRamPages, type RamPage } from './migration-stream';

export const CHUNK_INDEX_FILE = 'chunk-index.bin';
const MAGIC = Buffer.from('CLCHUNKS');
const VERSION = 1;
const BLOCK = 4096;
const HASH_BYTES = 16;
const DISK_ENTRY = 8 + HASH_BYTES;
const MEMORY_ENTRY = 8 + 8 + 4 + 4 + HASH_BYTES;
const FIXED_BLOCK = 0xffffffff;
const WINDOW = 1 << 20;
const ZERO = Buffer.alloc(BLOCK);

export interface DiskChunk {
  offset: number;
  hash: Buffer;
}

export interface MemoryChunk extends RamPage {
  hash: Buffer;
}

export interface ChunkIndex {
  disk: DiskChunk[];
  /** Null for a base without a memory state. */
  memory: MemoryChunk[] | null;
}

/** The key chunks are matched by: also what overlay creation computes for the target's chunks. */
export function chunkHash(chunk: Buffer): Buffer {
  return createHash('md5').update(chunk).digest();
}

interface BuildJob {
  chunkIndex: { disk: string; memoryState: string | null; out: string };
}

/**
 * Index the base disk (a standalone qcow2) and memory state (a libvirt save image, or null) into `out`, atomically,
 * in a worker thread.
 */
export function buildChunkIndex(disk: string, memoryState: string | null, out: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const job: BuildJob = { chunkIndex: { disk, memoryState, out } };
    const worker = new Worker(__filename, { workerData: job });
    worker.once('message', (error: string | null) => (error === null ? resolve() : reject(new Error(`indexing the base: ${error}`))));
    worker.once('error', reject);
    worker.once('exit', (code) => reject(new Error(`indexing the base: the worker exited with ${code}`)));
  });
}

async function build({ disk, memoryState, out }: BuildJob['chunkIndex']): Promise<void> {
  const index: ChunkIndex = { disk: await diskChunks(disk), memory: memoryState ? await memoryChunks(memoryState) : null };
  const tmp = `${out}.tmp`;
  try {
    await writeChunkIndex(tmp, index);
    await rename(tmp, out);
  } finally {
    await rm(tmp, { force: true });
  }
}

if (!isMainThread && (workerData as Partial<BuildJob> | null)?.chunkIndex) {
  build((workerData as BuildJob).chunkIndex).then(
    () => parentPort!.postMessage(null),
    (err: Error) => parentPort!.postMessage(err.message),
  );
}

async function diskChunks(file: string): Promise<DiskChunk[]> {
  const reader = await ImageReader.open(file);
  try {
    const chunks: DiskChunk[] = [];
    for (let at = 0; at < reader.size; at += WINDOW) {
      const window = await reader.read(at, Math.min(WINDOW, reader.size - at));
      for (let offset = 0; offset + BLOCK <= window.length; offset += BLOCK) {
        const block = window.subarray(offset, offset + BLOCK);
        if (!block.equals(ZERO)) chunks.push({ offset: at + offset, hash: chunkHash(block) });
      }
    }
    return chunks;
  } finally {
    await reader.close();
  }
}

/** A save image and its 4 KiB chunks: its RAM pages, or fixed blocks of the file when its stream is not understood. */
export async function readSaveImageChunks(file: string): Promise<{ image: Buffer; chunks: RamPage[] }> {
  const header = await readSaveImageHeader(file);
  const image = await readFile(file);
  const pages = findRamPages(image, header.streamOffset);
  const chunks = pages ?? Array.from({ length: Math.floor(image.length / BLOCK) }, (_, i) => ({ offset: i * BLOCK, guestAddress: `file@${i}` }));
  return { image, chunks };
}

async function memoryChunks(file: string): Promise<MemoryChunk[]> {
  const { image, chunks: pages } = await readSaveImageChunks(file);
  return pages.map((page) => ({ ...page, hash: chunkHash(image.subarray(page.offset, page.offset + BLOCK)) }));
}

async function writeChunkIndex(file: string, index: ChunkIndex): Promise<void> {
  const ramBlocks = [...new Set((index.memory ?? []).map((c) => splitAddress(c.guestAddress).block).filter((b) => b !== 'file'))];
  const json = Buffer.from(
    JSON.stringify({
      block_bytes: BLOCK,
      hash: 'md5',
      disk: { entries: index.disk.length },
      memory: index.memory && { entries: index.memory.length, ram_blocks: ramBlocks },
    }),
  );
  const head = Buffer.alloc(MAGIC.length + 8);
  MAGIC.copy(head);
  head.writeUInt32LE(VERSION, 8);
  head.writeUInt32LE(json.length, 12);
  const disk = Buffer.alloc(index.disk.length * DISK_ENTRY);
  index.disk.forEach((c, i) => {
    disk.writeBigUInt64LE(BigInt(c.offset), i * DISK_ENTRY);
    c.hash.copy(disk, i * DISK_ENTRY + 8);
  });
  const memory = Buffer.alloc((index.memory?.length ?? 0) * MEMORY_ENTRY);
  (index.memory ?? []).forEach((c, i) => {
    const at = i * MEMORY_ENTRY;
    const { block, address } = splitAddress(c.guestAddress);
    memory.writeBigUInt64LE(BigInt(c.offset), at);
    memory.writeBigUInt64LE(address, at + 8);
    memory.writeUInt32LE(block === 'file' ? FIXED_BLOCK : ramBlocks.indexOf(block), at + 16);
    c.hash.copy(memory, at + 24);
  });
  const out = await open(file, 'w', 0o644);
  try {
    await out.writev([head, json, disk, memory]);
  } finally {
    await out.close();
  }
}

/** Reads an index written by buildChunkIndex; throws on anything else. */
export async function readChunkIndex(file: string): Promise<ChunkIndex> {
  const data = await readFile(file);
  if (!data.subarray(0, MAGIC.length).equals(MAGIC) || data.readUInt32LE(8) !== VERSION) throw new Error(`${file}: not a chunk index of version ${VERSION}`);
  const jsonEnd = 16 + data.readUInt32LE(12);
  const meta = JSON.parse(data.toString('utf8', 16, jsonEnd)) as {
    block_bytes: number;
    disk: { entries: number };
    memory: { entries: number; ram_blocks: string[] } | null;
  };
  const diskEnd = jsonEnd + meta.disk.entries * DISK_ENTRY;
  if (meta.block_bytes !== BLOCK || data.length !== diskEnd + (meta.memory?.entries ?? 0) * MEMORY_ENTRY) throw new Error(`${file}: a damaged chunk index`);
  const disk = Array.from({ length: meta.disk.entries }, (_, i) => {
    const at = jsonEnd + i * DISK_ENTRY;
    return { offset: Number(data.readBigUInt64LE(at)), hash: data.subarray(at + 8, at + DISK_ENTRY) };
  });
  const memory =
    meta.memory &&
    Array.from({ length: meta.memory.entries }, (_, i) => {
      const at = diskEnd + i * MEMORY_ENTRY;
      const block = data.readUInt32LE(at + 16);
      const address = data.readBigUInt64LE(at + 8);
      return {
        offset: Number(data.readBigUInt64LE(at)),
        guestAddress: block === FIXED_BLOCK ? `file@${address}` : `${meta.memory!.ram_blocks[block]}@${address}`,
        hash: data.subarray(at + 24, at + MEMORY_ENTRY),
      };
    });
  return { disk, memory };
}

/** `block@address` (migration-stream.ts) → its parts. */
function splitAddress(guestAddress: string): { block: string; address: bigint } {
  const at = guestAddress.lastIndexOf('@');
  return { block: guestAddress.slice(0, at), address: BigInt(guestAddress.slice(at + 1)) };
}
