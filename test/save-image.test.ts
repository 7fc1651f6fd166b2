/**
 * Restore sources from a shared saved memory state: every instance gets the template's migration stream behind a
 * header carrying its own domain XML, without a per-instance copy. The template here is synthesized in the exact
 * layout libvirt writes (header, XML, cookie, 64 KiB of padding, then the stream), so no VM is needed.
 */
import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, open, readdir, readFile, stat, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { decodeSaveImageHeader, encodeSaveImageHeader, headerReadsOf, prepareRestoreSource, readSaveImageHeader } from '../agent/src/vm/save-image';

const TEMPLATE_XML = "<domain type='qemu'>\n  <name>svc-template</name>\n  <uuid>bff81a72-1be8-4acf-b7fc-ee13419fc526</uuid>\n</domain>\n";
const COOKIE = "<cookie>\n  <cpu mode='custom'><model>qemu64</model></cpu>\n  <slirpHelper/>\n</cookie>\n";
const LIBVIRT_PADDING = 64 * 1024;

async function scratchDir(t: Test): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'save-image-test-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A save image as virDomainSave leaves it: data_len covers XML, cookie and libvirt's 64 KiB of zero padding. */
async function syntheticTemplate(dir: string): Promise<{ path: string; stream: Buffer; streamOffset: number }> {
  const header = encodeSaveImageHeader({ xml: TEMPLATE_XML, cookie: COOKIE, wasRunning: true, compressed: 0 });
  header.writeUInt32LE(header.readUInt32LE(20) + LIBVIRT_PADDING, 20);
  const stream = Buffer.concat([Buffer.from('QEVM\0\0\0\x03'), randomBytes(3 * 1024 * 1024 + 123)]);
  const path = join(dir, 'state.sav');
  await writeFile(path, Buffer.concat([header, Buffer.alloc(LIBVIRT_PADDING), stream]));
  return { path, stream, streamOffset: header.length + LIBVIRT_PADDING };
}

/** A template in a fresh directory and a restore source for the instance `name` from it. */
async function restoreSourceFor(t: Test, name: string, headerReads: number) {
  const dir = await scratchDir(t);
  const template = await syntheticTemplate(dir);
  const xml = instanceXml(name);
  const source = await prepareRestoreSource(template.path, await readSaveImageHeader(template.path), xml, dir, headerReads);
  return { dir, template, xml, source };
}

function instanceXml(name: string): string {
  return TEMPLATE_XML.replace('svc-template', name).replace('bff81a72-1be8-4acf-b7fc-ee13419fc526', '0e9b1c55-2f5c-4c2e-9d1e-5d0c1f0a7b11');
}

t.test('encodeSaveImageHeader lays out libvirt’s version 2 header', async (t) => {
  const bytes = encodeSaveImageHeader({ xml: '<domain/>', cookie: '<cookie/>', wasRunning: true, compressed: 0 });
  t.equal(bytes.toString('latin1', 0, 16), 'LibvirtQemudSave', 'magic');
  t.equal(bytes.readUInt32LE(16), 2, 'version');
  t.equal(bytes.readUInt32LE(20), 10 + 10, 'data_len = xml\\0 + cookie\\0, no padding needed');
  t.equal(bytes.readUInt32LE(24), 1, 'was_running');
  t.equal(bytes.readUInt32LE(28), 0, 'compressed');
  t.equal(bytes.readUInt32LE(32), 10, 'cookieOffset counts from the end of the 92-byte header');
  t.ok(
    bytes.subarray(36, 92).every((byte) => byte === 0),
    'unused[14] is zero',
  );
  t.equal(bytes.toString('utf8', 92), '<domain/>\0<cookie/>\0');
  t.equal(bytes.length, 92 + 20);

  const withoutCookie = encodeSaveImageHeader({ xml: '<domain/>', cookie: null, wasRunning: false, compressed: 0 });
  t.equal(withoutCookie.readUInt32LE(32), 0, 'no cookie: cookieOffset 0');
  t.same(decodeSaveImageHeader(withoutCookie), { version: 2, xml: '<domain/>', cookie: null, wasRunning: false, compressed: 0, streamOffset: 102 });
});

t.test('readSaveImageHeader reads what libvirt wrote, padding included', async (t) => {
  const dir = await scratchDir(t);
  const template = await syntheticTemplate(dir);
  t.same(await readSaveImageHeader(template.path), {
    version: 2,
    xml: TEMPLATE_XML,
    cookie: COOKIE,
    wasRunning: true,
    compressed: 0,
    streamOffset: template.streamOffset,
  });
});

t.test('a restore source carries the new XML, the template cookie and a byte-identical stream', async (t) => {
  const dir = await scratchDir(t);
  const template = await syntheticTemplate(dir);
  const longer = instanceXml('instance-with-a-much-longer-name-than-the-template');
  const shorter = instanceXml('i1');
  t.ok(longer.length > TEMPLATE_XML.length && shorter.length < TEMPLATE_XML.length);

  for (const xml of [longer, shorter]) {
    const instanceDir = join(dir, `instance-${xml.length}`);
    await mkdir(instanceDir);
    const source = await prepareRestoreSource(template.path, await readSaveImageHeader(template.path), xml, instanceDir, 1);
    t.ok((await stat(source.path)).isFIFO(), 'the source is a FIFO: nothing is copied to disk');
    t.equal(source.path, join(instanceDir, 'memory-state.fifo'));

    const image = await readFile(source.path); // the other end, as libvirtd reads it
    await t.resolves(source.done(), 'done() resolves once the reader has everything');
    const header = decodeSaveImageHeader(image);
    t.equal(header.xml, xml);
    t.equal(header.cookie, COOKIE);
    t.equal(header.wasRunning, true);
    t.equal(header.compressed, 0);
    t.ok(image.subarray(header.streamOffset).equals(template.stream), 'the migration stream is the template’s, byte for byte');

    await source.dispose();
    await source.dispose(); // idempotent
    t.same(await readdir(instanceDir), [], 'dispose removes the FIFO');
  }
  t.ok((await readFile(template.path)).subarray(template.streamOffset).equals(template.stream), 'the template is untouched');
});

