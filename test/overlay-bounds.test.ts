// What an overlay's bytes cannot make the cloudlet do, checked on the applying itself (no VM: a disk-only overlay on a
// small base): expand a few KB into gigabytes of buffers, pass off another valid zstd frame as a signed one, carry
// a changed manifest when no key is trusted, leave a disk block half written, or write or read the disk before the
// memory state is complete.
import t from 'tap';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import type { BaseVm } from '../agent/src/core/bases';
import { compressFrame } from '../agent/src/images/zstd';
import { applyOverlay, expandedBytes, openOverlay } from '../agent/src/synthesis/apply';
import {
  encodeHeader,
  encodeRecord,
  HEADER_BYTES,
  OVERLAY_FORMAT,
  sha256,
  Source,
  Target,
  type OverlayManifest,
  type OverlayRecord,
} from '../agent/src/synthesis/overlay-format';

const run = promisify(execFile);
const MiB = 2 ** 20;
const GiB = 2 ** 30;
const BASE_DISK_BYTES = 64 * MiB;
let dir: string;
let base: BaseVm;

const SERVICE = {
  format: 1,
  service_id: 'test.bounds',
  version: '1',
  port: 8080,
  memory_mib: 128,
  shareable: false,
  readiness: { type: 'tcp' },
  disk: 'disk.qcow2',
  state: null,
  boot: null,
};

t.before(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-overlay-bounds-'));
  const baseDir = path.join(dir, 'base');
  await mkdir(baseDir);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(baseDir, 'disk.qcow2'), String(BASE_DISK_BYTES)]);
  base = {
    digest: 'b'.repeat(64),
    name: 'bounds',
    manifest: { ...SERVICE, tags: [], description: '', vcpus: 1, readiness: { type: 'tcp', timeout_ms: 60000 } } as BaseVm['manifest'],
    dir: baseDir,
    files: [],
  };
});
t.teardown(() => rm(dir, { recursive: true, force: true }));

/** An overlay of `frames` (each a list of records, compressed at level 1) on the test base; disk-only unless `memoryBytes`. */
async function overlayOf(virtualSize: number, frames: OverlayRecord[][], memoryBytes?: number): Promise<{ bytes: Buffer; frames: Buffer[] }> {
  const raw = frames.map((records) => Buffer.concat(records.map(encodeRecord)));
  const compressed = await Promise.all(raw.map((r) => compressFrame(r, 1)));
  const manifest = {
    format: OVERLAY_FORMAT,
    base: base.digest,
    disk: { virtual_size: virtualSize },
    memory: memoryBytes === undefined ? null : { bytes: memoryBytes },
    service: memoryBytes === undefined ? SERVICE : { ...SERVICE, state: 'memory.sav' },
    reference: null,
    frames: compressed.map((c, i) => ({ bytes: c.length, raw_bytes: raw[i]!.length, sha256: sha256(c) })),
  };
  return { bytes: Buffer.concat([encodeHeader(Buffer.from(JSON.stringify(manifest)), null), ...compressed]), frames: compressed };
}

/** Opens and applies `bytes` to a new disk (and memory state, if it has one); resolves when the disk is complete. */
async function apply(bytes: Buffer, name: string): Promise<string> {
  const opened = await openOverlay(Readable.from([bytes]), bytes.length, []);
  const disk = path.join(dir, `${name}.qcow2`);
  await applyOverlay(
    opened,
    base,
    { disk, memory: opened.manifest.memory ? path.join(dir, `${name}.sav`) : null },
    () => {},
    async () => disk,
  );
  return disk;
}

