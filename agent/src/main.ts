#!/usr/bin/env node
// libvirt calls run on libuv's threadpool (one thread each while they block); the default 4 would queue a second
// VM start behind three slow ones. Must be set before the pool's first use.
process.env.UV_THREADPOOL_SIZE ??= '16';

import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { startHttpServer } from './api/http-server';
import { loadConfig } from './config';
import { AGENT_VERSION, Cloudlet } from './core/cloudlet';
import { AvahiDiscovery } from './discovery/avahi';
import { createLogger } from './log';
import { agentUrl } from './system/agent-probe';
import { announceReady } from './system/systemd';
import { Telemetry } from './telemetry/mqtt';

async function main(): Promise<void> {
  const log = createLogger('cloudlet-agent');
  const config = await loadConfig();
  const cloudlet = await Cloudlet.open(config, log);
  const telemetry = await Telemetry.start({ config: config.mqtt, api: cloudlet, hostname: os.hostname(), agentVersion: AGENT_VERSION, log: createLogger('mqtt') });
  const server = await startHttpServer({
    api: cloudlet, provisioning: cloudlet, host: config.api.host, port: config.api.port, logger: createLogger('http'),
    streamEndpoints: [{ path: '/mqtt', protocol: 'mqtt', accept: (stream) => telemetry.handle(stream) }],
  });
  // Published only once the port is bound, so the advertised port is the one actually served.
  const discovery = config.discovery.enabled
    ? AvahiDiscovery.start({ api: cloudlet, port: server.port, agentVersion: AGENT_VERSION, log: createLogger('discovery') })
    : null;
  if (discovery) cloudlet.attachDiscovery(discovery);
  // performance.now() counts from the process's start: the start-to-listening time includes Node's own boot.
  log(`listening on ${config.api.host}:${server.port} after ${Math.round(performance.now())} ms; data in ${config.dataDir}`);
  const watchdog = await announceReady(agentUrl(config.api.host, server.port), () => cloudlet.health(), createLogger('systemd'));

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    watchdog?.stop();
    log(`${signal}: stopping; running instances keep running and are adopted at the next start`);
    await discovery?.close();
    await server.close();
    await telemetry.close();
    await cloudlet.close();
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
}

main().catch((err: Error & { code?: string }) => {
  process.stderr.write(`cloudlet-agent: cannot start: ${err.code ? `${err.code}: ` : ''}${err.message}\n`);
  process.exit(1);
});
