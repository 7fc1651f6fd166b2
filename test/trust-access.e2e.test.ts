// Trust, end to end, what each credential reaches: every route of the real agent's tables at its access level, and a
// real Service VM showing that a device's instances are its own and end with its authorization, also across an agent
// restart. The credentials themselves (pairing, TLS) are test/trust-pairing.e2e.test.ts. Forward ports 22600-22629.
import t from 'tap';
import { kdCloudletFace } from '../agent/src/api/kd-cloudlet';
import type { Route } from '../agent/src/api/routing';
import { v1Face } from '../agent/src/api/v1';
import type { FleetView } from '../agent/src/api/v1-fleet';
import type { TrustView } from '../agent/src/api/v1-trust';
import { webFace } from '../agent/src/api/web';
import type { CloudletApi, ProvisioningApi } from '../agent/src/core/types';
import { AgentProcess, domainsUnder, request, testGuestDir } from './support/agent';
import { NONE, as, expectError, pairDevice } from './support/pairing';

const SERVICE = 'org.cloudlet.demo.http';

let agent: AgentProcess;

t.before(async () => {
  // The table below sends hundreds of refused requests from one address: far above the default rate limit.
  agent = await AgentProcess.start({ portRange: '22600-22629', env: { CLOUDLET_RATE_PER_SECOND: '10000', CLOUDLET_RATE_BURST: '10000' } });
});
t.teardown(async () => {
  await agent.dispose();
});

const pair = (name: string, options: { expiresInMinutes?: number } = {}) => pairDevice(agent, name, options);

/** Every route of every face, as the agent builds them (the handlers are never called here; the KD face subscribes). */
function allRoutes(): Route[] {
  const nothing = { subscribe: () => () => undefined } as unknown as CloudletApi & ProvisioningApi;
  return [...v1Face(nothing, nothing, {} as TrustView, {} as FleetView).routes, ...kdCloudletFace(nothing).routes, ...webFace().routes];
}

/** A concrete path for a route: each `:param` becomes a plausible but unknown value. */
/**
 * Device routes only a paired cloudlet may use (docs/handoff.md). `POST /v1/handoffs` reads its JSON body first, so the
 * table's empty request gets a 400 there; its refusal of a phone is in test/handoff.e2e.test.ts.
 */
const CLOUDLETS_ONLY = new Set(['POST /v1/handoffs/:id/complete', 'DELETE /v1/handoffs/:id']);

const concrete = (route: Route) => route.path.replace(/:[a-z]+/g, 'no-such-thing');

t.test('the route tables: every route has its access level enforced', async (tt) => {
  const routes = allRoutes();
  const device = await pair('table phone');
  tt.ok(routes.length > 40, `${routes.length} routes checked`);
  for (const route of routes) {
    const url = concrete(route);
    const name = `${route.method} ${route.path} (${route.access})`;
    const anonymous = await request(agent.apiPort, route.method, url, undefined, NONE);
    // 'services' routes: open to unpaired clients under the default policy (the plain KD face); closed below.
    if (route.access === 'open' || route.access === 'services') {
      tt.notOk([401, 403].includes(anonymous.status), `${name} answers without a credential (${anonymous.status})`);
      continue;
    }
    expectError(tt, anonymous, 401, 'UNAUTHENTICATED', `${name} without a credential`);
    tt.match(anonymous.headers['www-authenticate'], /^Bearer /, `${name}: 401 says how to authenticate`);
    const forged = await request(agent.apiPort, route.method, url, undefined, as('cld_not-a-real-token'));
    expectError(tt, forged, 401, 'UNAUTHENTICATED', `${name} with an unknown token`);
    if (route.access === 'admin') {
      expectError(tt, await request(agent.apiPort, route.method, url, undefined, as(device.token)), 403, 'ADMIN_ONLY', `${name} with a device token`);
    } else if (CLOUDLETS_ONLY.has(`${route.method} ${route.path}`)) {
      const r = await request(agent.apiPort, route.method, url, undefined, as(device.token));
      expectError(tt, r, 403, 'PEER_NOT_ALLOWED', `${name} refuses a phone`);
    } else {
      const r = await request(agent.apiPort, route.method, url, undefined, as(device.token));
      tt.notOk([401, 403].includes(r.status), `${name} lets a paired device in (${r.status})`);
    }
  }
  // A sample of the admin token's reach (the rest of the suite uses it everywhere).
  tt.equal((await agent.get('/v1/devices')).status, 200, 'the admin token opens the admin routes');
  tt.equal((await agent.get('/v1/instances')).status, 200, 'and the device routes');
  const open = routes
    .filter((r) => r.access === 'open' && r.path.startsWith('/v1'))
    .map((r) => `${r.method} ${r.path}`)
    .sort();
  tt.same(
    open,
    ['GET /v1/apps', 'GET /v1/apps/:id', 'GET /v1/apps/:id/file', 'GET /v1/health', 'GET /v1/openapi.json', 'GET /v1/system', 'POST /v1/pairing/claim'],
    'the open /v1 routes are exactly the documented list',
  );
});

