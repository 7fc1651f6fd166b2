// How the instance registry converges with its runtime, over a fake runtime (test/support/fake-runtime.ts): instances
// that end outside the agent (noticed by a reconcile, by the runtime's own event, or when a lost runtime is back), and
// an agent restart (a new registry over the same runtime adopts what runs). The same with real VMs and a real libvirtd:
// test/fault-kill.e2e.test.ts, test/libvirtd-restart.exclusive.test.ts.
import { randomUUID } from 'node:crypto';
import { access, mkdir, readdir } from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import type { InstanceRecord } from '../agent/src/core/types';
import { CloudletError } from '../agent/src/errors';
import { PRIVATE, SHARED, fakeCloudlet, portRanges, startReady } from './support/fake-runtime';
import { until } from './support/poll';

const ports = portRanges(31300);

/** A reconcile poll interval no test reaches: what the registry notices, it notices from the runtime's signals. */
const HOUR_MS = 3_600_000;

/** The record of an instance of SHARED that the agent launched before the test's restart, serving on `hostPort`. */
function recordOf(dir: string, hostPort: number, fields: Partial<InstanceRecord> = {}): InstanceRecord {
  const now = new Date().toISOString();
  return {
    id: path.basename(dir),
    serviceId: SHARED.id,
    mechanism: 'cached-vm',
    state: 'ready',
    bindAddress: '127.0.0.1',
    hostPort,
    guestPort: 80,
    shareable: true,
    users: 1,
    owners: [],
    anonymous: [],
    launch: 'cold-boot',
    createdAt: now,
    readyAt: now,
    dir,
    readiness: SHARED.manifest.readiness,
    ...fields,
  };
}

t.test('instances that end outside the agent', async (t) => {
  t.test('one the runtime no longer runs is released by the next reconcile: its record, files and port, with a stopped event', async (tt) => {
    const { registry, runtime, events, instancesDir } = await fakeCloudlet(tt, { ports: ports(1) });
    const instance = await startReady(registry, runtime, SHARED);
    await runtime.vanish(instance.id);
    tt.equal(registry.get(instance.id).state, 'ready', 'until the registry looks, it does not know');
    await registry.reconcile();
    tt.match(await events.instance(instance.id, 'stopped'), { reason: 'vanished' });
    tt.same(registry.list(), []);
    await tt.rejects(access(path.join(instancesDir, instance.id)), { code: 'ENOENT' }, 'its files are deleted');
    tt.equal((await startReady(registry, runtime, SHARED)).hostPort, instance.hostPort, 'its port serves the next start');
  });

  t.test("one whose end the runtime reports is released at once, with the runtime's reason", async (tt) => {
    const { registry, runtime, events } = await fakeCloudlet(tt, { ports: ports(1) });
    registry.startReconciling(HOUR_MS);
    const instance = await startReady(registry, runtime, SHARED);
    await runtime.end(instance.id, { state: 'crashed', reason: 'crashed' });
    tt.match(await events.instance(instance.id, 'crashed'), { reason: 'crashed' });
    tt.same(registry.list(), []);
  });

  t.test('when a lost runtime is back, the registry converges: one that ended meanwhile is released', async (tt) => {
    const { registry, runtime, events } = await fakeCloudlet(tt, { ports: ports(2) });
    registry.startReconciling(HOUR_MS);
    const ended = await startReady(registry, runtime, SHARED);
    const alive = await startReady(registry, runtime, SHARED);
    runtime.unreachable = true;
    await runtime.vanish(ended.id);
    await tt.rejects(registry.reconcile(), { code: 'HYPERVISOR_UNAVAILABLE' }, 'while the runtime is lost, nothing can be told');
    tt.equal(registry.list().length, 2, 'so nothing is released');
    runtime.reconnect();
    tt.match(await events.instance(ended.id, 'stopped'), { reason: 'vanished' });
    tt.same(
      registry.list().map((i) => i.id),
      [alive.id],
      'the other one is kept',
    );
  });

  t.test("a launch that failed while the runtime was lost leaves its domain behind, which the runtime's return ends", async (tt) => {
    const { registry, runtime } = await fakeCloudlet(tt, { ports: ports(1) });
    registry.startReconciling(HOUR_MS);
    const start = registry.start(SHARED, false, runtime.vm);
    const launch = await runtime.nextLaunch();
    runtime.unreachable = true;
    launch.fail(new CloudletError('HYPERVISOR_UNAVAILABLE', 'libvirt is not reachable'));
    await tt.rejects(start, { code: 'HYPERVISOR_UNAVAILABLE' });
    tt.same(registry.list(), [], 'the start is over');
    tt.ok(runtime.instances.has(launch.record.id), 'but its domain could not be ended');
    const ended = runtime.destroyed(launch.record.id);
    runtime.reconnect();
    await ended;
    tt.same([...runtime.instances.keys()], [], 'ended once the runtime is back');
    tt.equal((await startReady(registry, runtime, SHARED)).hostPort, launch.record.hostPort, 'and its port serves the next start');
  });

  t.test('converging with a runtime that is back also deletes instance directories that belong to no instance', async (tt) => {
    const { registry, runtime, instancesDir } = await fakeCloudlet(tt, { ports: ports(1) });
    const instance = await startReady(registry, runtime, SHARED);
    await mkdir(path.join(instancesDir, randomUUID()));
    await registry.resync(runtime);
    tt.same(await readdir(instancesDir), [instance.id]);
  });

  t.test('a state capture in progress is left alone by that convergence; one whose staging directory is gone is ended', async (tt) => {
    const { registry, runtime, stagingDir } = await fakeCloudlet(tt, { ports: ports(1) });
    const inProgress = recordOf(path.join(stagingDir, randomUUID()), 0);
    const abandoned = recordOf(path.join(stagingDir, randomUUID()), 0);
    await mkdir(inProgress.dir, { recursive: true });
    runtime.seed(inProgress);
    runtime.seed(abandoned);
    await registry.resync(runtime);
    tt.same([...runtime.instances.keys()], [inProgress.id]);
  });
});

