// ./build.sh bench synthesis — VM Synthesis against the Elijah-style baseline, in one run on the same images.
//
// Base VM: the test guest with a 256 MiB guest, its www disk holding real OS files (/usr/share/doc and the Python
// standard library: a ≥256 MiB disk), and a captured memory state. Customized VM: the same disk with an app added the
// way a guest adds files (written into the ext4: code as a tarball of the typescript package, a 48 MiB model of
// incompressible weights, a new index page), booted, its files read once (a service loading its code and model), and
// saved: a memory state of ≥128 MiB. Then, for each way of making an overlay: its size, the time to create it, and
// the time to apply it (overlay → running VM answering HTTP). Ours goes through the real agent (upload over loopback
// HTTP, synthesis with the restore reading the memory state while it is rebuilt, readiness). The baselines' apply is
// their decode (to a raw disk and a save image, as Elijah does) plus the restore → answer time of that complete
// saved state, measured here as a Cached VM start of the customized VM (the agent's fastest restore path). The
// baselines are `xdelta3 -9 -S none -B <image size>` then `xz -9` (Elijah), and `zstd -9 --long=30 --patch-from` (at
// -19 its create alone takes over 3 minutes here, for 2 % less). The load average is recorded: the machine is shared.
// Ends with one line of JSON.
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { cp, link, mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { promisify } from 'node:util';
import { Connection } from '../native/libvirt';
import { AgentProcess, adminHeaders, request, ROOT } from '../test/support/agent';
import { median, round, runsOf, sized, testGuest } from './support/measure';

const run = promisify(execFile);
const RUNS = runsOf(3);
const MEMORY_MIB = sized(256, 128);
const MODEL_MIB = sized(48, 4);
const APP_PAGE = 'hello from the synthesized app';
const CLI = path.join(ROOT, 'dist', 'agent', 'src', 'synthesis', 'cli.js');
const BASE_CONTENT = sized(['/usr/share/doc', '/usr/lib/python3.11'], ['/usr/share/doc/libc6', '/usr/lib/python3.11/json']);
/** The app's code: a package from node_modules, tarred. */
const CODE_PACKAGE = sized('typescript', '@xmldom');

async function sh(cmd: string, args: string[]): Promise<string> {
  return (await run(cmd, args, { maxBuffer: 64 << 20 })).stdout;
}

async function timed<T>(work: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const t0 = performance.now();
  const value = await work();
  return { ms: performance.now() - t0, value };
}

const size = async (file: string) => (await stat(file)).size;

async function withManifest(dir: string, change: (m: any) => object): Promise<void> {
  const file = path.join(dir, 'manifest.json');
  await writeFile(file, JSON.stringify(change(JSON.parse(await readFile(file, 'utf8')))));
}

async function main() {
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-bench-synthesis-'));
  const agent = await AgentProcess.start({ portRange: '24400-24449' });
  const conn = await Connection.open('qemu:///system');
  try {
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
      const r = await request(started.endpoint.port, 'GET', `/${f}`);
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
    const diskBytes = await size(customRaw);
    const memoryBytes = await size(customState);
    process.stderr.write(`disk ${diskBytes} B, memory state ${memoryBytes} B (base ${await size(baseState)} B)\n`);

    // --- ours ----------------------------------------------------------------------------------------------------
    const overlay = path.join(scratch, 'app.overlay');
    const created = await timed(() =>
      sh('node', [
        CLI,
        'create',
        '--base',
        baseDir,
        '--disk',
        path.join(vm, 'disk.qcow2'),
        '--state',
        customState,
        '--service',
        path.join(vm, 'manifest.json'),
        '--out',
        overlay,
      ]),
    );
    const stats = JSON.parse(created.value);
    process.stderr.write(`ours: ${stats.overlay_bytes} B in ${round(created.ms)} ms ${created.value}`);
    const bytes = await readFile(overlay);
    const applies: number[] = [];
    const restores: number[] = [];
    const loadBefore = os.loadavg()[0]!;
    for (let i = 0; i < RUNS; i++) {
      const t0 = performance.now();
      const { id } = await post(agent, '/v1/synthesis/uploads', { bytes: bytes.length }, 201);
      const done = await upload(agent, id, bytes);
      if (done.status !== 201) throw new Error(`synthesis: ${done.status} ${done.body}`);
      const answer = await request(done.json.endpoint.port, 'GET', '/');
      const ms = performance.now() - t0;
      if (answer.body.trim() !== APP_PAGE) throw new Error(`the synthesized VM answered ${answer.status} ${answer.body}`);
      applies.push(ms);
      restores.push(done.json.timings.libvirt_ms + done.json.timings.guest_ms);
      process.stderr.write(`apply ${i + 1}: ${round(ms)} ms (restore → ready ${round(restores[i]!)} ms)\n`);
      await agent.delete(`/v1/instances/${done.json.instance.id}`);
    }
    const restoreMs = median(restores);

    // --- the restore → answer of the complete saved state, as any baseline must do after its decode -------------
    const cachedSrc = path.join(scratch, 'cached');
    await cp(vm, cachedSrc, { recursive: true });
    await link(customState, path.join(cachedSrc, 'state.sav'));
    for (const f of ['vmlinuz', 'initrd.img']) await cp(path.join(guest, f), path.join(cachedSrc, f));
    await withManifest(cachedSrc, (m) => ({ ...m, service_id: 'bench.app.cached', disk: 'disk.qcow2', state: 'state.sav' }));
    await post(agent, '/v1/services', { path: cachedSrc }, 201);
    const cachedStarts: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      const t0 = performance.now();
      const started = await post(agent, '/v1/instances', { service_id: 'bench.app.cached' }, 201);
      const answer = await request(started.endpoint.port, 'GET', '/');
      if (answer.body.trim() !== APP_PAGE) throw new Error(`the restored VM answered ${answer.status} ${answer.body}`);
      cachedStarts.push(performance.now() - t0);
      await agent.delete(`/v1/instances/${started.instance.id}`);
    }
    const baselineRestoreMs = median(cachedStarts);
    process.stderr.write(`restore → answer of the complete saved state: ${cachedStarts.map((ms) => round(ms)).join(', ')} ms\n`);

    // --- Elijah-style: xdelta3 -9 of disk and memory, then xz -9 -----------------------------------------------
    const pairs = [
      { name: 'disk', base: baseRaw, target: customRaw },
      { name: 'memory', base: baseState, target: customState },
    ];
    const window = String(Math.max(diskBytes, memoryBytes));
    const xdCreate = await timed(async () => {
      for (const p of pairs) {
        await sh('xdelta3', ['-9', '-f', '-S', 'none', '-B', window, '-e', '-s', p.base, p.target, path.join(scratch, `${p.name}.xd`)]);
        await sh('xz', ['-9', '-f', '-k', path.join(scratch, `${p.name}.xd`)]);
      }
    });
    let xdBytes = 0;
    for (const p of pairs) xdBytes += await size(path.join(scratch, `${p.name}.xd.xz`));
    const xdDecode = await timed(async () => {
      for (const p of pairs) {
        await sh('xz', ['-d', '-f', '-k', path.join(scratch, `${p.name}.xd.xz`)]);
        await sh('xdelta3', ['-d', '-f', '-B', window, '-s', p.base, path.join(scratch, `${p.name}.xd`), path.join(scratch, `${p.name}.xd.out`)]);
      }
    });
    process.stderr.write(`xdelta3+xz: ${xdBytes} B, create ${round(xdCreate.ms)} ms, decode ${round(xdDecode.ms)} ms\n`);

    // --- zstd --patch-from ------------------------------------------------------------------------------------
    const zsCreate = await timed(async () => {
      for (const p of pairs) {
        await sh('zstd', ['-q', '-f', '-9', '--long=30', `--patch-from=${p.base}`, p.target, '-o', path.join(scratch, `${p.name}.zst`)]);
      }
    });
    let zsBytes = 0;
    for (const p of pairs) zsBytes += await size(path.join(scratch, `${p.name}.zst`));
    const zsDecode = await timed(async () => {
      for (const p of pairs) {
        await sh('zstd', [
          '-q',
          '-d',
          '-f',
          '--long=30',
          `--patch-from=${p.base}`,
          path.join(scratch, `${p.name}.zst`),
          '-o',
          path.join(scratch, `${p.name}.zst.out`),
        ]);
      }
    });
    process.stderr.write(`zstd --patch-from: ${zsBytes} B, create ${round(zsCreate.ms)} ms, decode ${round(zsDecode.ms)} ms\n`);

    const applyMs = median(applies);
    const xdApplyMs = xdDecode.ms + baselineRestoreMs;
    const zsApplyMs = zsDecode.ms + baselineRestoreMs;
    const result = {
      bench: 'synthesis',
      runs: RUNS,
      disk_bytes: diskBytes,
      memory_state_bytes: memoryBytes,
      changed_disk_bytes: stats.disk_changed_blocks * 4096,
      overlay_bytes: stats.overlay_bytes,
      xdelta3_xz_bytes: xdBytes,
      zstd_patch_bytes: zsBytes,
      size_vs_xdelta3_xz: round(stats.overlay_bytes / xdBytes, 3),
      size_vs_zstd_patch: round(stats.overlay_bytes / zsBytes, 3),
      create_ms: round(created.ms),
      xdelta3_xz_create_ms: round(xdCreate.ms),
      zstd_patch_create_ms: round(zsCreate.ms),
      apply_ms: round(applyMs),
      applies_ms: applies.map((ms) => round(ms)),
      restore_ready_ms: round(restoreMs),
      baseline_restore_ready_ms: round(baselineRestoreMs),
      xdelta3_xz_decode_ms: round(xdDecode.ms),
      xdelta3_xz_apply_ms: round(xdApplyMs),
      zstd_patch_apply_ms: round(zsApplyMs),
      apply_speedup_vs_xdelta3_xz: round(xdApplyMs / applyMs, 2),
      apply_speedup_vs_zstd_patch: round(zsApplyMs / applyMs, 2),
      load_avg: [round(loadBefore, 2), round(os.loadavg()[0]!, 2)],
      overlay: {
        zero: stats.zero,
        from_base_disk: stats.from_base_disk,
        from_base_memory: stats.from_base_memory,
        from_overlay: stats.from_overlay,
        xor: stats.xor,
        literal: stats.literal,
      },
    };
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    await conn.close();
    await agent.dispose();
    await rm(scratch, { recursive: true, force: true });
  }
}

/** The whole overlay in one request; resolves with the synthesis' answer. */
function upload(agent: AgentProcess, id: string, bytes: Buffer): Promise<{ status: number; body: string; json: any }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: '127.0.0.1',
        port: agent.apiPort,
        method: 'POST',
        path: `/v1/synthesis/uploads/${id}?offset=0`,
        agent: false,
        headers: { 'content-type': 'application/octet-stream', 'content-length': bytes.length, ...adminHeaders(agent.apiPort) },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const body = Buffer.concat(chunks).toString();
          resolve({ status: res.statusCode ?? 0, body, json: JSON.parse(body) });
        });
      },
    );
    req.on('error', reject);
    req.end(bytes);
  });
}

async function post(agent: AgentProcess, urlPath: string, body: unknown, expected: number): Promise<any> {
  const r = await request(agent.apiPort, 'POST', urlPath, body);
  if (r.status !== expected) throw new Error(`POST ${urlPath}: ${r.status} ${r.body}`);
  return r.json;
}

main().catch((err) => {
  process.stderr.write(`bench synthesis failed: ${(err as Error).stack}\n`);
  process.exit(1);
});
