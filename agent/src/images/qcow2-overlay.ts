/**
 * Writing a qcow2 overlay ourselves, block by block, while VM Synthesis decodes an overlay: the synthesized disk is a
 * qcow2 (version 3, 4 KiB clusters) whose backing file is the Base VM's disk, so only the blocks the overlay
 * changes are stored. qemu-img cannot take data blocks from a stream, and qemu-nbd would add a daemon and a
 * device; the subset of qcow2 needed here (no snapshots, compression or encryption) is small. Data clusters are
 * appended in the order they come; the tables (L2, L1, refcounts) and the header are written by finish().
 * Format: QEMU docs/interop/qcow2.txt. Also here: reading a standalone image's guest bytes through its map.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { resolve } from 'node:path';
import { CloudletError } from '../errors';
import { imageMap, type ImageExtent } from './qemu-img';

const CLUSTER = 4096;
const CLUSTER_BITS = 12;
const L2_ENTRIES = CLUSTER / 8;
/** 16-bit refcounts: one refcount block covers this many clusters. */
const REFCOUNT_ORDER = 4;
const REFCOUNTS_PER_BLOCK = CLUSTER / 2;
const COPIED = 1n << 63n;
const ZERO_FLAG = 1n;
const HEADER_LENGTH = 104;
const EXT_BACKING_FORMAT = 0xe2792aca;
/** A cluster whose guest bytes are zero (no host cluster). */
const ZERO = -1;

/** Reads guest bytes of a standalone image straight from its file, through its map (no qemu-img per read). */
export class ImageReader {
  private constructor(
    private readonly file: FileHandle,
    private readonly extents: ImageExtent[],
    readonly size: number,
  ) {}

  static async open(path: string): Promise<ImageReader> {
    const extents = await imageMap(path);
    const file = await open(path, 'r');
    const last = extents[extents.length - 1];
    return new ImageReader(file, extents, last ? last.start + last.length : 0);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const out = Buffer.alloc(length);
    for (const e of this.extents) {
      const from = Math.max(offset, e.start);
      const to = Math.min(offset + length, e.start + e.length);
      if (from >= to || e.zero) continue;
      if (e.hostOffset === null) throw new CloudletError('INVALID_IMAGE', 'the base disk has compressed or backed clusters; it cannot be read directly');
      await this.file.read(out, from - offset, to - from, e.hostOffset + (from - e.start));
    }
    return out;
  }

  /** The parts of [start, end) that hold data, in order: the rest reads as zeros. */
  *dataRanges(start: number, end: number): Generator<[number, number]> {
    for (const e of this.extents) {
      const from = Math.max(start, e.start);
      const to = Math.min(end, e.start + e.length);
      if (from < to && !e.zero) yield [from, to];
    }
  }

  close(): Promise<void> {
    return this.file.close();
  }
}

/**
 * The most a Qcow2OverlayWriter's file of a `size`-byte disk can take: every cluster written, with its tables (an L2
 * entry of 8 bytes and a refcount of 2 per 4 KiB cluster, the L1 table) and the header.
 */
export function qcow2OverlayMaxBytes(size: number): number {
  const clusters = Math.ceil(size / CLUSTER);
  return (clusters + Math.ceil(clusters / L2_ENTRIES) * 2 + Math.ceil(clusters / REFCOUNTS_PER_BLOCK) * 2 + 2) * CLUSTER;
}

export class Qcow2OverlayWriter {
  /**
   * Guest cluster → host offset of its data, or ZERO; 0 where unset. One array per L2 table (512 clusters), made when
   * a cluster of it is set: 8 bytes a cluster, as the tables on disk, whatever the overlay writes.
   */
  private readonly tables = new Map<number, Float64Array>();
  private nextHost = CLUSTER; // cluster 0 is the header

  private constructor(
    private readonly file: FileHandle,
    private readonly backing: string,
    private readonly size: number,
    private readonly backingReader: ImageReader,
  ) {}