t.test('one access policy: where the KD face is not plain, no face lets an unpaired client see or start services', async (tt) => {
  const closed = await AgentProcess.start({ portRange: '27440-27449', env: { CLOUDLET_KD_API: 'off' } });
  tt.teardown(() => closed.dispose());
  const servicesRoutes = allRoutes().filter((r) => r.access === 'services' && r.path.startsWith('/v1'));
  tt.same(
    servicesRoutes.map((r) => `${r.method} ${r.path}`).sort(),
    ['DELETE /v1/instances/:id', 'GET /v1/services', 'GET /v1/services/:id', 'POST /v1/instances'],
    'the services routes of /v1',
  );
  for (const route of servicesRoutes) {
    const refused = await request(closed.apiPort, route.method, concrete(route), undefined, NONE);
    expectError(tt, refused, 401, 'UNAUTHENTICATED', `${route.method} ${route.path} without a credential`);
  }
});

t.test('an unpaired client starts through /v1 as through the KD face: an anonymous use, within the anonymous quota', async (tt) => {
  const quota = await AgentProcess.start({ portRange: '27450-27459', env: { CLOUDLET_KD_INSTANCES_PER_ADDRESS: '0' } });
  tt.teardown(() => quota.dispose());
  tt.equal((await quota.post('/v1/services', { path: testGuestDir() })).status, 201);
  const listed = await request(quota.apiPort, 'GET', '/v1/services', undefined, NONE);
  tt.equal(listed.status, 200, 'the services are listed without pairing');
  tt.notOk('dir' in listed.json.services[0], 'with no host path');
  const start = await request(quota.apiPort, 'POST', '/v1/instances', { service_id: SERVICE }, NONE);
  expectError(tt, start, 503, 'QUOTA_EXCEEDED', 'counted against the anonymous quota, not taken for the operator');
  const kd = await request(quota.apiPort, 'GET', `/api/servicevm/start?serviceId=${SERVICE}`, undefined, NONE);
  tt.equal(kd.status, 503, 'as the KD face counts it');
  tt.same(await domainsUnder(quota.dataDir), [], 'no VM was started');
});

t.test("a device's instances end with its authorization", async (tt) => {
  const imported = await agent.post('/v1/services', { path: testGuestDir() });
  tt.equal(imported.status, 201, imported.body);
  const alice = await pair('alice');
  const bob = await pair('bob');

  const started = await request(agent.apiPort, 'POST', '/v1/instances', { service_id: SERVICE, join: false }, as(alice.token));
  tt.equal(started.status, 201, started.body);
  const id = started.json.instance.id as string;
  tt.same(started.json.instance.owners, [alice.id], 'the starting device owns it (from its token, not from a header)');
  expectError(tt, await request(agent.apiPort, 'DELETE', `/v1/instances/${id}`, undefined, as(bob.token)), 403, 'FORBIDDEN', 'another device stopping it');
  const joined = await request(agent.apiPort, 'POST', '/v1/instances', { service_id: SERVICE, join: true }, as(bob.token));
  tt.equal(joined.json.instance.id, id, 'bob joins the shareable instance');
  tt.same(joined.json.instance.owners, [bob.id], "a device sees only its own entry among the owners, no other device's id");
  tt.same((await agent.get(`/v1/instances/${id}`)).json.owners, [alice.id, bob.id], 'the operator sees both');

  tt.equal((await agent.post(`/v1/devices/${alice.id}/revoke`)).status, 200);
  expectError(tt, await request(agent.apiPort, 'GET', `/v1/instances/${id}`, undefined, as(alice.token)), 401, 'DEVICE_REVOKED', 'alice at once');
  // Released as the revocation's consequence, in the background of its answer.
  await waitFor(async () => (await agent.get(`/v1/instances/${id}`)).json.users === 1, 10_000);
  tt.match((await agent.get(`/v1/instances/${id}`)).json, { state: 'ready', users: 1, owners: [bob.id] }, "alice's use is released; bob still uses it");

  tt.equal((await agent.delete(`/v1/devices/${bob.id}`)).status, 204);
  await waitFor(async () => (await agent.get(`/v1/instances/${id}`)).status === 404, 30_000);
  tt.same(await domainsUnder(agent.dataDir), [], 'with its last user removed, the VM is gone');
});

