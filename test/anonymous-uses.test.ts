// The instance registry's rules for the plain KD face's anonymous callers, over a runtime of its own (no libvirt; each
// "instance" is a TCP listener the readiness probe connects to): what an anonymous caller may release, and how many
// uses anonymous callers may hold, per address and in all. The same rules through the real agent and a real VM:
// test/kd-open-face.e2e.test.ts.
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { InstanceRegistry } from '../agent/src/core/instances';
import type { AnonymousLimits } from '../agent/src/core/instance-uses';
import { LaunchGate } from '../agent/src/core/launch-gate';
import { PortAllocator } from '../agent/src/core/ports';
import type { InstanceRecord, Workload } from '../agent/src/core/types';
import type { Mechanism } from '../agent/src/core/mechanism';
import type { InstanceRuntime } from '../agent/src/core/runtime';

let root: string;
t.beforeEach(async () => {
  root = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-anonymous-uses-'));
});
t.afterEach(() => rm(root, { recursive: true, force: true }));

const SERVICE: Workload = { id: 'svc', manifest: { port: 80, shareable: true, readiness: { type: 'tcp', timeout_ms: 5000 } } };
const ALICE = { anonymous: '192.0.2.10' };
const BOB = { anonymous: '192.0.2.11' };
const CAROL = { anonymous: '192.0.2.12' };

/** A runtime whose instances are TCP listeners on their forwarded port, and whose records survive the registry. */
function listenerRuntime(tt: Test) {
  const records = new Map<string, InstanceRecord>();
  const listeners = new Map<string, net.Server>();
  const runtime: InstanceRuntime = {
    running: async () => new Set(records.keys()),
    listInstances: async () => [...records.values()],
    writeRecord: async (record) => {
      records.set(record.id, record);
    },
    destroy: async (id) => {
      records.delete(id);
      listeners.get(id)?.close();
      listeners.delete(id);
    },
  };
  const mechanism: Mechanism = {
    name: 'cached-vm',
    runtime,
    launch: async ({ record }) => {
      const server = net.createServer((socket) => socket.on('error', () => {}));
      await new Promise<void>((resolve) => server.listen(record.hostPort, '127.0.0.1', resolve));
      listeners.set(record.id, server);
      records.set(record.id, record);
      return 'cold-boot';
    },
  };
  tt.teardown(() => {
    for (const server of listeners.values()) server.close();
  });
  return { mechanism: mechanism as Mechanism<never>, records };
}

async function registryWith(mechanism: Mechanism<never>, limits: AnonymousLimits) {
  const registry = new InstanceRegistry(
    [mechanism],
    new PortAllocator('127.0.0.1', { first: 31100, last: 31140 }),
    path.join(root, 'instances'),
    path.join(root, 'tmp'),
    '127.0.0.1',
    () => {},
    new LaunchGate({ concurrent: 4, queue: 8, readyWithinMs: 60000 }),
    limits,
  );
  await registry.adopt();
  return registry;
}

const NO_LIMIT = { perAddress: 100, total: 100 };

t.test("an anonymous caller never releases the operator's use nor a device's: to it, such an instance does not exist", async (tt) => {
  const { mechanism } = listenerRuntime(tt);
  const registry = await registryWith(mechanism, NO_LIMIT);
  const { instance: operators } = await registry.start(SERVICE, false, mechanism, 'operator');
  await tt.rejects(registry.stop(operators.id, ALICE), { code: 'INSTANCE_NOT_FOUND' }, "the operator's instance");
  const { instance: devices } = await registry.start(SERVICE, false, mechanism, { device: 'phone-1' });
  await tt.rejects(registry.stop(devices.id, ALICE), { code: 'INSTANCE_NOT_FOUND' }, "a device's instance");
  tt.same(
    registry.list().map((i) => i.users),
    [1, 1],
    'both still run with their one use',
  );
});

t.test("an anonymous caller that joined releases only the anonymous use; the operator's use keeps the instance", async (tt) => {
  const { mechanism } = listenerRuntime(tt);
  const registry = await registryWith(mechanism, NO_LIMIT);
  const { instance } = await registry.start(SERVICE, false, mechanism, 'operator');
  const joined = await registry.start(SERVICE, true, mechanism, ALICE);
  tt.equal(joined.instance.id, instance.id, "joined the operator's instance");
  tt.same(await registry.stop(instance.id, BOB), { destroyed: false, users: 1 }, 'any anonymous caller holding the id releases the anonymous use');
  await tt.rejects(registry.stop(instance.id, ALICE), { code: 'INSTANCE_NOT_FOUND' }, 'a second anonymous stop finds no use it may release');
  tt.equal(registry.get(instance.id).users, 1, "the operator's use is kept");
  tt.same(await registry.stop(instance.id, 'operator'), { destroyed: true, users: 0 }, 'the operator ends it');
});

