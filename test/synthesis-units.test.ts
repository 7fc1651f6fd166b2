// The pieces of VM Synthesis that need no VM: the overlay records, frames compressed against a reference, the qcow2
// overlay writer (checked by qemu-img), and the migration-stream walker's refusal of streams it does not know.
import t from 'tap';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { ImageReader, Qcow2OverlayWriter } from '../agent/src/images/qcow2-overlay';
import { compressFrame, openFrameDecoder, zstdReference } from '../agent/src/images/zstd';
import type { BaseVm } from '../agent/src/core/bases';
import type { ServiceManifest } from '../agent/src/core/types';
import { synthesisService } from '../agent/src/mechanisms/synthesis';
import type { OpenedOverlay } from '../agent/src/synthesis/apply';
import { findRamPages } from '../agent/src/vm/migration-stream';
import { decodeRecords, encodeRecord, Source, Target } from '../agent/src/synthesis/overlay-format';

const run = promisify(execFile);
const BLOCK = 4096;
let dir: string;

t.before(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-synthesis-units-'));
});
t.teardown(() => rm(dir, { recursive: true, force: true }));

t.test('records round-trip, and a frame cut inside a record or with an unknown type is refused', async (tt) => {
  const records = [
    { target: Target.Disk, source: Source.Literal, offset: 8192, length: 4, sourceOffset: 0, data: Buffer.from('abcd') },
    { target: Target.Disk, source: Source.Zero, offset: 12288, length: BLOCK, sourceOffset: 0 },
    { target: Target.Memory, source: Source.BaseMemory, offset: 0, length: BLOCK, sourceOffset: 123456 },
    { target: Target.Memory, source: Source.XorBaseDisk, offset: BLOCK, length: 2, sourceOffset: 1024, data: Buffer.from([1, 2]) },
  ];
  const frame = Buffer.concat(records.map(encodeRecord));
  tt.same(
    [...decodeRecords(frame)].map((r) => ({ ...r, data: r.data && Buffer.from(r.data) })),
    records,
  );
  tt.throws(() => [...decodeRecords(frame.subarray(0, frame.length - 1))], { code: 'OVERLAY_INVALID' });
  const unknown = Buffer.from(frame);
  unknown[1] = 9;
  tt.throws(() => [...decodeRecords(unknown)], { code: 'OVERLAY_INVALID' });
});

t.test('frames compressed against a reference file are tiny when their bytes are in the file at any offset, and decode with it in any order', async (tt) => {
  const referenceBytes = randomBytes(4 << 20);
  const referencePath = path.join(dir, 'reference.bin');
  await writeFile(referencePath, referenceBytes);
  const reference = zstdReference(referencePath, referenceBytes.length, 1 << 20)!;
  // Moved data: runs of the reference at odd offsets, as kernel objects that moved between two boots.
  const moved = Buffer.concat([referenceBytes.subarray(12345, 12345 + 300_000), referenceBytes.subarray(3_000_001, 3_000_001 + 300_000)]);
  const movedAgain = referenceBytes.subarray(1_000_003, 1_000_003 + 200_000);
  const plain = randomBytes(100_000);
  const withReference = await compressFrame(moved, 19, reference);
  tt.ok(withReference.length < moved.length / 50, `${moved.length} bytes → ${withReference.length}`);
  const againWithReference = await compressFrame(movedAgain, 19, reference);
  const stored = await compressFrame(plain, 19);
  tt.ok(stored.length < plain.length * 1.01, 'random bytes are stored, not recompressed at length');

  // One decoder for the sequence, as an overlay has them: disk frames without the reference, then memory frames with it.
  const decoder = await openFrameDecoder(reference);
  try {
    const written = (async () => {
      for (const frame of [stored, withReference, againWithReference]) await decoder.write(frame);
      decoder.end();
    })();
    tt.ok((await decoder.read(plain.length)).equals(plain));
    tt.ok((await decoder.read(moved.length)).equals(moved), 'a frame after the first finds the reference too');
    tt.ok((await decoder.read(movedAgain.length)).equals(movedAgain));
    await written;
    await decoder.finish();
  } finally {
    decoder.close();
  }
  const without = await openFrameDecoder();
  try {
    await without.write(withReference);
    without.end();
    await tt.rejects(without.read(moved.length), { code: 'OVERLAY_INVALID' }, 'without the reference, it does not decode');
  } finally {
    without.close();
  }
});

