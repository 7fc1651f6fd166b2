// The MQTT broker's bounds, and the long-lived connections a device may hold: a client cannot make the agent buffer
// a huge packet before (or after) logging in, one address cannot hold more than its share of MQTT connections, and
// one paired device no more than its share of MQTT and /v1/events connections together. Real agent with small caps,
// real clients over TCP and the /mqtt WebSocket; no VM is started.
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import type { MqttClient } from 'mqtt';
import t from 'tap';
import WebSocket from 'ws';
import { AgentProcess } from './support/agent';
import { connectMqtt, EventsSocket } from './support/listeners';
import { until } from './support/poll';

const PER_ADDRESS = 3;
const PER_DEVICE = 2;
const STREAMED_BYTES = 100 * 1024 * 1024;

let agent: AgentProcess;

t.before(async () => {
  agent = await AgentProcess.start({
    portRange: '26300-26309',
    env: { CLOUDLET_MQTT_CONNECTIONS_PER_ADDRESS: String(PER_ADDRESS), CLOUDLET_CONNECTIONS_PER_DEVICE: String(PER_DEVICE) },
  });
});
t.teardown(() => agent?.dispose());

const tcpUrl = () => `mqtt://127.0.0.1:${agent.mqttPort}`;
const wsUrl = () => `ws://127.0.0.1:${agent.apiPort}/mqtt`;
const adminToken = async () => (await readFile(path.join(agent.dataDir, 'trust', 'admin-token'), 'utf8')).trim();

function connect(url: string, username: string, password: string): Promise<MqttClient> {
  return connectMqtt(url, { username, password });
}

async function rssBytes(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/^VmRSS:\s+(\d+) kB/m.exec(status)![1]) * 1024;
}

/** A CONNECT's fixed header announcing the largest remaining length MQTT can express (256 MiB - 1). */
const HUGE_CONNECT_HEADER = Buffer.from([0x10, 0xff, 0xff, 0xff, 0x7f]);
const CHUNK = Buffer.alloc(256 * 1024, 0x41);

/** Streams up to STREAMED_BYTES into a CONNECT over TCP; returns how many bytes went out before the agent cut it. */
async function streamOverTcp(): Promise<{ cut: boolean; sent: number }> {
  const socket = net.connect(agent.mqttPort, '127.0.0.1');
  socket.on('error', () => {});
  let cut = false;
  const closed = new Promise<void>((resolve) =>
    socket.once('close', () => {
      cut = true;
      resolve();
    }),
  );
  await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
  socket.write(HUGE_CONNECT_HEADER);
  let sent = 0;
  while (!cut && sent < STREAMED_BYTES) {
    sent += CHUNK.length;
    if (!socket.write(CHUNK)) await Promise.race([new Promise((resolve) => socket.once('drain', resolve)), closed]);
  }
  const wasCut = cut;
  socket.destroy();
  await closed;
  return { cut: wasCut, sent };
}

/** The same through MQTT over WebSocket on the API port. */
async function streamOverWebSocket(): Promise<{ cut: boolean; sent: number }> {
  const socket = new WebSocket(wsUrl(), ['mqtt']);
  socket.on('error', () => {});
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    socket.once('open', () => resolve());
    socket.once('error', reject);
  });
  const send = (data: Buffer) => new Promise<void>((resolve) => socket.send(data, () => resolve()));
  await send(HUGE_CONNECT_HEADER);
  let sent = 0;
  // The agent's close frame ends the OPEN state before the connection's end.
  while (socket.readyState === WebSocket.OPEN && sent < STREAMED_BYTES) {
    sent += CHUNK.length;
    await Promise.race([send(CHUNK), closed]);
  }
  const wasCut = socket.readyState !== WebSocket.OPEN;
  socket.terminate();
  await closed;
  return { cut: wasCut, sent };
}

/** The HTTP status a WebSocket upgrade to /mqtt gets (101 when it opens); mqtt.js reports a refused one only as a close. */
function mqttUpgradeStatus(): Promise<number> {
  const socket = new WebSocket(wsUrl(), ['mqtt']);
  return new Promise((resolve, reject) => {
    socket.once('unexpected-response', (_req, res) => {
      resolve(res.statusCode ?? 0);
      socket.terminate();
    });
    socket.once('open', () => {
      resolve(101);
      socket.terminate();
    });
    socket.once('error', reject);
  });
}

