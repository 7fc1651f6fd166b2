// The app package store refuses every bad package with a clear error and leaves no file behind. Tarballs are
// written by hand (raw ustar headers) so that each one carries exactly the defect under test.
import { mkdir, readdir, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import t from 'tap';
import { silentLogger } from '../agent/src/log';
import { PackageStore } from '../agent/src/packages/store';
import { tempDir } from './support/app-package';

interface Entry {
  name: string;
  type?: '0' | '1' | '2' | '3' | '5' | '6';
  data?: string;
  linkname?: string;
  size?: number;
}

function header(e: Entry): Buffer {
  const h = Buffer.alloc(512);
  const field = (value: string, offset: number, length: number) => h.write(value, offset, length, 'utf8');
  const octal = (value: number, offset: number, length: number) => field(value.toString(8).padStart(length - 1, '0'), offset, length - 1);
  field(e.name, 0, 100);
  octal(e.type === '5' ? 0o755 : 0o644, 100, 8);
  octal(0, 108, 8);
  octal(0, 116, 8);
  octal(e.size ?? Buffer.byteLength(e.data ?? ''), 124, 12);
  octal(0, 136, 12);
  field('        ', 148, 8);
  field(e.type ?? '0', 156, 1);
  field(e.linkname ?? '', 157, 100);
  field('ustar\x0000', 257, 8);
  let sum = 0;
  for (const byte of h) sum += byte;
  field(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8);
  return h;
}

function tarball(entries: Entry[]): Buffer {
  const blocks = entries.flatMap((e) => {
    const data = Buffer.from(e.data ?? '');
    return [header(e), Buffer.concat([data, Buffer.alloc((512 - (data.length % 512)) % 512)])];
  });
  return gzipSync(Buffer.concat([...blocks, Buffer.alloc(1024)]));
}

const manifest = JSON.stringify({ format: 1, app_id: 'org.test.app', version: '1', command: ['/app/run'], port: 8080, memory_mib: 32 });
const good: Entry[] = [
  { name: 'manifest.json', data: manifest },
  { name: 'app/', type: '5' },
  { name: 'app/run', data: '#!/bin/sh\n' },
];

t.test('the package store refuses bad packages and keeps nothing of them', async (t) => {
  const dir = await tempDir('cloudlet-packages-');
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const root = path.join(dir, 'packages');
  const staging = path.join(dir, 'tmp');
  const store = new PackageStore(root, staging, (id) => id === 'org.test.taken', silentLogger, { maxBytes: 64 * 1024, maxEntries: 20 });
  await store.load();
  let n = 0;
  const importing = async (entries: Entry[] | Buffer) => {
    const file = path.join(dir, `package-${n++}.tar.gz`);
    await writeFile(file, Buffer.isBuffer(entries) ? entries : tarball(entries));
    return store.import({ path: file });
  };
  const refused = async (what: string, entries: Entry[] | Buffer, expected: { code: string; details?: { reason: string } }) => {
    await t.rejects(importing(entries), expected, what);
    t.same(await readdir(root), [], `${what}: nothing in the store`);
    t.same(await readdir(staging), [], `${what}: nothing left in staging`);
  };

  await refused('a path escaping with ..', [...good, { name: 'app/../../evil', data: 'x' }], {
    code: 'INVALID_PACKAGE',
    details: { reason: 'path-traversal' },
  });
  await refused('an absolute path', [...good, { name: '/etc/evil', data: 'x' }], { code: 'INVALID_PACKAGE', details: { reason: 'path-traversal' } });
  await refused('a file outside app/', [...good, { name: 'other', data: 'x' }], { code: 'INVALID_PACKAGE', details: { reason: 'path-traversal' } });
  await refused('a symlink escaping app/', [...good, { name: 'app/passwd', type: '2', linkname: '../../etc/passwd' }], {
    code: 'INVALID_PACKAGE',
    details: { reason: 'link-escapes' },
  });
  await refused('an absolute symlink', [...good, { name: 'app/passwd', type: '2', linkname: '/etc/passwd' }], {
    code: 'INVALID_PACKAGE',
    details: { reason: 'link-escapes' },
  });
  await refused('a hard link to outside app/', [...good, { name: 'app/manifest', type: '1', linkname: 'manifest.json' }], {
    code: 'INVALID_PACKAGE',
    details: { reason: 'link-escapes' },
  });
  await refused('a device file', [...good, { name: 'app/null', type: '3' }], { code: 'INVALID_PACKAGE', details: { reason: 'special-file' } });
  await refused('a FIFO', [...good, { name: 'app/fifo', type: '6' }], { code: 'INVALID_PACKAGE', details: { reason: 'special-file' } });
  await refused('a file bigger than the limit (by its header)', [...good, { name: 'app/big', size: 1024 ** 3 }], {
    code: 'INVALID_PACKAGE',
    details: { reason: 'too-large' },
  });
  await refused('a decompression bomb', tarball([...good, { name: 'app/zeros', data: '\0'.repeat(128 * 1024) }]), {
    code: 'INVALID_PACKAGE',
    details: { reason: 'too-large' },
  });
  await refused('too many files', [...good, ...Array.from({ length: 30 }, (_, i) => ({ name: `app/f${i}`, data: 'x' }))], {
    code: 'INVALID_PACKAGE',
    details: { reason: 'too-many-files' },
  });
  await refused('no manifest', good.slice(1), { code: 'INVALID_MANIFEST' });
  await refused(
    'a manifest without a command',
    [{ name: 'manifest.json', data: JSON.stringify({ ...JSON.parse(manifest), command: undefined }) }, ...good.slice(1)],
    { code: 'INVALID_MANIFEST' },
  );
  await refused('a manifest that is not JSON', [{ name: 'manifest.json', data: '{' }, ...good.slice(1)], { code: 'INVALID_MANIFEST' });
  await refused(
    'an app id taken by a cached service',
    [{ name: 'manifest.json', data: manifest.replace('org.test.app', 'org.test.taken') }, ...good.slice(1)],
    { code: 'SERVICE_EXISTS' },
  );
  await refused('no app/ directory', [{ name: 'manifest.json', data: manifest }], { code: 'INVALID_PACKAGE', details: { reason: 'no-app-dir' } });
  await refused('not a tarball', Buffer.from('plain text'), { code: 'INVALID_PACKAGE', details: { reason: 'not-a-tarball' } });
  await refused('a truncated gzip stream', tarball(good).subarray(0, 40), { code: 'INVALID_PACKAGE', details: { reason: 'not-a-tarball' } });

  const imported = await importing([...good, { name: 'app/sh', type: '2', linkname: 'run' }]);
  t.match(imported, { id: 'org.test.app', sha256: /^[0-9a-f]{64}$/ }, 'a good package with an inner link is imported');
  t.same(await readdir(imported.dir), ['app', 'manifest.json']);
  t.equal((await importing([...good, { name: 'app/sh', type: '2', linkname: 'run' }])).sha256, imported.sha256, 'the same tarball again is a no-op');
  await t.rejects(importing([...good, { name: 'app/other', data: 'y' }]), { code: 'SERVICE_EXISTS' }, 'another package for the same app id is refused');
  await mkdir(staging, { recursive: true });
  t.same(await readdir(staging), []);
});

t.test("the store's revision changes with every import and removal, so a list kept from it is never served stale", async (t) => {
  const dir = await tempDir('cloudlet-packages-');
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const store = new PackageStore(path.join(dir, 'packages'), path.join(dir, 'tmp'), () => false, silentLogger);
  await store.load();
  const file = path.join(dir, 'package.tar.gz');
  await writeFile(file, tarball(good));
  const seen = [store.revision];
  await t.rejects(store.import({ path: path.join(dir, 'missing.tar.gz') }));
  t.equal(store.revision, seen[0], 'a refused import changes nothing');
  await store.import({ path: file });
  seen.push(store.revision);
  await store.remove('org.test.app');
  seen.push(store.revision);
  t.equal(new Set(seen).size, 3, `a new revision after the import and after the removal (${seen.join(', ')})`);
});
