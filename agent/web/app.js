// The phone page: lists the cloudlet's services and apps from /v1, starts and stops Service VMs, and follows their
// progress on the /v1/events WebSocket. Plain DOM, no framework: it has to load fast over weak Wi-Fi.
'use strict';

const $ = (id) => document.getElementById(id);
const serviceCards = new Map(); // service id -> {status, progress, endpoint, stop, start}
const instances = new Map(); // instance id -> instance (from the events stream)
const starting = new Set(); // service ids with a start in flight

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? '' : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// This phone's device token from pairing; kept in the browser (docs/security.md says what that means).
const TOKEN_KEY = 'cloudlet.token';
const token = () => localStorage.getItem(TOKEN_KEY);

class ApiError extends Error {
  constructor(status, json) {
    super((json && json.message) || `HTTP ${status}`);
    this.status = status;
    this.code = json && json.code;
  }
}

async function api(method, path, body) {
  const headers = body ? { 'Content-Type': 'application/json' } : {};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const res = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  const json = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) throw new ApiError(res.status, json);
  return json;
}

/** Not (or no longer) paired: a revoked or expired token is forgotten, and the pairing form shown. */
function showPairing(reason) {
  localStorage.removeItem(TOKEN_KEY);
  $('pairing').hidden = false;
  $('services-empty').className = 'empty';
  $('services-empty').textContent = 'Pair this phone to see and start services.';
  if (reason) $('pair-status').textContent = reason;
}

$('pair-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  $('pair-status').className = 'status';
  $('pair-status').textContent = 'Pairing…';
  try {
    const paired = await api('POST', '/v1/pairing/claim', { code: $('pair-code').value.trim(), name: $('pair-name').value.trim() });
    localStorage.setItem(TOKEN_KEY, paired.token);
    $('pairing').hidden = true;
    $('pair-status').textContent = '';
    announce(`Paired as ${paired.device_id}`);
    await loadServices();
  } catch (err) {
    $('pair-status').className = 'status error';
    $('pair-status').textContent = `Could not pair: ${err.message}`;
  }
});

function announce(text) {
  $('live').textContent = text;
}

function formatBytes(n) {
  return n < 1024 * 1024 ? `${Math.max(1, Math.round(n / 1024))} KB` : `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function renderServices(services) {
  const list = $('services');
  list.replaceChildren();
  $('services-empty').textContent = services.length ? '' : 'No services are offered yet.';
  for (const s of services) {
    const m = s.manifest || {};
    const headingId = `svc-${s.id}`;
    const card = {
      status: el('p', { class: 'status', 'aria-live': 'polite' }),
      progress: el('progress', { max: '100', value: '0', hidden: true, 'aria-label': `Start progress of ${m.description || s.id}` }),
      endpoint: el('div', { hidden: true }),
      start: el('button', { type: 'button', onclick: () => start(s.id), 'aria-describedby': headingId }, 'Start'),
      stop: el('button', { type: 'button', class: 'secondary', hidden: true, 'aria-describedby': headingId }, 'Stop'),
      // Hands the running VM to the best paired cloudlet that holds the service (docs/handoff.md).
      move: el('button', { type: 'button', class: 'secondary', hidden: true, 'aria-describedby': headingId }, 'Move'),
    };
    serviceCards.set(s.id, card);
    list.append(el('li', { class: 'card', 'data-service': s.id },
      el('div', { class: 'row' },
        el('div', { class: 'grow' }, el('h3', { id: headingId }, m.description || s.id), el('div', { class: 'meta' }, `${s.id} · version ${m.version || '?'}`)),
        card.start, card.move, card.stop),
      card.progress, card.status, card.endpoint));
  }
  refreshServiceStates();
}

function renderApps(apps) {
  const list = $('apps');
  list.replaceChildren();
  $('apps-empty').textContent = apps.length ? '' : 'No apps are offered yet.';
  for (const a of apps) {
    list.append(el('li', { class: 'card' },
      el('div', { class: 'row' },
        el('div', { class: 'grow' },
          el('h3', {}, a.name),
          el('div', { class: 'meta' }, `${a.kind === 'android' ? 'Android app' : 'Web app'} · version ${a.version || '?'} · ${formatBytes(a.size)} · for ${a.service_id}`),
          a.description ? el('div', { class: 'meta' }, a.description) : null),
        el('a', { class: 'button', href: a.download, download: a.file_name, 'aria-label': `Download ${a.name} (${formatBytes(a.size)})` }, 'Download'))));
  }
}

/** Shows, on each service card, its ready instance (endpoint and Stop) or that it is starting. */
function refreshServiceStates() {
  for (const [serviceId, card] of serviceCards) {
    const mine = [...instances.values()].filter((i) => i.service_id === serviceId);
    const ready = mine.find((i) => i.state === 'ready');
    const stopping = mine.some((i) => i.state === 'stopping');
    const busy = starting.has(serviceId) || stopping || mine.some((i) => i.state === 'starting');
    card.start.disabled = busy;
    card.start.hidden = Boolean(ready);
    card.stop.hidden = !ready;
    card.move.hidden = !ready;
    if (ready) {
      card.progress.hidden = true;
      card.status.className = 'status ready';
      card.status.textContent = 'Ready';
      // A forward bound to all interfaces is reached at the address this page was loaded from.
      const wildcard = ['0.0.0.0', '::', ''].includes(ready.bind_address);
      showEndpoint(card, { address: wildcard ? location.hostname : ready.bind_address, port: ready.host_port });
      card.stop.onclick = () => stop(serviceId, ready.id);
      card.move.onclick = () => handOff(serviceId, ready.id);
    } else {
      card.endpoint.hidden = true;
      if (stopping) {
        card.status.className = 'status';
        card.status.textContent = 'Stopping…';
      } else if (!busy && card.status.className.includes('ready')) {
        card.status.className = 'status';
        card.status.textContent = 'Stopped';
      }
    }
  }
}

function showEndpoint(card, endpoint) {
  const url = `http://${endpoint.address.includes(':') ? `[${endpoint.address}]` : endpoint.address}:${endpoint.port}/`;
  card.endpoint.replaceChildren(
    el('p', {}, 'Connect to ', el('span', { class: 'endpoint' }, `${endpoint.address}:${endpoint.port}`)),
    el('a', { href: url, class: 'endpoint-link' }, `Open ${url}`));
  card.endpoint.hidden = false;
}

