// No client holds the box's launch slots, end to end on a real agent with two slots: a phone dripping two overlay
// uploads (real HTTP, real synthesis) does not delay another phone's Cached VM start, and an upload dripping below
// limits.bodyMinBytesPerSecond is cut with 408 REQUEST_TIMEOUT, keeping what arrived, so the phone can resume.
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { AgentProcess, domainsUnder, request, testGuestDir } from './support/agent';
import { EventsSocket } from './support/listeners';
import { createOverlay, prepareSynthesis, sendUploadBytes } from './support/synthesis-fixture';

const CACHED = 'org.cloudlet.demo.http';
const SYNTHESIZED = 'org.cloudlet.test.dripped';
/** Bytes sent at once before a drip starts: the overlay's header, manifest and first frames, so its synthesis begins. */
const HEAD_BYTES = 64 * 1024;
const MIN_RATE = 64;
/**
 * The slow phone's pace: above the agent's minimum, and above uWS's own (it cuts a request body that brings less than
 * 16 KiB/s over its 10 s timeout, unanswered), yet the overlay would take about a minute.
 */
const SLOW_BYTES_PER_S = 20 * 1024;
const RATE_WINDOW_MS = 3000;

let agent: AgentProcess;
let scratch: string;
let overlay: Buffer;

t.before(async () => {
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-drip-'));
  agent = await AgentProcess.start({
    portRange: '23330-23349',
    env: { CLOUDLET_MAX_LAUNCHES: '2', CLOUDLET_BODY_MIN_RATE: String(MIN_RATE), CLOUDLET_BODY_RATE_WINDOW_MS: String(RATE_WINDOW_MS) },
  });
  const fixture = await prepareSynthesis(agent, scratch, { baseName: 'drip-base', serviceId: SYNTHESIZED, content: 'dripped' });
  await createOverlay(fixture, fixture.baseDir, path.join(scratch, 'overlay.bin'));
  overlay = await readFile(path.join(scratch, 'overlay.bin'));
  const imported = await agent.post('/v1/services', { path: testGuestDir() });
  if (imported.status !== 201) throw new Error(imported.body);
});

t.teardown(async () => {
  await agent?.dispose();
  await rm(scratch, { recursive: true, force: true });
});

async function pair(id: string): Promise<Record<string, string>> {
  const window = await agent.post('/v1/pairing', {});
  const claim = await agent.post('/v1/pairing/claim', { code: window.json.code, device_id: id, name: `Phone ${id}` });
  if (claim.status !== 201) throw new Error(`claim: ${claim.body}`);
  return { authorization: `Bearer ${claim.json.token}` };
}

/**
 * A phone sending an upload's bytes from byte 0: HEAD_BYTES at once, then `dripBytes` every second, until stop() or
 * the agent answers. `answer` resolves with what the agent said (null when the phone stopped first).
 */
function drip(id: string, auth: Record<string, string>, dripBytes: number) {
  const socket = net.connect(agent.apiPort, '127.0.0.1');
  let response = '';
  let sent = 0;
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  let answered: unknown = null;
  const send = (n: number) => {
    socket.write(overlay.subarray(sent, Math.min(sent + n, overlay.length - 1)));
    sent = Math.min(sent + n, overlay.length - 1);
  };
  const answer = new Promise<{ status: number; json: any } | null>((resolve) => {
    socket.on('data', (d) => {
      response += d.toString();
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      clearInterval(timer);
      if (stopped) return resolve(null);
      const [head, body] = response.split('\r\n\r\n');
      answered = { status: Number(/^HTTP\/1\.1 (\d+)/.exec(head ?? '')?.[1]), json: JSON.parse(body || 'null') };
      return resolve(answered as { status: number; json: any });
    });
  });
  socket.on('connect', () => {
    socket.write(
      `POST /v1/synthesis/uploads/${id}?offset=0 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n` +
        `authorization: ${auth.authorization}\r\nContent-Length: ${overlay.length}\r\n\r\n`,
    );
    send(HEAD_BYTES);
    // Never the last byte: the upload stays unfinished for as long as the phone drips.
    timer = setInterval(() => send(dripBytes), 1000);
  });
  return {
    answer,
    get open() {
      return !socket.destroyed;
    },
    /** What the agent answered, if it did. */
    get answered() {
      return answered;
    },
    stop() {
      stopped = true;
      clearInterval(timer);
      socket.destroy();
    },
  };
}

