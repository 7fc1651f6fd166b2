// Application Virtualization through the real agent: packages imported over HTTP, run in real bubblewrap sandboxes
// with real pasta forwarding (127.0.0.1 only) and real cgroup limits.
import { readdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import t, { type Test } from 'tap';
import { AgentProcess, adminHeaders, fetchText, request } from './support/agent';
import { PAGE, buildHttpdPackage, cgroupExists, destroySandboxesUnder, sandboxesUnder, tempDir } from './support/app-package';

const PORTS = '21400-21499';

async function startAgent(t: Test): Promise<AgentProcess> {
  const agent = await AgentProcess.start({ portRange: PORTS });
  t.teardown(async () => {
    await agent.stop();
    await destroySandboxesUnder(agent.dataDir);
    await agent.dispose();
  });
  return agent;
}

async function until(what: string, check: () => Promise<boolean>, timeoutMs = 15000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await sleep(50);
  }
}

function processGone(pid: number): Promise<boolean> {
  return readFile(`/proc/${pid}/stat`, 'utf8').then(
    (stat) => /^\d+ \(.*\) [ZX]/.test(stat),
    () => true,
  );
}

t.test('an app package runs sandboxed: started, isolated, adopted across an agent crash, stopped without leftovers', async (t) => {
  const scratch = await tempDir('cloudlet-appvirt-');
  t.teardown(() => rm(scratch, { recursive: true, force: true }));
  const hostSecret = path.join(scratch, 'host-secret');
  await writeFile(hostSecret, 'not for sandboxes\n');
  const tarball = await buildHttpdPackage(scratch, { appId: 'org.test.httpd', hostSecret });
  const agent = await startAgent(t);

  const imported = await agent.post('/v1/packages', { path: tarball });
  t.equal(imported.status, 201, imported.body);
  t.match(imported.json, { id: 'org.test.httpd', sha256: /^[0-9a-f]{64}$/, manifest: { port: 8080, memory_mib: 32 } });
  t.match(
    (await agent.get('/api/services')).json.services,
    [{ service_id: 'org.test.httpd', description: 'busybox httpd' }],
    'KD clients see the package as a service',
  );

  // Started through the KD-Cloudlet face, as an Android client would.
  const started = await agent.get('/api/servicevm/start?serviceId=org.test.httpd');
  t.equal(started.status, 200, started.body);
  const { _id: id, port, ip_address: address } = started.json;
  t.equal(address, '127.0.0.1', 'forwarded on the test bind address only');
  t.equal(await fetchText(port, '/'), PAGE, 'the forwarded port answers as soon as start returns');
  t.match((await agent.get(`/v1/instances/${id}`)).json, { mechanism: 'app-virt', state: 'ready', host_port: port, guest_port: 8080 });

  const probe = Object.fromEntries(
    (await fetchText(port, '/cgi-bin/probe'))
      .trim()
      .split('\n')
      .map((l) => l.split(/=(.*)/s).slice(0, 2)),
  );
  t.equal(probe.read_host_file, 'no', 'a host file is not visible inside');
  t.equal(probe.write_app, 'no', 'the package is read-only');
  t.equal(probe.write_root, 'no', 'nothing outside the private directory is writable');
  t.equal(probe.write_data, 'yes', 'the private directory is writable');
  t.equal(probe.uid, '65534', 'the app runs unprivileged');
  t.equal(probe.no_new_privs, '1', 'no new privileges');
  // 'exe': busybox re-executes itself through /proc/self/exe for an applet, and is named so until the exec is done.
  const sandboxCommands = new Set(['bwrap', 'busybox', 'probe', 'sh', 'cat', 'sort', 'tr', 'exe']);
  t.same(
    (probe.processes as string)
      .trim()
      .split(' ')
      .filter((c: string) => !sandboxCommands.has(c)),
    [],
    `only its own processes are visible: ${probe.processes}`,
  );

  const [sandbox] = await sandboxesUnder(agent.dataDir);
  t.ok(sandbox?.pid, 'the sandbox is recorded in its instance directory');

  await agent.kill();
  t.equal(await fetchText(port, '/'), PAGE, 'the sandbox outlives a SIGKILLed agent');
  await agent.launch();
  t.match((await agent.get('/v1/instances')).json.instances, [{ id, mechanism: 'app-virt', state: 'ready', host_port: port }], 'the restarted agent adopts it');

  const stopped = await agent.get(`/api/servicevm/stop?instanceId=${id}`);
  t.equal(stopped.status, 200);
  t.ok(await processGone(sandbox!.pid!), 'stop leaves no process');
  t.notOk(await cgroupExists(id), 'stop removes the cgroup');
  await t.rejects(request(port, 'GET', '/'), 'the port is closed');
  t.same(await readdir(path.join(agent.dataDir, 'instances')), [], 'the instance directory is gone');

  const removed = await agent.delete('/v1/packages/org.test.httpd');
  t.equal(removed.status, 204);
  t.same(await readdir(path.join(agent.dataDir, 'packages')), [], 'removing the package deletes its files');
});

t.test('an app over its memory limit is killed by the cgroup and its instance ends with the reason logged', async (t) => {
  const scratch = await tempDir('cloudlet-appvirt-');
  t.teardown(() => rm(scratch, { recursive: true, force: true }));
  const tarball = await buildHttpdPackage(scratch, { appId: 'org.test.hog', hostSecret: '/etc/hostname', zstd: true });
  const agent = await startAgent(t);
  const upload = await new Promise<{ status: number; body: string }>((resolve, reject) => {
    import('node:http').then(async (http) => {
      const body = await readFile(tarball);
      const req = http.request(
        {
          host: '127.0.0.1',
          port: agent.apiPort,
          method: 'POST',
          path: '/v1/packages',
          headers: { 'content-type': 'application/zstd', 'content-length': body.length, ...adminHeaders(agent.apiPort) },
        },
        (res) => {
          let text = '';
          res.on('data', (c: Buffer) => {
            text += c.toString();
          });
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
        },
      );
      req.on('error', reject);
      req.end(body);
    }, reject);
  });
  t.equal(upload.status, 201, `a zstd tarball uploaded in the request body is imported: ${upload.body}`);

  const started = await agent.post('/v1/instances', { service_id: 'org.test.hog' });
  t.equal(started.status, 201, started.body);
  const { id } = started.json.instance;
  await request(started.json.endpoint.port, 'GET', '/cgi-bin/hog').catch(() => null);
  await until('the instance is gone', async () => (await agent.get('/v1/instances')).json.instances.length === 0);
  t.match(agent.log, new RegExp(`sandbox ${id} of org.test.hog ended: killed by its memory limit`));
  t.match(agent.log, /ended outside the agent \(out-of-memory\)/, 'the registry forgets it with the reason');
  t.notOk(await cgroupExists(id), 'its cgroup is removed');
});
