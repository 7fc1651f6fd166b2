// The registry's one launch pipeline on a runtime of its own (no libvirt; each "instance" is a TCP listener on its
// forwarded port, which the readiness probe connects to): a memory-state capture launches through it like a start,
// and a port that another program took between the test bind and the launch costs one more attempt on another port,
// apart from a range with no free port at all. The same captures with real VMs: test/cached-vm.e2e.test.ts
// (POST /v1/services/:id/state), test/on-demand.e2e.test.ts (a recipe's cached result), test/fault-kill.e2e.test.ts.
import { access, mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import type { CloudletEvent } from '../agent/src/core/events';
import { InstanceRegistry } from '../agent/src/core/instances';
import { LaunchGate } from '../agent/src/core/launch-gate';
import type { CapturingMechanism, Mechanism } from '../agent/src/core/mechanism';
import { PortAllocator } from '../agent/src/core/ports';
import type { InstanceRuntime } from '../agent/src/core/runtime';
import type { InstanceRecord, Workload } from '../agent/src/core/types';
import { CloudletError } from '../agent/src/errors';

const PORTS = { first: 31500, last: 31519 }; // see portRanges in support/fake-runtime.ts
const SERVICE: Workload = { id: 'svc', manifest: { port: 80, shareable: false, readiness: { type: 'tcp', timeout_ms: 5000 } } };

let root: string;
t.beforeEach(async () => {
  root = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-instance-capture-'));
});
t.afterEach(() => rm(root, { recursive: true, force: true }));

const exists = (file: string) =>
  access(file).then(
    () => true,
    () => false,
  );

/**
 * A runtime whose instances are TCP listeners that greet each connection, and which saves an instance by writing its
 * two files. `portTaken` launches fail as QEMU fails on a forward some program bound meanwhile.
 */
function listenerRuntime(tt: Test, { portTaken = 0, launchesOnce = false } = {}) {
  const running = new Map<string, InstanceRecord>();
  const listeners = new Map<string, net.Server>();
  const launchedOn: number[] = [];
  const saved: string[] = [];
  const end = (id: string) => {
    running.delete(id);
    listeners.get(id)?.close();
    listeners.delete(id);
  };
  const runtime: Required<Pick<InstanceRuntime, 'save'>> & InstanceRuntime = {
    running: async () => new Set(running.keys()),
    listInstances: async () => [...running.values()],
    writeRecord: async (record) => {
      running.set(record.id, record);
    },
    destroy: async (id) => end(id),
    save: async (record, into) => {
      saved.push(record.id);
      end(record.id);
      const files = { state: path.join(into, 'state.sav'), disk: path.join(into, 'captured.qcow2') };
      await writeFile(files.state, 'memory');
      await writeFile(files.disk, 'disk');
      return files;
    },
  };
  let refusals = portTaken;
  const mechanism: CapturingMechanism<Workload> = {
    name: 'cached-vm',
    runtime,
    launchesOnce,
    launch: async ({ record }) => {
      launchedOn.push(record.hostPort);
      if (refusals-- > 0) throw new CloudletError('PORT_TAKEN', `Could not set up host forwarding rule on ${record.hostPort}`);
      const server = net.createServer((socket) => socket.on('error', () => {}).end('hello'));
      await new Promise<void>((resolve) => server.listen(record.hostPort, '127.0.0.1', resolve));
      listeners.set(record.id, server);
      running.set(record.id, record);
      return 'cold-boot';
    },
  };
  tt.teardown(() => {
    for (const server of listeners.values()) server.close();
  });
  return { mechanism, running, launchedOn, saved };
}

function registryWith(mechanism: Mechanism<Workload>, gate = new LaunchGate({ concurrent: 2, queue: 2, readyWithinMs: 60000 }), ports = PORTS) {
  const allocator = new PortAllocator('127.0.0.1', ports);
  const registry = new InstanceRegistry([mechanism], allocator, path.join(root, 'instances'), path.join(root, 'tmp'), '127.0.0.1', () => {}, gate);
  const events: CloudletEvent[] = [];
  registry.events.subscribe((event) => events.push(event));
  return { registry, allocator, events };
}

async function setUp(tt: Test, options: { portTaken?: number; launchesOnce?: boolean } = {}, gate?: LaunchGate) {
  const fake = listenerRuntime(tt, options);
  const { registry, allocator, events } = registryWith(fake.mechanism, gate);
  await registry.adopt();
  await mkdir(path.join(root, 'tmp'));
  return { ...fake, registry, allocator, events };
}

/** Whether every port of the range can be reserved again: nothing the registry took is still held. */
async function allPortsFree(allocator: PortAllocator, range = PORTS): Promise<boolean> {
  const taken: number[] = [];
  try {
    for (let port = range.first; port <= range.last; port++) taken.push(await allocator.reserve());
    return true;
  } catch {
    return false;
  } finally {
    for (const port of taken) allocator.release(port);
  }
}

t.test('a capture launches through the registry in the staging area, saves the instance once it serves, and leaves nothing behind', async (tt) => {
  const { registry, allocator, events, mechanism, running, saved } = await setUp(tt);
  let seen: { dir: string; state: string; disk: string } | undefined;
  const kept = await registry.capture(SERVICE, mechanism, async (files) => {
    seen = files;
    tt.ok((await exists(files.state)) && (await exists(files.disk)), 'keep is handed the saved files while they exist');
    return 'kept';
  });
  tt.equal(kept, 'kept', 'the capture answers what keep made of the files');
  tt.equal(seen?.dir && path.dirname(seen.dir), path.join(root, 'tmp'), 'the capture instance lives in the staging area');
  tt.equal(saved.length, 1, 'the runtime saved the instance once');
  tt.equal(running.size, 0, 'the capture instance is ended');
  tt.same(await readdir(path.join(root, 'tmp')), [], 'its directory is gone');
  tt.ok(await allPortsFree(allocator), 'its port is released');
  tt.same(registry.list(), [], 'a capture is never listed');
  tt.same(events, [], 'and announces nothing');
});

t.test('a capture whose keeping fails fails with that error, and still leaves nothing behind', async (tt) => {
  const { registry, allocator, mechanism, running } = await setUp(tt);
  await tt.rejects(
    registry.capture(SERVICE, mechanism, async () => {
      throw new CloudletError('SERVICE_IN_USE', 'in use meanwhile');
    }),
    { code: 'SERVICE_IN_USE' },
  );
  tt.equal(running.size, 0);
  tt.same(await readdir(path.join(root, 'tmp')), []);
  tt.ok(await allPortsFree(allocator));
});

t.test("a capture holds one of the box's launch slots from its launch to the end of its keeping", async (tt) => {
  const { registry, mechanism } = await setUp(tt, {}, new LaunchGate({ concurrent: 1, queue: 0, readyWithinMs: 60000 }));
  let keepStarted = () => {};
  let finishKeeping = () => {};
  const inKeep = new Promise<void>((resolve) => {
    keepStarted = resolve;
  });
  const capturing = registry.capture(
    SERVICE,
    mechanism,
    () =>
      new Promise<void>((resolve) => {
        finishKeeping = resolve;
        keepStarted();
      }),
  );
  await inKeep;
  await tt.rejects(registry.start(SERVICE, false, mechanism), { code: 'BUSY' }, 'a start finds no slot and no room to wait');
  finishKeeping();
  await capturing;
  const started = await registry.start(SERVICE, false, mechanism);
  tt.equal(started.instance.state, 'ready', 'the slot is free again once the capture is over');
});

t.test('a capture whose port was taken meanwhile launches again on another port, like a start', async (tt) => {
  const { registry, mechanism, launchedOn } = await setUp(tt, { portTaken: 1 });
  await registry.capture(SERVICE, mechanism, async () => {});
  tt.equal(launchedOn.length, 2);
  tt.not(launchedOn[0], launchedOn[1], 'the second launch is on another port');
});

t.test('a start whose port was taken meanwhile is launched again on another port, and the first port is released', async (tt) => {
  const { registry, allocator, mechanism, launchedOn, events } = await setUp(tt, { portTaken: 2 });
  const started = await registry.start(SERVICE, false, mechanism);
  tt.equal(launchedOn.length, 3, 'two refusals, then a launch that serves');
  tt.equal(new Set(launchedOn).size, 3, 'each attempt on a port of its own');
  tt.equal(started.instance.hostPort, launchedOn[2]);
  tt.same(
    events.filter((e) => e.type === 'instance').map((e) => e.state),
    ['starting', 'ready'],
    'the retries are not events of their own',
  );
  await registry.stop(started.instance.id, 'operator');
  tt.ok(await allPortsFree(allocator), 'no port of a refused attempt is kept');
});

t.test('a port taken at every attempt fails the start with PORT_TAKEN after three launches, leaving nothing', async (tt) => {
  const { registry, allocator, mechanism, launchedOn, running } = await setUp(tt, { portTaken: 99 });
  await tt.rejects(registry.start(SERVICE, false, mechanism), { code: 'PORT_TAKEN', status: 503 });
  tt.equal(launchedOn.length, 3);
  tt.equal(running.size, 0);
  tt.same(await readdir(path.join(root, 'instances')), []);
  tt.ok(await allPortsFree(allocator));
});

t.test('a workload that can be launched only once is not launched again when its port was taken', async (tt) => {
  const { registry, mechanism, launchedOn } = await setUp(tt, { portTaken: 1, launchesOnce: true });
  await tt.rejects(registry.start(SERVICE, false, mechanism), { code: 'PORT_TAKEN' });
  tt.equal(launchedOn.length, 1);
});

t.test('a range with no free port is NO_FREE_PORT, and nothing is launched', async (tt) => {
  const fake = listenerRuntime(tt);
  const blocker = net.createServer();
  await new Promise<void>((resolve) => blocker.listen(PORTS.first, '127.0.0.1', resolve));
  tt.teardown(() => blocker.close());
  const { registry } = registryWith(fake.mechanism, undefined, { first: PORTS.first, last: PORTS.first });
  await registry.adopt();
  await tt.rejects(registry.start(SERVICE, false, fake.mechanism), { code: 'NO_FREE_PORT' });
  tt.same(fake.launchedOn, [], 'the mechanism never ran');
});
