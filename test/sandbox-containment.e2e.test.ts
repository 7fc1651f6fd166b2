// Sandboxes are contained: what an app package cannot reach or exhaust, proven from inside real sandboxes (real
// bwrap, pasta, nft and cgroups) started by the real agent. Network traffic stays on loopback and in a network
// namespace this test creates.
import { execFile, spawn } from 'node:child_process';
import { access, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import t, { type Test } from 'tap';
import { openCgroups, SandboxCgroup } from '../agent/src/sandbox/cgroups';
import { AgentProcess, ROOT, fetchText } from './support/agent';
import { buildHttpdPackage, destroySandboxesUnder, tempDir, type HttpdPackageOptions } from './support/app-package';

const run = promisify(execFile);
const PORTS = '21520-21539';
const LOG_CAP = 256 * 1024;

async function startAgent(t: Test, env: Record<string, string> = {}): Promise<AgentProcess> {
  const agent = await AgentProcess.start({ portRange: PORTS, env });
  t.teardown(async () => {
    await agent.stop();
    await destroySandboxesUnder(agent.dataDir);
    await agent.dispose();
  });
  return agent;
}

/** Import a busybox httpd package built with `options` and start it; returns the instance id and forwarded port. */
async function startApp(t: Test, agent: AgentProcess, options: Omit<HttpdPackageOptions, 'hostSecret'>): Promise<{ id: string; port: number }> {
  const scratch = await tempDir('cloudlet-contain-');
  t.teardown(() => rm(scratch, { recursive: true, force: true }));
  const tarball = await buildHttpdPackage(scratch, { hostSecret: '/etc/hostname', ...options });
  const imported = await agent.post('/v1/packages', { path: tarball });
  t.equal(imported.status, 201, imported.body);
  const started = await agent.post('/v1/instances', { service_id: options.appId });
  t.equal(started.status, 201, started.body);
  return { id: started.json.instance.id, port: started.json.endpoint.port };
}

function keyValues(text: string): Record<string, string> {
  return Object.fromEntries(
    text
      .trim()
      .split('\n')
      .map((line) => line.split(/=(.*)/s).slice(0, 2)),
  );
}

/** A file of the sandbox's cgroup part in the hierarchy that has it (v1 keeps each controller in its own). */
async function cgroupFile(id: string, part: 'app' | 'net', file: string): Promise<string> {
  const layout = await openCgroups();
  const { name } = new SandboxCgroup(layout, id);
  for (const parent of layout.parents) {
    const candidate = path.join(parent, name, part, file);
    if (
      await access(candidate).then(
        () => true,
        () => false,
      )
    )
      return readFile(candidate, 'utf8');
  }
  throw new Error(`no ${file} for ${part} of sandbox ${id}`);
}

const attempt = (key: string, command: string) => `${command} >/dev/null 2>&1 && echo ${key}=yes || echo ${key}=no`;

t.test('the app sees only descriptors 0-2 and runs under seccomp without user namespaces, while ordinary work still runs', async (t) => {
  const agent = await startAgent(t);
  const { port } = await startApp(t, agent, {
    appId: 'org.test.kernel',
    // The app's first process lists its descriptors (ls forks: the listing's own directory shows up too).
    startup: 'ls -l /proc/self/fd > /tmp/fds',
    cgi: {
      fds: 'cat /tmp/fds',
      kernel: [
        attempt('nested_userns', 'unshare -U true'),
        attempt('userns_mount', 'unshare -r -m sh -c "mount -t tmpfs none /tmp"'),
        attempt('mount', 'mount -t tmpfs none /tmp'),
        attempt('fork_and_pipe', 'test "$(echo b a | tr " " "\\n" | sort | head -1)" = a'),
        attempt('write_data', 'echo kept > /data/file && test "$(cat /data/file)" = kept'),
        'echo "seccomp=$(grep ^Seccomp: /proc/self/status | tr -dc 0-9)"',
      ].join('\n'),
    },
  });

  const inherited = (await fetchText(port, '/cgi-bin/fds'))
    .split('\n')
    .map((line) => /(\d+) -> (.*)$/.exec(line))
    .filter((m): m is RegExpExecArray => m !== null && Number(m[1]) > 2 && !/^\/proc\/\d+\/fd$/.test(m[2]!))
    .map((m) => `${m[1]} -> ${m[2]}`);
  t.same(inherited, [], "nothing above descriptor 2 reaches the app (pasta's listening socket did)");

  t.same(
    keyValues(await fetchText(port, '/cgi-bin/kernel')),
    {
      nested_userns: 'no', // it cannot create a user namespace
      userns_mount: 'no', // so it cannot become root in one and mount there
      mount: 'no',
      fork_and_pipe: 'yes', // positive control: processes, pipes and ordinary tools work
      write_data: 'yes', // positive control: its private /data takes writes
      seccomp: '2', // filter mode
    },
    'the app runs under a seccomp filter, without user namespaces or mounts, and ordinary work still runs',
  );
});

t.test('/data has a quota: writing past it fails with ENOSPC and nothing lands on the host data directory', async (t) => {
  const agent = await startAgent(t);
  const { id, port } = await startApp(t, agent, {
    appId: 'org.test.filler',
    memoryMib: 32,
    dataMib: 4,
    cgi: { fill: 'dd if=/dev/zero of=/data/fill bs=1024 count=16384 2>&1; echo "size=$(wc -c < /data/fill)"' },
  });
  const fill = await fetchText(port, '/cgi-bin/fill');
  t.match(fill, /No space left on device/, 'the write past the quota fails with ENOSPC');
  const size = Number(
    keyValues(
      fill
        .split('\n')
        .filter((l) => l.startsWith('size='))
        .join('\n'),
    ).size,
  );
  t.ok(size > 0 && size <= 4 * 1024 * 1024, `what was written stays within the 4 MiB quota (${size} bytes)`);
  const { stdout } = await run('du', ['-sk', path.join(agent.dataDir, 'instances', id)]);
  t.ok(Number(stdout.split('\t')[0]) < 1024, `the instance's host directory holds no app data (${stdout.trim()})`);
  t.equal(await fetchText(port, '/'), 'hello from a sandbox\n', 'the app keeps serving');
});

t.test('a log flood stays under the cap and keeps its newest output', async (t) => {
  const agent = await startAgent(t, { CLOUDLET_CONFIG: await configFile(t, { packages: { logBytes: LOG_CAP } }) });
  const { id, port } = await startApp(t, agent, { appId: 'org.test.chatty', startup: 'yes flood-flood-flood-flood &' });
  const log = path.join(agent.dataDir, 'instances', id, 'sandbox.log');
  const deadline = Date.now() + 30000;
  let text = '';
  // Until the cap has been reached at least once (the marker); the flood goes on meanwhile.
  while (!(text = await readFile(log, 'utf8')).includes('older output dropped') && text.length <= LOG_CAP && Date.now() < deadline) await sleep(100);
  for (let look = 0; look < 5; look++) {
    const size = (await readFile(log)).length;
    t.ok(size <= LOG_CAP, `sandbox.log is ${size} bytes, at most the ${LOG_CAP} configured`);
    await sleep(200);
  }
  t.match(
    await readFile(log, 'utf8'),
    /^\[cloudlet: older output dropped, the log is capped\]\n[^]*(flood-flood-flood-flood\n){100}/,
    'the newest output is kept behind a marker',
  );
  t.equal(await fetchText(port, '/'), 'hello from a sandbox\n', 'the app keeps serving');
});

t.test("a fork bomb stops at the sandbox's pids limit; pasta's group is limited too; the host still forks", async (t) => {
  const agent = await startAgent(t);
  const { id, port } = await startApp(t, agent, {
    appId: 'org.test.forker',
    pids: 24,
    // Bounded: 200 sleepers that end by themselves; the test stops the instance before then anyway.
    cgi: { bomb: 'for i in $(seq 200); do sleep 60 >/dev/null 2>&1 & done 2>/dev/null; echo started' },
  });
  t.equal((await cgroupFile(id, 'app', 'pids.max')).trim(), '24', "the manifest's pids limit is set");
  t.equal((await cgroupFile(id, 'net', 'pids.max')).trim(), '16', "pasta's group has a pids limit");
  t.ok(
    Number(await cgroupFile(id, 'net', 'memory.limit_in_bytes').catch(() => cgroupFile(id, 'net', 'memory.max'))) <= 128 * 1024 * 1024,
    'and a memory limit',
  );
  await fetchText(port, '/cgi-bin/bomb').catch(() => '');
  const procs = (await cgroupFile(id, 'app', 'cgroup.procs')).trim().split('\n').length;
  t.ok(procs <= 24, `the sandbox holds ${procs} processes, at most its limit`);
  t.match(await cgroupFile(id, 'app', 'pids.events'), /^max [1-9]/m, 'the limit refused forks');
  const child = spawn('true');
  t.equal(await new Promise((resolve) => child.on('exit', resolve)), 0, 'the host still starts processes');
  const stopped = await agent.delete(`/v1/instances/${id}`);
  t.ok(stopped.status < 300, 'the instance stops with its processes');
});

t.test("the app reaches none of the host's services on any host address, only its own forward serves", async (t) => {
  const ns = `cl-sbx-${process.pid}`;
  const ip = (...args: string[]) => run('ip', ['-n', ns, ...args]);
  await run('ip', ['netns', 'add', ns]);
  t.teardown(() => run('ip', ['netns', 'del', ns]).catch(() => {}));
  // The "host": an uplink pasta copies (10.77.0.1, default route via 10.77.0.254) and a second interface it does not
  // (veth pairs with nothing behind them: the kernel here has no dummy interfaces).
  await ip('link', 'set', 'lo', 'up');
  await ip('link', 'add', 'uplink', 'type', 'veth', 'peer', 'name', 'uplink-peer');
  await ip('link', 'set', 'uplink-peer', 'up');
  await ip('addr', 'add', '10.77.0.1/24', 'dev', 'uplink');
  await ip('link', 'set', 'uplink', 'up');
  await ip('route', 'add', 'default', 'via', '10.77.0.254');
  await ip('link', 'add', 'second', 'type', 'veth', 'peer', 'name', 'second-peer');
  await ip('link', 'set', 'second-peer', 'up');
  await ip('addr', 'add', '10.88.0.1/24', 'dev', 'second');
  await ip('link', 'set', 'second', 'up');

  const scratch = await tempDir('cloudlet-contain-');
  t.teardown(() => rm(scratch, { recursive: true, force: true }));
  const tarball = await buildHttpdPackage(scratch, {
    appId: 'org.test.netprobe',
    hostSecret: '/etc/hostname',
    cgi: {
      connect:
        'for t in $(echo "$QUERY_STRING" | tr "+" " "); do nc -w 2 "${t%:*}" "${t##*:}" -e /app/bin/true >/dev/null 2>&1 && echo "$t=yes" || echo "$t=no"; done',
    },
  });
  const driver = path.join(ROOT, 'dist', 'test', 'support', 'sandbox-netns-driver.js');
  const { stdout } = await run(
    'nsenter',
    [`--net=/run/netns/${ns}`, process.execPath, driver, tarball, 'org.test.netprobe', '10.88.0.1,10.77.0.1,10.77.0.254'],
    { env: { ...process.env, CLOUDLET_TEST_GUEST: process.env.CLOUDLET_TEST_GUEST ?? '' } },
  );
  const { fromSandbox, fromNamespace } = JSON.parse(stdout) as Record<string, Record<string, string | boolean>>;

  t.equal(fromSandbox!['own-app@127.0.0.1'], 'yes', 'positive control: the probe inside connects to its own server');
  t.same(
    fromNamespace,
    {
      'api@10.88.0.1': true,
      'mqtt@10.88.0.1': true,
      'api@10.77.0.1': true,
      'mqtt@10.77.0.1': true,
      'api@10.77.0.254': false,
      'mqtt@10.77.0.254': false,
    },
    "positive control: the agent's API and MQTT answer on both host addresses",
  );
  t.same(
    fromSandbox,
    {
      'own-app@127.0.0.1': 'yes',
      'api@10.88.0.1': 'no',
      'mqtt@10.88.0.1': 'no',
      'api@10.77.0.1': 'no',
      'mqtt@10.77.0.1': 'no',
      'api@10.77.0.254': 'no',
      'mqtt@10.77.0.254': 'no',
    },
    'from inside, the API and MQTT are out of reach on the second address, the copied one and the gateway',
  );
});

async function configFile(t: Test, config: unknown): Promise<string> {
  const dir = await tempDir('cloudlet-contain-config-');
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'agent.json');
  await writeFile(file, JSON.stringify(config));
  return file;
}