t.test('the qcow2 overlay writer makes an image qemu-img finds clean, with written, zeroed and backing blocks', async (tt) => {
  const size = 4 << 20; // two L2 tables' worth
  const backingRaw = Buffer.alloc(size, 0x5a);
  await writeFile(path.join(dir, 'backing.raw'), backingRaw);
  const backing = path.join(dir, 'backing.qcow2');
  await run('qemu-img', ['convert', '-O', 'qcow2', path.join(dir, 'backing.raw'), backing]);
  const expected = Buffer.from(backingRaw);
  const reader = await ImageReader.open(backing);
  const overlay = path.join(dir, 'overlay.qcow2');
  const writer = await Qcow2OverlayWriter.create(overlay, backing, reader, size);
  const written = Buffer.alloc(3 * BLOCK, 0xc3);
  await writer.write(BLOCK, written);
  written.copy(expected, BLOCK);
  writer.zero(5 * BLOCK, 2 * BLOCK);
  expected.fill(0, 5 * BLOCK, 7 * BLOCK);
  const far = Buffer.alloc(BLOCK, 0x11);
  await writer.write(size - BLOCK, far);
  far.copy(expected, size - BLOCK);
  tt.same(await writer.read(BLOCK - 1024, 8 * BLOCK), expected.subarray(BLOCK - 1024, 9 * BLOCK - 1024), 'reads span written, zero and backing blocks');
  await writer.finish();
  await writer.close();
  await reader.close();
  await run('qemu-img', ['check', overlay]);
  const info = JSON.parse((await run('qemu-img', ['info', '--output=json', overlay])).stdout);
  tt.equal(info['full-backing-filename'], backing);
  tt.equal(info['cluster-size'], BLOCK);
  await run('qemu-img', ['convert', '-O', 'raw', overlay, path.join(dir, 'out.raw')]);
  tt.ok((await readFile(path.join(dir, 'out.raw'))).equals(expected), 'the guest sees exactly the expected bytes');
});

t.test('a stream that is not a QEMU migration stream has no RAM pages to find', async (tt) => {
  tt.equal(findRamPages(Buffer.alloc(1 << 16), 0), null);
  const fake = Buffer.concat([Buffer.from('QEVM'), Buffer.alloc(100)]);
  tt.equal(findRamPages(fake, 0), null);
});

/** A file-version `version` migration stream whose RAM section (id 2) holds one zero page and one 4 KiB page of "pc.ram". */
function ramStream(version: number): { stream: Buffer; pageAt: number } {
  const be32 = (n: number) => Buffer.from([n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255]);
  const be64 = (n: bigint) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(n);
    return b;
  };
  const idstr = (s: string) => Buffer.concat([Buffer.from([s.length]), Buffer.from(s, 'latin1')]);
  const ram = 1n << 20n;
  const head = Buffer.concat([
    Buffer.from('QEVM'),
    be32(version),
    Buffer.from([0x07]), // QEMU_VM_CONFIGURATION: the machine type
    be32(6),
    Buffer.from('pc-q35'),
    Buffer.from([0x01]), // QEMU_VM_SECTION_START of "ram", instance 0, version 4
    be32(2),
    idstr('ram'),
    be32(0),
    be32(4),
    be64(ram | 0x04n), // total | MEM_SIZE, then each block: idstr, used length
    idstr('pc.ram'),
    be64(ram),
    be64(0x10n), // EOS
    Buffer.from([0x7e]), // footer
    be32(2),
    Buffer.from([0x03]), // QEMU_VM_SECTION_END of section 2
    be32(2),
    be64(0x1000n | 0x02n), // a zero page, with the block's idstr
    idstr('pc.ram'),
    Buffer.from([0]),
    be64(0x2000n | 0x08n | 0x20n), // a page of the same block (CONTINUE: no idstr)
  ]);
  const stream = Buffer.concat([head, Buffer.alloc(PAGE_BYTES, 0xab), be64(0x10n), Buffer.from([0x7e]), be32(2), Buffer.from([0x00])]);
  return { stream, pageAt: head.length };
}
const PAGE_BYTES = 4096;

t.test('the RAM pages of a version 3 stream (QEMU 7.2 to 10) are found; a stream of another version is not walked', async (tt) => {
  const { stream, pageAt } = ramStream(3);
  tt.same(findRamPages(stream, 0), [{ offset: pageAt, guestAddress: 'pc.ram@8192' }]);
  tt.equal(findRamPages(ramStream(2).stream, 0), null, 'file version 2 has other records: not guessed at');
  tt.equal(findRamPages(ramStream(4).stream, 0), null, 'nor a version not yet known');
});

t.test('an overlay may not ask for more memory or vCPUs than the base the operator imported', async (tt) => {
  const sized = (memory_mib: number, vcpus: number) => ({ service_id: 'org.test.svc', memory_mib, vcpus, boot: null }) as unknown as ServiceManifest;
  const base = { name: 'base', dir: '/nonexistent', manifest: sized(128, 1) } as unknown as BaseVm;
  const overlayAsking = (memory: number, vcpus: number) => ({ manifest: { service: sized(memory, vcpus) } }) as unknown as OpenedOverlay;
  const arrived = async () => {};
  tt.equal(synthesisService(overlayAsking(128, 1), base, false, arrived).manifest.memory_mib, 128, 'as much as the base is fine');
  tt.equal(synthesisService(overlayAsking(64, 1), base, false, arrived).manifest.memory_mib, 64, 'less is fine');
  tt.throws(() => synthesisService(overlayAsking(65536, 1), base, false, arrived), {
    code: 'OVERLAY_INVALID',
    message: /memory_mib 65536, more than its base's 128/,
  });
  tt.throws(() => synthesisService(overlayAsking(128, 64), base, false, arrived), { code: 'OVERLAY_INVALID', message: /vcpus 64, more than its base's 1/ });
});
