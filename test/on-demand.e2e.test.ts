// On-Demand VM Provisioning, end to end: the real agent process, real libvirtd + QEMU (TCG) guests, real sockets.
// The test guest is the Base VM; recipes turn it into services at request time through a cloud-init config drive.
// One agent serves the whole file; the subtests run in order and each leaves no instance behind.
import t, { Test } from 'tap';
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { AgentProcess, domainsUnder, fetchText, request, testGuestDir } from './support/agent';

let agent: AgentProcess;

t.before(async () => {
  agent = await AgentProcess.start({ portRange: '21800-21899' });
});
t.teardown(async () => {
  await agent.dispose();
});

/** A recipe that installs a small HTTP service (a page and a CGI program) into the busybox base. */
const hello = (overrides: Record<string, unknown> = {}) => ({
  format: 1,
  service_id: 'org.example.hello',
  version: '1',
  base: 'busybox',
  port: 8080,
  readiness: { type: 'http', path: '/', timeout_ms: 60000 },
  files: [
    { path: '/srv/www/index.html', content: 'hello from a recipe\n' },
    {
      path: '/srv/www/cgi-bin/uptime',
      content: Buffer.from("#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\ncat /proc/uptime\n").toString('base64'),
      encoding: 'base64',
      mode: '0755',
    },
  ],
  script: '#!/bin/sh\nset -e\necho "provisioned by the recipe" >> /srv/www/index.html\necho "recipe script ran"\n',
  ...overrides,
});

async function assertNothingLeft(tt: Test, what: string) {
  tt.same(await domainsUnder(agent.dataDir), [], `${what}: no domain left in libvirt`);
  tt.same(await readdir(path.join(agent.dataDir, 'instances')), [], `${what}: no clone or config drive left`);
  tt.same(await readdir(path.join(agent.dataDir, 'tmp')), [], `${what}: no staging leftovers`);
  tt.same((await agent.get('/v1/instances')).json.instances, [], `${what}: no instance listed`);
}

t.test('a directory with a qcow2 disk, a kernel and a manifest is imported as a Base VM named by its digest', async (tt) => {
  const r = await agent.post('/v1/bases', { path: testGuestDir(), name: 'busybox' });
  tt.equal(r.status, 201, r.body);
  tt.match(r.json.digest, /^[0-9a-f]{64}$/);
  tt.equal(r.json.name, 'busybox');
  const again = await agent.post('/v1/bases', { path: testGuestDir(), name: 'busybox' });
  tt.equal(again.json.digest, r.json.digest, 'importing the same bytes again is the same base');
  tt.same(
    (await agent.get('/v1/bases')).json.bases.map((b: { name: string }) => b.name),
    ['busybox'],
  );
  tt.equal((await agent.get(`/v1/bases/${r.json.digest}`)).json.name, 'busybox', 'found by digest as well as by name');
});

t.test('bad recipes are refused with a clear 4xx and leave nothing stored', async (tt) => {
  const cases: Array<[string, unknown, number, string]> = [
    ['no script', { ...hello(), script: undefined }, 422, 'INVALID_RECIPE'],
    ['a script without an interpreter line', hello({ script: 'echo hi' }), 422, 'INVALID_RECIPE'],
    ['a file path escaping with ..', hello({ files: [{ path: '/srv/../etc/passwd', content: 'x' }] }), 422, 'INVALID_RECIPE'],
    ['a relative file path', hello({ files: [{ path: 'srv/www/index.html', content: 'x' }] }), 422, 'INVALID_RECIPE'],
    ['files over the size limit', hello({ files: [{ path: '/srv/big', content: 'x'.repeat(600 << 10) }] }), 422, 'INVALID_RECIPE'],
    ['an unknown base', hello({ base: 'no-such-base' }), 404, 'BASE_NOT_FOUND'],
    ['a body over the upload limit', hello({ description: 'x'.repeat(1100 << 10) }), 413, 'PAYLOAD_TOO_LARGE'],
    ['a version carrying a newline and a shell command', hello({ version: '1\nreboot -f' }), 422, 'INVALID_RECIPE'],
  ];
  for (const [name, recipe, status, code] of cases) {
    const r = await agent.post('/v1/recipes', recipe);
    tt.equal(r.status, status, `${name}: ${status}`);
    tt.equal(r.json?.code, code, `${name}: ${code}`);
    tt.type(r.json?.message, 'string');
  }
  tt.same((await agent.get('/v1/recipes')).json.recipes, [], 'no refused recipe was stored');
  tt.same(await readdir(path.join(agent.dataDir, 'recipes')), []);
  tt.equal((await agent.post('/v1/recipes/no.such.recipe/instances')).json.code, 'RECIPE_NOT_FOUND');
  await assertNothingLeft(tt, 'after bad recipes');
});

let onDemandMs = 0;

