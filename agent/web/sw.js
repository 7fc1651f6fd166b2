// The phone page's service worker: it keeps the page's shell (its HTML, script, manifest and icons) so that the page
// opens without the network, and nothing else. Every API answer (/v1, /api) and every other request goes to the
// network untouched: what the cloudlet offers, and the phone's own instances, are never shown stale or stored.
'use strict';

const SHELL_CACHE = 'cloudlet-shell-v1';
const SHELL = ['/', '/ui/app.js', '/ui/manifest.webmanifest', '/ui/icon.svg', '/ui/icon-maskable.svg'];

self.addEventListener('install', (event) => {
  event.waitUntil(
    caches
      .open(SHELL_CACHE)
      .then((cache) => cache.addAll(SHELL))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener('activate', (event) => {
  // Older shells go; this worker takes over the open page at once.
  event.waitUntil(
    caches
      .keys()
      .then((names) => Promise.all(names.filter((name) => name !== SHELL_CACHE).map((name) => caches.delete(name))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener('fetch', (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== 'GET' || url.origin !== self.location.origin || !SHELL.includes(url.pathname)) return;
  // Network first, so an agent upgrade shows at once (the files are no-cache); the kept copy only when it is away.
  event.respondWith(
    fetch(event.request)
      .then((answer) => {
        if (answer.ok) {
          const copy = answer.clone();
          event.waitUntil(caches.open(SHELL_CACHE).then((cache) => cache.put(url.pathname, copy)));
        }
        return answer;
      })
      .catch(() => caches.match(url.pathname).then((kept) => kept || Response.error())),
  );
});
