import { readFile } from 'node:fs/promises';
import { CloudletError, isErrno } from './errors';

/**
 * Embedded defaults are what an appliance runs with no config file at all. A JSON file (CLOUDLET_CONFIG, else
 * /etc/cloudlet/agent.json when present) overrides them, and environment variables override the file.
 */
export interface AgentConfig {
  /** `tlsPort`: the HTTPS listener (same host; 0 picks a free port), where devices send their credentials. */
  api: { host: string; port: number; tlsPort: number };
  dataDir: string;
  libvirtUri: string;
  /** 'auto' picks kvm only when KVM really works on this host, else qemu (TCG). */
  domainType: 'auto' | 'kvm' | 'qemu';
  forward: {
    /** Address the forwarded Service VM ports bind to: all interfaces on an appliance, 127.0.0.1 in tests. */
    bindAddress: string;
    portRange: { first: number; last: number };
  };
  /** Service directories imported at start when the catalog lacks them (how an image ships its preloaded services). */
  seedDir: string | null;
  /** How often the registry compares itself with libvirt to notice VMs that ended outside the agent. */
  reconcileIntervalMs: number;
  /** Learn of VMs that ended from libvirt's lifecycle events (ms) instead of only the reconcile poll. */
  libvirtEvents: boolean;
  mqtt: {
    /** The embedded broker's TCP listener (telemetry is always published to the embedded broker). */
    host: string;
    port: number;
    /** Root of the agent's topic tree; null: `cloudlet/<host name>`. */
    topicRoot: string | null;
    metricsIntervalMs: number;
    /** Also publish everything to this broker (mqtt://, mqtts://, ws://, wss://), reconnecting as needed; null: none. */
    externalUrl: string | null;
    /** PEM file of the certificate authority the external broker's certificate must chain to; null: the system's. */
    externalCaFile: string | null;
    /** A client certificate and its key (PEM files) to log in to the external broker with; both or neither. */
    externalCertFile: string | null;
    externalKeyFile: string | null;
    /** Username on the external broker, and a file holding its password (first line); null: none. */
    externalUsername: string | null;
    externalPasswordFile: string | null;
    /** MQTT keep-alive towards the external broker: it declares the cloudlet offline (last will) after 1.5× this. */
    externalKeepaliveSeconds: number;
    /** Messages held while the external broker is unreachable, replayed in order on reconnect (telemetry/uplink.ts). */
    externalQueueLimit: number;
    /**
     * Who may subscribe: 'devices' (username = a paired device's id and password = its token, or `admin` and the
     * admin token) or 'anonymous-read' (anyone). Either way clients only read: the agent alone publishes.
     */
    access: 'devices' | 'anonymous-read';
    /**
     * Home Assistant MQTT discovery: its config topics go under this prefix (HA's default `homeassistant`), so the
     * cloudlet shows up in HA as a device with its entities; null: not published.
     */
    discoveryPrefix: string | null;
  };
  /**
   * Who may scrape GET /metrics besides the operator: the holder of this bearer token, given in the config
   * (`token`) or in a file of its own (`tokenFile`, read at start; its content, trimmed). Neither: the operator alone.
   */
  metrics: { token: string | null; tokenFile: string | null };
  /** Publish the cloudlet over mDNS/DNS-SD through Avahi's D-Bus API and browse for peers. */
  discovery: { enabled: boolean };
  /** How often the placement facts of each paired cloudlet are asked for (docs/fleet.md, "Between cloudlets"). */
  peers: { pollIntervalMs: number };
  /** Cloudlet Push: the largest app file an operator may upload. */
  apps: { maxUploadBytes: number };
  /**
   * App packages: the largest tarball accepted, and the most its files may unpack to; the most processes any sandbox
   * may have (caps a manifest's `pids`); how long a sandbox's sandbox.log may grow.
   */
  packages: { maxUploadBytes: number; maxPids: number; logBytes: number };
  /** The KD-Cloudlet face under /api: 'plain' (KD's default), 'encrypted' (only POST /api/command, per device key), 'off'. */
  kdApi: 'plain' | 'encrypted' | 'off';
  /**
   * 'info': what happened and what went wrong (HTTP refusals and failures one by one, requests counted once a minute);
   * 'debug': also every HTTP request answered, and the reconcile poll's cost each tick.
   */
  logLevel: 'info' | 'debug';
  limits: {
    /** Launches (first libvirt call to ready) running at once; more wait in a queue of `queuedLaunches`, then BUSY. */
    concurrentLaunches: number;
    queuedLaunches: number;
    /** Per client (a paired device, else the remote IP): requests per second sustained, and the burst allowed. */
    requestsPerSecond: number;
    requestBurst: number;
    /** The largest JSON (or form) request body; uploads have their own limits. */
    jsonBodyBytes: number;
    /** A request body that brings no byte for this long is cut off (uWS cuts any connection idle for ~10 s). */
    bodyIdleMs: number;
    /**
     * A request body bringing fewer bytes than this per second, over any `bodyRateWindowMs`, is answered 408 and cut
     * off (0: never). uWS itself cuts one that brings under 16 KiB/s over its 10 s timeout, unanswered: the window is
     * shorter by default, so that a slow client hears why.
     */
    bodyMinBytesPerSecond: number;
    bodyRateWindowMs: number;
    /** The longest a launch (or capture) waits for its service to answer, whatever its readiness probe asks for. */
    readinessTimeoutMs: number;
    /** Instances (uses) the plain KD face's anonymous callers may hold: per address (an IPv6 /64), and in all. */
    anonymousInstancesPerAddress: number;
    anonymousInstances: number;
    /** MQTT connections (TCP and /mqtt WebSocket) open at once from one address, counted before any login. */
    mqttConnectionsPerAddress: number;
    /** Long-lived connections (MQTT and /v1/events) one paired device holds at once; the operator is not capped. */
    connectionsPerDevice: number;
  };
  /** The warm pool: Service VMs restored paused ahead of time, so that a start only resumes one (docs/warm-pool.md). */
  pool: {
    /** Memory (MiB) all pooled VMs together may take; 0 turns the warm pool off. */
    memoryBudgetMib: number;
    /** The pool is filled only while the host keeps this much available memory (MiB) after the next pooled VM. */
    hostReserveMib: number;
    /** Pool size per service id, over the manifest's `pool_size` and the default (1 with a memory state, else 0). */
    sizes: Record<string, number>;
    /** The most pooled VMs one service's pool grows to with demand (the starts of the last minute). */
    maxPerService: number;
  };
}

