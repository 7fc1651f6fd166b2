// The instance registry's launch pipeline under concurrent requests, over a fake runtime whose launches end when the
// test says (test/support/fake-runtime.ts): who shares a launch (joins), who waits for a launch slot and who is refused,
// and how a forwarded port taken meanwhile is retried. What it leaves behind after a failure (records, domains, ports)
// is checked each time. The same pipeline with real VMs: test/cached-vm.e2e.test.ts, test/limits.e2e.test.ts.
import t from 'tap';
import { CloudletError } from '../agent/src/errors';
import { PRIVATE, SHARED, fakeCloudlet, idle, portRanges, startReady } from './support/fake-runtime';

const ports = portRanges(31200);

/**
 * How a mechanism tells the registry today that the port reserved for the forward was taken meanwhile (QEMU could not
 * bind it): the launch throws PORT_TAKEN, which the registry's launcher (Launcher.bringUp) retries on another port.
 */
const portTaken = () => new CloudletError('PORT_TAKEN', 'the forwarded port was taken meanwhile');

const launchFailed = () => new CloudletError('LAUNCH_FAILED', 'the VM did not start');

/** Whether `promise` has settled yet (read after `idle()`). */
function settledFlag(promise: Promise<unknown>): () => boolean {
  let settled = false;
  promise.then(
    () => {
      settled = true;
    },
    () => {
      settled = true;
    },
  );
  return () => settled;
}

t.test('joins', async (t) => {
  t.test('two joiners arriving together share one launch and get the same instance', async (tt) => {
    const { registry, runtime } = await fakeCloudlet(tt, { ports: ports(2) });
    const alice = registry.start(SHARED, true, runtime.vm, { device: 'alice' });
    const bob = registry.start(SHARED, true, runtime.vm, { device: 'bob' });
    await (await runtime.nextLaunch()).succeed();
    const [first, second] = await Promise.all([alice, bob]);
    tt.equal(second.instance.id, first.instance.id, 'the same instance');
    tt.same([first.joined, second.joined], [false, true], 'the first launched it, the second joined it');
    tt.equal(runtime.launches.length, 1, 'one launch');
    tt.match(registry.get(first.instance.id), { state: 'ready', users: 2, owners: ['alice', 'bob'] });
  });

  t.test('a joiner arriving during a launch waits for the instance to be ready instead of starting one of its own', async (tt) => {
    const { registry, runtime, events } = await fakeCloudlet(tt, { ports: ports(2) });
    const first = registry.start(SHARED, true, runtime.vm);
    const launch = await runtime.nextLaunch();
    const whileLaunching = registry.start(SHARED, true, runtime.vm, { device: 'bob' });
    launch.boot();
    await events.progress(launch.record.id, 'waiting-ready');
    const whileWaitingReady = registry.start(SHARED, true, runtime.vm, { device: 'carol' });
    const joinersDone = [settledFlag(whileLaunching), settledFlag(whileWaitingReady)];
    await idle();
    tt.same(
      joinersDone.map((done) => done()),
      [false, false],
      'both joiners wait while the instance starts',
    );
    tt.equal(runtime.launches.length, 1, 'and launch nothing');
    await launch.serve();
    const [started, ...joins] = await Promise.all([first, whileLaunching, whileWaitingReady]);
    for (const joined of joins) {
      tt.match(joined, { joined: true, instance: { id: started.instance.id, state: 'ready' } });
      tt.equal(joined.timings, undefined, 'a join has no launch timings');
    }
    tt.match(registry.get(started.instance.id), { users: 3, owners: ['bob', 'carol'] });
  });

  t.test('a failed shared launch fails its joiners with its error, and leaves no record, domain nor port', async (tt) => {
    const { registry, runtime, events } = await fakeCloudlet(tt, { ports: ports(1) });
    const first = registry.start(SHARED, true, runtime.vm, { device: 'alice' });
    const launch = await runtime.nextLaunch();
    const joiners = [registry.start(SHARED, true, runtime.vm, { device: 'bob' }), registry.start(SHARED, true, runtime.vm, { device: 'carol' })];
    await idle();
    launch.fail(launchFailed());
    await tt.rejects(first, { code: 'LAUNCH_FAILED' });
    // Were a joiner to launch anew instead, the runtime would be asked for another launch: that counts as a failure here.
    const anotherLaunch = runtime.nextLaunch();
    const outcomes = joiners.map((joiner) =>
      Promise.race([
        joiner.then(
          () => 'joined',
          (err: CloudletError) => err.code,
        ),
        anotherLaunch.then(() => 'launched anew'),
      ]),
    );
    tt.same(await Promise.all(outcomes), ['LAUNCH_FAILED', 'LAUNCH_FAILED'], 'each joiner fails with the launch it waited for');
    tt.equal(runtime.launches.length, 1, 'nobody launched again');
    tt.same(registry.list(), [], 'no record');
    tt.same([...runtime.instances.keys()], [], 'no domain');
    await tt.resolves(events.instance(launch.record.id, 'stopped'), 'the launch ended with its event');
    const next = registry.start(SHARED, false, runtime.vm);
    const nextLaunch = await anotherLaunch;
    tt.equal(nextLaunch.record.hostPort, launch.record.hostPort, 'its port serves the next start (the range has one)');
    await nextLaunch.succeed();
    await next;
  });

  t.test('join=false always launches anew: beside a ready instance, and during another launch', async (tt) => {
    const { registry, runtime } = await fakeCloudlet(tt, { ports: ports(3) });
    const ready = await startReady(registry, runtime, SHARED);
    const beside = registry.start(SHARED, false, runtime.vm);
    const besideLaunch = await runtime.nextLaunch();
    const during = registry.start(SHARED, false, runtime.vm);
    const duringLaunch = await runtime.nextLaunch();
    await Promise.all([besideLaunch.succeed(), duringLaunch.succeed()]);
    const ids = [ready.id, (await beside).instance.id, (await during).instance.id];
    tt.equal(new Set(ids).size, 3, 'three instances');
    tt.same(
      registry.list().map((i) => i.users),
      [1, 1, 1],
      'of one user each',
    );
  });

  t.test('a service that is not shareable is never joined, join=true or not', async (tt) => {
    const { registry, runtime } = await fakeCloudlet(tt, { ports: ports(2) });
    const first = await startReady(registry, runtime, PRIVATE);
    const second = registry.start(PRIVATE, true, runtime.vm);
    await (await runtime.nextLaunch()).succeed();
    const { instance, joined } = await second;
    tt.notOk(joined);
    tt.not(instance.id, first.id);
  });
});

