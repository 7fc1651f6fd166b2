/**
 * native/libvirt.ts against libvirt's in-memory test driver (test:///default: every open starts from a fresh state
 * holding one running persistent domain named "test"). Needs the shim: bash native/build.sh.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { Connection, DomainEvent, DomainFlags, DomainState, LibvirtError, StoppedDetail, libvirtInfo, type LifecycleEvent } from '../native/libvirt';

const TEST_URI = 'test:///default';
const DEFAULT_DOMAIN = 'test';
const UNKNOWN_UUID = '00000000-0000-4000-8000-000000000000';
const METADATA_URI = 'http://cloudlet.example/test/1';
const COMPILED_MODULE = path.resolve(__dirname, '../native/libvirt.js');

function domainXml(name: string, extra = ''): string {
  return `<domain type='test'><name>${name}</name><memory unit='KiB'>65536</memory><os><type>hvm</type></os>${extra}</domain>`;
}

/** Opens the test driver; at teardown removes every domain the test left behind and closes the connection. */
async function openTestDriver(t: Test): Promise<Connection> {
  const conn = await Connection.open(TEST_URI);
  t.teardown(async () => {
    for (const dom of await conn.listDomains()) {
      if (dom.name === DEFAULT_DOMAIN) continue;
      if (dom.active) await conn.destroyDomain(dom.uuid);
      if (dom.persistent) await conn.undefineDomain(dom.uuid);
    }
    await conn.close();
  });
  return conn;
}

async function rejection(promise: Promise<unknown>): Promise<LibvirtError> {
  try {
    await promise;
  } catch (err) {
    if (err instanceof LibvirtError) return err;
    throw err;
  }
  throw new Error('expected a LibvirtError, but the call succeeded');
}

/** Runs a script with the compiled module in a fresh node process (the module loads the shim once per process). */
function runChild(script: string, env: Record<string, string> = {}): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(process.execPath, ['-e', script], { env: { ...process.env, ...env } }, (err, stdout, stderr) =>
      err ? reject(Object.assign(err as Error, { stderr })) : resolve({ stdout, stderr }),
    );
  });
}

/** Prints, as JSON, the error libvirtInfo() throws in the child. */
const REPORT_LOAD_ERROR = `
  const { libvirtInfo } = require(${JSON.stringify(COMPILED_MODULE)});
  try { libvirtInfo(); console.log('null'); }
  catch (e) { console.log(JSON.stringify({ code: e.code, operation: e.operation, message: e.message })); }`;

async function loadErrorIn(env: Record<string, string>): Promise<{ code: string; operation: string; message: string }> {
  return JSON.parse((await runChild(REPORT_LOAD_ERROR, env)).stdout);
}

t.test("opens test:///default and reports libvirt's version", async (t) => {
  const { libraryVersion } = libvirtInfo();
  t.match(libraryVersion, /^\d+\.\d+\.\d+$/);
  t.ok(Number(libraryVersion.split('.')[0]) >= 6, 'at least libvirt 6');

  const conn = await openTestDriver(t);
  t.equal(conn.uri, TEST_URI);
  t.equal(await conn.isAlive(), true);
  t.match(await conn.hypervisorVersion(), /^\d+\.\d+\.\d+$/);
  t.match(await conn.capabilities(), /^<capabilities>/);
  const noSupport = await rejection(conn.domainCapabilities('kvm'));
  t.equal(noSupport.code, 'VIR_ERR_NO_SUPPORT', 'the test driver has no domain capabilities');
  t.equal(noSupport.operation, 'virConnectGetDomainCapabilities');
});