function showProgress(serviceId, phase, percent) {
  const card = serviceCards.get(serviceId);
  if (!card || !starting.has(serviceId)) return;
  card.progress.hidden = false;
  card.progress.value = percent;
  card.status.className = 'status';
  card.status.textContent = `${phase.replace('-', ' ')}… ${Math.round(percent)}%`;
}

async function start(serviceId) {
  const card = serviceCards.get(serviceId);
  starting.add(serviceId);
  card.status.className = 'status';
  card.status.textContent = 'Starting…';
  card.progress.hidden = false;
  card.progress.removeAttribute('value'); // indeterminate until the first progress event
  refreshServiceStates();
  try {
    // join: a shareable service that is already running is shared instead of starting another VM.
    const result = await api('POST', '/v1/instances', { service_id: serviceId, join: true });
    instances.set(result.instance.id, result.instance);
    starting.delete(serviceId);
    refreshServiceStates();
    showEndpoint(card, result.endpoint);
    announce(`${serviceId} is ready at ${result.endpoint.address}:${result.endpoint.port}`);
  } catch (err) {
    starting.delete(serviceId);
    card.progress.hidden = true;
    card.status.className = 'status error';
    card.status.textContent = `Could not start: ${err.message}`;
    refreshServiceStates();
  }
}

async function stop(serviceId, instanceId) {
  const card = serviceCards.get(serviceId);
  card.stop.disabled = true;
  try {
    const result = await api('DELETE', `/v1/instances/${encodeURIComponent(instanceId)}`);
    // Released by this phone either way; others may still share it (destroyed: false).
    instances.delete(instanceId);
    card.status.className = 'status';
    card.status.textContent = result.destroyed ? 'Stopped' : 'Released (others still use it)';
    refreshServiceStates();
  } catch (err) {
    card.status.className = 'status error';
    card.status.textContent = `Could not stop: ${err.message}`;
  } finally {
    card.stop.disabled = false;
  }
}

async function handOff(serviceId, instanceId) {
  const card = serviceCards.get(serviceId);
  card.move.disabled = true;
  card.status.className = 'status';
  card.status.textContent = 'Moving to another cloudlet; it serves while it moves…';
  try {
    const result = await api('POST', `/v1/instances/${encodeURIComponent(instanceId)}/handoff`, { target: 'auto' });
    showMoved(serviceId, instanceId, result.moved_to);
  } catch (err) {
    card.status.className = 'status error';
    card.status.textContent = `Could not move it (it runs on here): ${err.message}`;
  } finally {
    card.move.disabled = false;
  }
}

