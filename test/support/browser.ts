// Debian's headless Chromium (never a downloaded browser) driven by playwright-core, with everything that would reach
// the network on its own (updates, sync, QUIC, background services) switched off, on a fresh profile.
import { chromium, type BrowserContext, type Page } from 'playwright-core';

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
 * Counts the bytes `page` receives over the network from now on (headers and bodies as they came over the wire,
 * compressed or not), from Chromium's own accounting; read `bytes` when the page has settled.
 */
export async function countTransferredBytes(context: BrowserContext, page: Page): Promise<{ bytes: number }> {
  const counter = { bytes: 0 };
  const cdp = await context.newCDPSession(page);
  await cdp.send('Network.enable');
  cdp.on('Network.loadingFinished', (event) => {
    counter.bytes += event.encodedDataLength;
  });
  return counter;
}