t.test('libvirt 11.1 and later read the header in an open of their own first: the source serves that open, then the restore', async (t) => {
  t.equal(headerReadsOf('9.0.0'), 1, 'libvirt 9.0 (Debian 12) reads header and stream through one open');
  t.equal(headerReadsOf('11.0.0'), 1);
  t.equal(headerReadsOf('11.3.0'), 2, 'libvirt 11.3 (Debian 13) reads the metadata first, then opens again for QEMU');
  t.equal(headerReadsOf('12.0.0'), 2);

  const { dir, template, xml, source } = await restoreSourceFor(t, 'i2', 2);
  const headerBytes = encodeSaveImageHeader({ xml, cookie: COOKIE, wasRunning: true, compressed: 0 }).length;

  // As libvirt's qemuSaveImageGetMetadata: open, read exactly the header, close.
  const metadataOpen = await open(source.path, 'r');
  const metadata = Buffer.alloc(headerBytes);
  for (let at = 0; at < headerBytes;) at += (await metadataOpen.read(metadata, at, headerBytes - at)).bytesRead;
  await metadataOpen.close();
  t.equal(decodeSaveImageHeader(metadata).xml, xml, 'the first open reads the new header');

  // As qemuSaveImageOpen + QEMU: the header again, then the stream to its end.
  const image = await readFile(source.path);
  await t.resolves(source.done());
  const header = decodeSaveImageHeader(image);
  t.equal(header.xml, xml, 'the second open reads the header again');
  t.ok(image.subarray(header.streamOffset).equals(template.stream), 'then the template’s stream, byte for byte');
  await source.dispose();
  t.same((await readdir(dir)).sort(), ['state.sav']);
});

t.test('dispose ends a reader that is still reading: it sees the end of the FIFO instead of hanging', async (t) => {
  const { dir, template, source } = await restoreSourceFor(t, 'i2', 1);
  const reader = await open(source.path, 'r');
  const first = await reader.read(Buffer.alloc(4096), 0, 4096);
  t.equal(first.buffer.toString('latin1', 0, 16), 'LibvirtQemudSave');
  // The reader stops reading (QEMU failed); the restore call fails and its caller disposes of the source.
  await source.dispose();
  await t.rejects(source.done(), { code: 'LAUNCH_FAILED' });
  const rest = await reader.readFile();
  t.ok(rest.length < template.stream.length, 'the reader got EOF before the end of the stream');
  await reader.close();
  t.same((await readdir(dir)).sort(), ['state.sav']);
});

t.test('dispose before anyone read the source stops it: done() rejects and the FIFO is gone', async (t) => {
  const { dir, source } = await restoreSourceFor(t, 'i3', 1);
  await source.dispose();
  await t.rejects(source.done(), { code: 'LAUNCH_FAILED' });
  t.same((await readdir(dir)).sort(), ['state.sav']);
});

t.test('images we cannot restore from are INVALID_IMAGE', async (t) => {
  const dir = await scratchDir(t);
  const template = await syntheticTemplate(dir);
  const image = await readFile(template.path);
  const variant = async (name: string, bytes: Buffer): Promise<string> => {
    const path = join(dir, name);
    await writeFile(path, bytes);
    return path;
  };
  const withField = (offset: number, value: number): Buffer => {
    const copy = Buffer.from(image);
    copy.writeUInt32LE(value, offset);
    return copy;
  };

  const cases: Array<[string, Buffer, RegExp]> = [
    ['bad-magic.sav', Buffer.concat([Buffer.from('NotASaveImage!!!'), image.subarray(16)]), /bad magic/],
    ['partial.sav', Buffer.concat([Buffer.from('LibvirtQemudPart'), image.subarray(16)]), /incomplete/],
    ['short-header.sav', image.subarray(0, 50), /truncated header/],
    ['cut-in-xml.sav', image.subarray(0, 150), /truncated header/],
    ['no-stream.sav', image.subarray(0, template.streamOffset), /no migration stream/],
    ['version-3.sav', withField(16, 3), /version 3/],
    ['zstd.sav', withField(28, 5), /compression format 5 \(zstd\)/],
    ['sparse.sav', withField(28, 6), /compression format 6 \(sparse/],
    ['unknown-format.sav', withField(28, 7), /compression format 7: save it raw/],
    ['huge-data-len.sav', withField(20, 0xffffffff), /bad data length/],
  ];
  for (const [name, bytes, message] of cases) {
    await t.rejects(readSaveImageHeader(await variant(name, bytes)), { code: 'INVALID_IMAGE', message }, name);
  }
  await t.rejects(readSaveImageHeader(join(dir, 'missing.sav')), { code: 'INVALID_IMAGE' }, 'missing file');
});