export const DEFAULT_CONFIG: AgentConfig = {
  api: { host: '0.0.0.0', port: 9999, tlsPort: 9443 },
  dataDir: '/var/lib/cloudlet',
  libvirtUri: 'qemu:///system',
  domainType: 'auto',
  forward: { bindAddress: '0.0.0.0', portRange: { first: 20000, last: 20999 } },
  seedDir: '/usr/share/cloudlet/services',
  reconcileIntervalMs: 1000,
  libvirtEvents: true,
  mqtt: {
    host: '0.0.0.0',
    port: 1883,
    topicRoot: null,
    metricsIntervalMs: 10000,
    externalUrl: null,
    externalCaFile: null,
    externalCertFile: null,
    externalKeyFile: null,
    externalUsername: null,
    externalPasswordFile: null,
    externalKeepaliveSeconds: 30,
    externalQueueLimit: 10000,
    access: 'devices',
    discoveryPrefix: 'homeassistant',
  },
  metrics: { token: null, tokenFile: null },
  discovery: { enabled: true },
  peers: { pollIntervalMs: 10000 },
  apps: { maxUploadBytes: 512 * 1024 * 1024 },
  packages: { maxUploadBytes: 1024 ** 3, maxPids: 1024, logBytes: 1024 * 1024 },
  kdApi: 'plain',
  logLevel: 'info',
  limits: {
    concurrentLaunches: 2,
    queuedLaunches: 8,
    requestsPerSecond: 20,
    requestBurst: 60,
    jsonBodyBytes: 64 * 1024,
    bodyIdleMs: 8000,
    bodyMinBytesPerSecond: 4096,
    bodyRateWindowMs: 8000,
    readinessTimeoutMs: 120000,
    anonymousInstancesPerAddress: 2,
    anonymousInstances: 8,
    mqttConnectionsPerAddress: 16,
    connectionsPerDevice: 8,
  },
  pool: { memoryBudgetMib: 1024, hostReserveMib: 512, sizes: {}, maxPerService: 4 },
};

