import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { mkdtemp, open, readdir, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { checkImage, convertImage, createLinkedClone, imageInfo } from '../agent/src/images/qemu-img';

const MiB = 1 << 20;

async function scratchDir(t: Test): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'qemu-img-test-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A 4 MiB raw disk whose first MiB is random data, and its qcow2 conversion (the "template"). */
async function template(dir: string): Promise<{ raw: string; qcow2: string; data: Buffer }> {
  const data = Buffer.concat([randomBytes(MiB), Buffer.alloc(3 * MiB)]);
  const raw = join(dir, 'disk.raw');
  await writeFile(raw, data);
  const qcow2 = join(dir, 'template.qcow2');
  await convertImage(raw, qcow2, 'qcow2');
  return { raw, qcow2, data };
}

/** Overwrites bytes of a file in place. */
async function patch(path: string, offset: number, bytes: Buffer): Promise<void> {
  const file = await open(path, 'r+');
  await file.write(bytes, 0, bytes.length, offset);
  await file.close();
}

/** Rewrites the L2 table entry of the qcow2's first data cluster; `entry` gets the cluster's host offset. */
async function rewriteFirstL2Entry(path: string, entry: (dataOffset: bigint) => bigint): Promise<void> {
  const image = await readFile(path);
  const l1TableOffset = Number(image.readBigUInt64BE(40));
  const l2TableOffset = Number(image.readBigUInt64BE(l1TableOffset) & 0x00fffffffffffe00n);
  const dataOffset = image.readBigUInt64BE(l2TableOffset) & 0x00fffffffffffe00n;
  const bytes = Buffer.alloc(8);
  bytes.writeBigUInt64BE(entry(dataOffset));
  await patch(path, l2TableOffset, bytes);
}
/** qemu-img check: "ERROR ... exceeding the end of the file" (metadata corruption). */
const POINT_BEYOND_EOF = () => (1n << 63n) | 0x7ff0000000n;
/** A "compressed" cluster of garbage: qemu-img opens the image but fails with an I/O error once it reads that
 *  cluster, i.e. after a convert has created its output. */
const GARBAGE_COMPRESSED_CLUSTER = (dataOffset: bigint) => (1n << 62n) | (7n << 54n) | dataOffset;

t.test('convertImage writes a standalone image in the requested format, byte-identical to the guest', async (t) => {
  const dir = await scratchDir(t);
  const { qcow2, data } = await template(dir);
  const info = await imageInfo(qcow2);
  t.equal(info.format, 'qcow2');
  t.equal(info.virtualSize, 4 * MiB);
  t.equal(info.backingFile, null);
  t.equal(info.backingFormat, null);
  t.equal(info.dirty, false);
  t.ok(info.actualSize > 0 && info.actualSize < 4 * MiB, 'zero clusters are not allocated');

  const back = join(dir, 'back.raw');
  await convertImage(qcow2, back, 'raw');
  t.equal((await imageInfo(back)).format, 'raw');
  t.same(await readFile(back), data, 'raw → qcow2 → raw round trip keeps every byte');
});

t.test('createLinkedClone makes a qcow2 overlay on the template, never a copy', async (t) => {
  const dir = await scratchDir(t);
  const { qcow2 } = await template(dir);
  const clone = join(dir, 'instance', '..', 'clone.qcow2');
  await createLinkedClone(relative(process.cwd(), qcow2), clone);
  const info = await imageInfo(clone);
  t.equal(info.format, 'qcow2');
  t.equal(info.backingFile, qcow2, 'the backing file is the template, as an absolute path');
  t.equal(info.backingFormat, 'qcow2');
  t.equal(info.virtualSize, 4 * MiB, 'the guest sees the template size');
  t.ok(info.actualSize < 512 * 1024, `the clone holds no data of its own (${info.actualSize} bytes)`);
  t.ok((await imageInfo(qcow2)).actualSize > MiB, 'while the template holds the MiB of data');
  await t.resolves(checkImage(clone, 'qcow2'));
});

t.test('a linked clone of a raw template records the raw backing format', async (t) => {
  const dir = await scratchDir(t);
  const { raw } = await template(dir);
  const clone = join(dir, 'clone.qcow2');
  await createLinkedClone(raw, clone);
  t.equal((await imageInfo(clone)).backingFormat, 'raw');
});

t.test('checkImage accepts healthy images and rejects a corrupt qcow2 with INVALID_IMAGE', async (t) => {
  const dir = await scratchDir(t);
  const { raw, qcow2 } = await template(dir);
  await t.resolves(checkImage(qcow2));
  await t.resolves(checkImage(raw), 'raw has nothing to check');

  const truncated = join(dir, 'truncated.qcow2');
  await convertImage(qcow2, truncated, 'qcow2');
  await truncate(truncated, 100);
  await t.rejects(checkImage(truncated), { code: 'INVALID_IMAGE', message: /header too short/ });

  const badL1 = join(dir, 'bad-l1.qcow2');
  await convertImage(qcow2, badL1, 'qcow2');
  await patch(badL1, 40, Buffer.alloc(8, 0xff)); // l1_table_offset
  await t.rejects(checkImage(badL1), { code: 'INVALID_IMAGE', message: /L1 table offset invalid/ });

  const badL2 = join(dir, 'bad-l2.qcow2');
  await convertImage(qcow2, badL2, 'qcow2');
  await rewriteFirstL2Entry(badL2, POINT_BEYOND_EOF);
  await t.rejects(checkImage(badL2), { code: 'INVALID_IMAGE', message: /ERROR/ }, 'the first error line of the check report');

  const badMagic = join(dir, 'bad-magic.qcow2');
  await convertImage(qcow2, badMagic, 'qcow2');
  await patch(badMagic, 0, Buffer.from('XXXX'));
  await t.rejects(checkImage(badMagic, 'qcow2'), { code: 'INVALID_IMAGE', message: /not in qcow2 format/ }, 'a known format is not probed');
});

t.test('imageInfo on something that is not there is INVALID_IMAGE with qemu-img’s words', async (t) => {
  const dir = await scratchDir(t);
  await t.rejects(imageInfo(join(dir, 'missing.qcow2')), { code: 'INVALID_IMAGE', message: /No such file/ });
});

t.test('a failed clone or convert leaves neither the destination nor a temp file', async (t) => {
  const dir = await scratchDir(t);
  const { qcow2 } = await template(dir);
  const before = (await readdir(dir)).sort();

  await t.rejects(createLinkedClone(join(dir, 'missing.qcow2'), join(dir, 'clone.qcow2')), { code: 'INVALID_IMAGE' });

  const unreadable = join(dir, 'unreadable.qcow2');
  await convertImage(qcow2, unreadable, 'qcow2');
  await rewriteFirstL2Entry(unreadable, GARBAGE_COMPRESSED_CLUSTER);
  const withUnreadable = [...before, 'unreadable.qcow2'].sort();
  // qemu-img has already created its output when the read error hits
  await t.rejects(convertImage(unreadable, join(dir, 'flat.raw'), 'raw'), { code: 'IMAGE_TOOL_FAILED', message: /Input\/output error/ });
  t.same((await readdir(dir)).sort(), withUnreadable, 'only the inputs remain');
});

t.test('without qemu-img the error names the package to install', async (t) => {
  const dir = await scratchDir(t);
  const path = process.env.PATH;
  process.env.PATH = dir; // nothing executable in there
  t.teardown(() => {
    process.env.PATH = path;
  });
  await t.rejects(imageInfo(join(dir, 'x.qcow2')), { code: 'IMAGE_TOOL_FAILED', message: /qemu-utils/ });
});
