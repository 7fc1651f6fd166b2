// Crash recovery, end to end: the real agent is SIGKILLed at named fault points (CLOUDLET_FAULT_POINT, see
// docs/reliability.md) in every phase of every mechanism, and at seeded random moments after a request; each time it is
// restarted on the same data directory and must have left nothing orphaned or half-made, while the instances that were
// ready before the kill (a VM and a sandbox) are still listed and served.
//
// One data directory serves every case, in order: it is prepared once (service with a memory state, base, recipe,
// overlay, app package), the two long-lived instances are started, and each case kills and restarts the same agent.
import t, { Test } from 'tap';
import { execFile } from 'node:child_process';
import { cp, mkdir, mkdtemp, readFile, rm, writeFile, copyFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { AgentProcess, request, ROOT, testGuestDir } from './support/agent';
import { buildHttpdPackage, destroySandboxesUnder, PAGE } from './support/app-package';
import { assertRecovered, settled, type ServedInstance } from './support/invariants';

const run = promisify(execFile);
const PORTS = '22800-22899';
const PORT_RANGE: [number, number] = [22800, 22899];
const OVERLAY_CLI = path.join(ROOT, 'dist', 'agent', 'src', 'synthesis', 'cli.js');
const SERVICE = 'org.cloudlet.demo.http';
/** A second copy of the test guest: captures refuse a service with running instances, and SERVICE always has one. */
const CAPTURED = 'org.cloudlet.test.capture';
/** A third copy, imported (and removed again) by the import cases. */
const IMPORTED = 'org.cloudlet.test.import';
const APP = 'org.test.httpd';
const APP_SPARE = 'org.test.httpd.spare';
const RECIPE = 'org.example.fault';
const GUEST_CONTENT = /hello from the cloudlet demo service/;
/** Seeded, so a failing random kill can be replayed: CLOUDLET_FAULT_SEED=<seed>. */
const SEED = Number(process.env.CLOUDLET_FAULT_SEED ?? 20261125);
/** Runs only the cases whose name matches (replaying one failure): CLOUDLET_FAULT_ONLY=<regexp>. */
const ONLY = process.env.CLOUDLET_FAULT_ONLY ? new RegExp(process.env.CLOUDLET_FAULT_ONLY) : null;

let agent: AgentProcess;
let scratch: string;
let overlayFile: string;
let spareTarball: string;
const served: ServedInstance[] = [];

/** mulberry32: a tiny seeded PRNG, enough to spread kill times reproducibly. */
function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = Math.imul(a ^ (a >>> 15), 1 | a);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}
const random = seededRandom(SEED);

async function guestCopy(serviceId: string): Promise<string> {
  const dir = path.join(scratch, serviceId);
  await cp(testGuestDir(), dir, { recursive: true });
  const manifest = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8'));
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ ...manifest, service_id: serviceId }));
  return dir;
}

async function must(what: string, call: Promise<{ status: number; body: string; json: any }>, status: number): Promise<any> {
  const r = await call;
  if (r.status !== status) throw new Error(`${what}: HTTP ${r.status} ${r.body}`);
  return r.json;
}

