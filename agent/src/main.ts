#!/usr/bin/env node
// libvirt calls run on libuv's threadpool (one thread each while they block); the default 4 would queue a second
// VM start behind three slow ones. Must be set before the pool's first use.
process.env.UV_THREADPOOL_SIZE ??= '16';

import { readFile } from 'node:fs/promises';
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { startHttpServer } from './api/http-server';
import { ConnectionCaps } from './trust/connection-caps';
import { RateLimiter } from './trust/rate-limit';
import { composeCloudlet } from './compose';
import { loadConfig, metricsToken, type AgentConfig } from './config';
import { AGENT_VERSION } from './core/host-status';
import { OptionalParts } from './core/optional-parts';
import { AvahiDiscovery } from './discovery/avahi';
import { PeerLinks } from './fleet/peer-links';
import { OutgoingHandoffs } from './fleet/handoff-source';
import { IncomingHandoffs } from './fleet/handoff-target';
import { sweepHandoffSockets } from './fleet/handoff-relay';
import { handoffChannelEndpoint } from './api/v1-handoff';
import { FileDigests } from './system/file-digest';
import { createLogger } from './log';
import { agentUrl } from './system/agent-probe';
import { announceReady } from './system/systemd';
import { AgentMetrics, MetricsCredential } from './telemetry/metrics';
import { Telemetry } from './telemetry/mqtt';
import { TokenGate, accessPolicy } from './trust/access';
import { loadOrCreateAdminToken } from './trust/admin-token';
import { DeviceRegistry } from './trust/devices';
import { Pairing } from './trust/pairing';
import { ensureTlsIdentity, type TlsIdentity } from './trust/tls';