async function newUpload(auth: Record<string, string>): Promise<string> {
  const created = await request(agent.apiPort, 'POST', '/v1/synthesis/uploads', { bytes: overlay.length }, auth);
  if (created.status !== 201) throw new Error(created.body);
  return created.json.id;
}

t.test("a phone dripping two uploads does not delay another phone's Cached VM start", async (tt) => {
  const dripper = await pair('phone-dripper');
  const other = await pair('phone-other');
  const events = await EventsSocket.connect(agent.apiPort);
  tt.teardown(() => events.close());
  // A slow phone, not one the agent cuts: it would still be sending long after the other phone's start.
  tt.ok(overlay.length > 40 * SLOW_BYTES_PER_S, `the overlay (${overlay.length} bytes) takes the slow phone long to send`);
  const drips = [drip(await newUpload(dripper), dripper, SLOW_BYTES_PER_S), drip(await newUpload(dripper), dripper, SLOW_BYTES_PER_S)];
  tt.teardown(() => drips.forEach((d) => d.stop()));
  // Both syntheses have begun (an instance starting each, from the overlays' first bytes) before the other phone asks.
  const synthesizing = () =>
    new Set(
      events.inbox.items
        .map((i) => i.value)
        .filter((e) => e.type === 'instance' && e.state === 'starting' && e.instance.service_id === SYNTHESIZED)
        .map((e) => e.instance.id),
    ).size;
  for (let i = 0; i < 600 && synthesizing() < 2; i++) await new Promise((r) => setTimeout(r, 100));
  tt.equal(synthesizing(), 2, 'both dripped syntheses are under way');

  // The drips run until the start is answered; on their own they would end only after about a minute.
  const started = await request(agent.apiPort, 'POST', '/v1/instances', { service_id: CACHED, join: false }, other);
  tt.equal(started.status, 201, started.body);
  tt.ok(
    drips.every((d) => d.open),
    'the Cached VM was ready while both drips were still open: they hold no launch slot',
    { answered: drips.map((d) => d.answered) },
  );
  if (!drips.every((d) => d.open)) tt.comment(agent.log.slice(-4000));

  for (const d of drips) d.stop();
  const stopped = await request(agent.apiPort, 'DELETE', `/v1/instances/${started.json.instance.id}`, undefined, other);
  tt.equal(stopped.status, 200, stopped.body);
  // A stopped drip pauses its upload: its synthesis ends and its launch is cleaned up; the uploads stay resumable.
  const ended = () =>
    events.inbox.items.filter((i) => i.value.type === 'instance' && i.value.state === 'stopped' && i.value.instance.service_id === SYNTHESIZED).length;
  for (let i = 0; i < 600 && ended() < 2; i++) await new Promise((r) => setTimeout(r, 100));
  tt.equal(ended(), 2, 'both paused syntheses ended');
  tt.same((await agent.get('/v1/instances')).json.instances, [], 'no instance left');
  tt.same(await domainsUnder(agent.dataDir), [], 'no domain left');
});

t.test('an upload dripping below the minimum rate is cut with 408, keeps what arrived, and resumes to a ready instance', async (tt) => {
  const phone = await pair('phone-slow');
  const id = await newUpload(phone);
  const slow = drip(id, phone, 1);
  tt.teardown(() => slow.stop());
  const cut = await slow.answer;
  tt.equal(cut?.status, 408, 'answered 408, then the connection closed');
  tt.match(cut?.json, { code: 'REQUEST_TIMEOUT', message: /too slowly/, details: { upload_id: id, received: Number, min_bytes_per_s: MIN_RATE } });
  const status = (await request(agent.apiPort, 'GET', `/v1/synthesis/uploads/${id}`, undefined, phone)).json;
  tt.match(status, { state: 'receiving', received: cut?.json.details.received }, 'the upload keeps every byte that arrived');

  const rest = await sendUploadBytes(agent.apiPort, id, status.received, overlay.subarray(status.received));
  tt.equal(rest?.status, 201, JSON.stringify(rest?.json));
  const stopped = await agent.delete(`/v1/instances/${rest?.json.instance.id}`);
  tt.equal(stopped.status, 200, stopped.body);
  tt.same(await domainsUnder(agent.dataDir), [], 'no domain left');
});