t.test('a few-KB overlay whose copies and zeros claim gigabytes is applied in bounded buffers', async (tt) => {
  const copies = 4;
  const records: OverlayRecord[] = [
    { target: Target.Disk, source: Source.Zero, offset: 0, length: GiB, sourceOffset: 0 },
    ...Array.from({ length: copies }, (_, i) => ({
      target: Target.Disk,
      source: Source.BaseDisk,
      offset: GiB + i * BASE_DISK_BYTES,
      length: BASE_DISK_BYTES,
      sourceOffset: 0,
    })),
    { target: Target.Disk, source: Source.TargetDisk, offset: 2 * GiB, length: BASE_DISK_BYTES, sourceOffset: GiB },
  ];
  const expanded = GiB + (copies + 1) * BASE_DISK_BYTES;
  const { bytes } = await overlayOf(3 * GiB, [records]);
  tt.ok(bytes.length < 4096, `the overlay is ${bytes.length} bytes`);
  const before = process.memoryUsage().arrayBuffers;
  let peak = before;
  const sample = setInterval(() => {
    peak = Math.max(peak, process.memoryUsage().arrayBuffers);
  }, 1);
  try {
    await apply(bytes, 'expanding');
  } finally {
    clearInterval(sample);
  }
  peak = Math.max(peak, process.memoryUsage().arrayBuffers);
  tt.ok(peak - before < 128 * MiB, `buffers grew by ${Math.round((peak - before) / MiB)} MiB while ${expanded / MiB} MiB were expanded`);
  await run('qemu-img', ['check', path.join(dir, 'expanding.qcow2')]);
});

t.test('an overlay is as large on disk as its declared disk and memory can expand to, which a terabyte claim cannot meet', async (tt) => {
  const service = { ...SERVICE, state: 'memory.sav' } as BaseVm['manifest'];
  const manifest: OverlayManifest = {
    format: OVERLAY_FORMAT,
    base: base.digest,
    disk: { virtual_size: 2 ** 40 },
    memory: { bytes: 100 * MiB },
    service,
    reference: null,
    frames: [],
  };
  tt.ok(expandedBytes(manifest) > 2 ** 40 + 100 * MiB, 'every cluster written, its tables and the memory state');
  tt.ok(expandedBytes(manifest) < 2 ** 40 * 1.01, 'the tables are a small share of it');
});

t.test('a frame replaced by another valid zstd frame of the same length is refused by its SHA-256, not by zstd', async (tt) => {
  const literal = (data: Buffer): OverlayRecord => ({ target: Target.Disk, source: Source.Literal, offset: 0, length: data.length, sourceOffset: 0, data });
  const signed = await overlayOf(BASE_DISK_BYTES, [[literal(randomBytes(4096))]]);
  const other = await overlayOf(BASE_DISK_BYTES, [[literal(randomBytes(4096))]]);
  tt.equal(other.frames[0]!.length, signed.frames[0]!.length, 'the two frames have the same length');
  const swapped = Buffer.concat([signed.bytes.subarray(0, signed.bytes.length - signed.frames[0]!.length), other.frames[0]!]);
  await tt.resolves(apply(other.bytes, 'other'), 'the other frame is a valid overlay frame in its own right');
  await tt.rejects(apply(swapped, 'swapped'), { code: 'OVERLAY_INVALID', message: /frame 0 does not match its SHA-256/ });
});

t.test('with no key trusted, a manifest changed after it was hashed is refused', async (tt) => {
  const { bytes } = await overlayOf(BASE_DISK_BYTES, [[{ target: Target.Disk, source: Source.Zero, offset: 0, length: 4096, sourceOffset: 0 }]]);
  // Still valid JSON of a valid manifest: only its hash in the header tells the change.
  const changed = Buffer.from(bytes.toString('latin1').replace('"port":8080', '"port":8081'), 'latin1');
  tt.not(changed.subarray(HEADER_BYTES).toString(), bytes.subarray(HEADER_BYTES).toString());
  await tt.resolves(
    openOverlay(Readable.from([bytes]), bytes.length, []).then((o) => o.reader.close()),
    'the unchanged overlay opens',
  );
  await tt.rejects(openOverlay(Readable.from([changed]), changed.length, []), { code: 'OVERLAY_INVALID', message: /manifest does not match its SHA-256/ });
});