t.test('defines, starts, lists, describes and destroys a domain', async (t) => {
  const conn = await openTestDriver(t);
  const uuid = await conn.defineDomain(domainXml('cl-define'));
  t.match(uuid, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
  t.equal(await conn.lookupByName('cl-define'), uuid);
  t.equal(await conn.domainExists(uuid), true);
  t.same(await conn.domainState(uuid), { state: DomainState.Shutoff, reason: 0 });

  await conn.startDomain(uuid);
  t.equal((await conn.domainState(uuid)).state, DomainState.Running);
  const listed = (await conn.listDomains()).find((d) => d.uuid === uuid);
  t.same(listed, { uuid, name: 'cl-define', state: DomainState.Running, reason: 1, persistent: true, active: true });
  t.same((await conn.listDomains(DomainFlags.VIR_CONNECT_LIST_DOMAINS_ACTIVE)).map((d) => d.name).sort(), ['cl-define', DEFAULT_DOMAIN]);
  t.match(await conn.domainXml(uuid), /<domain type='test' id='\d+'>[\s\S]*<name>cl-define<\/name>/);
  t.notMatch(await conn.domainXml(uuid, DomainFlags.VIR_DOMAIN_XML_INACTIVE), / id='/, 'inactive XML has no id');

  await conn.destroyDomain(uuid);
  t.equal((await conn.domainState(uuid)).state, DomainState.Shutoff);
  await conn.undefineDomain(uuid);
  t.equal(await conn.domainExists(uuid), false);
  t.equal(await conn.lookupByName('cl-define'), null);
});

t.test('a transient domain from createDomain disappears on destroy', async (t) => {
  const conn = await openTestDriver(t);
  const uuid = await conn.createDomain(domainXml('cl-transient'));
  const listed = (await conn.listDomains(DomainFlags.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)).map((d) => [d.name, d.active, d.persistent]);
  t.same(listed, [['cl-transient', true, false]]);
  await conn.destroyDomain(uuid);
  t.equal(await conn.domainExists(uuid), false);
});

t.test('metadata round-trips and is null when unset', async (t) => {
  const conn = await openTestDriver(t);
  const uuid = await conn.defineDomain(domainXml('cl-meta'));
  t.equal(await conn.getMetadata(uuid, METADATA_URI), null);

  await conn.setMetadata(uuid, '<instance id="i-1" service="echo"/>', 'cl', METADATA_URI, DomainFlags.VIR_DOMAIN_AFFECT_CONFIG);
  t.equal(await conn.getMetadata(uuid, METADATA_URI), '<instance id="i-1" service="echo"/>');
  t.match(await conn.domainXml(uuid), `<cl:instance xmlns:cl="${METADATA_URI}" id="i-1" service="echo"/>`);
  t.equal(await conn.getMetadata(uuid, 'http://cloudlet.example/other'), null, 'other namespaces stay unset');

  await conn.setMetadata(uuid, null, 'cl', METADATA_URI);
  t.equal(await conn.getMetadata(uuid, METADATA_URI), null, 'removed');
});

t.test('save and restore a domain', async (t) => {
  const conn = await openTestDriver(t);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cl-native-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const saveFile = path.join(dir, 'cl-save.img');
  const uuid = await conn.createDomain(domainXml('cl-save'));

  await conn.saveDomain(uuid, saveFile);
  t.ok(fs.existsSync(saveFile), 'the save file is written');
  t.equal(await conn.domainExists(uuid), false, 'a saved transient domain is gone');

  // The test driver cannot rewrite a save image's XML; its refusal shows the replacement XML reaches libvirt.
  const replacement = domainXml('cl-save', '<description>restored</description>');
  const refused = await rejection(conn.restoreDomain(saveFile, replacement));
  t.equal(refused.code, 'VIR_ERR_ARGUMENT_UNSUPPORTED');
  t.equal(refused.operation, 'virDomainRestoreFlags');

  await conn.restoreDomain(saveFile);
  t.same(await conn.domainState(uuid), { state: DomainState.Running, reason: 3 /* VIR_DOMAIN_RUNNING_RESTORED */ });
  await conn.destroyDomain(uuid);
});

// Pausing and resuming for real (a warm pool's VMs, restored paused): test/warm-pool.e2e.test.ts. The test driver can
// neither start nor restore a domain paused, so only the calls' wiring is checked here.
t.test('resume and a QEMU monitor command reach libvirt, which answers with its own errors here', async (t) => {
  const conn = await openTestDriver(t);
  const uuid = await conn.createDomain(domainXml('cl-resume'));
  const running = await rejection(conn.resumeDomain(uuid));
  t.equal(running.operation, 'virDomainResume', 'a running domain cannot be resumed');
  t.match(running.message, /not paused/);
  t.equal((await rejection(conn.resumeDomain(UNKNOWN_UUID))).code, 'VIR_ERR_NO_DOMAIN');
  // No QEMU monitor in the test driver: the refusal, named after the call, shows libvirt-qemu was loaded and called.
  const refused = await rejection(conn.qemuMonitorCommand(uuid, 'info status', DomainFlags.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP));
  t.equal(refused.operation, 'virDomainQemuMonitorCommand');
  t.match(refused.code, /^VIR_ERR_/);
});

t.test("an unknown domain uuid is a typed VIR_ERR_NO_DOMAIN error carrying libvirt's message", async (t) => {
  const conn = await openTestDriver(t);
  // Every rejection gets its handler at once: the calls run in parallel and may fail in any order.
  const errors = await Promise.all(
    [
      conn.startDomain(UNKNOWN_UUID),
      conn.domainState(UNKNOWN_UUID),
      conn.domainXml(UNKNOWN_UUID),
      conn.getMetadata(UNKNOWN_UUID, METADATA_URI),
      conn.destroyDomain(UNKNOWN_UUID),
    ].map((call) => rejection(call)),
  );
  for (const err of errors) {
    t.equal(err.code, 'VIR_ERR_NO_DOMAIN');
    t.equal(err.virCode, 42);
    t.equal(err.virDomain, 12 /* VIR_FROM_TEST */);
    t.equal(err.operation, 'virDomainLookupByUUIDString');
    t.match(err.message, /^virDomainLookupByUUIDString: Domain not found/);
  }
  t.equal(await conn.domainExists(UNKNOWN_UUID), false, 'domainExists answers false instead');
  t.equal(await conn.lookupByName('cl-nonexistent'), null, 'lookupByName answers null instead');
});

t.test('a failing operation is reported against the libvirt function that failed', async (t) => {
  const conn = await openTestDriver(t);
  const malformed = await rejection(conn.defineDomain('<domain'));
  t.equal(malformed.code, 'VIR_ERR_XML_DETAIL');
  t.equal(malformed.operation, 'virDomainDefineXML');
  const running = await rejection(conn.startDomain((await conn.lookupByName(DEFAULT_DOMAIN))!));
  t.equal(running.operation, 'virDomainCreate');
  t.match(running.message, /^virDomainCreate: .*already running/);
});

t.test('errors of concurrent failing calls are not mixed up', async (t) => {
  const conn = await openTestDriver(t);
  // Each call fails differently, with its index in libvirt's message (or a distinct code/operation).
  const failing = (i: number) => {
    switch (i % 4) {
      case 0:
        return {
          call: conn.defineDomain(`<domain type='kvm${i}'><name>x</name></domain>`),
          code: 'VIR_ERR_CONFIG_UNSUPPORTED',
          operation: 'virDomainDefineXML',
          message: `invalid domain type kvm${i}`,
        };
      case 1:
        return {
          call: conn.defineDomain(domainXml('x').replace('65536', `${i}q`)),
          code: 'VIR_ERR_XML_ERROR',
          operation: 'virDomainDefineXML',
          message: `Invalid value '${i}q'`,
        };
      case 2:
        return {
          call: conn.createDomain(domainXml(`a/b${i}`)),
          code: 'VIR_ERR_XML_ERROR',
          operation: 'virDomainCreateXML',
          message: `name a/b${i} cannot contain '/'`,
        };
      default:
        return { call: conn.domainXml(UNKNOWN_UUID), code: 'VIR_ERR_NO_DOMAIN', operation: 'virDomainLookupByUUIDString', message: 'Domain not found' };
    }
  };
  for (let round = 0; round < 5; round++) {
    const expected = Array.from({ length: 20 }, (_, i) => failing(i));
    const errors = await Promise.all(expected.map((e) => rejection(e.call)));
    errors.forEach((err, i) => {
      const want = expected[i]!;
      t.equal(err.code, want.code, `call ${i}: code`);
      t.equal(err.operation, want.operation, `call ${i}: operation`);
      t.ok(err.message.includes(want.message), `call ${i}: own message (${err.message})`);
    });
  }
});

t.test('no libvirt call blocks the event loop', async (t) => {
  const conn = await openTestDriver(t);
  let inFlight = 0;
  let ticksWhileCalling = 0;
  const interval = setInterval(() => {
    if (inFlight > 0) ticksWhileCalling++;
  }, 1);
  t.teardown(() => clearInterval(interval));
  // Keep 8 calls in flight until the timer has run 5 times meanwhile (or give up after 20,000 calls).
  let started = 0;
  const worker = async () => {
    while (ticksWhileCalling < 5 && started < 20_000) {
      started++;
      inFlight++;
      try {
        await conn.listDomains();
      } finally {
        inFlight--;
      }
    }
  };
  await Promise.all(Array.from({ length: 8 }, worker));
  t.ok(ticksWhileCalling >= 5, `timers ran while libvirt calls were pending (${ticksWhileCalling} ticks, ${started} calls)`);
});

t.test('a closed connection refuses calls with CONNECTION_CLOSED', async (t) => {
  const conn = await Connection.open(TEST_URI);
  const inFlight = Array.from({ length: 10 }, () => conn.listDomains());
  const closing = conn.close();
  t.equal((await Promise.all(inFlight)).length, 10, 'calls already made complete before the connection closes');
  await closing;
  await conn.close(); // idempotent
  const err = await rejection(conn.isAlive());
  t.equal(err.code, 'CONNECTION_CLOSED');
  t.equal(err.operation, 'isAlive');
  t.equal((await rejection(conn.domainState(UNKNOWN_UUID))).code, 'CONNECTION_CLOSED');
});

t.test('loading with a missing shim or library gives NATIVE_SHIM_MISSING / LIBVIRT_UNAVAILABLE / LIBVIRT_UNSUPPORTED', async (t) => {
  const noShim = await loadErrorIn({ CLOUDLET_NATIVE_LIB: '/nonexistent/libcloudlet_virt.so' });
  t.equal(noShim.code, 'NATIVE_SHIM_MISSING');
  t.match(noShim.message, /\/nonexistent\/libcloudlet_virt\.so.*build\.sh/);

  const noLibvirt = await loadErrorIn({ CLOUDLET_LIBVIRT_SO: '/nonexistent/libvirt.so.0' });
  t.equal(noLibvirt.code, 'LIBVIRT_UNAVAILABLE');
  t.match(noLibvirt.message, /\/nonexistent\/libvirt\.so\.0.*libvirt0/);

  const notLibvirt = await loadErrorIn({ CLOUDLET_LIBVIRT_SO: 'libc.so.6' });
  t.equal(notLibvirt.code, 'LIBVIRT_UNSUPPORTED');
  t.match(notLibvirt.message, /lacks .*virConnectOpen.*virDomainFree/);

  const openFails = await runChild(
    `
    const { Connection } = require(${JSON.stringify(COMPILED_MODULE)});
    Connection.open('test:///default').then(() => console.log('opened'), (e) => console.log(e.code));`,
    { CLOUDLET_LIBVIRT_SO: '/nonexistent/libvirt.so.0' },
  );
  t.equal(openFails.stdout.trim(), 'LIBVIRT_UNAVAILABLE', 'Connection.open rejects with the load error');
});

t.test('libvirt prints nothing to stderr on errors', async (t) => {
  const { stdout, stderr } = await runChild(`
    const { Connection } = require(${JSON.stringify(COMPILED_MODULE)});
    (async () => {
      const failures = [];
      const fail = (p) => p.then(() => failures.push('succeeded'), (e) => failures.push(e.code));
      await fail(Connection.open('nosuchdriver:///'));
      const conn = await Connection.open('test:///default');
      await fail(conn.domainXml(${JSON.stringify(UNKNOWN_UUID)}));
      await fail(conn.defineDomain('<domain'));
      await conn.close();
      console.log(failures.join(' '));
    })();`);
  t.equal(stdout.trim(), 'VIR_ERR_NO_CONNECT VIR_ERR_NO_DOMAIN VIR_ERR_XML_DETAIL', 'the errors happened');
  t.equal(stderr, '', 'nothing on stderr');
});

t.test('lifecycle events arrive in order for a start and a destroy, and stop once the watch is closed', async (t) => {
  const conn = await openTestDriver(t);
  const received: LifecycleEvent[] = [];
  const watch = await conn.watchLifecycle((events) => received.push(...events));
  const uuid = await conn.createDomain(domainXml('cloudlet-events'));
  await conn.destroyDomain(uuid);
  const deadline = Date.now() + 5000;
  while (received.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  t.same(
    received.map(({ uuid, event, detail }) => ({ uuid, event, detail })),
    [
      { uuid, event: DomainEvent.Started, detail: 0 },
      { uuid, event: DomainEvent.Stopped, detail: StoppedDetail.Destroyed },
    ],
    'started (booted), then stopped (destroyed)',
  );
  t.ok(
    received.every((e) => Math.abs(e.atMs - Date.now()) < 5000),
    'each event carries the time it was delivered',
  );

  await watch.close();
  const count = received.length;
  await conn.destroyDomain(await conn.createDomain(domainXml('cloudlet-after-close')));
  await new Promise((r) => setTimeout(r, 200));
  t.equal(received.length, count, 'no event after close');
});

t.test('closing a connection closes its watches', async (t) => {
  const conn = await Connection.open(TEST_URI);
  await conn.watchLifecycle(() => {});
  const started = Date.now();
  await conn.close();
  t.ok(Date.now() - started < 2000, 'close does not wait for the watch to time out repeatedly');
});