  /** A new overlay at `path` on the standalone qcow2 `backing` (read through `backingReader`), `size` bytes large. */
  static async create(path: string, backing: string, backingReader: ImageReader, size: number): Promise<Qcow2OverlayWriter> {
    if (size % CLUSTER !== 0) throw new CloudletError('INVALID_PARAMETER', `a qcow2 overlay size must be a multiple of ${CLUSTER}`);
    return new Qcow2OverlayWriter(await open(path, 'wx+', 0o644), resolve(backing), size, backingReader);
  }

  /** Guest bytes at `offset` (cluster-aligned, whole clusters), each cluster written at most once. */
  async write(offset: number, data: Buffer): Promise<void> {
    const first = offset / CLUSTER;
    for (let i = 0; i < data.length / CLUSTER; i++) this.set(first + i, this.nextHost + i * CLUSTER);
    await this.file.write(data, 0, data.length, this.nextHost);
    this.nextHost += data.length;
  }

  /**
   * Zeros at `offset` (whole clusters). Only clusters the backing file has data in need an entry: the rest read as
   * zeros already, so a run of zeros over a huge, empty disk costs nothing.
   */
  zero(offset: number, length: number): void {
    for (const [from, to] of this.backingReader.dataRanges(offset, offset + length)) {
      for (let i = Math.floor(from / CLUSTER); i < Math.ceil(to / CLUSTER); i++) this.set(i, ZERO);
    }
  }

  /** The guest's view of any byte range: what was written here, else the backing file's bytes. */
  async read(offset: number, length: number): Promise<Buffer> {
    const out = Buffer.alloc(length);
    // Runs of clusters stored back to back here, or all in the backing file, are read in one call each.
    let runStart = offset;
    let runHost: number | undefined;
    const flush = async (end: number) => {
      if (end === runStart) return;
      if (runHost === undefined) {
        const to = Math.min(end, this.backingReader.size);
        if (runStart < to) (await this.backingReader.read(runStart, to - runStart)).copy(out, runStart - offset);
      } else if (runHost !== ZERO) {
        await this.file.read(out, runStart - offset, end - runStart, runHost);
      }
      runStart = end;
    };
    for (let at = offset; at < offset + length;) {
      const cluster = Math.floor(at / CLUSTER);
      const end = Math.min(offset + length, (cluster + 1) * CLUSTER);
      const stored = this.get(cluster);
      const host = stored === undefined || stored === ZERO ? stored : stored + (at - cluster * CLUSTER);
      const continues =
        at === runStart ||
        (host === undefined
          ? runHost === undefined
          : host === ZERO
            ? runHost === ZERO
            : runHost !== undefined && runHost !== ZERO && runHost + (at - runStart) === host);
      if (!continues) await flush(at);
      if (at === runStart) runHost = host;
      at = end;
    }
    await flush(offset + length);
    return out;
  }