const DEFAULT_CONFIG_FILE = '/etc/cloudlet/agent.json';

function invalid(message: string): CloudletError {
  return new CloudletError('INVALID_PARAMETER', `config: ${message}`);
}

function port(value: unknown, what: string, allowZero = false): number {
  const n = typeof value === 'string' && /^\d+$/.test(value) ? Number(value) : value;
  if (typeof n !== 'number' || !Number.isInteger(n) || n < (allowZero ? 0 : 1) || n > 65535) {
    throw invalid(`${what} must be a port number, got ${JSON.stringify(value)}`);
  }
  return n;
}

function text(value: unknown, what: string): string {
  if (typeof value !== 'string' || value.length === 0) throw invalid(`${what} must be a non-empty string`);
  return value;
}

function portRange(value: unknown): { first: number; last: number } {
  const parts = typeof value === 'string' ? value.split('-') : Array.isArray(value) ? value : null;
  if (!parts || parts.length !== 2) throw invalid(`forward port range must look like "20000-20999", got ${JSON.stringify(value)}`);
  const first = port(parts[0], 'forward port range start');
  const last = port(parts[1], 'forward port range end');
  if (last < first) throw invalid(`forward port range ${first}-${last} is empty`);
  return { first, last };
}

function flag(value: unknown, what: string): boolean {
  if (typeof value === 'boolean') return value;
  if (value === '1' || value === 'true' || value === 'on') return true;
  if (value === '0' || value === 'false' || value === 'off') return false;
  throw invalid(`${what} must be true or false (1/0, on/off), got ${JSON.stringify(value)}`);
}

function orNull(value: unknown, what: string): string | null {
  return value === null || value === '' ? null : text(value, what);
}

function oneOf<T extends string>(value: unknown, what: string, allowed: readonly T[]): T {
  if (typeof value === 'string' && (allowed as readonly string[]).includes(value)) return value as T;
  throw invalid(`${what} must be ${allowed.join(', ')}, got ${JSON.stringify(value)}`);
}

function count(value: unknown, what: string, min: number, max = Number.MAX_SAFE_INTEGER): number {
  const n = typeof value === 'string' && /^\d+$/.test(value) ? Number(value) : value;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < min || n > max) throw invalid(`${what} must be a whole number from ${min} to ${max}`);
  return n;
}

/** `pool.sizes`: service id → pooled VMs (0–16). */
function poolSizes(value: unknown): Record<string, number> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw invalid('pool.sizes must be an object {"service id": size}');
  return Object.fromEntries(Object.entries(value).map(([id, size]) => [id, count(size, `pool.sizes["${id}"]`, 0, 16)]));
}

/** An MQTT topic prefix without wildcards, empty levels or a leading or trailing slash. */
function topicPrefix(value: unknown, what: string): string | null {
  if (value === null || value === '') return null;
  if (typeof value !== 'string' || !/^[A-Za-z0-9_-]+(\/[A-Za-z0-9_-]+)*$/.test(value)) {
    throw invalid(`${what} must be topic levels of letters, digits, _ and - separated by /, got ${JSON.stringify(value)}`);
  }
  return value;
}

/** Long enough not to be guessed, and without white space (it travels in an Authorization header). */
export function metricsToken(value: unknown, what: string): string | null {
  if (value === null || value === '') return null;
  if (typeof value !== 'string' || !/^\S{16,512}$/.test(value)) throw invalid(`${what} must be 16 to 512 characters without white space`);
  return value;
}

