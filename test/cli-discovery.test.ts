// `cloudlet discover` on a real (virtual) LAN: network namespaces this test creates, joined by a veth pair that
// is created inside them, so no multicast ever reaches the machine's own interfaces. The "cloudlet" namespace runs
// the real agent and a DNS-SD responder answering as Avahi does for it; the "phone" namespace runs the CLI. Processes
// enter a namespace with nsenter --net, which (unlike `ip netns exec`) leaves /sys and its cgroups mounted.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile, chmod } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { AGENT_MAIN, ROOT, destroyDomainsUnder } from './support/agent';
import { AvahiNetwork } from './support/avahi-netns';
import { cli, type CliResult } from './support/cli';
import { deleteNamespaces, joinNamespaces, type NamespaceSide } from './support/netns-pair';

const RESPONDER = path.join(ROOT, 'dist', 'test', 'support', 'mdns-responder.js');
const CLOUDLET_NS = `cl7-cloudlet-${process.pid}`;
const PHONE_NS = `cl7-phone-${process.pid}`;
const CLOUDLET_IP = '10.77.7.1';
const PHONE_IP = '10.77.7.2';
const API_PORT = 9999; // the namespace is ours: the port KD clients expect is free there
const CLOUDLET_SIDE: NamespaceSide = { namespace: CLOUDLET_NS, link: 'cl7c', address: CLOUDLET_IP };
const PHONE_SIDE: NamespaceSide = { namespace: PHONE_NS, link: 'cl7p', address: PHONE_IP };

const children: ChildProcess[] = [];
let dataDir = '';

