// The instance registry on its own, over a fake runtime (no libvirt): a device's uses are released even when the
// runtime was unreachable at the moment its authorization ended.
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { InstanceRegistry } from '../agent/src/core/instances';
import { LaunchGate } from '../agent/src/core/launch-gate';
import { PortAllocator } from '../agent/src/core/ports';
import type { InstanceRecord } from '../agent/src/core/types';
import { CloudletError } from '../agent/src/errors';
import type { Mechanism } from '../agent/src/core/mechanism';
import type { InstanceRuntime } from '../agent/src/core/runtime';

let root: string;
t.beforeEach(async () => {
  root = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-instance-owners-'));
});
t.afterEach(() => rm(root, { recursive: true, force: true }));

/** A runtime running the given instances, which refuses every call while `down` (libvirt unreachable). */
function fakeRuntime(records: InstanceRecord[]) {
  const running = new Map(records.map((r) => [r.id, r]));
  const state = { down: false };
  const reachable = () => {
    if (state.down) throw new CloudletError('HYPERVISOR_UNAVAILABLE', 'libvirt is not reachable');
  };
  const runtime: InstanceRuntime = {
    running: async () => {
      reachable();
      return new Set(running.keys());
    },
    listInstances: async () => {
      reachable();
      return [...running.values()];
    },
    writeRecord: async (record) => {
      reachable();
      running.set(record.id, record);
    },
    destroy: async (id) => {
      reachable();
      running.delete(id);
    },
  };
  return { runtime, running, state };
}

async function registryOver(records: InstanceRecord[]) {
  const fake = fakeRuntime(records);
  for (const r of records) await mkdir(r.dir, { recursive: true });
  const mechanism: Mechanism = { name: 'cached-vm', runtime: fake.runtime, launch: async () => 'cold-boot' };
  const registry = new InstanceRegistry(
    [mechanism],
    new PortAllocator('127.0.0.1', { first: 31000, last: 31010 }),
    path.join(root, 'instances'),
    path.join(root, 'tmp'),
    '127.0.0.1',
    () => {},
    new LaunchGate({ concurrent: 1, queue: 1, readyWithinMs: 60000 }),
  );
  await registry.adopt();
  return { registry, mechanism, ...fake };
}

function record(id: string, owners: string[], users = owners.length): InstanceRecord {
  return {
    id,
    serviceId: 'svc',
    mechanism: 'cached-vm',
    state: 'ready',
    bindAddress: '127.0.0.1',
    hostPort: 0,
    guestPort: 80,
    shareable: true,
    users,
    owners,
    launch: 'cold-boot',
    createdAt: new Date().toISOString(),
    readyAt: new Date().toISOString(),
    dir: path.join(root, 'instances', id),
    readiness: { type: 'tcp', timeout_ms: 1000 },
  };
}

t.test("a revoked device's instance is stopped once libvirt is back, though the release at revocation failed", async (tt) => {
  const { registry, running, state } = await registryOver([record('11111111-1111-1111-1111-111111111111', ['alice'])]);
  const revoked = new Set<string>();
  registry.setOwnerStanding((owner) => !revoked.has(owner));
  state.down = true;
  revoked.add('alice');
  await registry.releaseOwner('alice');
  tt.equal(running.size, 1, 'still running while libvirt is unreachable');
  state.down = false;
  await registry.reconcile();
  tt.equal(running.size, 0, 'stopped by the next reconcile');
  tt.same(registry.list(), []);
});

t.test("a failed release is retried even after the device id was paired again, and takes only the old device's uses", async (tt) => {
  const id = '22222222-2222-2222-2222-222222222222';
  const { registry, running, state, mechanism } = await registryOver([record(id, ['alice', 'bob'])]);
  state.down = true;
  await registry.releaseOwner('alice'); // removed: fails
  state.down = false;
  // 'alice' is paired again (in good standing, the default) and joins the same instance before the retry.
  const { joined } = await registry.start({ id: 'svc', manifest: { shareable: true } } as never, true, mechanism, { device: 'alice' });
  tt.ok(joined);
  tt.same(
    registry.list().map((i) => i.owners),
    [['alice', 'bob', 'alice']],
  );
  await registry.reconcile();
  tt.equal(running.size, 1);
  tt.same(
    registry.list().map((i) => [i.users, i.owners]),
    [[2, ['bob', 'alice']]],
    'the new alice keeps its own use',
  );
});
