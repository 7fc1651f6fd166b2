// Who may subscribe to the embedded MQTT broker with `mqtt.access: devices` (the default): a paired device with its
// id and token, or `admin` with the admin token; nobody anonymous; and a device whose authorization ends is
// disconnected at once. Real agent, real MQTT clients over TCP and over the /mqtt WebSocket; no VM is started.
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import type { MqttClient } from 'mqtt';
import t from 'tap';
import { AgentProcess } from './support/agent';
import { connectMqtt } from './support/listeners';

let agent: AgentProcess;

t.before(async () => {
  agent = await AgentProcess.start({ portRange: '22740-22749' });
});
t.teardown(() => agent?.dispose());

const tcpUrl = () => `mqtt://127.0.0.1:${agent.mqttPort}`;
const wsUrl = () => `ws://127.0.0.1:${agent.apiPort}/mqtt`;

async function pair(id: string): Promise<{ id: string; token: string }> {
  const window = await agent.post('/v1/pairing', {});
  const claim = await agent.post('/v1/pairing/claim', { code: window.json.code, device_id: id, name: `Phone ${id}` });
  if (claim.status !== 201) throw new Error(`claim: ${claim.body}`);
  return { id, token: claim.json.token };
}

/** Connects, or rejects with the broker's refusal (CONNACK return code 4: bad username or password). */
function connect(url: string, username?: string, password?: string): Promise<MqttClient> {
  return connectMqtt(url, username !== undefined ? { username, password } : undefined);
}

/** The retained status the agent publishes: what any subscriber sees first. */
async function firstStatus(client: MqttClient): Promise<string> {
  const got = new Promise<string>((resolve) => client.once('message', (_topic, payload) => resolve(JSON.parse(payload.toString()).state)));
  await client.subscribeAsync('cloudlet/+/status');
  return got;
}

t.test("an anonymous client, or a device id with a wrong or someone else's token, is refused (TCP and WebSocket)", async (tt) => {
  const phone = await pair('phone-a');
  const other = await pair('phone-b');
  for (const url of [tcpUrl(), wsUrl()]) {
    await tt.rejects(connect(url), /Bad username or password/, `${url}: no credentials`);
    await tt.rejects(connect(url, phone.id, 'cld_not-the-token'), /Bad username or password/, `${url}: a wrong token`);
    await tt.rejects(connect(url, phone.id, other.token), /Bad username or password/, `${url}: another device's token`);
  }
});

t.test("a paired device logs in with its id and token and reads the agent's tree; it may not publish", async (tt) => {
  const phone = await pair('phone-c');
  for (const url of [tcpUrl(), wsUrl()]) {
    const client = await connect(url, phone.id, phone.token);
    tt.equal(await firstStatus(client), 'online', `${url}: the retained status arrives`);
    const closed = new Promise<void>((resolve) => client.once('close', () => resolve()));
    client.publish('phones/hello', 'hi');
    await closed;
    tt.pass(`${url}: a publish gets the client disconnected`);
    await client.endAsync(true);
  }
});

t.test('the operator logs in as admin with the admin token', async (tt) => {
  const adminToken = (await readFile(path.join(agent.dataDir, 'trust', 'admin-token'), 'utf8')).trim();
  const client = await connect(tcpUrl(), 'admin', adminToken);
  tt.equal(await firstStatus(client), 'online');
  await client.endAsync(true);
  await tt.rejects(connect(tcpUrl(), 'someone', adminToken), /Bad username or password/, 'only under the name admin');
});

t.test('revoking a device disconnects its subscribers at once, and it cannot log in again', async (tt) => {
  const phone = await pair('phone-d');
  const client = await connect(tcpUrl(), phone.id, phone.token);
  tt.equal(await firstStatus(client), 'online');
  const closed = new Promise<void>((resolve) => client.once('close', () => resolve()));
  const revoked = await agent.post(`/v1/devices/${phone.id}/revoke`);
  tt.equal(revoked.status, 200, 'the operator revokes it');
  await closed;
  tt.pass("the revoked device's connection was closed");
  await client.endAsync(true);
  await tt.rejects(connect(tcpUrl(), phone.id, phone.token), /Bad username or password/, 'its token no longer logs in');
});
