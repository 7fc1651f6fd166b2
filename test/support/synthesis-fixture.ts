// What the VM Synthesis tests start from, made by the real agent: a Base VM (the test guest with a captured memory
// state) and a customized VM (another www disk, a page and a data file, with a memory state captured while it serves),
// and the developer's CLI that makes overlays from them.
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFile, mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { adminHeaders, ROOT, testGuestDir, type AgentProcess } from './agent';

export const run = promisify(execFile);
export const OVERLAY_CLI = path.join(ROOT, 'dist', 'agent', 'src', 'synthesis', 'cli.js');
const BASE_SERVICE = 'org.cloudlet.demo.http';

export interface SynthesisFixture {
  /** The imported base's directory in the agent's data directory, and its disk. */
  baseDir: string;
  baseDisk: string;
  /** A copy of the customized VM's service directory (manifest.json, disk, memory state). */
  customizedVm: string;
}

/** The customized VM's extra file: 1 MiB of deterministic, incompressible bytes (what its page cache also holds). */
function dataFile(): Buffer {
  const blocks: Buffer[] = [];
  for (let i = 0; i < 1 << 15; i++) blocks.push(createHash('sha256').update(`block ${i}`).digest());
  return Buffer.concat(blocks);
}

/** Import the base as `baseName` into `agent`, and make the customized VM of `serviceId` serving `content` in `scratch`. */
export async function prepareSynthesis(
  agent: AgentProcess,
  scratch: string,
  { baseName, serviceId, content }: { baseName: string; serviceId: string; content: string },
): Promise<SynthesisFixture> {
  const imported = await agent.post('/v1/services', { path: testGuestDir() });
  if (imported.status !== 201) throw new Error(imported.body);
  const captured = await agent.post(`/v1/services/${BASE_SERVICE}/state`);
  if (captured.status !== 200) throw new Error(captured.body);
  const base = await agent.post('/v1/bases', { path: path.join(agent.dataDir, 'services', BASE_SERVICE), name: baseName });
  if (base.status !== 201) throw new Error(base.body);
  await agent.delete(`/v1/services/${BASE_SERVICE}`);

  const www = path.join(scratch, 'www');
  await mkdir(www);
  await writeFile(path.join(www, 'index.html'), `${content}\n`);
  await writeFile(path.join(www, 'data.bin'), dataFile());
  await run('bash', [path.join(ROOT, 'rootfs', 'guest', 'build-guest.sh'), path.join(scratch, 'custom'), '--www', www, '--service-id', serviceId]);
  // Its readiness probe reads the data file, so the captured memory holds it in the page cache, as a service's own
  // files are after it started.
  const customManifest = path.join(scratch, 'custom', 'manifest.json');
  const m = JSON.parse(await readFile(customManifest, 'utf8'));
  await writeFile(customManifest, JSON.stringify({ ...m, readiness: { ...m.readiness, path: '/data.bin' } }));
  const custom = await agent.post('/v1/services', { path: path.join(scratch, 'custom') });
  if (custom.status !== 201) throw new Error(custom.body);
  const customState = await agent.post(`/v1/services/${serviceId}/state`);
  if (customState.status !== 200) throw new Error(customState.body);
  const customizedVm = path.join(scratch, 'customized-vm');
  await mkdir(customizedVm);
  const serviceDir = path.join(agent.dataDir, 'services', serviceId);
  for (const entry of await readdir(serviceDir)) await copyFile(path.join(serviceDir, entry), path.join(customizedVm, entry));
  await agent.delete(`/v1/services/${serviceId}`);
  return { baseDir: base.json.dir, baseDisk: path.join(base.json.dir, base.json.disk), customizedVm };
}

/**
 * `cloudlet-overlay create` of the customized VM against the base in `baseDir`, into `out`; its JSON statistics.
 * `state`: another memory state file to carry instead of the customized VM's own.
 */
export async function createOverlay(
  fixture: SynthesisFixture,
  baseDir: string,
  out: string,
  key: string | null = null,
  state?: string,
): Promise<Record<string, number>> {
  const vm = fixture.customizedVm;
  const manifest = JSON.parse(await readFile(path.join(vm, 'manifest.json'), 'utf8'));
  const { stdout } = await run('node', [
    OVERLAY_CLI,
    'create',
    '--base',
    baseDir,
    '--disk',
    path.join(vm, manifest.disk),
    '--state',
    state ?? path.join(vm, manifest.state),
    '--service',
    path.join(vm, 'manifest.json'),
    '--out',
    out,
    ...(key ? ['--key', key] : []),
  ]);
  return JSON.parse(stdout);
}

/**
 * POST bytes to an overlay upload from `offset` over a raw socket (as the agent's admin); `cutAfter` bytes in, the
 * connection is cut, as a phone losing Wi-Fi would cut it.
 */
export function sendUploadBytes(port: number, id: string, offset: number, bytes: Buffer, cutAfter?: number): Promise<{ status: number; json: any } | null> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    let response = '';
    socket.on('data', (d) => {
      response += d.toString();
    });
    socket.on('error', (err) => (cutAfter === undefined ? reject(err) : resolve(null)));
    socket.on('close', () => {
      if (cutAfter !== undefined) return resolve(null);
      const [head, body] = response.split('\r\n\r\n');
      resolve({ status: Number(/^HTTP\/1\.1 (\d+)/.exec(head ?? '')?.[1]), json: JSON.parse(body ?? 'null') });
    });
    const auth = Object.entries(adminHeaders(port))
      .map(([name, value]) => `${name}: ${value}\r\n`)
      .join('');
    socket.write(
      `POST /v1/synthesis/uploads/${id}?offset=${offset} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n` +
        `${auth}Content-Length: ${bytes.length}\r\nConnection: close\r\n\r\n`,
    );
    if (cutAfter === undefined) {
      socket.write(bytes);
    } else {
      socket.write(bytes.subarray(0, cutAfter), () => setTimeout(() => socket.destroy(), 200));
    }
  });
}
