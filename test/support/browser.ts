// Debian's headless Chromium (never a downloaded browser) driven by playwright-core, with everything that would reach
// the network on its own (updates, sync, QUIC, background services) switched off, on a fresh profile.
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { AgentProcess } from './agent';

export const CHROMIUM = '/usr/bin/chromium';

/** A phone-sized browser on the profile directory `userDataDir` (the caller makes it fresh and deletes it). */
export function launchChromium(userDataDir: string): Promise<BrowserContext> {
  return chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 390, height: 844 },
    deviceScaleFactor: 2,
    isMobile: true,
    hasTouch: true,
    acceptDownloads: true,
  });
}

/**
 * Counts the bytes `page` receives over the network from now on, as on a first visit (headers and bodies as they came over the wire,
 * compressed or not), from Chromium's own accounting; read `bytes` when the page has settled.
 */
export async function countTransferredBytes(context: BrowserContext, page: Page): Promise<{ bytes: number }> {
  const counter = { bytes: 0 };
  const cdp = await context.newCDPSession(page);
  await cdp.send('Network.enable');
  // What a first visit transfers: the page's service worker (which would answer the shell from its cache) is bypassed.
  await cdp.send('Network.setBypassServiceWorker', { bypass: true });
  cdp.on('Network.loadingFinished', (event) => {
    counter.bytes += event.encodedDataLength;
  });
  return counter;
}

/** A real agent on loopback (no discovery, MQTT on loopback only) and a phone-sized Chromium on a fresh profile. */
export interface PhoneOnAgent {
  agent: AgentProcess;
  scratch: string;
  browser: BrowserContext;
  page: Page;
  close(): Promise<void>;
}

export async function phoneOnAgent(portRange: string, prefix: string): Promise<PhoneOnAgent> {
  const agent = await AgentProcess.start({ portRange, env: { CLOUDLET_DISCOVERY: '0', CLOUDLET_MQTT_HOST: '127.0.0.1', CLOUDLET_MQTT_PORT: '0' } });
  const scratch = await mkdtemp(path.join(os.tmpdir(), prefix));
  const browser = await launchChromium(path.join(scratch, 'profile'));
  const page = browser.pages()[0] ?? (await browser.newPage());
  const close = async () => {
    await browser.close();
    await agent.dispose();
    await rm(scratch, { recursive: true, force: true });
  };
  return { agent, scratch, browser, page, close };
}