/** Starts a process in a namespace and resolves once its output matches `ready`. */
function startIn(ns: string, argv: string[], env: Record<string, string>, ready: RegExp): Promise<ChildProcess> {
  const child = spawn('nsenter', [`--net=/run/netns/${ns}`, ...argv], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let output = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${argv.join(' ')} not ready after 20 s: ${output}`)), 20000);
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      if (ready.test(output)) {
        clearTimeout(timer);
        resolve(child);
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('exit', (code) => reject(new Error(`${argv.join(' ')} exited with ${code}: ${output}`)));
  });
}

/** An agent on the KD port of its namespace, on all of that namespace's interfaces, with its data in `dir`. */
function agentEnv(dir: string): Record<string, string> {
  return {
    CLOUDLET_PORT: String(API_PORT),
    CLOUDLET_API_HOST: '0.0.0.0',
    CLOUDLET_DATA_DIR: path.join(dir, 'data'),
    CLOUDLET_FORWARD_ADDRESS: '127.0.0.1',
    CLOUDLET_PORT_RANGE: '22090-22099',
    CLOUDLET_SEED_DIR: '',
    CLOUDLET_CONFIG: path.join(ROOT, 'test', 'support', 'no-config.json'),
    CLOUDLET_MQTT_HOST: '127.0.0.1',
    CLOUDLET_MQTT_PORT: '0',
    CLOUDLET_TLS_PORT: '0',
  };
}

/** The CLI run from the phone's namespace. */
function phoneCli(...args: string[]): Promise<CliResult> {
  return cli(args, { via: ['nsenter', `--net=/run/netns/${PHONE_NS}`] });
}

t.before(async () => {
  await joinNamespaces(CLOUDLET_SIDE, PHONE_SIDE);

  dataDir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-discovery-'));
  await chmod(dataDir, 0o755);
  // A DNS-SD responder stands in for Avahi here (the last test has the agent publish through a real one).
  await startIn(CLOUDLET_NS, [process.execPath, AGENT_MAIN], { ...agentEnv(dataDir), CLOUDLET_DISCOVERY: '0' }, /listening on \S+ after/);
  await startIn(
    CLOUDLET_NS,
    [
      process.execPath,
      RESPONDER,
      CLOUDLET_IP,
      'cloudlet-a',
      'cloudlet-a.local',
      CLOUDLET_IP,
      String(API_PORT),
      // A second advertisement whose API does not answer: listed, but never chosen.
      'cloudlet-gone',
      'cloudlet-gone.local',
      CLOUDLET_IP,
      '1',
    ],
    {},
    /ready/,
  );
});

t.teardown(async () => {
  for (const child of children) if (child.exitCode === null) child.kill('SIGTERM');
  await Promise.all(children.filter((child) => child.exitCode === null).map((child) => new Promise((r) => child.once('exit', r))));
  await deleteNamespaces(PHONE_SIDE, CLOUDLET_SIDE);
  if (dataDir) {
    await destroyDomainsUnder(dataDir);
    await rm(dataDir, { recursive: true, force: true });
  }
});

t.test('discover finds the cloudlets on the chosen interface and ranks them as client-lib does', async (tt) => {
  const r = await phoneCli('discover', '--interface', PHONE_IP, '--timeout', '1500', '--json');
  tt.equal(r.code, 0, r.stderr);
  const [best, gone] = r.json.cloudlets;
  tt.equal(r.json.cloudlets.length, 2);
  tt.match(best, { name: 'cloudlet-a', host: 'cloudlet-a.local', address: CLOUDLET_IP, port: API_PORT, encryption: 'disabled', eligible: true });
  // CpuBasedRanker: 100 × max_cores − usage, from the cloudlet's own /api/system.
  tt.ok(best.rank > 0 && best.rank <= 100 * os.cpus().length, `rank ${best.rank} within (0, 100 × cores]`);
  tt.match(gone, { name: 'cloudlet-gone', rank: null, eligible: false }, 'an unreachable cloudlet is listed last and not eligible');
});

t.test('without --cloudlet, a verb talks to the best-ranked cloudlet discovered', async (tt) => {
  // The app catalog is open to unpaired phones (docs/security.md).
  const r = await phoneCli('apps', '--interface', PHONE_IP, '--json');
  tt.equal(r.code, 0, r.stderr);
  tt.same(r.json, { apps: [] });
});

t.test("adding apps is refused to a client without the operator's credential", async (tt) => {
  const apk = path.join(dataDir, 'tiny.apk');
  await writeFile(apk, 'not really an apk');
  const r = await phoneCli('add-app', apk, '--service', 'any.service', '--name', 'Tiny', '--cloudlet', `${CLOUDLET_IP}:${API_PORT}`, '--json');
  tt.equal(r.code, 1);
  tt.equal(r.json.error.code, 'UNAUTHENTICATED');
});

t.test('with nobody answering, discover says so and a verb without --cloudlet exits 4', async (tt) => {
  const r = await phoneCli('apps', '--interface', '127.0.0.1', '--timeout', '500', '--json');
  tt.equal(r.code, 4);
  tt.equal(r.json.error.code, 'NO_CLOUDLET');
});

t.test('discover finds an agent that publishes itself through a real Avahi, and ranks it', async (tt) => {
  // Another pair of namespaces, each with its own D-Bus and avahi-daemon; the agent runs in side A and publishes
  // through A's Avahi (its own discovery module), the CLI browses from side B.
  const network = await AvahiNetwork.create();
  const avahiData = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-discovery-avahi-'));
  await chmod(avahiData, 0o755);
  let agentProcess: ChildProcess | undefined;
  tt.teardown(async () => {
    if (agentProcess && agentProcess.exitCode === null) {
      agentProcess.kill('SIGTERM');
      await new Promise((resolve) => agentProcess!.once('exit', resolve));
    }
    await network.dispose();
    await destroyDomainsUnder(avahiData);
    await rm(avahiData, { recursive: true, force: true });
  });
  agentProcess = await startIn(
    network.namespace('a'),
    [process.execPath, AGENT_MAIN],
    {
      ...agentEnv(avahiData),
      CLOUDLET_DISCOVERY: '1',
      DBUS_SYSTEM_BUS_ADDRESS: network.busAddress('a'),
    },
    /listening on \S+ after/,
  );

  let found: any;
  const deadline = Date.now() + 20000;
  while (!found && Date.now() < deadline) {
    const r = await cli(['discover', '--interface', network.address('b'), '--timeout', '1000', '--json'], {
      via: ['nsenter', `--net=/run/netns/${network.namespace('b')}`],
    });
    tt.equal(r.code, 0, r.stderr);
    found = r.json.cloudlets.find((c: { address: string }) => c.address === network.address('a'));
  }
  tt.match(found, { port: API_PORT, encryption: 'disabled', eligible: true }, "the agent's own publication, with client-lib's TXT");
  tt.ok(found.rank > 0, `ranked ${found.rank} from its /api/system`);
});
