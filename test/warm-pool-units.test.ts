// The warm pool's bookkeeping without libvirt (docs/warm-pool.md): the launch gate lending slots to background work,
// the pool's settings, and the registry handing a pooled VM to a start, over the fake runtime of
// test/support/fake-runtime.ts. The real thing, with QEMU: test/warm-pool.e2e.test.ts.
import t, { type Test } from 'tap';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { loadConfig } from '../agent/src/config';
import { InstanceRegistry } from '../agent/src/core/instances';
import { LaunchGate } from '../agent/src/core/launch-gate';
import { parseManifest } from '../agent/src/core/manifest';
import type { WarmStart } from '../agent/src/core/mechanism';
import { PortAllocator } from '../agent/src/core/ports';
import type { InstanceRecord, Service } from '../agent/src/core/types';
import type { WarmMechanism } from '../agent/src/core/warm-pool';
import { CloudletError } from '../agent/src/errors';
import { FakeRuntime, portRanges } from './support/fake-runtime';

const NO_FILE = { CLOUDLET_CONFIG: path.join(__dirname, '..', '..', 'test', 'support', 'no-config.json') };
const nextPorts = portRanges(31600); // see portRanges: below the kernel's ephemeral ports, apart from other files'

t.test('the launch gate lends a slot to background work only when one is free, and launches never wait for it', async (tt) => {
  const gate = new LaunchGate({ concurrent: 2, queue: 2, readyWithinMs: 1000 });
  const freed: string[] = [];
  gate.onFreed(() => freed.push('freed'));
  const lent = gate.tryLend();
  tt.ok(lent, 'a slot is lent while the gate is idle');
  tt.equal(gate.tryLend() !== null, true, 'and a second one');
  tt.equal(gate.tryLend(), null, 'not a third: launches plus background work leave no slot');
  // Both slots are lent, yet two launches are admitted at once: they do not count what was lent.
  const first = await gate.acquire();
  const second = await gate.acquire();
  tt.pass('two launches admitted while every slot was lent');
  lent!();
  tt.equal(gate.tryLend(), null, 'a slot given back by background work is not lent while launches fill the gate');
  const waiting = gate.acquire();
  first();
  const third = await waiting;
  tt.equal(gate.tryLend(), null, 'nothing is lent while launches run or wait');
  second();
  third();
  tt.ok(freed.length >= 2, 'listeners hear each slot given back');
  tt.ok(gate.tryLend(), 'lent again once the launches are over');
});

t.test("a service's pool size comes from the config, then the manifest, and both are bounded", async (tt) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-pool-config-'));
  tt.teardown(() => rm(dir, { recursive: true, force: true }));
  const defaults = await loadConfig(NO_FILE);
  tt.same(defaults.pool, { memoryBudgetMib: 1024, hostReserveMib: 512, sizes: {}, maxPerService: 4 });
  const file = path.join(dir, 'agent.json');
  await writeFile(file, JSON.stringify({ pool: { sizes: { 'org.example.a': 3 }, maxPerService: 6, memoryBudgetMib: 2048 } }));
  const configured = await loadConfig({ CLOUDLET_CONFIG: file, CLOUDLET_POOL_BUDGET_MIB: '0' });
  tt.same(configured.pool, { memoryBudgetMib: 0, hostReserveMib: 512, sizes: { 'org.example.a': 3 }, maxPerService: 6 }, 'the environment overrides the file');
  for (const pool of [{ sizes: { a: 17 } }, { sizes: [] }, { maxPerService: -1 }, { memoryBudgetMib: 'lots' }]) {
    await writeFile(file, JSON.stringify({ pool }));
    await tt.rejects(loadConfig({ CLOUDLET_CONFIG: file }), { code: 'INVALID_PARAMETER', message: /pool\./ }, JSON.stringify(pool));
  }

  const manifest = { format: 1, service_id: 'org.example.a', version: '1', port: 80, memory_mib: 64, disk: 'disk.qcow2' };
  tt.equal(parseManifest(manifest).pool_size, undefined, 'absent: the default applies');
  tt.equal(parseManifest({ ...manifest, pool_size: 2 }).pool_size, 2);
  for (const pool_size of [-1, 17, 1.5, '2']) {
    tt.throws(() => parseManifest({ ...manifest, pool_size }), { code: 'INVALID_MANIFEST', details: { field: 'pool_size' } }, JSON.stringify(pool_size));
  }
});

