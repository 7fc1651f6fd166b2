// The phone page as an installable web app, in Debian's headless Chromium against the real agent on loopback (no VM):
// Chromium itself finds it installable (manifest, icons, service worker), its shell opens without the network, and
// the service worker keeps nothing but the shell: no API answer is ever stored. Forward ports 27430-27439.
import type { BrowserContext, Page } from 'playwright-core';
import t from 'tap';
import { request, type AgentProcess } from './support/agent';
import { phoneOnAgent, type PhoneOnAgent } from './support/browser';

let agent: AgentProcess;
let browser: BrowserContext;
let page: Page;
let phone: PhoneOnAgent | undefined;

t.before(async () => {
  phone = await phoneOnAgent('27430-27439', 'cloudlet-web-app-');
  ({ agent, browser, page } = phone);
});
t.teardown(() => phone?.close());

t.test('the manifest and its icons are served, and Chromium finds the page installable', async (tt) => {
  const manifest = await request(agent.apiPort, 'GET', '/ui/manifest.webmanifest', undefined, { authorization: '' });
  tt.equal(manifest.status, 200);
  tt.equal(manifest.headers['content-type'], 'application/manifest+json');
  tt.match(manifest.json, { name: 'Cloudlet', start_url: '/', scope: '/', display: 'standalone' });
  for (const icon of manifest.json.icons as Array<{ src: string; type: string }>) {
    const answer = await request(agent.apiPort, 'GET', icon.src, undefined, { authorization: '' });
    tt.equal(answer.status, 200, `${icon.src} is served`);
    tt.equal(answer.headers['content-type'], icon.type, `${icon.src} as ${icon.type}`);
    tt.match(answer.body, /^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg"/, `${icon.src}: an SVG written as text`);
  }
  await page.goto(`http://127.0.0.1:${agent.apiPort}/`, { waitUntil: 'networkidle' });
  await page.evaluate('navigator.serviceWorker.ready.then(() => true)');
  const cdp = await browser.newCDPSession(page);
  const { installabilityErrors } = (await cdp.send('Page.getInstallabilityErrors')) as { installabilityErrors: unknown[] };
  tt.same(installabilityErrors, [], 'no installability error');
  const { url } = (await cdp.send('Page.getAppManifest')) as { url: string };
  tt.equal(url, `http://127.0.0.1:${agent.apiPort}/ui/manifest.webmanifest`);
});

t.test('the shell opens offline, and the service worker keeps no API answer', async (tt) => {
  await page.goto(`http://127.0.0.1:${agent.apiPort}/`, { waitUntil: 'networkidle' });
  tt.ok(await page.evaluate('navigator.serviceWorker.controller !== null'), 'the service worker controls the page');
  // The page called the API (system, apps) while online: none of it may have been kept.
  const kept = await page.evaluate(`(async () => {
    const urls = [];
    for (const name of await caches.keys()) for (const req of await (await caches.open(name)).keys()) urls.push(new URL(req.url).pathname);
    return urls.sort();
  })()`);
  tt.same(kept, ['/', '/ui/app.js', '/ui/icon-maskable.svg', '/ui/icon.svg', '/ui/manifest.webmanifest'], 'only the shell is kept');

  await browser.setOffline(true);
  try {
    await page.reload({ waitUntil: 'load' });
    tt.equal(await page.title(), 'Cloudlet', 'the page opens without the network');
    tt.ok(await page.getByRole('heading', { name: 'Cloudlet', level: 1 }).isVisible(), 'its shell is drawn');
    await page.locator('#apps-empty.error').waitFor();
    tt.match(await page.locator('#apps-empty').textContent(), /did not answer/, 'and it says the cloudlet does not answer, rather than showing old answers');
  } finally {
    await browser.setOffline(false);
  }
});

t.test('the service worker may control the page at / although it is served under /ui/', async (tt) => {
  const sw = await request(agent.apiPort, 'GET', '/ui/sw.js', undefined, { authorization: '' });
  tt.equal(sw.status, 200);
  tt.equal(sw.headers['service-worker-allowed'], '/');
  tt.equal(sw.headers['cache-control'], 'no-cache', 'revalidated, so an agent upgrade replaces it');
});