function domainType(value: unknown): AgentConfig['domainType'] {
  if (value === 'auto' || value === 'kvm' || value === 'qemu') return value;
  throw invalid(`domainType must be auto, kvm or qemu, got ${JSON.stringify(value)}`);
}

type Overrides = {
  api?: { host?: unknown; port?: unknown; tlsPort?: unknown };
  dataDir?: unknown;
  libvirtUri?: unknown;
  domainType?: unknown;
  forward?: { bindAddress?: unknown; portRange?: unknown };
  seedDir?: unknown;
  reconcileIntervalMs?: unknown;
  libvirtEvents?: unknown;
  mqtt?: { [K in keyof AgentConfig['mqtt']]?: unknown };
  metrics?: { token?: unknown; tokenFile?: unknown };
  discovery?: { enabled?: unknown };
  peers?: { pollIntervalMs?: unknown };
  apps?: { maxUploadBytes?: unknown };
  packages?: { maxUploadBytes?: unknown; maxPids?: unknown; logBytes?: unknown };
  kdApi?: unknown;
  logLevel?: unknown;
  limits?: { [K in keyof AgentConfig['limits']]?: unknown };
  pool?: { memoryBudgetMib?: unknown; hostReserveMib?: unknown; sizes?: unknown; maxPerService?: unknown };
};

