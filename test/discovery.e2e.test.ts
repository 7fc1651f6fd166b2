// Discovery, end to end: the real agent publishes and browses through a real Avahi, inside network namespaces the
// test creates (see support/avahi-netns.ts); a real avahi-browse/avahi-publish on the other side plays the network.
import os from 'node:os';
import t from 'tap';
import { AgentProcess } from './support/agent';
import { AvahiNetwork } from './support/avahi-netns';
import { until } from './support/poll';

const HOSTNAME = os.hostname();

let network: AvahiNetwork;
let agent: AgentProcess;

t.before(async () => {
  network = await AvahiNetwork.create();
  agent = await AgentProcess.start({
    portRange: '21250-21259',
    env: { CLOUDLET_DISCOVERY: 'on', DBUS_SYSTEM_BUS_ADDRESS: network.busAddress('a') },
  });
});
t.teardown(async () => {
  await agent?.dispose();
  await network?.dispose();
});

async function discoveryStatus() {
  return (await agent.get('/v1/system')).json.discovery;
}

t.test('the cloudlet is browsable as _cloudlet._tcp: host name, API port, and exactly the TXT encryption=disabled', async (tt) => {
  const [found] = await network.browseUntil('b', '_cloudlet._tcp', (s) => s.length > 0);
  tt.match(found, { name: HOSTNAME, port: agent.apiPort, address: network.address('a') });
  tt.same(found!.txt, ['encryption=disabled'], 'one TXT entry, as KD-Cloudlet clients parse it');
  tt.same(await discoveryStatus(), { state: 'published', name: HOSTNAME });
  const health = (await agent.get('/v1/health')).json;
  tt.same(
    health.checks.find((c: { name: string }) => c.name === 'discovery'),
    { name: 'discovery', ok: true, optional: true },
  );
});

t.test('_cloudlet-agent._tcp carries the richer facts', async (tt) => {
  const [found] = await network.browseUntil('b', '_cloudlet-agent._tcp', (s) => s.length > 0);
  tt.equal(found!.port, agent.apiPort);
  const txt = Object.fromEntries(found!.txt.map((e) => e.split('=')));
  tt.match(txt, { txtvers: '1', id: HOSTNAME, version: /^\d+\.\d+\.\d+/, api: 'kd-cloudlet,v1', instances: '0', free_memory_mb: /^\d+$/ });
});

t.test('other cloudlets on the network are listed in /v1/peers', async (tt) => {
  const peer = network.spawn('b', 'avahi-publish', ['-s', 'field-cloudlet', '_cloudlet._tcp', '9999', 'encryption=disabled']);
  tt.teardown(() => {
    peer.kill();
  });
  const peers = await until(
    async () => (await agent.get('/v1/peers')).json.peers,
    (p: Array<{ name: string }>) => p.length > 0,
  );
  tt.match(peers, [{ name: 'field-cloudlet', address: network.address('b'), port: 9999, txt: { encryption: 'disabled' } }]);
  tt.notOk(
    peers.some((p: { name: string }) => p.name === HOSTNAME),
    'the agent does not list itself',
  );
});

t.test('when avahi-daemon restarts, the agent reports it gone, then registers again', async (tt) => {
  await network.stopAvahi('a');
  const gone = await until(discoveryStatus, (s) => s.state === 'unavailable');
  tt.match(gone, { state: 'unavailable', name: null });
  const health = await agent.get('/v1/health');
  tt.equal(health.status, 200, 'the agent stays healthy without discovery');
  tt.match(
    health.json.checks.find((c: { name: string }) => c.name === 'discovery'),
    { ok: false, optional: true, detail: /avahi-daemon/ },
  );

  await network.startAvahi('a');
  const back = await network.browseUntil('b', '_cloudlet._tcp', (s) => s.some((x) => x.name === HOSTNAME));
  tt.equal(back.find((x) => x.name === HOSTNAME)!.port, agent.apiPort, 'the record is back with the API port');
  tt.same(await until(discoveryStatus, (s) => s.state === 'published'), { state: 'published', name: HOSTNAME });
});

t.test("a name collision takes Avahi's alternative name, and /v1/system shows the name in use", async (tt) => {
  await network.stopAvahi('a');
  const squatter = network.spawn('b', 'avahi-publish', ['-s', HOSTNAME, '_cloudlet._tcp', '9999', 'encryption=disabled']);
  tt.teardown(() => {
    squatter.kill();
  });
  await network.browseUntil('b', '_cloudlet._tcp', (s) => s.some((x) => x.name === HOSTNAME && x.address === network.address('b')));
  await network.startAvahi('a');
  const status = await until(discoveryStatus, (s) => s.state === 'published' && s.name !== HOSTNAME);
  tt.equal(status.name, `${HOSTNAME} #2`);
  const seen = await network.browseUntil('b', '_cloudlet._tcp', (s) => s.some((x) => x.name === `${HOSTNAME} #2`));
  tt.equal(seen.find((x) => x.name === `${HOSTNAME} #2`)!.port, agent.apiPort);
});

t.test('without a system bus the agent serves and says discovery is unavailable', async (tt) => {
  const lonely = await AgentProcess.start({
    portRange: '21260-21269',
    env: { CLOUDLET_DISCOVERY: 'on', DBUS_SYSTEM_BUS_ADDRESS: 'unix:path=/nonexistent/bus.sock' },
  });
  tt.teardown(() => lonely.dispose());
  const discoveryCheck = (checks: Array<{ name: string }>) => checks.find((c) => c.name === 'discovery');
  const health = await until(
    () => lonely.get('/v1/health'),
    (h) => discoveryCheck(h.json.checks) !== undefined,
  );
  tt.equal(health.status, 200);
  tt.match(discoveryCheck(health.json.checks), { ok: false, optional: true, detail: /system bus/ });
  tt.match((await lonely.get('/v1/system')).json.discovery, { state: 'unavailable', name: null });
  tt.same((await lonely.get('/v1/peers')).json, { peers: [] });
});