t.test('launch slots', async (t) => {
  t.test('with every slot taken the next start waits its turn, and takes the first slot given back', async (tt) => {
    const { registry, runtime } = await fakeCloudlet(tt, { ports: ports(3), limits: { concurrent: 2, queue: 1 } });
    const starts = [1, 2, 3].map(() => registry.start(SHARED, false, runtime.vm));
    const first = await runtime.nextLaunch();
    const second = await runtime.nextLaunch();
    await idle();
    tt.equal(runtime.launches.length, 2, 'the third waits for a slot');
    const third = runtime.nextLaunch();
    await second.succeed();
    await (await third).succeed();
    await first.succeed();
    tt.equal((await Promise.all(starts)).length, 3);
    tt.equal(registry.list().length, 3);
  });

  t.test('when the queue is full a start is refused at once with BUSY, and holds nothing', async (tt) => {
    const { registry, runtime, events } = await fakeCloudlet(tt, { ports: ports(2), limits: { concurrent: 1, queue: 1 } });
    const running = registry.start(SHARED, false, runtime.vm);
    const launch = await runtime.nextLaunch();
    const queued = registry.start(SHARED, false, runtime.vm);
    const eventsBefore = events.seen.length;
    await tt.rejects(registry.start(SHARED, false, runtime.vm), { code: 'BUSY', status: 503, details: { running: 1, waiting: 1 } });
    tt.equal(events.seen.length, eventsBefore, 'the refused start announced nothing');
    tt.equal(runtime.launches.length, 1);
    const queuedLaunch = runtime.nextLaunch();
    await launch.succeed();
    await (await queuedLaunch).succeed();
    await Promise.all([running, queued]);
    tt.equal(registry.list().length, 2, 'the running and the queued start both end ready');
  });

  t.test('a failed launch gives its slot to the next start in the queue', async (tt) => {
    const { registry, runtime } = await fakeCloudlet(tt, { ports: ports(2), limits: { concurrent: 1, queue: 1 } });
    const failing = registry.start(SHARED, false, runtime.vm);
    const launch = await runtime.nextLaunch();
    const queued = registry.start(SHARED, false, runtime.vm);
    const next = runtime.nextLaunch();
    launch.fail(launchFailed());
    await tt.rejects(failing, { code: 'LAUNCH_FAILED' });
    await (await next).succeed();
    await tt.resolves(queued);
  });

  t.test('a launch that admits itself holds no slot until it does; refused there, it leaves no record, domain nor port', async (tt) => {
    const { registry, runtime } = await fakeCloudlet(tt, { ports: ports(2), limits: { concurrent: 1, queue: 0 } });
    const synthesis = registry.start(SHARED, false, runtime.synthesis);
    const uploading = await runtime.nextLaunch();
    const cached = registry.start(SHARED, false, runtime.vm);
    const cachedLaunch = await runtime.nextLaunch();
    tt.pass('a Cached VM start takes the only slot while the synthesis still receives its overlay');
    const refusal = await uploading.admit().catch((err: CloudletError) => err);
    tt.match(refusal, { code: 'BUSY' }, 'the synthesis asks for its slot once every byte is there: the queue holds none');
    uploading.fail(refusal as Error);
    await tt.rejects(synthesis, { code: 'BUSY' });
    tt.notOk(runtime.instances.has(uploading.record.id), 'its domain was ended');
    await cachedLaunch.succeed();
    await cached;
    const next = registry.start(SHARED, false, runtime.vm);
    const nextLaunch = await runtime.nextLaunch();
    tt.equal(nextLaunch.record.hostPort, uploading.record.hostPort, 'its port serves the next start');
    await nextLaunch.succeed();
    await next;
    tt.equal(registry.list().length, 2);
  });

  t.test('an instance is listed, and can be stopped, once its VM is up; a stop while it waits for readiness ends it and fails its start', async (tt) => {
    const { registry, runtime, events } = await fakeCloudlet(tt, { ports: ports(1), limits: { concurrent: 1, queue: 1 } });
    const start = registry.start(SHARED, false, runtime.vm);
    const launch = await runtime.nextLaunch();
    const { id } = launch.record;
    await tt.rejects(registry.stop(id, 'operator'), { code: 'INSTANCE_NOT_FOUND' }, 'while its mechanism launches it, it is not listed yet');
    const queued = registry.start(SHARED, false, runtime.vm);
    const queuedLaunch = runtime.nextLaunch();
    launch.boot();
    await events.progress(id, 'waiting-ready');
    tt.match(registry.get(id), { state: 'starting' });
    tt.same(await registry.stop(id, 'operator'), { destroyed: true, users: 0 });
    tt.notOk(runtime.instances.has(id), 'its domain is ended');
    await tt.rejects(start, { code: 'LAUNCH_FAILED' }, 'its start fails: the VM stopped before it was ready');
    const next = await queuedLaunch;
    tt.equal(next.record.hostPort, launch.record.hostPort, 'its slot and its port went to the next start');
    await next.succeed();
    await queued;
    tt.same(
      registry.list().map((i) => i.id),
      [next.record.id],
    );
  });

  t.test(
    "a stop during the readiness wait ends the instance once: one final event, and its port, taken by the next start meanwhile, stays that start's",
    async (tt) => {
      const { registry, runtime, events } = await fakeCloudlet(tt, { ports: ports(1) });
      const stopped = registry.start(SHARED, false, runtime.vm);
      const launch = await runtime.nextLaunch();
      launch.boot();
      await events.progress(launch.record.id, 'waiting-ready');
      await registry.stop(launch.record.id, 'operator');
      const next = registry.start(SHARED, false, runtime.vm);
      const nextLaunch = await runtime.nextLaunch();
      tt.equal(nextLaunch.record.hostPort, launch.record.hostPort, 'the next start took the port at once');
      await tt.rejects(stopped, { code: 'LAUNCH_FAILED' });
      const endings = events.seen.filter(
        (e) => e.type === 'instance' && e.instance.id === launch.record.id && (e.state === 'stopped' || e.state === 'crashed'),
      );
      tt.same(
        endings.map((e) => e.type === 'instance' && e.reason),
        ['requested'],
        'one final event, for the stop',
      );
      // Were the port given back a second time, a third start would be handed it: the runtime would be asked for a launch.
      const anotherLaunch = runtime.nextLaunch().then(() => "launched on the next start's port");
      const third = registry.start(SHARED, false, runtime.vm).then(
        () => 'started',
        (err: CloudletError) => err.code,
      );
      tt.equal(await Promise.race([third, anotherLaunch]), 'NO_FREE_PORT', "the range's one port is still the next start's");
      await nextLaunch.succeed();
      await next;
    },
  );
});

