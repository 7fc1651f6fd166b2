// A guest can never reach the agent: from inside a Service VM of each VM mechanism (a cached VM cold-booted and
// restored from its memory state, an on-demand provisioning, a synthesized VM), the guest's own probe endpoint
// (rootfs/guest/probe-connect, port 8081) tries TCP connects to the agent's API and MQTT ports at 10.0.2.2 (the host
// as user-mode networking presents it) and to a listener on every host address, and none connects. The same probe
// connects to the guest's own HTTP server, and the host reaches the listener: the refusals are the isolation's.
import t, { Test } from 'tap';
import { copyFile, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { AgentProcess, domainsUnder, fetchText, testGuestDir } from './support/agent';
import { createOverlay, prepareSynthesis } from './support/synthesis-fixture';

const PROBE_PORT = 8081;
const PROBE_READINESS = { type: 'http', path: '/cgi-bin/connect', timeout_ms: 90000 };
/** The guest's own web server: what the probe must reach, or it proves nothing. */
const IN_GUEST = '127.0.0.1:8080';

let agent: AgentProcess;
let scratch: string;
/** A TCP listener on every host address, standing for anything else the host serves. */
let listener: net.Server;
let listenerPort: number;

t.before(async () => {
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-guest-isolation-'));
  agent = await AgentProcess.start({ portRange: '26400-26449' });
  listener = net.createServer((socket) => socket.end());
  await new Promise<void>((resolve) => listener.listen(0, '0.0.0.0', resolve));
  listenerPort = (listener.address() as net.AddressInfo).port;
});

t.teardown(async () => {
  await agent?.dispose();
  listener?.close();
  await rm(scratch, { recursive: true, force: true });
});

const hostAddresses = () =>
  Object.values(os.networkInterfaces())
    .flat()
    .filter((a) => a && a.family === 'IPv4' && !a.internal)
    .map((a) => a!.address);

/** Everything of the host a guest must not reach. */
function hostTargets(): string[] {
  return [
    `10.0.2.2:${agent.apiPort}`,
    `10.0.2.2:${agent.mqttPort}`,
    `10.0.2.2:${listenerPort}`,
    ...hostAddresses().flatMap((address) => [`${address}:${agent.apiPort}`, `${address}:${listenerPort}`]),
  ];
}

/** Asks the guest behind `port` to connect to each target; what it answered, target by target. */
async function probeFromGuest(port: number, targets: string[]): Promise<Map<string, string>> {
  const answer = await fetchText(port, `/cgi-bin/connect?${targets.join(',')}`);
  return new Map(
    answer
      .trim()
      .split('\n')
      .map((line) => [line.split(' ')[0]!, line.slice(line.indexOf(' ') + 1)]),
  );
}

async function assertIsolated(tt: Test, port: number, what: string): Promise<void> {
  const hostSide = await new Promise<boolean>((resolve) =>
    net
      .connect(listenerPort, '127.0.0.1')
      .on('connect', function (this: net.Socket) {
        this.destroy();
        resolve(true);
      })
      .on('error', () => resolve(false)),
  );
  tt.ok(hostSide, 'the host itself reaches the listener');
  const targets = hostTargets();
  const seen = await probeFromGuest(port, [IN_GUEST, ...targets]);
  tt.equal(seen.get(IN_GUEST), 'open', `${what}: the probe connects to what the guest may reach (its own server)`);
  for (const target of targets) tt.match(seen.get(target), /^closed/, `${what}: the guest cannot connect to ${target}`);
}

async function stopAndCheck(tt: Test, id: string): Promise<void> {
  tt.equal((await agent.delete(`/v1/instances/${id}`)).status, 200);
  tt.same(await domainsUnder(agent.dataDir), [], 'no domain left');
  tt.same(await readdir(path.join(agent.dataDir, 'instances')), [], 'no instance files left');
}

t.test("a cached VM's guest, cold-booted and restored from its memory state, cannot reach the agent or the host", async (tt) => {
  const dir = path.join(scratch, 'probe-service');
  await mkdir(dir);
  for (const entry of await readdir(testGuestDir())) await copyFile(path.join(testGuestDir(), entry), path.join(dir, entry));
  const manifest = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8'));
  await writeFile(
    path.join(dir, 'manifest.json'),
    JSON.stringify({ ...manifest, service_id: 'org.cloudlet.test.probe', port: PROBE_PORT, readiness: PROBE_READINESS }),
  );
  tt.equal((await agent.post('/v1/services', { path: dir })).status, 201);

  const cold = await agent.post('/v1/instances', { service_id: 'org.cloudlet.test.probe' });
  tt.equal(cold.status, 201, cold.body);
  tt.equal(cold.json.instance.launch, 'cold-boot');
  await assertIsolated(tt, cold.json.endpoint.port, 'cold-booted');
  await stopAndCheck(tt, cold.json.instance.id);

  tt.equal((await agent.post('/v1/services/org.cloudlet.test.probe/state')).status, 200);
  const restored = await agent.post('/v1/instances', { service_id: 'org.cloudlet.test.probe' });
  tt.equal(restored.status, 201, restored.body);
  tt.equal(restored.json.instance.launch, 'memory-state');
  await assertIsolated(tt, restored.json.endpoint.port, 'restored');
  await stopAndCheck(tt, restored.json.instance.id);
  await agent.delete('/v1/services/org.cloudlet.test.probe');
});

t.test('an on-demand provisioned guest cannot reach the agent or the host', async (tt) => {
  tt.equal((await agent.post('/v1/bases', { path: testGuestDir(), name: 'probe-busybox' })).status, 201);
  const recipe = {
    format: 1,
    service_id: 'org.cloudlet.test.probe-recipe',
    version: '1',
    base: 'probe-busybox',
    port: PROBE_PORT,
    readiness: PROBE_READINESS,
    files: [{ path: '/srv/www/index.html', content: 'provisioned\n' }],
    script: '#!/bin/sh\necho provisioned\n',
  };
  tt.equal((await agent.post('/v1/recipes', recipe)).status, 201);
  const started = await agent.post('/v1/recipes/org.cloudlet.test.probe-recipe/instances');
  tt.equal(started.status, 201, started.body);
  await assertIsolated(tt, started.json.endpoint.port, 'on-demand');
  await stopAndCheck(tt, started.json.instance.id);
});

t.test("a synthesized VM's guest cannot reach the agent or the host", async (tt) => {
  const service = 'org.cloudlet.test.probe-synthesized';
  const fixture = await prepareSynthesis(agent, scratch, { baseName: 'probe-base', serviceId: service, content: 'synthesized' });
  const manifestPath = path.join(fixture.customizedVm, 'manifest.json');
  const manifest = JSON.parse(await readFile(manifestPath, 'utf8'));
  await writeFile(manifestPath, JSON.stringify({ ...manifest, port: PROBE_PORT, readiness: PROBE_READINESS }));
  const overlay = path.join(scratch, 'probe.overlay');
  await createOverlay(fixture, fixture.baseDir, overlay);
  const started = await agent.post('/v1/synthesis', { path: overlay });
  tt.equal(started.status, 201, started.body);
  tt.equal(started.json.instance.launch, 'memory-state');
  await assertIsolated(tt, started.json.endpoint.port, 'synthesized');
  await stopAndCheck(tt, started.json.instance.id);
});