/** A registry whose Cached VM keeps a warm pool, with one pooled VM already running (as after a restart). */
async function withPooledVm(tt: Test, assign: WarmStart['assign']) {
  const root = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-pool-'));
  const runtime = new FakeRuntime();
  tt.teardown(async () => {
    registry.stopReconciling();
    await runtime.close();
    await rm(root, { recursive: true, force: true });
  });
  const service: Service = {
    id: 'org.example.warm',
    dir: path.join(root, 'services', 'org.example.warm'),
    importedAt: new Date().toISOString(),
    manifest: { ...parseManifest({ format: 1, service_id: 'org.example.warm', version: '1', port: 80, memory_mib: 64, disk: 'd.qcow2' }), state: 's.sav' },
  };
  const mechanism: WarmMechanism = { ...(runtime.vm as WarmMechanism), warm: { poolable: () => true, prepare: async () => {}, assign } };
  const instancesDir = path.join(root, 'instances');
  const pooled: InstanceRecord = {
    id: '00000000-0000-4000-8000-000000000001',
    serviceId: service.id,
    mechanism: 'cached-vm',
    state: 'starting',
    bindAddress: '127.0.0.1',
    hostPort: 0,
    guestPort: 80,
    shareable: false,
    users: 0,
    owners: [],
    launch: 'memory-state',
    createdAt: new Date().toISOString(),
    readyAt: null,
    dir: path.join(instancesDir, '00000000-0000-4000-8000-000000000001'),
    readiness: { type: 'tcp', timeout_ms: 60000 },
    pooled: { source: `${service.dir}/d.qcow2|s.sav`, memoryMib: 64 },
  };
  runtime.seed(pooled);
  const registry = new InstanceRegistry(
    [mechanism],
    new PortAllocator('127.0.0.1', nextPorts(10)),
    instancesDir,
    path.join(root, 'tmp'),
    '127.0.0.1',
    () => {},
    new LaunchGate({ concurrent: 2, queue: 2, readyWithinMs: 60000 }),
    undefined,
    { mechanism, sizing: { memoryBudgetMib: 1024, hostReserveMib: 0, sizes: {}, maxPerService: 4 }, availableMemory: async () => 2 ** 40 },
  );
  await registry.adopt();
  return { runtime, registry, service, mechanism, pooled };
}

t.test('a start is handed the adopted pooled VM: its record becomes an instance before the VM gets its forward', async (tt) => {
  let recordWhenAssigned: InstanceRecord | undefined;
  const { runtime, registry, service, mechanism, pooled } = await withPooledVm(tt, async (record) => {
    recordWhenAssigned = runtime.instances.get(record.id);
    await runtime.serve(record);
  });
  tt.same(registry.list(), [], 'a pooled VM is not listed');
  tt.equal(registry.pool!.status(service).ready, 1, 'adopted into the pool');
  const started = await registry.start(service, false, mechanism);
  tt.equal(started.instance.id, pooled.id);
  tt.equal(started.instance.launch, 'warm-pool');
  tt.equal(runtime.launches.length, 0, 'nothing was launched');
  tt.notOk(recordWhenAssigned?.pooled, 'the runtime held an instance record, not a pooled one, when the forward was added');
  tt.equal(recordWhenAssigned?.state, 'starting');
  tt.equal(registry.pool!.status(service).ready, 0);
});

t.test('a pooled VM whose assignment fails is destroyed, never handed to a start, and the start restores instead', async (tt) => {
  const { runtime, registry, service, mechanism, pooled } = await withPooledVm(tt, async () => {
    throw new CloudletError('HYPERVISOR_ERROR', 'QEMU refused hostfwd_add');
  });
  const destroyed = runtime.destroyed(pooled.id);
  const start = registry.start(service, false, mechanism);
  await destroyed;
  tt.notOk(runtime.instances.has(pooled.id), 'the pooled VM is gone');
  const launch = await runtime.nextLaunch();
  tt.notOk(launch.record.pooled, 'the restore is an instance of its own');
  await launch.succeed();
  const started = await start;
  tt.not(started.instance.launch, 'warm-pool');
  tt.same(
    registry.list().map((i) => i.id),
    [started.instance.id],
  );
});
