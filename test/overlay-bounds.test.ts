// What an overlay's bytes cannot make the cloudlet do, checked on the applying itself (no VM: a disk-only overlay on a
// small base): expand a few KB into gigabytes of buffers, pass off another valid zstd frame as a signed one, or carry
// a changed manifest when no key is trusted.
import t from 'tap';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import type { BaseVm } from '../agent/src/core/bases';
import { compressFrame } from '../agent/src/images/zstd';
import { applyOverlay, expandedBytes, openOverlay } from '../agent/src/synthesis/apply';
import { encodeHeader, encodeRecord, HEADER_BYTES, sha256, Source, Target, type OverlayRecord } from '../agent/src/synthesis/overlay-format';

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

/** A disk-only overlay of `frames` (each a list of records, compressed at level 1) on the test base. */
async function overlayOf(virtualSize: number, frames: OverlayRecord[][]): Promise<{ bytes: Buffer; frames: Buffer[] }> {
  const raw = frames.map((records) => Buffer.concat(records.map(encodeRecord)));
  const compressed = await Promise.all(raw.map((r) => compressFrame(r, 1)));
  const manifest = {
    format: 2,
    base: base.digest,
    disk: { virtual_size: virtualSize },
    memory: null,
    service: SERVICE,
    reference: null,
    frames: compressed.map((c, i) => ({ bytes: c.length, raw_bytes: raw[i]!.length, sha256: sha256(c) })),
  };
  return { bytes: Buffer.concat([encodeHeader(Buffer.from(JSON.stringify(manifest)), null), ...compressed]), frames: compressed };
}

/** Opens and applies `bytes` to a new disk; resolves when the disk is complete. */
async function apply(bytes: Buffer, name: string): Promise<string> {
  const opened = await openOverlay(Readable.from([bytes]), bytes.length, []);
  const disk = path.join(dir, `${name}.qcow2`);
  await applyOverlay(
    opened,
    base,
    { disk, memory: null },
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
  const manifest = {
    format: 2 as const,
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