/** Merge overrides (from the file or the environment) over a base, validating each field it touches. */
function apply(base: AgentConfig, o: Overrides): AgentConfig {
  const c: AgentConfig = structuredClone(base);
  if (o.api?.host !== undefined) c.api.host = text(o.api.host, 'api.host');
  if (o.api?.port !== undefined) c.api.port = port(o.api.port, 'api.port', true);
  if (o.api?.tlsPort !== undefined) c.api.tlsPort = port(o.api.tlsPort, 'api.tlsPort', true);
  if (o.dataDir !== undefined) c.dataDir = text(o.dataDir, 'dataDir');
  if (o.libvirtUri !== undefined) c.libvirtUri = text(o.libvirtUri, 'libvirtUri');
  if (o.domainType !== undefined) c.domainType = domainType(o.domainType);
  if (o.forward?.bindAddress !== undefined) c.forward.bindAddress = text(o.forward.bindAddress, 'forward.bindAddress');
  if (o.forward?.portRange !== undefined) c.forward.portRange = portRange(o.forward.portRange);
  if (o.seedDir !== undefined) c.seedDir = o.seedDir === null || o.seedDir === '' ? null : text(o.seedDir, 'seedDir');
  if (o.reconcileIntervalMs !== undefined) {
    const ms = o.reconcileIntervalMs;
    if (typeof ms !== 'number' || !(ms >= 50)) throw invalid('reconcileIntervalMs must be a number ≥ 50');
    c.reconcileIntervalMs = ms;
  }
  if (o.libvirtEvents !== undefined) c.libvirtEvents = flag(o.libvirtEvents, 'libvirtEvents');
  if (o.mqtt?.host !== undefined) c.mqtt.host = text(o.mqtt.host, 'mqtt.host');
  if (o.mqtt?.port !== undefined) c.mqtt.port = port(o.mqtt.port, 'mqtt.port', true);
  if (o.mqtt?.topicRoot !== undefined) c.mqtt.topicRoot = orNull(o.mqtt.topicRoot, 'mqtt.topicRoot');
  if (o.mqtt?.externalUrl !== undefined) c.mqtt.externalUrl = orNull(o.mqtt.externalUrl, 'mqtt.externalUrl');
  for (const key of ['externalCaFile', 'externalCertFile', 'externalKeyFile', 'externalUsername', 'externalPasswordFile'] as const) {
    if (o.mqtt?.[key] !== undefined) c.mqtt[key] = orNull(o.mqtt[key], `mqtt.${key}`);
  }
  if (o.mqtt?.externalKeepaliveSeconds !== undefined) {
    c.mqtt.externalKeepaliveSeconds = count(o.mqtt.externalKeepaliveSeconds, 'mqtt.externalKeepaliveSeconds', 1, 65535);
  }
  if (o.mqtt?.externalQueueLimit !== undefined) c.mqtt.externalQueueLimit = count(o.mqtt.externalQueueLimit, 'mqtt.externalQueueLimit', 1, 50_000);
  if (o.mqtt?.metricsIntervalMs !== undefined) {
    const ms = o.mqtt.metricsIntervalMs;
    if (typeof ms !== 'number' || !(ms >= 100)) throw invalid('mqtt.metricsIntervalMs must be a number ≥ 100');
    c.mqtt.metricsIntervalMs = ms;
  }
  if (o.discovery?.enabled !== undefined) c.discovery.enabled = flag(o.discovery.enabled, 'discovery.enabled');
  if (o.peers?.pollIntervalMs !== undefined) c.peers.pollIntervalMs = count(o.peers.pollIntervalMs, 'peers.pollIntervalMs', 500, 3_600_000);
  if (o.apps?.maxUploadBytes !== undefined) {
    const bytes = typeof o.apps.maxUploadBytes === 'string' && /^\d+$/.test(o.apps.maxUploadBytes) ? Number(o.apps.maxUploadBytes) : o.apps.maxUploadBytes;
    if (typeof bytes !== 'number' || !Number.isSafeInteger(bytes) || bytes < 1) throw invalid('apps.maxUploadBytes must be a positive number of bytes');
    c.apps.maxUploadBytes = bytes;
  }
  if (o.mqtt?.access !== undefined) c.mqtt.access = oneOf(o.mqtt.access, 'mqtt.access', ['devices', 'anonymous-read'] as const);
  if (o.mqtt?.discoveryPrefix !== undefined) c.mqtt.discoveryPrefix = topicPrefix(o.mqtt.discoveryPrefix, 'mqtt.discoveryPrefix');
  if (o.metrics?.token !== undefined) c.metrics.token = metricsToken(o.metrics.token, 'metrics.token');
  if (o.metrics?.tokenFile !== undefined) c.metrics.tokenFile = orNull(o.metrics.tokenFile, 'metrics.tokenFile');
  if (o.packages?.maxUploadBytes !== undefined) c.packages.maxUploadBytes = count(o.packages.maxUploadBytes, 'packages.maxUploadBytes', 1);
  if (o.packages?.maxPids !== undefined) c.packages.maxPids = count(o.packages.maxPids, 'packages.maxPids', 8);
  // cloudlet-logcap needs room for a few of its 64 KiB reads.
  if (o.packages?.logBytes !== undefined) c.packages.logBytes = count(o.packages.logBytes, 'packages.logBytes', 256 * 1024);
  if (o.kdApi !== undefined) c.kdApi = oneOf(o.kdApi, 'kdApi', ['plain', 'encrypted', 'off'] as const);
  if (o.logLevel !== undefined) c.logLevel = oneOf(o.logLevel, 'logLevel', ['info', 'debug'] as const);
  const limits = o.limits ?? {};
  if (limits.concurrentLaunches !== undefined) c.limits.concurrentLaunches = count(limits.concurrentLaunches, 'limits.concurrentLaunches', 1);
  if (limits.queuedLaunches !== undefined) c.limits.queuedLaunches = count(limits.queuedLaunches, 'limits.queuedLaunches', 0);
  if (limits.requestsPerSecond !== undefined) c.limits.requestsPerSecond = count(limits.requestsPerSecond, 'limits.requestsPerSecond', 1);
  if (limits.requestBurst !== undefined) c.limits.requestBurst = count(limits.requestBurst, 'limits.requestBurst', 1);
  if (limits.jsonBodyBytes !== undefined) c.limits.jsonBodyBytes = count(limits.jsonBodyBytes, 'limits.jsonBodyBytes', 1024);
  if (limits.bodyIdleMs !== undefined) c.limits.bodyIdleMs = count(limits.bodyIdleMs, 'limits.bodyIdleMs', 100, 10000);
  if (limits.bodyMinBytesPerSecond !== undefined) c.limits.bodyMinBytesPerSecond = count(limits.bodyMinBytesPerSecond, 'limits.bodyMinBytesPerSecond', 0);
  if (limits.bodyRateWindowMs !== undefined) c.limits.bodyRateWindowMs = count(limits.bodyRateWindowMs, 'limits.bodyRateWindowMs', 1000, 600000);
  if (limits.readinessTimeoutMs !== undefined) c.limits.readinessTimeoutMs = count(limits.readinessTimeoutMs, 'limits.readinessTimeoutMs', 1000, 600000);
  if (limits.anonymousInstancesPerAddress !== undefined) {
    c.limits.anonymousInstancesPerAddress = count(limits.anonymousInstancesPerAddress, 'limits.anonymousInstancesPerAddress', 0);
  }
  if (limits.anonymousInstances !== undefined) c.limits.anonymousInstances = count(limits.anonymousInstances, 'limits.anonymousInstances', 0);
  if (limits.mqttConnectionsPerAddress !== undefined)
    c.limits.mqttConnectionsPerAddress = count(limits.mqttConnectionsPerAddress, 'limits.mqttConnectionsPerAddress', 1);
  if (limits.connectionsPerDevice !== undefined) c.limits.connectionsPerDevice = count(limits.connectionsPerDevice, 'limits.connectionsPerDevice', 1);
  const pool = o.pool ?? {};
  if (pool.memoryBudgetMib !== undefined) c.pool.memoryBudgetMib = count(pool.memoryBudgetMib, 'pool.memoryBudgetMib', 0);
  if (pool.hostReserveMib !== undefined) c.pool.hostReserveMib = count(pool.hostReserveMib, 'pool.hostReserveMib', 0);
  if (pool.maxPerService !== undefined) c.pool.maxPerService = count(pool.maxPerService, 'pool.maxPerService', 0, 16);
  if (pool.sizes !== undefined) c.pool.sizes = poolSizes(pool.sizes);
  return c;
}