const disk = (source: Source, offset: number, length: number, data?: Buffer, sourceOffset = 0): OverlayRecord => ({
  target: Target.Disk,
  source,
  offset,
  length,
  sourceOffset,
  data,
});

t.test('disk records may start and end inside a block when the next one continues there: the blocks are stored whole', async (tt) => {
  const a = randomBytes(1024);
  const b = randomBytes(3072 + 4096 + 1024);
  const records = [disk(Source.Literal, 0, 1024, a), disk(Source.Zero, 1024, 2048), disk(Source.Literal, 3072, b.length, b), disk(Source.Zero, 11264, 5120)];
  const { bytes } = await overlayOf(BASE_DISK_BYTES, [records]);
  const image = await apply(bytes, 'pieces');
  await run('qemu-img', ['check', image]);
  await run('qemu-img', ['convert', '-O', 'raw', image, path.join(dir, 'pieces.raw')]);
  const raw = await readFile(path.join(dir, 'pieces.raw'));
  tt.same(raw.subarray(0, 16384), Buffer.concat([a, Buffer.alloc(2048), b, Buffer.alloc(5120)]));
});

t.test('a disk block left half written, or a record that starts inside a block it does not continue, is refused', async (tt) => {
  const piece = randomBytes(1024);
  const halfBlock = await overlayOf(BASE_DISK_BYTES, [[disk(Source.Literal, 0, 1024, piece)]]);
  await tt.rejects(apply(halfBlock.bytes, 'half'), { code: 'OVERLAY_INVALID', message: /end inside the block at 0/ });
  const jump = await overlayOf(BASE_DISK_BYTES, [[disk(Source.Literal, 0, 1024, piece), disk(Source.Literal, 8192, 1024, piece)]]);
  await tt.rejects(apply(jump.bytes, 'jump'), { code: 'OVERLAY_INVALID', message: /out of order or bounds at 8192/ });
  const inside = await overlayOf(BASE_DISK_BYTES, [[disk(Source.Literal, 1024, 1024, piece)]]);
  await tt.rejects(apply(inside.bytes, 'inside'), { code: 'OVERLAY_INVALID', message: /out of order or bounds at 1024/ });
  const ownBlock = await overlayOf(BASE_DISK_BYTES, [[disk(Source.Literal, 4096, 1024, piece), disk(Source.TargetDisk, 5120, 3072, undefined, 4096)]]);
  await tt.rejects(
    apply(ownBlock.bytes, 'own'),
    { code: 'OVERLAY_INVALID', message: /copies from beyond what it may read/ },
    'not from the block being written',
  );
});

t.test('the memory state comes first: a disk record before it is complete, or a memory record after the disk, is refused', async (tt) => {
  const memory = (source: Source, offset: number, length: number, data?: Buffer, sourceOffset = 0): OverlayRecord => ({
    target: Target.Memory,
    source,
    offset,
    length,
    sourceOffset,
    data,
  });
  const early = await overlayOf(BASE_DISK_BYTES, [[memory(Source.Zero, 0, 4096), disk(Source.Zero, 0, 4096)]], 8192);
  await tt.rejects(apply(early.bytes, 'early'), {
    code: 'OVERLAY_INVALID',
    message: /a disk record before the memory state is complete \(4096 of 8192 bytes\)/,
  });
  const late = await overlayOf(BASE_DISK_BYTES, [[memory(Source.Zero, 0, 4096), disk(Source.Zero, 0, 4096), memory(Source.Zero, 4096, 4096)]], 4096);
  await tt.rejects(apply(late.bytes, 'late'), { code: 'OVERLAY_INVALID', message: /a memory record after the disk records/ });
  const fromDisk = await overlayOf(BASE_DISK_BYTES, [[memory(Source.TargetDisk, 0, 4096)]], 4096);
  await tt.rejects(
    apply(fromDisk.bytes, 'from-disk'),
    { code: 'OVERLAY_INVALID', message: /copies from beyond/ },
    'the memory may not read the disk: it is not there yet',
  );
});
