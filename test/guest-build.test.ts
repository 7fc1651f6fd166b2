/**
 * rootfs/guest/build-guest.sh: the demo Service VM as a cached-service directory, built from installed Debian
 * packages. Nothing here boots the VM (the end-to-end tests do); this checks what the directory holds.
 */
import t, { type Test } from 'tap';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { gunzip } from 'node:zlib';
import { convertImage, imageInfo } from '../agent/src/images/qemu-img';

const BUILDER = resolve(__dirname, '../../rootfs/guest/build-guest.sh');
const GUEST_FILES = ['disk.qcow2', 'initrd.img', 'manifest.json', 'vmlinuz'];

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function build(...args: string[]): Promise<Run> {
  return new Promise((done) => {
    execFile('bash', [BUILDER, ...args], (err, stdout, stderr) => {
      done({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr });
    });
  });
}

async function scratchDir(t: Test): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'guest-build-test-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A file of the guest's ext4 data disk, read with debugfs from a raw copy (no mount needed). */
async function diskFile(t: Test, disk: string, path: string): Promise<string> {
  const raw = join(await scratchDir(t), 'disk.raw');
  await convertImage(disk, raw, 'raw');
  const { stdout } = await promisify(execFile)('debugfs', ['-R', `cat ${path}`, raw]);
  return stdout;
}

t.test('builds the four files of a cached service from installed packages', async (t) => {
  const out = join(await scratchDir(t), 'demo');
  const run = await build(out);
  t.equal(run.code, 0, run.stderr);
  t.match(run.stdout, /^built .*demo: vmlinuz \d+ B .*initrd\.img \d+ B.*disk\.qcow2 \d+ B/);
  t.equal(run.stdout.trim().split('\n').length, 1, 'one line of what was built');
  t.same((await readdir(out)).sort(), GUEST_FILES, 'exactly the four files, no build leftovers');

  t.same(JSON.parse(await readFile(join(out, 'manifest.json'), 'utf8')), {
    format: 1,
    service_id: 'org.cloudlet.demo.http',
    version: '1',
    description: 'Demo HTTP service (busybox httpd in a tiny VM)',
    tags: ['demo', 'http'],
    port: 8080,
    memory_mib: 128,
    vcpus: 1,
    shareable: true,
    readiness: { type: 'http', path: '/', timeout_ms: 60000 },
    disk: 'disk.qcow2',
    state: null,
    boot: { kernel: 'vmlinuz', initrd: 'initrd.img', cmdline: 'console=ttyS0 quiet ipv6.disable=1 init_on_free=1 no_timer_check' },
  });

  const kernel = await readFile(join(out, 'vmlinuz'));
  t.equal(kernel.toString('latin1', 0x202, 0x206), 'HdrS', 'vmlinuz is a bzImage kernel');

  const initramfs = await promisify(gunzip)(await readFile(join(out, 'initrd.img')));
  const text = initramfs.toString('latin1');
  t.ok(text.startsWith('070701'), 'initrd.img is a gzip-compressed newc cpio archive');
  t.match(text, 'echo "CLOUDLET-READY', '/init announces readiness on the console');
  t.match(text, 'httpd -p 8080', '/init serves HTTP on 8080');
  for (const module of ['virtio_pci.ko', 'virtio_net.ko', 'virtio_blk.ko']) t.match(text, `lib/modules/${module}`, module);

  const disk = await imageInfo(join(out, 'disk.qcow2'));
  t.equal(disk.format, 'qcow2');
  t.equal(disk.backingFile, null, 'a standalone disk that instances can clone');
  t.ok(disk.virtualSize >= 16 << 20 && disk.virtualSize <= 64 << 20, `a small disk (${disk.virtualSize} bytes)`);
  t.equal(await diskFile(t, join(out, 'disk.qcow2'), '/www/index.html'), 'hello from the cloudlet demo service\n');
});

t.test('rebuilding the same content leaves the directory untouched', async (t) => {
  const out = join(await scratchDir(t), 'demo');
  t.equal((await build(out)).code, 0);
  const before = await Promise.all(GUEST_FILES.map((file) => stat(join(out, file))));
  const again = await build(out);
  t.equal(again.code, 0);
  t.match(again.stdout, /^unchanged /);
  const after = await Promise.all(GUEST_FILES.map((file) => stat(join(out, file))));
  t.same(
    after.map((s) => [s.ino, s.mtimeMs]),
    before.map((s) => [s.ino, s.mtimeMs]),
    'same files, not rewritten',
  );
});

t.test('--www and --service-id make another service; a changed build replaces the directory whole', async (t) => {
  const scratch = await scratchDir(t);
  const www = join(scratch, 'www');
  await mkdir(join(www, 'docs'), { recursive: true });
  await writeFile(join(www, 'index.html'), '<h1>speech</h1>\n');
  await writeFile(join(www, 'docs', 'a page.html'), 'spaces are fine\n');
  const out = join(scratch, 'services', 'speech');

  t.equal((await build(out)).code, 0, 'first the default content');
  const run = await build(out, '--www', www, '--service-id', 'org.example.speech');
  t.equal(run.code, 0, run.stderr);
  t.match(run.stdout, /^built /);
  t.equal(JSON.parse(await readFile(join(out, 'manifest.json'), 'utf8')).service_id, 'org.example.speech');
  t.equal(await diskFile(t, join(out, 'disk.qcow2'), '/www/index.html'), '<h1>speech</h1>\n');
  t.equal(await diskFile(t, join(out, 'disk.qcow2'), '"/www/docs/a page.html"'), 'spaces are fine\n');
  t.same(await readdir(join(scratch, 'services')), ['speech'], 'no temp or previous directory is left next to it');
});

t.test('a bad invocation exits non-zero with one line and builds nothing', async (t) => {
  const scratch = await scratchDir(t);
  const out = join(scratch, 'out');
  const cases: Array<[string, string[], RegExp]> = [
    ['no OUTDIR', [], /usage: .*OUTDIR is missing/],
    ['unknown option', [out, '--bogus'], /usage: .*unknown option --bogus/],
    ['--www without a value', [out, '--www'], /usage: .*--www needs a directory/],
    ['--www that is not a directory', [out, '--www', join(scratch, 'nope')], /is not a directory/],
    ['a service id that is not reverse-DNS', [out, '--service-id', 'a b"c'], /invalid service id/],
  ];
  for (const [name, args, message] of cases) {
    const run = await build(...args);
    t.not(run.code, 0, `${name}: non-zero exit`);
    t.equal(run.stderr.trim().split('\n').length, 1, `${name}: one line`);
    t.match(run.stderr, message, name);
    t.equal(run.stdout, '', `${name}: nothing on stdout`);
  }
  t.same(await readdir(scratch), [], 'nothing was built');
});
