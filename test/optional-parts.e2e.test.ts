// "Say what is off": the agent serves without its optional parts, and says which are off, why, and what to do — in one
// log line at start and in /v1/health's `parts`. Each case is a real agent on a host made to lack the part: a system
// bus (a private dbus-daemon) where no avahi-daemon runs, and an MQTT port another program holds.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { AgentProcess, freePort } from './support/agent';
import { launchChromium } from './support/browser';
import { NONE } from './support/pairing';
import { until } from './support/poll';

const PART_NAMES = ['discovery', 'https', 'mqtt-tcp', 'mqtt-external'];

/** A dbus-daemon of its own, standing in for a system bus on which avahi-daemon never appeared; resolves once it listens. */
async function busWithoutAvahi(tt: Test): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-bus-'));
  const daemon: ChildProcess = spawn('dbus-daemon', ['--session', '--nofork', '--print-address=1', `--address=unix:path=${path.join(dir, 'bus.sock')}`], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  tt.teardown(async () => {
    if (daemon.exitCode === null) await new Promise((resolve) => daemon.once('exit', resolve).kill());
    await rm(dir, { recursive: true, force: true });
  });
  // It prints its address once it accepts connections.
  return new Promise((resolve, reject) => {
    daemon.once('error', reject);
    daemon.stdout!.once('data', (chunk: Buffer) => resolve(chunk.toString().trim().split('\n')[0]!));
  });
}

const health = (agent: AgentProcess) => agent.get('/v1/health', NONE);
const partOf = (json: any, name: string) => (json?.parts ?? []).find((p: any) => p.part === name);
const linesAbout = (agent: AgentProcess, part: string) => agent.log.split('\n').filter((line) => line.includes(`${part} is off:`));

t.test('with no avahi-daemon on the system bus, the agent serves, logs one line with the fix, and /v1/health says discovery is off', async (tt) => {
  const bus = await busWithoutAvahi(tt);
  const agent = await AgentProcess.start({ portRange: '21500-21509', env: { CLOUDLET_DISCOVERY: 'on', DBUS_SYSTEM_BUS_ADDRESS: bus } });
  tt.teardown(() => agent.dispose());
  const report = await until(
    () => health(agent),
    (r) => partOf(r.json, 'discovery')?.state === 'off',
  );
  tt.equal(report.status, 200, 'healthy all the same: discovery is optional');
  tt.same(
    report.json.parts.map((p: any) => p.part),
    PART_NAMES,
    'every optional part, under its stable name',
  );
  tt.match(partOf(report.json, 'discovery'), { state: 'off', reason: /avahi-daemon is not on the system bus/, fix: /apt install avahi-daemon/ });
  tt.match(partOf(report.json, 'mqtt-tcp'), { state: 'on', reason: null, fix: null });
  tt.match(partOf(report.json, 'https'), { state: 'on', reason: null, fix: null });
  tt.match(partOf(report.json, 'mqtt-external'), { state: 'disabled', reason: /mqtt\.externalUrl/, fix: null });
  const lines = linesAbout(agent, 'discovery');
  tt.equal(lines.length, 1, 'one log line about it');
  tt.match(lines[0], /avahi-daemon is not on the system bus.*to fix: .*avahi-daemon/, 'with the reason and the fix');
});

t.test('with its MQTT port taken, the agent serves, logs one line with the fix, and /v1/health says MQTT over TCP is off', async (tt) => {
  const squatter = net.createServer();
  const port = await freePort();
  await new Promise<void>((resolve) => squatter.listen(port, '127.0.0.1', resolve));
  tt.teardown(() => new Promise<void>((resolve) => squatter.close(() => resolve())));
  const agent = await AgentProcess.start({ portRange: '21510-21519', env: { CLOUDLET_MQTT_PORT: String(port) } });
  tt.teardown(() => agent.dispose());
  const report = await health(agent);
  tt.equal(report.status, 200, 'healthy all the same: MQTT over WebSocket still serves');
  tt.match(partOf(report.json, 'mqtt-tcp'), {
    state: 'off',
    reason: new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port}`),
    fix: /mqtt\.port|CLOUDLET_MQTT_PORT/,
  });
  tt.match(partOf(report.json, 'discovery'), { state: 'disabled', fix: null }, 'discovery turned off by configuration is not a fault');
  const lines = linesAbout(agent, 'mqtt-tcp');
  tt.equal(lines.length, 1, 'one log line about it');
  tt.match(lines[0], new RegExp(`${port}.*to fix: .*${port}`), 'with the reason and the fix');

  // The operator looking at the phone page (headless Chromium) sees it in the footer.
  const profile = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-parts-browser-'));
  const browser = await launchChromium(profile);
  tt.teardown(async () => {
    await browser.close();
    await rm(profile, { recursive: true, force: true });
  });
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${agent.apiPort}/`);
  const footer = page.locator('#parts-off li[data-part="mqtt-tcp"]');
  await footer.waitFor({ state: 'visible' });
  tt.match(
    await footer.textContent(),
    new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port}.*To fix: `),
    "the page's footer names the part, the reason and the fix",
  );
  tt.equal(await page.locator('#parts-off li').count(), 1, 'and only the parts that are off');
});

t.test('with its HTTPS port taken and its external broker unreachable, the agent says both, without the broker credentials', async (tt) => {
  const squatter = net.createServer();
  const tlsPort = await freePort();
  await new Promise<void>((resolve) => squatter.listen(tlsPort, '127.0.0.1', resolve));
  tt.teardown(() => new Promise<void>((resolve) => squatter.close(() => resolve())));
  // Nothing listens there: every connection attempt is refused.
  const brokerPort = await freePort();
  const agent = await AgentProcess.start({
    portRange: '21520-21529',
    env: { CLOUDLET_TLS_PORT: String(tlsPort), CLOUDLET_MQTT_URL: `mqtt://127.0.0.1:${brokerPort}` },
  });
  tt.teardown(() => agent.dispose());
  const report = await until(
    () => health(agent),
    (r) => partOf(r.json, 'mqtt-external')?.state === 'off',
  );
  tt.equal(report.status, 200, 'healthy all the same');
  tt.match(partOf(report.json, 'https'), { state: 'off', reason: new RegExp(`127\\.0\\.0\\.1:${tlsPort}`), fix: /api\.tlsPort|CLOUDLET_TLS_PORT/ });
  tt.match(partOf(report.json, 'mqtt-external'), {
    state: 'off',
    reason: new RegExp(`mqtt://127\\.0\\.0\\.1:${brokerPort} is unreachable`),
    fix: /mqtt\.externalUrl|CLOUDLET_MQTT_URL/,
  });
  tt.equal(linesAbout(agent, 'https').length, 1, 'one log line about HTTPS');
  tt.ok(linesAbout(agent, 'mqtt-external').length >= 1, 'a log line about the broker');
  tt.equal((await agent.get('/v1/system')).json.tls_port, null, '/v1/system says there is no HTTPS port');
});
