// The images the VM Synthesis benchmarks share (bench/synthesis.ts, bench/synthesis-link.ts), made through the real
// agent: the Base VM, the customized VM, our overlay and the Elijah-style one, and the customized VM as a Cached VM
// (the restore → answer of its complete saved state, which any baseline pays after its decode).
//
// Base VM: the test guest with a 256 MiB guest, its www disk holding real OS files (/usr/share/doc and the Python
// standard library: a ≥256 MiB disk), and a captured memory state. Customized VM: the same disk with an app added the
// way a guest adds files (written into the ext4: code as a tarball of the typescript package, a 48 MiB model of
// incompressible weights, a new index page), booted, its files read once (a service loading its code and model), and
// saved: a memory state of ≥128 MiB.
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { cp, link, mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { promisify } from 'node:util';
import type { Connection } from '../../native/libvirt';
import { request, ROOT, type AgentProcess } from '../../test/support/agent';
import { httpGet } from './http-get';
import { sized, testGuest } from './measure';

const run = promisify(execFile);
const MEMORY_MIB = sized(256, 128);
const MODEL_MIB = sized(48, 4);
/** What the customized VM's `GET /` answers. */
export const APP_PAGE = 'hello from the synthesized app';
const CLI = path.join(ROOT, 'dist', 'agent', 'src', 'synthesis', 'cli.js');
const BASE_CONTENT = sized(['/usr/share/doc', '/usr/lib/python3.11'], ['/usr/share/doc/libc6', '/usr/lib/python3.11/json']);
/** The app's code: a package from node_modules, tarred. */
const CODE_PACKAGE = sized('typescript', '@xmldom');
/** The service id under which the customized VM is registered as a Cached VM (registerCachedApp). */
export const CACHED_APP = 'bench.app.cached';

export async function sh(cmd: string, args: string[]): Promise<string> {
  return (await run(cmd, args, { maxBuffer: 64 << 20 })).stdout;
}

export async function timed<T>(work: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const t0 = performance.now();
  const value = await work();
  return { ms: performance.now() - t0, value };
}

export const size = async (file: string) => (await stat(file)).size;

async function withManifest(dir: string, change: (m: any) => object): Promise<void> {
  const file = path.join(dir, 'manifest.json');
  await writeFile(file, JSON.stringify(change(JSON.parse(await readFile(file, 'utf8')))));
}

export async function post(agent: AgentProcess, urlPath: string, body: unknown, expected: number): Promise<any> {
  const r = await request(agent.apiPort, 'POST', urlPath, body);
  if (r.status !== expected) throw new Error(`POST ${urlPath}: ${r.status} ${r.body}`);
  return r.json;
}

export interface SynthesisImages {
  scratch: string;
  guest: string;
  baseDir: string;
  baseRaw: string;
  baseState: string;
  /** The customized VM's disk (qcow2) and manifest. */
  vm: string;
  customRaw: string;
  customState: string;
  diskBytes: number;
  memoryBytes: number;
}

/** Makes the Base VM (imported into `agent`) and the customized VM, in `scratch`. */
export async function buildSynthesisImages(agent: AgentProcess, conn: Connection, scratch: string): Promise<SynthesisImages> {
  // --- the Base VM -------------------------------------------------------------------------------------------
  const guest = testGuest();
  const baseWww = path.join(scratch, 'base-www');
  await mkdir(baseWww);
  for (const dir of BASE_CONTENT) await cp(dir, path.join(baseWww, path.basename(dir)), { recursive: true, dereference: false, verbatimSymlinks: true });
  await writeFile(path.join(baseWww, 'index.html'), 'base\n');
  const baseSrc = path.join(scratch, 'base');
  await sh('bash', [path.join(ROOT, 'rootfs/guest/build-guest.sh'), baseSrc, '--www', baseWww, '--service-id', 'bench.base']);
  await withManifest(baseSrc, (m) => ({ ...m, memory_mib: MEMORY_MIB, shareable: false }));
  await post(agent, '/v1/services', { path: baseSrc }, 201);
  await post(agent, '/v1/services/bench.base/state', {}, 200);
  const base = await post(agent, '/v1/bases', { path: path.join(agent.dataDir, 'services', 'bench.base'), name: 'bench-base' }, 201);
  const baseDir: string = base.dir;
  await agent.delete('/v1/services/bench.base');

  // --- the customized VM: the base disk plus an app, written into its ext4 -----------------------------------
  const app = path.join(scratch, 'app');
  await mkdir(app);
  await sh('tar', ['-C', path.join(ROOT, 'node_modules'), '-cf', path.join(app, 'code.tar'), CODE_PACKAGE]);
  await writeFile(path.join(app, 'model.bin'), randomBytes(MODEL_MIB << 20));
  await writeFile(path.join(app, 'index.html'), `${APP_PAGE}\n`);
  const customRaw = path.join(scratch, 'custom.raw');
  await sh('qemu-img', ['convert', '-O', 'raw', path.join(baseDir, base.disk), customRaw]);
  await writeFile(
    path.join(scratch, 'install.debugfs'),
    ['rm www/index.html', ...['index.html', 'code.tar', 'model.bin'].map((f) => `write ${path.join(app, f)} www/${f}`)].join('\n') + '\n',
  );
  await sh('debugfs', ['-w', '-f', path.join(scratch, 'install.debugfs'), customRaw]);
  const customSrc = path.join(scratch, 'custom');
  await mkdir(customSrc);
  await sh('qemu-img', ['convert', '-O', 'qcow2', customRaw, path.join(customSrc, 'disk.qcow2')]);
  for (const f of ['vmlinuz', 'initrd.img']) await cp(path.join(guest, f), path.join(customSrc, f));
  await writeFile(path.join(customSrc, 'manifest.json'), await readFile(path.join(baseSrc, 'manifest.json')));
  await withManifest(customSrc, (m) => ({ ...m, service_id: 'bench.app', memory_mib: MEMORY_MIB }));
  await post(agent, '/v1/services', { path: customSrc }, 201);
  const started = await post(agent, '/v1/instances', { service_id: 'bench.app' }, 201);
  for (const f of ['code.tar', 'model.bin']) {
    const r = await httpGet(started.endpoint.address, started.endpoint.port, `/${f}`);
    if (r.status !== 200) throw new Error(`GET /${f}: ${r.status}`);
  }
  const customState = path.join(scratch, 'custom.sav');
  await conn.saveDomain(started.instance.id, customState); // the agent sees it end and cleans up after it
  const vm = path.join(scratch, 'vm');
  await mkdir(vm);
  await cp(path.join(agent.dataDir, 'services', 'bench.app', 'disk.qcow2'), path.join(vm, 'disk.qcow2'));
  await cp(path.join(customSrc, 'manifest.json'), path.join(vm, 'manifest.json'));
  const baseManifest = JSON.parse(await readFile(path.join(baseDir, 'manifest.json'), 'utf8')).manifest;
  const baseState = path.join(baseDir, baseManifest.state);
  const baseRaw = path.join(scratch, 'base.raw');
  await sh('qemu-img', ['convert', '-O', 'raw', path.join(baseDir, baseManifest.disk), baseRaw]);
  const images = {
    scratch,
    guest,
    baseDir,
    baseRaw,
    baseState,
    vm,
    customRaw,
    customState,
    diskBytes: await size(customRaw),
    memoryBytes: await size(customState),
  };
  process.stderr.write(`disk ${images.diskBytes} B, memory state ${images.memoryBytes} B (base ${await size(baseState)} B)\n`);
  return images;
}

/** `cloudlet-overlay create` of the customized VM against the base: the overlay file, its create time and stats. */
export async function createOverlay(images: SynthesisImages): Promise<{ file: string; ms: number; stats: any }> {
  const file = path.join(images.scratch, 'app.overlay');
  const { vm } = images;
  const args = ['create', '--base', images.baseDir, '--disk', path.join(vm, 'disk.qcow2'), '--state', images.customState];
  // Quick: the lowest level, which CI's run of every benchmark can afford on a loaded machine (the sizes mean little there).
  const level = sized([], ['--level', '1']);
  const created = await timed(() => sh('node', [CLI, ...args, '--service', path.join(vm, 'manifest.json'), '--out', file, ...level]));
  process.stderr.write(`ours: created in ${Math.round(created.ms)} ms ${created.value}`);
  return { file, ms: created.ms, stats: JSON.parse(created.value) };
}

/** The disk and the memory state, each a (base, target) pair: what the baselines diff. */
export const imagePairs = (images: SynthesisImages) => [
  { name: 'disk', base: images.baseRaw, target: images.customRaw },
  { name: 'memory', base: images.baseState, target: images.customState },
];

/** xdelta3's source window: the whole image, or its decode takes tens of seconds (docs/overlay-format.md). */
const xdeltaWindow = (images: SynthesisImages) => String(Math.max(images.diskBytes, images.memoryBytes));

/** Elijah's overlay: `xdelta3 -9` of the disk and of the memory, each then `xz -9`. Its files, bytes and create time. */
export async function createElijahOverlay(images: SynthesisImages): Promise<{ files: string[]; bytes: number; ms: number }> {
  const files = imagePairs(images).map((p) => path.join(images.scratch, `${p.name}.xd.xz`));
  const created = await timed(async () => {
    for (const p of imagePairs(images)) {
      const delta = path.join(images.scratch, `${p.name}.xd`);
      await sh('xdelta3', ['-9', '-f', '-S', 'none', '-B', xdeltaWindow(images), '-e', '-s', p.base, p.target, delta]);
      await sh('xz', ['-9', '-f', delta]);
    }
  });
  let bytes = 0;
  for (const f of files) bytes += await size(f);
  process.stderr.write(`xdelta3+xz: ${bytes} B, created in ${Math.round(created.ms)} ms\n`);
  return { files, bytes, ms: created.ms };
}

/** Elijah's decode: `xz -d` then `xdelta3 -d` of each file back to a raw disk and a save image; its time. */
export async function decodeElijahOverlay(images: SynthesisImages, files: string[]): Promise<number> {
  const decoded = await timed(async () => {
    for (const [i, p] of imagePairs(images).entries()) {
      await sh('xz', ['-d', '-f', '-k', files[i]!]);
      const delta = files[i]!.replace(/\.xz$/, '');
      await sh('xdelta3', ['-d', '-f', '-B', xdeltaWindow(images), '-s', p.base, delta, `${delta}.out`]);
    }
  });
  return decoded.ms;
}

/** Registers the customized VM, with its complete saved state, as the Cached VM CACHED_APP. */
export async function registerCachedApp(agent: AgentProcess, images: SynthesisImages): Promise<void> {
  const cachedSrc = path.join(images.scratch, 'cached');
  await cp(images.vm, cachedSrc, { recursive: true });
  await link(images.customState, path.join(cachedSrc, 'state.sav'));
  for (const f of ['vmlinuz', 'initrd.img']) await cp(path.join(images.guest, f), path.join(cachedSrc, f));
  await withManifest(cachedSrc, (m) => ({ ...m, service_id: CACHED_APP, disk: 'disk.qcow2', state: 'state.sav' }));
  await post(agent, '/v1/services', { path: cachedSrc }, 201);
}
