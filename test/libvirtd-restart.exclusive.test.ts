// libvirtd restarted under a running agent: the agent notices, fails calls fast while libvirt is away, reconnects, and
// its registry converges with libvirt's view. This file stops and starts the SYSTEM libvirtd (./build.sh libvirtd), so
// it runs alone, after every other file (test/run.ts runs *.exclusive.test.* files in a second tap run); its teardown
// always leaves libvirtd running.
//
// The agent's reconcile poll is slowed to 10 minutes here, so what ends instances is the reconnect's own convergence
// and libvirt's lifecycle events, not the poll.
import t from 'tap';
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { Connection } from '../native/libvirt';
import { AgentProcess, fetchText, killQemuOf, ROOT, testGuestDir } from './support/agent';
import { assertRecovered } from './support/invariants';
import { EventsSocket } from './support/listeners';
import { until } from './support/poll';

const run = promisify(execFile);
const PORTS = '22900-22949';
const PORT_RANGE: [number, number] = [22900, 22949];
const SERVICE = 'org.cloudlet.demo.http';
const GUEST_CONTENT = /hello from the cloudlet demo service/;

let agent: AgentProcess;
let scratch: string;

const libvirtd = (action: 'stop' | 'start') => run('bash', [path.join(ROOT, 'build.sh'), 'libvirtd', action]);

/** Until libvirtd accepts connections again. */
async function libvirtdAnswers(): Promise<void> {
  const deadline = Date.now() + 30000;
  for (;;) {
    try {
      await (await Connection.open('qemu:///system')).close();
      return;
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await sleep(100);
    }
  }
}

const healthOf = async (check: string) =>
  ((await agent.get('/v1/health')).json.checks as Array<{ name: string; ok: boolean }>).find((c) => c.name === check)?.ok;

/** Until the agent's libvirt check passes again (it reconnected). */
async function reconnected(): Promise<void> {
  if (
    (await until(
      () => healthOf('libvirt'),
      (ok) => ok === true,
      30000,
    )) !== true
  )
    throw new Error('the agent did not reconnect within 30 s');
}

async function startReady(): Promise<{ id: string; port: number }> {
  const r = await agent.post('/v1/instances', { service_id: SERVICE });
  if (r.status !== 201) throw new Error(r.body);
  return { id: r.json.instance.id, port: r.json.endpoint.port };
}

t.before(async () => {
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-libvirtd-'));
  const config = path.join(scratch, 'config.json');
  await writeFile(config, JSON.stringify({ reconcileIntervalMs: 600000 }));
  agent = await AgentProcess.start({ portRange: PORTS, env: { CLOUDLET_CONFIG: config } });
  const imported = await agent.post('/v1/services', { path: testGuestDir() });
  if (imported.status !== 201) throw new Error(imported.body);
  const captured = await agent.post(`/v1/services/${SERVICE}/state`);
  if (captured.status !== 200) throw new Error(captured.body);
});

t.teardown(async () => {
  // Whatever failed above, the host's libvirtd runs again before anything else.
  await libvirtd('start');
  await libvirtdAnswers();
  await agent?.dispose();
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

t.test('instances keep running and serving across a libvirtd restart; while it is down, health fails and starts get 503 at once', async (tt) => {
  const a = await startReady();
  const b = await startReady();
  await libvirtd('stop');
  tt.equal(
    await until(
      () => healthOf('libvirt'),
      (ok) => ok === false,
      10000,
    ),
    false,
    '/v1/health reports the libvirt check failing while libvirtd is down',
  );
  const began = Date.now();
  const refused = await agent.post('/v1/instances', { service_id: SERVICE });
  tt.equal(refused.status, 503, refused.body);
  tt.equal(refused.json.code, 'HYPERVISOR_UNAVAILABLE');
  tt.ok(Date.now() - began < 2000, 'the start is refused at once instead of hanging');
  tt.match(await fetchText(a.port), GUEST_CONTENT, 'a VM serves while libvirtd is down');

  await libvirtd('start');
  await reconnected();
  await assertRecovered(tt, agent, 'after the restart', {
    portRange: PORT_RANGE,
    served: [
      { ...a, content: GUEST_CONTENT },
      { ...b, content: GUEST_CONTENT },
    ],
  });
  for (const { id } of [a, b]) tt.equal((await agent.delete(`/v1/instances/${id}`)).status, 200, 'stopped after the restart');
});

t.test('an instance whose VM died while libvirtd was down is reported ended once the agent reconnects', async (tt) => {
  const events = await EventsSocket.connect(agent.apiPort);
  tt.teardown(() => events.close());
  const survivor = await startReady();
  const victim = await startReady();
  await libvirtd('stop');
  await killQemuOf(victim.id);
  await libvirtd('start');
  const ended = await events.next((e) => e.type === 'instance' && e.instance?.id === victim.id && (e.state === 'stopped' || e.state === 'crashed'), 30000);
  tt.ok(ended, 'an instance event says it ended');
  tt.notOk(
    (await agent.get('/v1/instances')).json.instances.some((i: { id: string }) => i.id === victim.id),
    'it is no longer listed',
  );
  await assertRecovered(tt, agent, 'after the restart', { portRange: PORT_RANGE, served: [{ ...survivor, content: GUEST_CONTENT }] });
  await agent.delete(`/v1/instances/${survivor.id}`);
});

t.test('a start in flight while libvirtd restarts completes or fails cleanly, and the agent starts instances afterwards', async (tt) => {
  for (const delayMs of [0, 400, 1500]) {
    const starting = agent.post('/v1/instances', { service_id: SERVICE });
    await sleep(delayMs);
    await libvirtd('stop');
    await libvirtd('start');
    const outcome = await starting;
    tt.ok(outcome.status === 201 || outcome.status >= 500, `restart ${delayMs} ms into a start: ${outcome.status} ${outcome.json?.code ?? ''}`);
    await reconnected();
    const served = outcome.status === 201 ? [{ id: outcome.json.instance.id, port: outcome.json.endpoint.port, content: GUEST_CONTENT }] : [];
    await assertRecovered(tt, agent, `after a restart ${delayMs} ms into a start`, { portRange: PORT_RANGE, served });
    for (const { id } of served) await agent.delete(`/v1/instances/${id}`);
  }
  const fresh = await startReady();
  tt.match(await fetchText(fresh.port), GUEST_CONTENT, 'a new start after the restarts serves');
  await agent.delete(`/v1/instances/${fresh.id}`);
});

t.test('lifecycle events work again after a reconnect: a VM killed afterwards is reported ended at once', async (tt) => {
  await libvirtd('stop');
  await libvirtd('start');
  await reconnected();
  const events = await EventsSocket.connect(agent.apiPort);
  tt.teardown(() => events.close());
  const instance = await startReady();
  const killedAt = Date.now();
  await killQemuOf(instance.id);
  await events.next((e) => e.type === 'instance' && e.instance?.id === instance.id && e.state === 'crashed', 10000);
  tt.ok(Date.now() - killedAt < 5000, `ended ${Date.now() - killedAt} ms after the kill, with the reconcile poll at 10 minutes`);
  await assertRecovered(tt, agent, 'after the kill', { portRange: PORT_RANGE, served: [] });
});