t.test("the plain KD face (anonymous) stops only owner-less uses: a paired device's instance is an unknown one to it", async (tt) => {
  const dave = await pair('dave');
  const started = await request(agent.apiPort, 'POST', '/v1/instances', { service_id: SERVICE, join: false }, as(dave.token));
  tt.equal(started.status, 201, started.body);
  const id = started.json.instance.id as string;
  const kdStop = () => request(agent.apiPort, 'GET', `/api/servicevm/stop?instanceId=${id}`, undefined, NONE);
  const unknown = `404 Not Found - service vm for ${id} not found`;

  const direct = await kdStop();
  tt.equal(direct.status, 404, "an unpaired client cannot stop a device's instance");
  tt.match(direct.body, unknown, "to it the instance does not exist (KD's usual text)");
  tt.match((await agent.get(`/v1/instances/${id}`)).json, { state: 'ready', users: 1, owners: [dave.id] }, 'the VM still runs');

  // Joining the shareable instance gives the anonymous client an owner-less use of it, and that one only.
  const joined = await request(agent.apiPort, 'GET', `/api/servicevm/start?serviceId=${SERVICE}&join=true`, undefined, NONE);
  tt.equal(joined.status, 200, joined.body);
  tt.equal(joined.json._id, id, "the anonymous join gets the device's instance");
  tt.equal((await kdStop()).status, 200, 'it releases its own (owner-less) use');
  tt.match((await agent.get(`/v1/instances/${id}`)).json, { state: 'ready', users: 1, owners: [dave.id] }, "the device's use is kept");
  const again = await kdStop();
  tt.equal(again.status, 404, "stopping twice does not release the device's use");
  tt.match(again.body, unknown);
  tt.match((await agent.get(`/v1/instances/${id}`)).json, { state: 'ready', users: 1, owners: [dave.id] }, 'the VM still runs');
  tt.equal((await request(agent.apiPort, 'DELETE', `/v1/instances/${id}`, undefined, as(dave.token))).json.destroyed, true, 'the device stops it');

  // KD compatibility: what an anonymous client starts through the plain face, it can stop through it.
  const own = await request(agent.apiPort, 'GET', `/api/servicevm/start?serviceId=${SERVICE}&join=false`, undefined, NONE);
  tt.equal(own.status, 200, own.body);
  tt.same((await agent.get(`/v1/instances/${own.json._id}`)).json.owners, [], 'owner-less');
  tt.equal(
    (await request(agent.apiPort, 'GET', `/api/servicevm/stop?instanceId=${own.json._id}`, undefined, NONE)).status,
    200,
    'stopped through the plain face',
  );
  tt.equal((await agent.get(`/v1/instances/${own.json._id}`)).status, 404, 'and gone');
  tt.same(await domainsUnder(agent.dataDir), [], 'no domain left');
});

t.test("an authorization that expires stops the device's instance, even across an agent restart", async (tt) => {
  // One minute: comfortably longer than the start, short enough to wait for.
  const carol = await pair('carol', { expiresInMinutes: 1 });
  tt.type(carol.json.expires_at, 'string');
  const started = await request(agent.apiPort, 'POST', '/v1/instances', { service_id: SERVICE, join: false }, as(carol.token));
  tt.equal(started.status, 201, started.body);
  const id = started.json.instance.id as string;
  tt.ok(Date.parse(carol.json.expires_at) > Date.now(), 'started before the authorization expired');

  // The timer lives in the agent: this one is gone, the next one re-arms it from the stored expiry date.
  await agent.stop();
  await agent.launch();
  tt.equal((await agent.get(`/v1/instances/${id}`)).json.state, 'ready', 'the restarted agent adopted the instance');
  await waitFor(async () => (await agent.get(`/v1/instances/${id}`)).status === 404, Date.parse(carol.json.expires_at) - Date.now() + 30_000);
  tt.pass('the instance was stopped when the authorization expired');
  expectError(tt, await request(agent.apiPort, 'GET', '/v1/services', undefined, as(carol.token)), 401, 'DEVICE_EXPIRED', 'carol afterwards');
  tt.same(await domainsUnder(agent.dataDir), [], 'no domain left');
  const listed = (await agent.get(`/v1/devices/${carol.id}`)).json;
  tt.equal(listed.standing, 'expired');
});

async function waitFor(check: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`not within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 250));
  }
}
