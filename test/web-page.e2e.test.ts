// The phone web page in a real browser: Debian's headless Chromium driven by playwright-core, against the real agent
// on loopback, booting one real Service VM. What a person on a phone does: open the page, start the demo service,
// watch it become ready, follow its endpoint, download an app, stop the service.
import { createHash, randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { BrowserContext, Page } from 'playwright-core';
import t from 'tap';
import { ROOT, domainsUnder, testGuestDir, type AgentProcess } from './support/agent';
import { countTransferredBytes, phoneOnAgent, type PhoneOnAgent } from './support/browser';
import { cli } from './support/cli';

const SERVICE = 'org.cloudlet.demo.http';
const SCREENSHOT = path.join(ROOT, 'docs', 'web-page.png');

let agent: AgentProcess;
let scratch: string;
let browser: BrowserContext;
let page: Page;
let phone: PhoneOnAgent | undefined;
const apk = randomBytes(512 * 1024);

t.before(async () => {
  phone = await phoneOnAgent('22020-22029', 'cloudlet-web-');
  ({ agent, scratch, browser, page } = phone);
  const imported = await agent.post('/v1/services', { path: testGuestDir() });
  if (imported.status !== 201) throw new Error(imported.body);
  await writeFile(path.join(scratch, 'demo-client.apk'), apk);
  const added = await cli([
    'add-app',
    path.join(scratch, 'demo-client.apk'),
    '--service',
    SERVICE,
    '--name',
    'Demo client',
    '--version',
    '1.0',
    '--cloudlet',
    `127.0.0.1:${agent.apiPort}`,
  ]);
  if (added.code !== 0) throw new Error(added.stderr);
});
t.teardown(() => phone?.close());

t.test("an unpaired phone sees the services (the plain KD default lets it start them) and may pair with the operator's code", async (tt) => {
  await page.goto(`http://127.0.0.1:${agent.apiPort}/`, { waitUntil: 'networkidle' });
  tt.ok(await page.getByRole('heading', { name: 'Pair this phone' }).isVisible(), 'the pairing form shows');
  await page.locator(`li[data-service="${SERVICE}"]`).waitFor();
  tt.ok(await page.locator(`li[data-service="${SERVICE}"]`).getByRole('button', { name: 'Start' }).isEnabled(), 'services show, startable, before pairing');
  tt.ok(await page.getByRole('link', { name: /Download Demo client/ }).isVisible(), 'the (open) app catalog shows before pairing');
  const window = await agent.post('/v1/pairing', {});
  await page.getByLabel('Pairing code').fill(window.json.code);
  await page.getByLabel('Name of this phone').fill('test phone');
  await page.getByRole('button', { name: 'Pair' }).click();
  await page.getByRole('heading', { name: 'Pair this phone' }).waitFor({ state: 'hidden' });
  await page.locator(`li[data-service="${SERVICE}"]`).waitFor();
  tt.ok(
    await page
      .locator('#live')
      .textContent()
      .then((text) => /Paired as/.test(text ?? '')),
    'the form goes once paired',
  );
  const devices = (await agent.get('/v1/devices')).json.devices;
  tt.match(devices, [{ name: 'test phone', standing: 'active' }], 'the operator sees the phone');
});

t.test('the page lists what the cloudlet offers, small and without a framework', async (tt) => {
  const transferred = await countTransferredBytes(browser, page);
  // Paired: the token is in the browser's storage, so a reload goes straight to the services.
  await page.goto(`http://127.0.0.1:${agent.apiPort}/`, { waitUntil: 'networkidle' });
  const card = page.locator(`li[data-service="${SERVICE}"]`);
  await card.waitFor();
  tt.equal(await page.title(), 'Cloudlet');
  tt.equal(
    await page
      .getByRole('heading', { level: 2 })
      .allTextContents()
      .then((h) => h.join(',')),
    'Services,Apps',
  );
  tt.ok(await card.getByRole('button', { name: 'Start' }).isEnabled(), 'a Start button per service');
  tt.ok(await page.getByRole('link', { name: /Download Demo client/ }).isVisible(), 'the app, with an accessible download link');
  tt.ok(transferred.bytes > 8000 && transferred.bytes < 100 * 1024, `everything loaded weighs ${transferred.bytes} bytes (< 100 KB)`);
});

t.test('starting the demo service shows progress, then the endpoint, which serves the guest', async (tt) => {
  const card = page.locator(`li[data-service="${SERVICE}"]`);
  await card.getByRole('button', { name: 'Start' }).click();
  tt.ok(await card.getByRole('button', { name: 'Start' }).isDisabled(), 'Start is disabled while starting');
  // Launch progress arrives on the /v1/events WebSocket: the bar gets a value and the status names the phase.
  await card.locator('progress[value]:not([hidden])').waitFor({ timeout: 120000 });
  tt.match(await card.locator('.status').textContent(), /^(cloning|restoring|booting|waiting ready|ready)… \d+%$/, 'the phase and how far along');
  await card.locator('.status.ready').waitFor({ timeout: 180000 });
  tt.ok(await card.getByRole('button', { name: 'Start' }).isHidden(), 'a ready service offers Stop instead of Start');
  const instances = (await agent.get('/v1/instances')).json.instances;
  tt.equal(instances.length, 1, 'one instance runs');
  tt.equal(instances[0].state, 'ready');
  const endpoint = `127.0.0.1:${instances[0].host_port}`;
  tt.equal(await card.locator('.endpoint').first().textContent(), endpoint, 'the endpoint to connect to');
  await page.screenshot({ path: SCREENSHOT, fullPage: true });

  // A second client (the CLI) joins the shareable instance instead of booting another VM, then leaves.
  const joined = await cli(['start', SERVICE, '--cloudlet', `127.0.0.1:${agent.apiPort}`, '--json']);
  tt.equal(joined.code, 0, joined.stderr);
  tt.match(joined.json, { joined: true, instance: { id: instances[0].id }, endpoint: { port: instances[0].host_port } });
  const listed = await cli(['instances', '--cloudlet', `127.0.0.1:${agent.apiPort}`]);
  tt.match(listed.stdout, new RegExp(`${instances[0].id}\\s+${SERVICE.replace(/\./g, '\\.')}\\s+ready\\s+${instances[0].host_port}\\s+2`));
  const left = await cli(['stop', instances[0].id, '--cloudlet', `127.0.0.1:${agent.apiPort}`]);
  tt.equal(left.stdout.trim(), `released ${instances[0].id} (1 user(s) left)`);

  await card.getByRole('link', { name: `Open http://${endpoint}/` }).click();
  await page.waitForURL(`http://${endpoint}/`);
  tt.match(await page.textContent('body'), /hello from the cloudlet demo service/, 'the endpoint serves the Service VM');
  await page.goBack();
  await card.locator('.status.ready').waitFor();
});

t.test('an app downloads from the page with its exact bytes', async (tt) => {
  const [download] = await Promise.all([page.waitForEvent('download'), page.getByRole('link', { name: /Download Demo client/ }).click()]);
  tt.equal(download.suggestedFilename(), 'demo-client.apk');
  const saved = path.join(scratch, 'downloaded.apk');
  await download.saveAs(saved);
  tt.equal(
    createHash('sha256')
      .update(await readFile(saved))
      .digest('hex'),
    createHash('sha256').update(apk).digest('hex'),
  );
});

t.test('stopping from the page destroys the Service VM', async (tt) => {
  const card = page.locator(`li[data-service="${SERVICE}"]`);
  await card.getByRole('button', { name: 'Stop' }).click();
  await card.locator('button:not([disabled]):not([hidden])', { hasText: 'Start' }).waitFor({ timeout: 30000 });
  tt.equal(await card.locator('.status').textContent(), 'Stopped');
  tt.same((await agent.get('/v1/instances')).json.instances, []);
  tt.same(await domainsUnder(agent.dataDir), [], 'no domain left in libvirt');
});