  /** Writes the tables and the header: the image is complete. It can still be read through read() until close(). */
  async finish(): Promise<void> {
    const l1Size = Math.ceil(this.size / (CLUSTER * L2_ENTRIES));
    const l2Tables = new Map<number, Buffer>();
    for (const [l1Index, hosts] of this.tables) {
      const table = Buffer.alloc(CLUSTER);
      hosts.forEach((host, i) => {
        if (host) table.writeBigUInt64BE(host === ZERO ? ZERO_FLAG : BigInt(host) | COPIED, i * 8);
      });
      l2Tables.set(l1Index, table);
    }
    const l1Clusters = Math.ceil((l1Size * 8) / CLUSTER);
    const l2Start = this.nextHost;
    const l1Offset = l2Start + l2Tables.size * CLUSTER;
    const refcountStart = l1Offset + l1Clusters * CLUSTER;
    // The refcount structures count themselves: grow them until they cover every cluster, their own included.
    let blocks = 0;
    let tableClusters = 0;
    for (;;) {
      const total = refcountStart / CLUSTER + blocks + tableClusters;
      const needBlocks = Math.ceil(total / REFCOUNTS_PER_BLOCK);
      const needTable = Math.ceil((needBlocks * 8) / CLUSTER);
      if (needBlocks === blocks && needTable === tableClusters) break;
      blocks = needBlocks;
      tableClusters = needTable;
    }
    const totalClusters = refcountStart / CLUSTER + blocks + tableClusters;
    const refcountTableOffset = refcountStart + blocks * CLUSTER;

    const l1 = Buffer.alloc(l1Clusters * CLUSTER);
    const l2 = Buffer.alloc(l2Tables.size * CLUSTER);
    [...l2Tables.entries()]
      .sort((a, b) => a[0] - b[0])
      .forEach(([l1Index, table], i) => {
        table.copy(l2, i * CLUSTER);
        l1.writeBigUInt64BE(BigInt(l2Start + i * CLUSTER) | COPIED, l1Index * 8);
      });
    const refcounts = Buffer.alloc(blocks * CLUSTER);
    for (let i = 0; i < totalClusters; i++) refcounts.writeUInt16BE(1, i * 2);
    const refcountTable = Buffer.alloc(tableClusters * CLUSTER);
    for (let i = 0; i < blocks; i++) refcountTable.writeBigUInt64BE(BigInt(refcountStart + i * CLUSTER), i * 8);

    await this.file.write(Buffer.concat([l2, l1, refcounts, refcountTable]), 0, undefined, l2Start);
    await this.file.write(this.header(l1Size, l1Offset, refcountTableOffset, tableClusters), 0, undefined, 0);
  }

  private set(cluster: number, host: number): void {
    const l1Index = Math.floor(cluster / L2_ENTRIES);
    let table = this.tables.get(l1Index);
    if (!table) this.tables.set(l1Index, (table = new Float64Array(L2_ENTRIES)));
    table[cluster % L2_ENTRIES] = host;
  }

  private get(cluster: number): number | undefined {
    return this.tables.get(Math.floor(cluster / L2_ENTRIES))?.[cluster % L2_ENTRIES] || undefined;
  }

  private header(l1Size: number, l1Offset: number, refcountTableOffset: number, refcountTableClusters: number): Buffer {
    const backing = Buffer.from(this.backing, 'utf8');
    const h = Buffer.alloc(CLUSTER);
    const backingAt = HEADER_LENGTH + 16 + 8; // after the backing-format extension and the end-of-extensions marker
    if (backingAt + backing.length > CLUSTER) throw new CloudletError('INVALID_PARAMETER', `backing file path too long: ${this.backing}`);
    h.write('QFI\xfb', 0, 'latin1');
    h.writeUInt32BE(3, 4);
    h.writeBigUInt64BE(BigInt(backingAt), 8);
    h.writeUInt32BE(backing.length, 16);
    h.writeUInt32BE(CLUSTER_BITS, 20);
    h.writeBigUInt64BE(BigInt(this.size), 24);
    h.writeUInt32BE(l1Size, 36);
    h.writeBigUInt64BE(BigInt(l1Offset), 40);
    h.writeBigUInt64BE(BigInt(refcountTableOffset), 48);
    h.writeUInt32BE(refcountTableClusters, 56);
    h.writeUInt32BE(REFCOUNT_ORDER, 96);
    h.writeUInt32BE(HEADER_LENGTH, 100);
    h.writeUInt32BE(EXT_BACKING_FORMAT, HEADER_LENGTH);
    h.writeUInt32BE(5, HEADER_LENGTH + 4);
    h.write('qcow2', HEADER_LENGTH + 8, 'latin1');
    backing.copy(h, backingAt); // the end-of-extensions marker before it is the zeros already there
    return h;
  }

  /** Closes the file; before finish(), the image is incomplete and the caller removes it. */
  async close(): Promise<void> {
    await this.file.close().catch(() => {});
  }
}