t.before(async () => {
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-fault-'));
  agent = await AgentProcess.start({ portRange: PORTS });
  await must('import', agent.post('/v1/services', { path: testGuestDir() }), 201);
  await must('capture', agent.post(`/v1/services/${SERVICE}/state`), 200);
  await must('import the capture copy', agent.post('/v1/services', { path: await guestCopy(CAPTURED) }), 201);
  await guestCopy(IMPORTED);
  const base = await must('base', agent.post('/v1/bases', { path: path.join(agent.dataDir, 'services', SERVICE), name: 'busybox' }), 201);
  await must(
    'recipe',
    agent.post('/v1/recipes', {
      format: 1,
      service_id: RECIPE,
      version: '1',
      base: 'busybox',
      port: 8080,
      cache: 'on-request',
      readiness: { type: 'http', path: '/', timeout_ms: 60000 },
      files: [{ path: '/srv/www/index.html', content: 'hello from a recipe\n' }],
      script: '#!/bin/sh\necho provisioned\n',
    }),
    201,
  );

  // An overlay of the base onto itself: every block and page is the base's, the cheapest overlay that still runs
  // every synthesis phase (upload, apply, memory rebuild, restore).
  const keys = path.join(scratch, 'keys');
  await mkdir(keys);
  await run('node', [OVERLAY_CLI, 'keygen', path.join(keys, 'dev.key'), path.join(keys, 'dev.pem')]);
  await mkdir(path.join(agent.dataDir, 'overlay-keys'));
  await copyFile(path.join(keys, 'dev.pem'), path.join(agent.dataDir, 'overlay-keys', 'dev.pem'));
  overlayFile = path.join(scratch, 'self.overlay');
  await run('node', [
    OVERLAY_CLI,
    'create',
    '--base',
    base.dir,
    '--disk',
    path.join(base.dir, base.disk),
    '--state',
    path.join(base.dir, base.state),
    '--service',
    path.join(agent.dataDir, 'services', SERVICE, 'manifest.json'),
    '--out',
    overlayFile,
    '--key',
    path.join(keys, 'dev.key'),
  ]);

  const hostSecret = path.join(scratch, 'host-secret');
  await writeFile(hostSecret, 'not for sandboxes\n');
  await must('package', agent.post('/v1/packages', { path: await buildHttpdPackage(scratch, { appId: APP, hostSecret }) }), 201);
  spareTarball = await buildHttpdPackage(scratch, { appId: APP_SPARE, hostSecret });

  // Ready before any kill: what every case checks is still served afterwards.
  const vm = await must('the long-lived VM', agent.post('/v1/instances', { service_id: SERVICE }), 201);
  served.push({ id: vm.instance.id, port: vm.endpoint.port, content: GUEST_CONTENT });
  const sandbox = await must('the long-lived sandbox', agent.post('/v1/instances', { service_id: APP }), 201);
  served.push({ id: sandbox.instance.id, port: sandbox.endpoint.port, content: new RegExp(PAGE.trim()) });
});