async function main(): Promise<void> {
  const log = createLogger('cloudlet-agent');
  const config = await loadConfig();
  const metrics = new AgentMetrics();
  const { cloudlet, handoffHost } = await composeCloudlet(config, log, (call, seconds) => metrics.libvirtCall(call, seconds));
  metrics.watch(cloudlet);
  // What runs without its optional parts says which are off, why and what to do: one log line each, /v1/health.
  const parts = new OptionalParts(log);
  cloudlet.attachParts(parts);
  if (!config.discovery.enabled) parts.disabled('discovery', 'discovery.enabled is false');
  if (!config.mqtt.externalUrl) parts.disabled('mqtt-external', 'no external broker configured (mqtt.externalUrl)');
  const devices = await DeviceRegistry.open(config.dataDir);
  const tls = await tlsIdentity(config.dataDir, parts);
  const gate = new TokenGate(devices, await loadOrCreateAdminToken(config.dataDir), accessPolicy(config.kdApi));
  // One set of request buckets for the API and the MQTT broker's TCP connections.
  const rateLimiter = new RateLimiter({ perSecond: config.limits.requestsPerSecond, burst: config.limits.requestBurst });
  // One count of long-lived connections (MQTT, /v1/events) per address and per device.
  const connectionCaps = new ConnectionCaps({ mqttPerAddress: config.limits.mqttConnectionsPerAddress, perDevice: config.limits.connectionsPerDevice });
  const telemetry = await Telemetry.start({
    config: config.mqtt,
    api: cloudlet,
    hostname: os.hostname(),
    agentVersion: AGENT_VERSION,
    dataDir: config.dataDir,
    log: createLogger('mqtt'),
    parts,
    credentials: { gate, devices },
    rateLimiter,
    connectionCaps,
  });
  // The paired cloudlets, joined in /v1/peers with what mDNS sees (nothing until discovery is attached).
  const peerLinks = await PeerLinks.open(config.dataDir, {
    name: os.hostname(),
    intervalMs: config.peers.pollIntervalMs,
    log: createLogger('peers'),
    discovered: () => cloudlet.peers(),
  });
  const digests = new FileDigests();
  const sha256 = (file: string) => digests.sha256(file);
  await sweepHandoffSockets();
  const handoffs = {
    outgoing: new OutgoingHandoffs(handoffHost, peerLinks, sha256, createLogger('handoff')),
    incoming: new IncomingHandoffs(handoffHost, sha256, createLogger('handoff')),
  };
  metrics.countMqttClients(() => telemetry.clientCount);
  let tlsPort: number | null = null;
  const server = await startHttpServer({
    api: cloudlet,
    provisioning: cloudlet,
    host: config.api.host,
    port: config.api.port,
    logger: createLogger('http'),
    accessLogLevel: config.logLevel,
    gate,
    trust: { devices, pairing: new Pairing(devices), tls: { fingerprint: tls?.fingerprint ?? null, port: () => tlsPort } },
    ...(tls ? { tls: { port: config.api.tlsPort, keyFile: tls.keyFile, certFile: tls.certFile } } : {}),
    fleet: { links: peerLinks, sha256, handoffs },
    streamEndpoints: [
      {
        path: '/mqtt',
        protocol: 'mqtt',
        admit: (transport) => telemetry.admit(transport),
        accept: (stream, transport) => telemetry.handle(stream, transport),
      },
      handoffChannelEndpoint(handoffs.incoming, gate, rateLimiter),
    ],
    kdApi: config.kdApi === 'encrypted' ? { mode: 'encrypted', devices } : { mode: config.kdApi },
    maxBodyBytes: config.limits.jsonBodyBytes,
    bodyIdleMs: config.limits.bodyIdleMs,
    bodyMinBytesPerSecond: config.limits.bodyMinBytesPerSecond,
    bodyRateWindowMs: config.limits.bodyRateWindowMs,
    rateLimiter,
    connectionCaps,
    metrics: { source: { exposition: () => metrics.exposition(), credential: await metricsCredential(config.metrics) }, observer: metrics },
  });
  tlsPort = server.tlsPort;
  if (server.tlsProblem !== null) {
    parts.off(
      'https',
      `no HTTPS listener on ${config.api.host}:${config.api.tlsPort}: ${server.tlsProblem}; phones cannot pair or send credentials from the network`,
      `free port ${config.api.tlsPort} or choose another (api.tlsPort, CLOUDLET_TLS_PORT), then restart the agent`,
    );
  } else if (tls) {
    parts.on('https');
  }
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
        parts,
        kdEncrypted: config.kdApi === 'encrypted',
      })
    : null;
  if (discovery) cloudlet.attachDiscovery(discovery);
  // performance.now() counts from the process's start: the start-to-listening time includes Node's own boot.
  if (tls && server.tlsPort !== null) log(`HTTPS on ${config.api.host}:${server.tlsPort}, certificate SHA-256 ${tls.fingerprint}`);
  log(`listening on ${config.api.host}:${server.port} after ${Math.round(performance.now())} ms; data in ${config.dataDir}`);
  const watchdog = await announceReady(agentUrl(config.api.host, server.port), () => cloudlet.health(), createLogger('systemd'));

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    watchdog?.stop();
    log(`${signal}: stopping; running instances keep running and are adopted at the next start`);
    await discovery?.close();
    peerLinks.close();
    devices.close();
    await server.close();
    await telemetry.close();
    await cloudlet.close();
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
}

/** The agent's TLS identity, made on first start; without one the agent serves on, over plain HTTP alone. */
async function tlsIdentity(dataDir: string, parts: OptionalParts): Promise<TlsIdentity | null> {
  try {
    return await ensureTlsIdentity(dataDir, os.hostname(), createLogger('tls'));
  } catch (err) {
    parts.off(
      'https',
      `no usable TLS certificate (${(err as Error).message}); phones cannot pair or send credentials from the network`,
      `make sure openssl is installed and ${dataDir}/trust/tls is writable by the agent, then restart it (a new certificate is made)`,
    );
    return null;
  }
}

/** The metrics credential from the config, or from its file (read now: a file that cannot be read stops the start). */
async function metricsCredential(config: AgentConfig['metrics']): Promise<MetricsCredential | null> {
  const token =
    config.token ?? (config.tokenFile ? metricsToken((await readFile(config.tokenFile, 'utf8')).trim(), `the metrics token in ${config.tokenFile}`) : null);
  return token === null ? null : new MetricsCredential(token);
}

main().catch((err: Error & { code?: string }) => {
  process.stderr.write(`cloudlet-agent: cannot start: ${err.code ? `${err.code}: ` : ''}${err.message}\n`);
  process.exit(1);
});