t.test('forwarded ports', async (t) => {
  t.test('a port taken meanwhile costs one more attempt on another port, and the taken one is given back', async (tt) => {
    const { registry, runtime } = await fakeCloudlet(tt, { ports: ports(2) });
    const start = registry.start(SHARED, false, runtime.vm);
    const taken = await runtime.nextLaunch();
    taken.fail(portTaken());
    const retry = await runtime.nextLaunch();
    tt.not(retry.record.hostPort, taken.record.hostPort, 'the retry forwards another port');
    tt.equal(retry.record.id, taken.record.id, 'of the same instance');
    tt.same([...runtime.instances.keys()], [retry.record.id], "the first attempt's domain was ended");
    await retry.succeed();
    tt.equal((await start).instance.hostPort, retry.record.hostPort);
    const next = registry.start(SHARED, false, runtime.vm);
    const nextLaunch = await runtime.nextLaunch();
    tt.equal(nextLaunch.record.hostPort, taken.record.hostPort, 'the taken port was given back (it may be free again)');
    await nextLaunch.succeed();
    await next;
  });

  t.test('after three taken ports the start fails, holding no record, domain nor port', async (tt) => {
    const { registry, runtime } = await fakeCloudlet(tt, { ports: ports(3) });
    const start = registry.start(SHARED, false, runtime.vm);
    for (let attempt = 1; attempt <= 3; attempt++) (await runtime.nextLaunch()).fail(portTaken());
    await tt.rejects(start, { code: 'PORT_TAKEN' });
    tt.equal(new Set(runtime.launches.map((l) => l.record.hostPort)).size, 3, 'each attempt had a port of its own');
    tt.same(registry.list(), []);
    tt.same([...runtime.instances.keys()], []);
    const again = [1, 2, 3].map(() => registry.start(SHARED, false, runtime.vm));
    for (let n = 0; n < 3; n++) await (await runtime.nextLaunch()).succeed();
    tt.equal((await Promise.all(again)).length, 3, 'all three ports were given back');
  });

  t.test('an exhausted range refuses a start with NO_FREE_PORT before any launch, and it keeps no slot', async (tt) => {
    const { registry, runtime } = await fakeCloudlet(tt, { ports: ports(1), limits: { concurrent: 1, queue: 1 } });
    const only = await startReady(registry, runtime, SHARED);
    await tt.rejects(registry.start(SHARED, false, runtime.vm), { code: 'NO_FREE_PORT', status: 503 });
    tt.equal(runtime.launches.length, 1, 'no launch was asked for');
    tt.same(
      registry.list().map((i) => i.id),
      [only.id],
    );
    await registry.stop(only.id, 'operator');
    const next = await startReady(registry, runtime, SHARED);
    tt.equal(next.hostPort, only.hostPort, 'the slot and the port are free for the next start');
  });

  t.test("a failed launch whose clean-up also fails reports the launch's error, and gives its port back", async (tt) => {
    const { registry, runtime } = await fakeCloudlet(tt, { ports: ports(1) });
    const failing = registry.start(SHARED, false, runtime.vm);
    const launch = await runtime.nextLaunch();
    runtime.unreachable = true;
    launch.fail(launchFailed());
    await tt.rejects(failing, { code: 'LAUNCH_FAILED' }, 'not HYPERVISOR_UNAVAILABLE from ending its domain');
    runtime.unreachable = false;
    tt.same(registry.list(), [], 'no instance is recorded');
    tt.equal((await startReady(registry, runtime, SHARED)).hostPort, launch.record.hostPort, 'the port is free again');
  });

  t.test('the port of a failed launch is given back', async (tt) => {
    const { registry, runtime } = await fakeCloudlet(tt, { ports: ports(1) });
    const failing = registry.start(SHARED, false, runtime.vm);
    const launch = await runtime.nextLaunch();
    launch.fail(launchFailed());
    await tt.rejects(failing, { code: 'LAUNCH_FAILED' });
    tt.equal((await startReady(registry, runtime, SHARED)).hostPort, launch.record.hostPort);
  });
});