t.test("a client streaming 100 MB into an unauthenticated CONNECT is cut, and the agent's RSS grows by less than 10 MB", async (tt) => {
  const before = await rssBytes(agent.pid!);
  const tcp = await streamOverTcp();
  tt.ok(tcp.cut, `TCP: cut after ${tcp.sent} bytes sent`);
  const ws = await streamOverWebSocket();
  tt.ok(ws.cut, `WebSocket: cut after ${ws.sent} bytes sent`);
  const growth = (await rssBytes(agent.pid!)) - before;
  tt.ok(growth < 10 * 1024 * 1024, `the agent's RSS grew by ${Math.round(growth / 1024)} KiB`);
  tt.match(agent.log, /MQTT: cutting the connection from 127\.0\.0\.1: \d+ bytes before login/, 'the log says why');
  const admin = await connect(tcpUrl(), 'admin', await adminToken());
  await admin.endAsync(true);
  tt.pass('the broker still serves');
});

t.test('a logged-in client sending a packet over the bound is cut', async (tt) => {
  const client = await connect(tcpUrl(), 'admin', await adminToken());
  tt.teardown(() => client.endAsync(true));
  const closed = new Promise<string>((resolve) => client.once('close', () => resolve('cut')));
  const outcome = await Promise.race([
    client.subscribeAsync(`cloudlet/${'x'.repeat(20 * 1024)}`).then(
      () => 'subscribed',
      () => 'cut',
    ),
    closed,
  ]);
  tt.equal(outcome, 'cut', 'a 20 KiB SUBSCRIBE ends the connection');
});

t.test('one address holds at most its share of MQTT connections, logged in or not; a closed one frees its place', async (tt) => {
  const idle = await Promise.all(
    Array.from(
      { length: PER_ADDRESS },
      () =>
        new Promise<net.Socket>((resolve) => {
          const socket = net.connect(agent.mqttPort, '127.0.0.1', () => resolve(socket));
          socket.on('error', () => {});
        }),
    ),
  );
  tt.teardown(() => {
    for (const socket of idle) socket.destroy();
  });
  const token = await adminToken();
  await tt.rejects(connect(tcpUrl(), 'admin', token), 'TCP: one more connection is refused');
  tt.equal(await mqttUpgradeStatus(), 429, 'WebSocket: counted with TCP, so its upgrade is refused: 429');
  idle.pop()!.destroy();
  const admitted = await until(
    () => connect(tcpUrl(), 'admin', token).catch(() => null),
    (client) => client !== null,
  );
  tt.ok(admitted, 'once one is closed, a new one is served');
  await admitted?.endAsync(true);
});

t.test('a device holds at most its share of /v1/events sockets and MQTT connections together; the operator is not capped', async (tt) => {
  const window = await agent.post('/v1/pairing', {});
  const claim = await agent.post('/v1/pairing/claim', { code: window.json.code, device_id: 'phone-caps', name: 'Phone' });
  const asDevice = { authorization: `Bearer ${claim.json.token}` };
  const sockets = await Promise.all(Array.from({ length: PER_DEVICE }, () => EventsSocket.connect(agent.apiPort, { headers: asDevice })));
  tt.teardown(() => Promise.all(sockets.map((s) => s.close())));
  await tt.rejects(EventsSocket.connect(agent.apiPort, { headers: asDevice }), /429/, 'one more events socket is refused: 429');
  await tt.rejects(connect(tcpUrl(), 'phone-caps', claim.json.token), /Server unavailable/, 'so is an MQTT login');
  await sockets.pop()!.close();
  const client = await until(
    () => connect(tcpUrl(), 'phone-caps', claim.json.token).catch(() => null),
    (c) => c !== null,
  );
  tt.ok(client, 'once an events socket is closed, the device logs in on MQTT');
  tt.teardown(() => client?.endAsync(true));
  await tt.rejects(EventsSocket.connect(agent.apiPort, { headers: asDevice }), /429/, 'and that connection counts too');
  const operator = await Promise.all(Array.from({ length: PER_DEVICE + 1 }, () => EventsSocket.connect(agent.apiPort)));
  tt.pass(`the operator opened ${operator.length} events sockets`);
  await Promise.all(operator.map((s) => s.close()));
});
