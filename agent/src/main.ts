#!/usr/bin/env node
// libvirt calls run on libuv's threadpool (one thread each while they block); the default 4 would queue a second
// VM start behind three slow ones. Must be set before the pool's first use.
process.env.UV_THREADPOOL_SIZE ??= '16';

import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { startHttpServer } from './api/http-server';
import { ConnectionCaps } from './trust/connection-caps';
import { RateLimiter } from './trust/rate-limit';
import { composeCloudlet } from './compose';
import { loadConfig } from './config';
import { AGENT_VERSION } from './core/host-status';
import { AvahiDiscovery } from './discovery/avahi';
import { createLogger } from './log';
import { agentUrl } from './system/agent-probe';
import { announceReady } from './system/systemd';
import { Telemetry } from './telemetry/mqtt';
import { TokenGate } from './trust/access';
import { loadOrCreateAdminToken } from './trust/admin-token';
import { DeviceRegistry } from './trust/devices';
import { Pairing } from './trust/pairing';
import { ensureTlsIdentity } from './trust/tls';

async function main(): Promise<void> {
  const log = createLogger('cloudlet-agent');
  const config = await loadConfig();
  const cloudlet = await composeCloudlet(config, log);
  const devices = await DeviceRegistry.open(config.dataDir);
  const tls = await ensureTlsIdentity(config.dataDir, os.hostname(), createLogger('tls'));
  const gate = new TokenGate(devices, await loadOrCreateAdminToken(config.dataDir));
  // One set of request buckets for the API and the MQTT broker's TCP connections.
  const rateLimiter = new RateLimiter({ perSecond: config.limits.requestsPerSecond, burst: config.limits.requestBurst });
  // One count of long-lived connections (MQTT, /v1/events) per address and per device.
  const connectionCaps = new ConnectionCaps({ mqttPerAddress: config.limits.mqttConnectionsPerAddress, perDevice: config.limits.connectionsPerDevice });
  const telemetry = await Telemetry.start({
    config: config.mqtt,
    api: cloudlet,
    hostname: os.hostname(),
    agentVersion: AGENT_VERSION,
    log: createLogger('mqtt'),
    credentials: { gate, devices },
    rateLimiter,
    connectionCaps,
  });
  let tlsPort: number | null = null;
  const server = await startHttpServer({
    api: cloudlet,
    provisioning: cloudlet,
    host: config.api.host,
    port: config.api.port,
    logger: createLogger('http'),
    accessLogLevel: config.logLevel,
    gate,
    trust: { devices, pairing: new Pairing(devices), tls: { fingerprint: tls.fingerprint, port: () => tlsPort } },
    tls: { port: config.api.tlsPort, keyFile: tls.keyFile, certFile: tls.certFile },
    streamEndpoints: [
      {
        path: '/mqtt',
        protocol: 'mqtt',
        admit: (transport) => telemetry.admit(transport),
        accept: (stream, transport) => telemetry.handle(stream, transport),
      },
    ],
    kdApi: config.kdApi === 'encrypted' ? { mode: 'encrypted', devices } : { mode: config.kdApi },
    maxBodyBytes: config.limits.jsonBodyBytes,
    bodyIdleMs: config.limits.bodyIdleMs,
    bodyMinBytesPerSecond: config.limits.bodyMinBytesPerSecond,
    bodyRateWindowMs: config.limits.bodyRateWindowMs,
    rateLimiter,
    connectionCaps,
  });
  tlsPort = server.tlsPort;
  // A device whose authorization ends loses its instances; armed after adoption, so one that expired while the agent
  // was down is handled now.
  cloudlet.attachDeviceStanding((id) => devices.standing(id));
  devices.on('device-ended', (device, reason) => {
    log(`device ${device.id} (${device.name}) ${reason}; releasing its instances`);
    void cloudlet.releaseDevice(device.id);
  });
  devices.startExpiryTimers();
  // Published only once the port is bound, so the advertised port is the one actually served.
  const discovery = config.discovery.enabled
    ? AvahiDiscovery.start({
        api: cloudlet,
        port: server.port,
        agentVersion: AGENT_VERSION,
        log: createLogger('discovery'),
        kdEncrypted: config.kdApi === 'encrypted',
      })
    : null;
  if (discovery) cloudlet.attachDiscovery(discovery);
  // performance.now() counts from the process's start: the start-to-listening time includes Node's own boot.
  if (server.tlsPort !== null) log(`HTTPS on ${config.api.host}:${server.tlsPort}, certificate SHA-256 ${tls.fingerprint}`);
  log(`listening on ${config.api.host}:${server.port} after ${Math.round(performance.now())} ms; data in ${config.dataDir}`);
  const watchdog = await announceReady(agentUrl(config.api.host, server.port), () => cloudlet.health(), createLogger('systemd'));

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    watchdog?.stop();
    log(`${signal}: stopping; running instances keep running and are adopted at the next start`);
    await discovery?.close();
    devices.close();
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