/** The external broker's settings must make sense together, and a password never crosses a network in the clear. */
function checkUplink(m: AgentConfig['mqtt']): void {
  if ((m.externalCertFile === null) !== (m.externalKeyFile === null)) throw invalid('mqtt.externalCertFile and mqtt.externalKeyFile go together');
  if (m.externalPasswordFile !== null && m.externalUsername === null) throw invalid('mqtt.externalPasswordFile needs mqtt.externalUsername');
  if (m.externalUrl === null) return;
  let url: URL;
  try {
    url = new URL(m.externalUrl);
  } catch {
    throw invalid(`mqtt.externalUrl is not a URL: ${JSON.stringify(m.externalUrl)}`);
  }
  if (!['mqtt:', 'mqtts:', 'ws:', 'wss:'].includes(url.protocol)) throw invalid('mqtt.externalUrl must be mqtt://, mqtts://, ws:// or wss://');
  if (url.username || url.password) throw invalid('mqtt.externalUrl must not carry credentials: use mqtt.externalUsername and mqtt.externalPasswordFile');
  const loopback = ['localhost', '127.0.0.1', '[::1]'].includes(url.hostname) || url.hostname.startsWith('127.');
  const tls = url.protocol === 'mqtts:' || url.protocol === 'wss:';
  if (m.externalPasswordFile !== null && !tls && !loopback)
    throw invalid('mqtt.externalPasswordFile needs mqtts:// or wss:// (a password crosses a network only inside TLS)');
  if ((m.externalCaFile !== null || m.externalCertFile !== null) && !tls)
    throw invalid('mqtt.externalCaFile and mqtt.externalCertFile need mqtts:// or wss://');
}