t.test('an agent restart', async (t) => {
  t.test('adopts the running instances with their ports, users and owners, and they can be stopped as before', async (tt) => {
    const cloudlet = await fakeCloudlet(tt, { ports: ports(2) });
    const { registry, runtime } = cloudlet;
    const solo = await startReady(registry, runtime, PRIVATE);
    const shared = await startReady(registry, runtime, SHARED, { device: 'alice' });
    await registry.start(SHARED, true, runtime.vm, { device: 'bob' });
    await registry.start(SHARED, true, runtime.vm, { anonymous: '192.0.2.10' });
    const before = registry.list();
    const after = (await cloudlet.restart()).registry;
    tt.same(after.list(), before, 'the same instances, ports, users and owners');
    await tt.rejects(after.stop(shared.id, { device: 'carol' }), { code: 'FORBIDDEN' }, 'a device that holds no use still may not stop it');
    tt.same(await after.stop(shared.id, { device: 'alice' }), { destroyed: false, users: 2 });
    tt.same(await after.stop(shared.id, { anonymous: '192.0.2.10' }), { destroyed: false, users: 1 }, 'the anonymous use is still told apart');
    tt.same(await after.stop(shared.id, { device: 'bob' }), { destroyed: true, users: 0 });
    tt.same(await after.stop(solo.id, 'operator'), { destroyed: true, users: 0 });
    tt.same([...runtime.instances.keys()], [], 'both ended');
    tt.same(after.list(), []);
  });

  t.test('never hands out the port of an adopted instance, even while nothing answers on it', async (tt) => {
    const range = ports(1);
    const cloudlet = await fakeCloudlet(tt, { ports: range });
    const record = recordOf(path.join(cloudlet.instancesDir, randomUUID()), range.first);
    cloudlet.runtime.seed(record);
    const { registry } = await cloudlet.restart();
    await tt.rejects(registry.start(SHARED, false, cloudlet.runtime.vm), { code: 'NO_FREE_PORT' }, "the one port of the range is the adopted one's");
    await registry.stop(record.id, 'operator');
    tt.equal((await startReady(registry, cloudlet.runtime, SHARED)).hostPort, record.hostPort, 'stopped, it gives the port back');
  });

  t.test('does not adopt a record whose instance is gone, and deletes its files', async (tt) => {
    const cloudlet = await fakeCloudlet(tt, { ports: ports(2) });
    const { registry, runtime } = cloudlet;
    const gone = await startReady(registry, runtime, SHARED);
    const kept = await startReady(registry, runtime, SHARED);
    await runtime.vanish(gone.id);
    const after = (await cloudlet.restart()).registry;
    tt.same(
      after.list().map((i) => i.id),
      [kept.id],
    );
    tt.same(await readdir(cloudlet.instancesDir), [kept.id]);
    tt.equal((await startReady(after, runtime, SHARED)).hostPort, gone.hostPort, 'its port serves the next start');
  });

  t.test('finishes the launch of an instance adopted while it was starting: ready once its service answers', async (tt) => {
    const range = ports(1);
    const cloudlet = await fakeCloudlet(tt, { ports: range });
    const record = recordOf(path.join(cloudlet.instancesDir, randomUUID()), range.first, { state: 'starting', readyAt: null });
    cloudlet.runtime.seed(record);
    const { registry, events } = await cloudlet.restart();
    tt.match(registry.get(record.id), { state: 'starting' }, 'adopted as it was');
    await cloudlet.runtime.serve(record);
    await events.instance(record.id, 'ready');
    tt.match(registry.get(record.id), { state: 'ready', readyAt: String });
  });

  t.test('ends an instance adopted while starting whose readiness deadline passed meanwhile (counted from its launch)', async (tt) => {
    const range = ports(1);
    const cloudlet = await fakeCloudlet(tt, { ports: range });
    const launchedAt = new Date(Date.now() - SHARED.manifest.readiness.timeout_ms - 1).toISOString();
    const record = recordOf(path.join(cloudlet.instancesDir, randomUUID()), range.first, { state: 'starting', readyAt: null, createdAt: launchedAt });
    cloudlet.runtime.seed(record);
    const { registry, events } = await cloudlet.restart();
    tt.match(await events.instance(record.id, 'stopped'), { reason: 'not-ready' });
    tt.same(registry.list(), []);
    tt.same([...cloudlet.runtime.instances.keys()], [], 'its domain is ended');
  });

  t.test('releases at the first reconcile the adopted uses of a device whose authorization ended while the agent was down', async (tt) => {
    const cloudlet = await fakeCloudlet(tt, { ports: ports(1) });
    const { registry, runtime } = cloudlet;
    const instance = await startReady(registry, runtime, SHARED, { device: 'alice' });
    await registry.start(SHARED, true, runtime.vm, { device: 'bob' });
    const after = (await cloudlet.restart()).registry;
    after.setOwnerStanding((owner) => owner !== 'alice');
    await after.reconcile();
    tt.match(after.get(instance.id), { users: 1, owners: ['bob'] });
  });

  t.test("leaves another agent's instances alone, and ends unfinished work found in its staging area", async (tt) => {
    const cloudlet = await fakeCloudlet(tt, { ports: ports(1) });
    const foreign = recordOf(path.join('/var/lib/another-cloudlet/instances', randomUUID()), 0);
    const unfinished = recordOf(path.join(cloudlet.stagingDir, randomUUID()), 0);
    cloudlet.runtime.seed(foreign);
    cloudlet.runtime.seed(unfinished);
    const { registry } = await cloudlet.restart();
    tt.same(registry.list(), [], 'neither is adopted');
    tt.same([...cloudlet.runtime.instances.keys()], [foreign.id], "the other agent's still runs");
  });
});

t.test("the reconcile poll's cost is measured: nothing before the first tick, then the last tick's, the median and the most", async (t) => {
  const { registry, runtime } = await fakeCloudlet(t, { ports: ports(10) });
  await startReady(registry, runtime, PRIVATE);
  t.equal(registry.reconcileCost(), null, 'no tick yet');
  registry.startReconciling(50, false);
  const cost = await until(
    async () => registry.reconcileCost(),
    (c) => c !== null,
  );
  t.type(cost?.lastMs, 'number');
  t.ok(cost!.lastMs >= 0 && cost!.medianMs <= cost!.maxMs && cost!.lastMs <= cost!.maxMs, JSON.stringify(cost));
});