/** The instance runs at another cloudlet now: its new endpoint, on the service's card. */
function showMoved(serviceId, instanceId, to) {
  instances.delete(instanceId);
  refreshServiceStates();
  const card = serviceCards.get(serviceId);
  if (!card) return;
  card.status.className = 'status';
  card.status.textContent = `Moved to ${to.name}`;
  showEndpoint(card, to);
}

/** Live state from /v1/events; without it (an old agent, a proxy) the page still works from the start replies. */
function followEvents(retryMs) {
  let ws;
  if (!token()) return;
  try {
    // A browser cannot set headers on a WebSocket: the token goes as a subprotocol entry.
    ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/events`, ['cloudlet.events', `bearer.${token()}`]);
  } catch {
    return;
  }
  ws.onopen = () => { retryMs = 1000; };
  ws.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.type === 'snapshot') {
      instances.clear();
      for (const i of event.instances) instances.set(i.id, i);
    } else if (event.type === 'instance') {
      if (event.state === 'moved') return showMoved(event.instance.service_id, event.instance.id, event.moved_to);
      if (event.state === 'stopped' || event.state === 'crashed') instances.delete(event.instance.id);
      else instances.set(event.instance.id, event.instance);
    } else if (event.type === 'progress') {
      showProgress(event.service_id, event.phase, event.percent);
      return;
    }
    refreshServiceStates();
  };
  ws.onclose = () => setTimeout(() => followEvents(Math.min(retryMs * 2, 30000)), retryMs);
}

const LOOPBACK = /^(127\.\d+\.\d+\.\d+|localhost|\[::1\])$/;

/**
 * Over plain HTTP from another machine the cloudlet refuses tokens and pairing codes (they would cross the network in
 * clear): the page sends the phone to the HTTPS address, with the certificate's fingerprint to compare.
 */
async function showHttpsRequired() {
  // Without the token: it must not travel here.
  const system = await (await fetch('/v1/system')).json();
  const url = `https://${location.hostname}:${system.tls_port}/`;
  $('services-empty').className = 'empty';
  $('services-empty').replaceChildren('This connection is not encrypted. To pair this phone and use services, open ',
    el('a', { href: url }, url), ` and accept the cloudlet's certificate if its SHA-256 fingerprint is ${system.tls_fingerprint}.`);
}

/**
 * The apps are open to anyone. The services too where the cloudlet lets unpaired phones start them (as the plain
 * KD face does): then this phone starts them as any KD client could, and pairing adds only its own credential.
 */
async function loadServices() {
  if (!token()) {
    try {
      renderServices((await api('GET', '/v1/services')).services);
      // Pairing sends a secret: offered where it may travel (HTTPS, or this machine).
      $('pairing').hidden = location.protocol === 'http:' && !LOOPBACK.test(location.hostname);
      return;
    } catch (err) {
      if (err.status !== 401) throw err;
    }
  }
  if (location.protocol === 'http:' && !LOOPBACK.test(location.hostname)) return showHttpsRequired();
  if (!token()) return showPairing();
  try {
    renderServices((await api('GET', '/v1/services')).services);
    followEvents(1000);
  } catch (err) {
    if (err.status !== 401) throw err;
    // The pairing ended (revoked, expired, forgotten): the token goes, and the services may still be open to this phone.
    showPairing(err.code === 'UNAUTHENTICATED' ? '' : `${err.message}: pair again.`);
    return loadServices();
  }
}

function failed(what) {
  return (err) => {
    $(what).textContent = `The cloudlet did not answer: ${err.message}`;
    $(what).className = 'error';
  };
}

/** The footer tells the operator which optional parts are off (/v1/health, open to all), why, and what to do. */
async function showPartsOff() {
  const health = await (await fetch('/v1/health')).json();
  const off = (health.parts || []).filter((p) => p.state === 'off');
  $('parts-off').replaceChildren(...off.map((p) => el('li', { 'data-part': p.part }, el('strong', {}, p.part), `: ${p.reason}. To fix: ${p.fix}`)));
  $('parts').hidden = off.length === 0;
}

showPartsOff().catch(() => {});
loadServices().catch(failed('services-empty'));
api('GET', '/v1/apps').then((apps) => renderApps(apps.apps), failed('apps-empty'));
// Installable, and its shell opens offline (ui/sw.js keeps only the shell, never an API answer).
if ('serviceWorker' in navigator) navigator.serviceWorker.register('/ui/sw.js', { scope: '/' }).catch(() => {});