t.test("what an anonymous caller started, an anonymous caller stops (KD's own behaviour), and the operator may too", async (tt) => {
  const { mechanism } = listenerRuntime(tt);
  const registry = await registryWith(mechanism, NO_LIMIT);
  const { instance: first } = await registry.start(SERVICE, false, mechanism, ALICE);
  tt.same(await registry.stop(first.id, ALICE), { destroyed: true, users: 0 });
  const { instance: second } = await registry.start(SERVICE, false, mechanism, ALICE);
  tt.same(await registry.stop(second.id, 'operator'), { destroyed: true, users: 0 });
  tt.same(registry.list(), []);
});

t.test('one address holds at most perAddress anonymous uses, joins included; others still may start', async (tt) => {
  const { mechanism } = listenerRuntime(tt);
  const registry = await registryWith(mechanism, { perAddress: 2, total: 10 });
  const { instance } = await registry.start(SERVICE, false, mechanism, ALICE);
  await registry.start(SERVICE, true, mechanism, ALICE);
  await tt.rejects(registry.start(SERVICE, false, mechanism, ALICE), { code: 'QUOTA_EXCEEDED', status: 503, details: { limit: 2, scope: 'address' } });
  await tt.rejects(registry.start(SERVICE, true, mechanism, ALICE), { code: 'QUOTA_EXCEEDED' }, 'a join is a use too');
  await registry.start(SERVICE, false, mechanism, BOB);
  await registry.stop(instance.id, ALICE);
  await registry.start(SERVICE, true, mechanism, ALICE);
  tt.pass('a released use makes room again');
  await registry.start(SERVICE, false, mechanism, { device: 'phone-1' });
  await registry.start(SERVICE, false, mechanism, 'operator');
  tt.pass('paired devices and the operator are not counted');
});

t.test('all anonymous callers together hold at most `total` uses', async (tt) => {
  const { mechanism } = listenerRuntime(tt);
  const registry = await registryWith(mechanism, { perAddress: 5, total: 2 });
  await registry.start(SERVICE, false, mechanism, ALICE);
  await registry.start(SERVICE, false, mechanism, BOB);
  await tt.rejects(registry.start(SERVICE, true, mechanism, CAROL), { code: 'QUOTA_EXCEEDED', details: { limit: 2, scope: 'cloudlet' } });
});

t.test('concurrent anonymous starts from one address cannot pass the check together', async (tt) => {
  const { mechanism } = listenerRuntime(tt);
  const registry = await registryWith(mechanism, { perAddress: 2, total: 10 });
  const outcomes = await Promise.allSettled([1, 2, 3, 4].map(() => registry.start(SERVICE, false, mechanism, ALICE)));
  tt.equal(outcomes.filter((o) => o.status === 'fulfilled').length, 2, 'two started');
  tt.equal(outcomes.filter((o) => o.status === 'rejected' && (o.reason as { code: string }).code === 'QUOTA_EXCEEDED').length, 2, 'two refused');
  tt.equal(registry.list().length, 2);
});

t.test('an agent restart forgets no anonymous use: the adopted ones still count and still may not be taken', async (tt) => {
  const { mechanism } = listenerRuntime(tt);
  const before = await registryWith(mechanism, { perAddress: 1, total: 10 });
  const { instance } = await before.start(SERVICE, false, mechanism, 'operator');
  await before.start(SERVICE, true, mechanism, ALICE);
  const after = await registryWith(mechanism, { perAddress: 1, total: 10 });
  tt.equal(after.get(instance.id).users, 2, 'adopted with both uses');
  await tt.rejects(after.start(SERVICE, true, mechanism, ALICE), { code: 'QUOTA_EXCEEDED' }, 'the adopted anonymous use counts');
  tt.same(await after.stop(instance.id, ALICE), { destroyed: false, users: 1 });
  await tt.rejects(after.stop(instance.id, ALICE), { code: 'INSTANCE_NOT_FOUND' }, "the operator's use is still the operator's");
});

t.test("records from before anonymous uses were told apart count as the operator's: an anonymous caller cannot end them", async (tt) => {
  const { mechanism, records } = listenerRuntime(tt);
  const before = await registryWith(mechanism, NO_LIMIT);
  const { instance } = await before.start(SERVICE, false, mechanism, ALICE);
  const { anonymous: _anonymous, ...old } = records.get(instance.id)!;
  records.set(instance.id, old);
  const after = await registryWith(mechanism, NO_LIMIT);
  await tt.rejects(after.stop(instance.id, ALICE), { code: 'INSTANCE_NOT_FOUND' });
  tt.same(await after.stop(instance.id, 'operator'), { destroyed: true, users: 0 });
});