function fromEnvironment(env: NodeJS.ProcessEnv): Overrides {
  return {
    api: { host: env.CLOUDLET_API_HOST, port: env.CLOUDLET_PORT, tlsPort: env.CLOUDLET_TLS_PORT },
    dataDir: env.CLOUDLET_DATA_DIR,
    libvirtUri: env.CLOUDLET_LIBVIRT_URI,
    domainType: env.CLOUDLET_DOMAIN_TYPE,
    forward: { bindAddress: env.CLOUDLET_FORWARD_ADDRESS, portRange: env.CLOUDLET_PORT_RANGE },
    seedDir: env.CLOUDLET_SEED_DIR,
    libvirtEvents: env.CLOUDLET_LIBVIRT_EVENTS,
    mqtt: {
      host: env.CLOUDLET_MQTT_HOST,
      port: env.CLOUDLET_MQTT_PORT,
      externalUrl: env.CLOUDLET_MQTT_URL,
      access: env.CLOUDLET_MQTT_ACCESS,
      discoveryPrefix: env.CLOUDLET_MQTT_DISCOVERY_PREFIX,
    },
    metrics: { token: env.CLOUDLET_METRICS_TOKEN, tokenFile: env.CLOUDLET_METRICS_TOKEN_FILE },
    discovery: { enabled: env.CLOUDLET_DISCOVERY },
    peers: { pollIntervalMs: env.CLOUDLET_PEERS_POLL_MS },
    apps: { maxUploadBytes: env.CLOUDLET_APP_MAX_BYTES },
    packages: { maxUploadBytes: env.CLOUDLET_PACKAGE_MAX_BYTES },
    kdApi: env.CLOUDLET_KD_API,
    logLevel: env.CLOUDLET_LOG_LEVEL,
    limits: {
      concurrentLaunches: env.CLOUDLET_MAX_LAUNCHES,
      queuedLaunches: env.CLOUDLET_LAUNCH_QUEUE,
      requestsPerSecond: env.CLOUDLET_RATE_PER_SECOND,
      requestBurst: env.CLOUDLET_RATE_BURST,
      jsonBodyBytes: env.CLOUDLET_MAX_BODY_BYTES,
      bodyIdleMs: env.CLOUDLET_BODY_IDLE_MS,
      bodyMinBytesPerSecond: env.CLOUDLET_BODY_MIN_RATE,
      bodyRateWindowMs: env.CLOUDLET_BODY_RATE_WINDOW_MS,
      readinessTimeoutMs: env.CLOUDLET_READINESS_TIMEOUT_MS,
      anonymousInstancesPerAddress: env.CLOUDLET_KD_INSTANCES_PER_ADDRESS,
      anonymousInstances: env.CLOUDLET_KD_INSTANCES,
      mqttConnectionsPerAddress: env.CLOUDLET_MQTT_CONNECTIONS_PER_ADDRESS,
      connectionsPerDevice: env.CLOUDLET_CONNECTIONS_PER_DEVICE,
    },
    pool: { memoryBudgetMib: env.CLOUDLET_POOL_BUDGET_MIB, hostReserveMib: env.CLOUDLET_POOL_HOST_RESERVE_MIB },
  };
}

export async function loadConfig(env: NodeJS.ProcessEnv = process.env): Promise<AgentConfig> {
  const file = env.CLOUDLET_CONFIG ?? DEFAULT_CONFIG_FILE;
  let fromFile: Overrides = {};
  try {
    fromFile = JSON.parse(await readFile(file, 'utf8')) as Overrides;
  } catch (err) {
    // Only the default file may be absent; a named file that is missing or malformed is a mistake worth stopping for.
    if (!(isErrno(err, 'ENOENT') && env.CLOUDLET_CONFIG === undefined)) {
      throw invalid(`cannot read ${file}: ${(err as Error).message}`);
    }
  }
  const config = apply(apply(DEFAULT_CONFIG, fromFile), fromEnvironment(env));
  checkUplink(config.mqtt);
  return config;
}