t.test('a recipe provisions the base on demand: the endpoint answers with the recipe content', async (tt) => {
  const stored = await agent.post('/v1/recipes', hello());
  tt.equal(stored.status, 201, stored.body);
  tt.match(stored.json.digest, /^[0-9a-f]{64}$/);

  const start = await agent.post('/v1/recipes/org.example.hello/instances');
  tt.equal(start.status, 201, start.body);
  tt.equal(start.json.instance.mechanism, 'on-demand');
  tt.equal(start.json.instance.state, 'ready');
  onDemandMs = start.json.timings.total_ms;
  const port = start.json.endpoint.port;
  tt.equal(await fetchText(port), 'hello from a recipe\nprovisioned by the recipe\n', 'the files and the script both shaped the service');
  tt.match(await fetchText(port, '/cgi-bin/uptime'), /^\d+\.\d+ \d+\.\d+/, 'the installed CGI program runs in the guest');

  const id = start.json.instance.id;
  const console = await agent.get(`/v1/instances/${id}/console`);
  tt.equal(console.status, 200);
  tt.match(console.body, /recipe script ran/, 'the script output is in the console log');
  tt.match(console.body, /CLOUDLET-PROVISIONED/);
  tt.equal((await agent.get(`/v1/instances/${id}/console?bytes=0`)).status, 400);

  tt.equal((await agent.delete(`/v1/instances/${id}`)).json.destroyed, true);
  await assertNothingLeft(tt, 'after stop');
});

t.test('the cached result of a recipe is what later requests start, as a Cached VM', async (tt) => {
  const cached = await agent.post('/v1/recipes/org.example.hello/cache');
  tt.equal(cached.status, 200, cached.body);
  tt.equal(cached.json.id, 'org.example.hello');
  tt.ok(cached.json.manifest.state, 'the result has a memory state');
  tt.notMatch(cached.json.manifest.boot.cmdline, /ds=nocloud/, 'a cold boot of the result would not wait for a config drive');

  const start = await agent.post('/v1/recipes/org.example.hello/instances');
  tt.equal(start.status, 201, start.body);
  tt.equal(start.json.instance.mechanism, 'cached-vm');
  tt.equal(start.json.instance.launch, 'memory-state');
  tt.equal(await fetchText(start.json.endpoint.port), 'hello from a recipe\nprovisioned by the recipe\n');
  tt.comment(`on demand ${onDemandMs} ms, cached ${start.json.timings.total_ms} ms (measured in bench/on-demand.ts)`);
  await agent.delete(`/v1/instances/${start.json.instance.id}`);

  const changed = await agent.post('/v1/recipes', hello({ version: '2' }));
  tt.equal(changed.status, 201);
  const again = await agent.post('/v1/recipes/org.example.hello/instances');
  tt.equal(again.json.instance?.mechanism, 'on-demand', 'a changed recipe is provisioned again, not served from the old result');
  await agent.delete(`/v1/instances/${again.json.instance.id}`);
  await agent.delete('/v1/services/org.example.hello');
  await assertNothingLeft(tt, 'after the cached start');
});

t.test('a failing provisioning script fails cleanly, with the console tail in the error', async (tt) => {
  await agent.post('/v1/recipes', hello({ service_id: 'org.example.broken', script: '#!/bin/sh\necho "cannot configure the widget" >&2\nexit 3\n' }));
  const r = await agent.post('/v1/recipes/org.example.broken/instances');
  tt.equal(r.status, 500, r.body);
  tt.equal(r.json.code, 'PROVISIONING_FAILED');
  tt.match(r.json.message, /failed in the guest/);
  tt.match(r.json.details.console_tail, /cannot configure the widget/, 'what the script said');
  tt.match(r.json.details.console_tail, /CLOUDLET-PROVISIONING-FAILED exit status 3/);
  await assertNothingLeft(tt, 'after the failure');
});

t.test("a failed launch's console tail goes only to the operator, who may read consoles; a phone gets the error without it", async (tt) => {
  const window = await agent.post('/v1/pairing');
  const claim = await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: window.json.code, name: 'provisioning phone' }, { authorization: '' });
  tt.equal(claim.status, 201, claim.body);
  const phone = { authorization: `Bearer ${claim.json.token}` };
  const r = await request(agent.apiPort, 'POST', '/v1/recipes/org.example.broken/instances', {}, phone);
  tt.equal(r.status, 500, r.body);
  tt.equal(r.json.code, 'PROVISIONING_FAILED');
  tt.match(r.json.message, /failed in the guest/);
  tt.equal(r.json.details?.console_tail, undefined, 'no console output for a caller that may not read the console');
  tt.same(r.json.details, { recipe_id: 'org.example.broken' }, 'the other details stay');
  tt.notMatch(r.body, /cannot configure the widget/);
  await assertNothingLeft(tt, 'after the failure');
});

t.test('a provisioned service that never becomes ready times out cleanly, with the console tail', async (tt) => {
  await agent.post('/v1/recipes', hello({ service_id: 'org.example.never', readiness: { type: 'http', path: '/no-such-page', timeout_ms: 30000 } }));
  const r = await agent.post('/v1/recipes/org.example.never/instances');
  tt.equal(r.status, 504, r.body);
  tt.equal(r.json.code, 'READINESS_TIMEOUT');
  tt.match(r.json.details.console_tail, /CLOUDLET-READY/, 'the guest itself came up: the console shows it');
  await assertNothingLeft(tt, 'after the timeout');
});

t.test('stored recipes can be read back and removed', async (tt) => {
  const shown = await agent.get('/v1/recipes/org.example.hello');
  tt.equal(shown.json.recipe.files[1].mode, '0755');
  tt.equal(Buffer.from(shown.json.recipe.files[0].content, 'base64').toString(), 'hello from a recipe\n');
  for (const id of ['org.example.hello', 'org.example.broken', 'org.example.never']) tt.equal((await agent.delete(`/v1/recipes/${id}`)).status, 204);
  tt.same((await agent.get('/v1/recipes')).json.recipes, []);
});