t.teardown(async () => {
  await agent?.stop();
  if (agent) await destroySandboxesUnder(agent.dataDir);
  await agent?.dispose();
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

/** Fire a request whose answer may never come (the agent dies on it); its outcome is not the point. */
function fire(call: () => Promise<unknown>): void {
  void call().catch(() => {});
}

async function uploadOverlay(a: AgentProcess): Promise<void> {
  const bytes = await readFile(overlayFile);
  const upload = await must('upload', a.post('/v1/synthesis/uploads', { bytes: bytes.length }), 201);
  const half = Math.floor(bytes.length / 2);
  await request(a.apiPort, 'POST', `/v1/synthesis/uploads/${upload.id}?offset=0`, bytes.subarray(0, half), {
    'content-type': 'application/octet-stream',
  }).catch(() => {});
  await request(a.apiPort, 'POST', `/v1/synthesis/uploads/${upload.id}?offset=${half}`, bytes.subarray(half), { 'content-type': 'application/octet-stream' });
}

/** The operations the cases interrupt. */
const operations: Record<string, (a: AgentProcess) => Promise<unknown>> = {
  'cached-vm start': (a) => a.post('/v1/instances', { service_id: SERVICE }),
  'KD-Cloudlet start': (a) => a.get(`/api/servicevm/start?serviceId=${SERVICE}&join=false`),
  'service import': (a) => a.post('/v1/services', { path: path.join(scratch, IMPORTED) }),
  'state capture': (a) => a.post(`/v1/services/${CAPTURED}/state`),
  'on-demand provisioning': (a) => a.post(`/v1/recipes/${RECIPE}/instances`, {}),
  'synthesis from a file': (a) => a.post('/v1/synthesis', { path: overlayFile }),
  'synthesis upload': uploadOverlay,
  'app-virt start': (a) => a.post('/v1/instances', { service_id: APP }),
  'package import': (a) => a.post('/v1/packages', { path: spareTarball }),
  'app upload (Cloudlet Push)': (a) =>
    request(a.apiPort, 'POST', `/v1/apps?service_id=${SERVICE}&name=Fault&file_name=fault.apk&kind=android`, 'x'.repeat(4096), {
      'content-type': 'application/octet-stream',
    }),
};

/** [fault point, operation that passes it]. */
const NAMED: Array<[string, string]> = [
  ['launch:before-port', 'cached-vm start'],
  ['launch:after-port', 'KD-Cloudlet start'],
  ['cached-vm:after-clone', 'cached-vm start'],
  ['vm:mid-restore', 'cached-vm start'],
  ['cached-vm:after-domain', 'KD-Cloudlet start'],
  ['launch:before-ready-record', 'cached-vm start'],
  ['launch:after-ready-record', 'cached-vm start'],
  ['catalog:before-rename', 'service import'],
  ['catalog:after-rename', 'service import'],
  ['capture:mid-save', 'state capture'],
  ['capture:before-commit', 'state capture'],
  ['on-demand:after-cidata', 'on-demand provisioning'],
  ['on-demand:first-boot', 'on-demand provisioning'],
  ['synthesis:mid-upload', 'synthesis upload'],
  ['synthesis:after-apply', 'synthesis from a file'],
  ['vm:mid-restore', 'synthesis from a file'],
  ['launch:before-ready-record', 'synthesis from a file'],
  ['app-virt:after-spawn', 'app-virt start'],
  ['app-virt:after-state', 'app-virt start'],
  ['launch:after-port', 'app-virt start'],
  ['package:before-rename', 'package import'],
  ['apps:before-rename', 'app upload (Cloudlet Push)'],
];

/** [operation, longest useful delay in ms]: two random kills each, anywhere from the request to about when it completes. */
const RANDOM: Array<[string, number]> = [
  ['cached-vm start', 3000],
  ['KD-Cloudlet start', 3000],
  ['state capture', 8000],
  ['on-demand provisioning', 8000],
  ['synthesis from a file', 4000],
  ['app-virt start', 600],
];

/** After the checks: stop what the case left running (adopted launches that finished) and undo imports it completed. */
async function tidy(): Promise<void> {
  for (const instance of await settled(agent)) {
    if (!served.some((s) => s.id === instance.id)) await agent.delete(`/v1/instances/${instance.id}`);
  }
  await agent.delete(`/v1/services/${IMPORTED}`);
  await agent.delete(`/v1/packages/${APP_SPARE}`);
  for (const app of (await agent.get('/v1/apps')).json.apps as Array<{ id: string }>) await agent.delete(`/v1/apps/${app.id}`);
}

async function killedAt(tt: Test, point: string, operation: string): Promise<void> {
  await agent.stop();
  await agent.launch({ CLOUDLET_FAULT_POINT: point });
  // The answer only comes when the point was never reached: then it says why.
  let answer = 'no answer';
  void operations[operation]!(agent).then(
    (r) => {
      answer = String(JSON.stringify(r)).slice(0, 2000);
    },
    () => {},
  );
  const signal = await agent.exited(90000).catch((err: Error) => err.message);
  tt.equal(signal, 'SIGKILL', `the agent died by SIGKILL at ${point}`, { answer });
  if (signal !== 'SIGKILL') await agent.stop();
  await agent.launch({ CLOUDLET_FAULT_POINT: '' });
  await assertRecovered(tt, agent, `after a kill at ${point}`, { portRange: PORT_RANGE, served });
  await tidy();
}

for (const [point, operation] of NAMED) {
  if (ONLY && !ONLY.test(`${point} ${operation}`)) continue;
  t.test(`a SIGKILL at ${point} during a ${operation} leaves nothing behind and loses no ready instance`, (tt) => killedAt(tt, point, operation));
}

for (const [operation, span] of [...RANDOM, ...RANDOM]) {
  const delay = Math.round(random() * span);
  if (ONLY && !ONLY.test(`random ${operation}`)) continue;
  t.test(`a SIGKILL ${delay} ms into a ${operation} (seed ${SEED}) leaves nothing behind and loses no ready instance`, async (tt) => {
    fire(() => operations[operation]!(agent));
    await sleep(delay);
    await agent.kill();
    await agent.launch();
    await assertRecovered(tt, agent, `after a kill ${delay} ms into a ${operation}`, { portRange: PORT_RANGE, served });
    await tidy();
  });
}
