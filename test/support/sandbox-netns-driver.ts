// Run inside a test's own network namespace (nsenter --net, which keeps /sys and the cgroups): a real agent serving
// its API and MQTT on every address of the namespace, one app package started in a sandbox, and which of those
// services the app reaches from inside, next to what the namespace itself reaches. Prints one JSON line.
import net from 'node:net';
import { AgentProcess, fetchText } from './agent';
import { destroySandboxesUnder } from './app-package';

function canConnect(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port, timeout: 2000 });
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.once('connect', () => done(true));
    socket.once('timeout', () => done(false));
    socket.once('error', () => done(false));
  });
}

async function main(tarball: string, appId: string, addresses: string[]): Promise<void> {
  const agent = await AgentProcess.start({ portRange: '21500-21519', env: { CLOUDLET_API_HOST: '0.0.0.0', CLOUDLET_MQTT_HOST: '0.0.0.0' } });
  try {
    const imported = await agent.post('/v1/packages', { path: tarball });
    if (imported.status !== 201) throw new Error(`import: ${imported.body}`);
    const started = await agent.post('/v1/instances', { service_id: appId });
    if (started.status !== 201) throw new Error(`start: ${started.body}`);
    const services = { api: agent.apiPort, mqtt: agent.mqttPort };
    const targets = addresses.flatMap((address) => Object.entries(services).map(([name, port]) => ({ name, address, port })));
    const own = { name: 'own-app', address: '127.0.0.1', port: 8080 };
    const probe = await fetchText(started.json.endpoint.port, `/cgi-bin/connect?${[own, ...targets].map((t) => `${t.address}:${t.port}`).join('+')}`);
    const fromSandbox = Object.fromEntries(
      probe
        .trim()
        .split('\n')
        .map((line) => line.split('=')),
    );
    const result = {
      fromSandbox: Object.fromEntries([own, ...targets].map((t) => [`${t.name}@${t.address}`, fromSandbox[`${t.address}:${t.port}`]])),
      fromNamespace: Object.fromEntries(await Promise.all(targets.map(async (t) => [`${t.name}@${t.address}`, await canConnect(t.address, t.port)]))),
    };
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    await agent.stop();
    await destroySandboxesUnder(agent.dataDir);
    await agent.dispose();
  }
}

const [tarball, appId, addresses] = process.argv.slice(2);
main(tarball!, appId!, addresses!.split(',')).catch((err: Error) => {
  process.stderr.write(`${err.stack ?? err.message}\n`);
  process.exit(1);
});
