/**
 * The phone web page: plain files from agent/web (no framework, no build step), served from disk. The page itself
 * is `/`; its assets live under `/ui/`. Everything it shows comes from the /v1 face and the /v1/events WebSocket. It is
 * an installable web app: a manifest, SVG icons, and a service worker (sw.js) that keeps only the shell for offline use.
 */
import path from 'node:path';
import { CloudletError } from '../errors';
import { fileReply, textReply, type Face } from './routing';

// From dist/agent/src/api/ up to the repository (or installed package) root.
const WEB_DIR = path.resolve(__dirname, '../../../../agent/web');

/** The only files served, by name: nothing else in (or outside) the directory is reachable. */
const ASSETS: Record<string, string> = {
  'index.html': 'text/html; charset=utf-8',
  'app.js': 'text/javascript; charset=utf-8',
  'icon.svg': 'image/svg+xml',
  'icon-maskable.svg': 'image/svg+xml',
  'manifest.webmanifest': 'application/manifest+json',
  'sw.js': 'text/javascript; charset=utf-8',
};

/** The service worker lives with the assets but keeps the page at `/` offline: it may control the whole origin. */
const EXTRA_HEADERS: Record<string, Record<string, string>> = { 'sw.js': { 'Service-Worker-Allowed': '/' } };

function asset(name: string) {
  // Own keys only: `toString` and friends are not assets.
  const contentType = Object.hasOwn(ASSETS, name) ? ASSETS[name] : undefined;
  if (!contentType) throw new CloudletError('NOT_FOUND', `No page asset named ${name}`);
  // no-cache: phones revalidate, so an agent upgrade is seen at once; the files are small.
  const headers = { 'Content-Type': contentType, 'Cache-Control': 'no-cache', 'X-Content-Type-Options': 'nosniff', ...(EXTRA_HEADERS[name] ?? {}) };
  return fileReply(path.join(WEB_DIR, name), headers, false);
}

export function webFace(): Face {
  return {
    prefix: '/ui',
    routes: [
      { method: 'GET', path: '/', access: 'open', handle: () => asset('index.html') },
      { method: 'GET', path: '/ui/:name', access: 'open', handle: ({ params }) => asset(params.name!) },
    ],
    headAsGet: true,
    wrongMethod: 'method-not-allowed',
    errorReply: (error) => textReply(error.status, `${error.message}\n`),
  };
}
