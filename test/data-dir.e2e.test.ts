// A data directory QEMU cannot reach, end to end with the real agent and the system libvirtd, whose QEMU runs as its
// own user (libvirt-qemu here): below a 0700 directory (a `mktemp -d`, /root) no VM could ever start, so the agent
// refuses to start, in one line naming the directory and the fix; the directories it creates itself are made
// reachable; and a VM start that libvirt still refuses that way (a mode changed behind the running agent's back) is a
// typed error on /v1, leaving nothing behind. Forward ports 23390-23399.
import { chmod, mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { AgentProcess, domainsUnder, freePort, registerAgent, testGuestDir } from './support/agent';

const SERVICE = 'org.cloudlet.demo.http';
const PORTS = '23390-23399';

/** An agent on `dataDir` as the support helper starts one, except that the directory is left exactly as given. */
async function agentOn(dataDir: string): Promise<AgentProcess> {
  const agent = new AgentProcess(await freePort(), dataDir, { portRange: PORTS }, await freePort());
  registerAgent(agent.apiPort, dataDir);
  return agent;
}

/** A directory of the test's own, 0700 as `mktemp -d` makes it, removed afterwards. */
async function privateDir(tt: Test): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-private-'));
  tt.equal((await stat(dir)).mode & 0o777, 0o700, 'mktemp -d makes it 0700');
  tt.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

t.test('below a directory QEMU may not search, the agent refuses to start: one line naming it and the fix, which works', async (tt) => {
  const parent = await privateDir(tt);
  const agent = await agentOn(path.join(parent, 'cloudlet'));
  tt.teardown(() => agent.dispose());
  const refused = await agent.launch().then(
    () => null,
    (err: Error) => err.message,
  );
  tt.ok(refused, 'the agent exited');
  const lines = agent.log.split('\n').filter((line) => line.startsWith('cloudlet-agent: cannot start:'));
  tt.equal(lines.length, 1, 'one line says why');
  tt.match(lines[0], `DATA_DIR_UNREACHABLE: QEMU (uid `);
  tt.match(lines[0], `cannot reach the data directory ${parent}/cloudlet: it may not search ${parent}.`, 'names the directory in the way');
  tt.match(lines[0], `Fix: chmod o+x ${parent} (search only, not listing)`, 'and the fix');
  tt.equal((await stat(parent)).mode & 0o777, 0o700, 'a directory the operator made is not changed behind their back');

  await chmod(parent, 0o701); // the fix, as the line says
  await agent.launch();
  tt.equal((await agent.get('/v1/services')).status, 200, 'with the fix applied the agent starts');
});

t.test('the directories the agent creates for its data directory are reachable, even under a umask of 0077', async (tt) => {
  const parent = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-umask-'));
  await chmod(parent, 0o755);
  const agent = await agentOn(path.join(parent, 'a', 'b', 'cloudlet'));
  tt.teardown(async () => {
    await agent.dispose();
    await rm(parent, { recursive: true, force: true });
  });
  const umask = process.umask(0o077); // inherited by the agent process
  try {
    await agent.launch();
  } finally {
    process.umask(umask);
  }
  for (const dir of ['a', 'a/b', 'a/b/cloudlet']) tt.equal((await stat(path.join(parent, dir))).mode & 0o777, 0o755, `${dir} is 0755`);
});

t.test('a VM start libvirt refuses for want of search permission is the typed DATA_DIR_UNREACHABLE on /v1, leaving nothing behind', async (tt) => {
  const parent = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-reachable-'));
  await chmod(parent, 0o755);
  const agent = await agentOn(path.join(parent, 'cloudlet'));
  tt.teardown(async () => {
    await chmod(parent, 0o755);
    await agent.dispose();
    await rm(parent, { recursive: true, force: true });
  });
  await agent.launch();
  tt.equal((await agent.post('/v1/services', { path: testGuestDir() })).status, 201);

  await chmod(parent, 0o700); // behind the running agent's back
  const started = await agent.post('/v1/instances', { service_id: SERVICE, join: false });
  tt.equal(started.status, 500, started.body);
  tt.match(started.json, {
    code: 'DATA_DIR_UNREACHABLE',
    message: /^QEMU \(uid \d+, gid \d+\) may not read .*disk\.qcow2: a directory above it is not searchable by that user/,
    details: { libvirt_code: 'VIR_ERR_SYSTEM_ERROR', path: new RegExp(`^${parent}/cloudlet/instances/`) },
  });
  tt.same(await domainsUnder(agent.dataDir), [], 'no domain');
  tt.same(await readdir(path.join(agent.dataDir, 'instances')), [], 'no instance files');
  tt.same((await agent.get('/v1/instances')).json.instances, [], 'no instance');
});
