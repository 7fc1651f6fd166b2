// The agent's configuration: embedded defaults, a JSON file over them, environment variables over both.
import t from 'tap';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { DEFAULT_CONFIG, loadConfig } from '../agent/src/config';

const NO_FILE = { CLOUDLET_CONFIG: undefined };

t.test('with nothing configured the agent runs on its embedded defaults', async (t) => {
  // The default file (/etc/cloudlet/agent.json) is absent on test machines.
  const config = await loadConfig({ ...NO_FILE });
  t.same(config, DEFAULT_CONFIG);
  t.equal(config.api.port, 9999, 'KD-Cloudlet clients expect port 9999');
  t.equal(config.libvirtUri, 'qemu:///system');
  t.equal(config.domainType, 'auto');
});

t.test('environment variables override the defaults', async (t) => {
  const config = await loadConfig({
    CLOUDLET_PORT: '18080',
    CLOUDLET_DATA_DIR: '/srv/cloudlet',
    CLOUDLET_LIBVIRT_URI: 'test:///default',
    CLOUDLET_FORWARD_ADDRESS: '127.0.0.1',
    CLOUDLET_PORT_RANGE: '30000-30009',
    CLOUDLET_DOMAIN_TYPE: 'qemu',
    CLOUDLET_SEED_DIR: '',
  });
  t.equal(config.api.port, 18080);
  t.equal(config.dataDir, '/srv/cloudlet');
  t.equal(config.libvirtUri, 'test:///default');
  t.same(config.forward, { bindAddress: '127.0.0.1', portRange: { first: 30000, last: 30009 } });
  t.equal(config.domainType, 'qemu');
  t.equal(config.seedDir, null, 'an empty seed directory turns seeding off');
});

t.test('a config file overrides the defaults and the environment overrides the file', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-config-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'agent.json');
  await writeFile(file, JSON.stringify({ api: { port: 7000 }, dataDir: '/from/file', forward: { portRange: '25000-25100' } }));
  const config = await loadConfig({ CLOUDLET_CONFIG: file, CLOUDLET_DATA_DIR: '/from/env' });
  t.equal(config.api.port, 7000);
  t.equal(config.api.host, '0.0.0.0', 'unset fields keep their defaults');
  t.equal(config.dataDir, '/from/env');
  t.same(config.forward.portRange, { first: 25000, last: 25100 });
});

t.test('bad settings stop the agent with one line naming the setting', async (t) => {
  const bad: Array<[Record<string, string>, RegExp]> = [
    [{ CLOUDLET_PORT: '99999' }, /api\.port must be a port number/],
    [{ CLOUDLET_PORT: 'http' }, /api\.port must be a port number/],
    [{ CLOUDLET_PORT_RANGE: '21000' }, /port range must look like/],
    [{ CLOUDLET_PORT_RANGE: '21010-21000' }, /is empty/],
    [{ CLOUDLET_DOMAIN_TYPE: 'xen' }, /domainType must be auto, kvm or qemu/],
    [{ CLOUDLET_CONFIG: '/nonexistent/agent.json' }, /cannot read \/nonexistent\/agent\.json/],
  ];
  for (const [env, message] of bad) {
    await t.rejects(loadConfig({ ...NO_FILE, ...env }), { code: 'INVALID_PARAMETER', message }, JSON.stringify(env));
  }
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-config-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await writeFile(path.join(dir, 'broken.json'), '{ "api": ');
  await t.rejects(loadConfig({ CLOUDLET_CONFIG: path.join(dir, 'broken.json') }), { code: 'INVALID_PARAMETER', message: /cannot read/ });
});

t.test('telemetry, discovery and libvirt events are configured from the file and the environment', async (t) => {
  t.match(
    await loadConfig({ ...NO_FILE }),
    {
      libvirtEvents: true,
      discovery: { enabled: true },
      mqtt: { host: '0.0.0.0', port: 1883, topicRoot: null, metricsIntervalMs: 10000, externalUrl: null },
    },
    'defaults: broker on 1883, discovery and events on',
  );
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-config-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'agent.json');
  await writeFile(file, JSON.stringify({ mqtt: { topicRoot: 'fleet/site-7', metricsIntervalMs: 2000 }, discovery: { enabled: false } }));
  const config = await loadConfig({
    CLOUDLET_CONFIG: file,
    CLOUDLET_MQTT_HOST: '127.0.0.1',
    CLOUDLET_MQTT_PORT: '0',
    CLOUDLET_MQTT_URL: 'mqtt://fleet.example:1883',
    CLOUDLET_LIBVIRT_EVENTS: 'off',
  });
  t.match(config.mqtt, {
    host: '127.0.0.1',
    port: 0,
    topicRoot: 'fleet/site-7',
    metricsIntervalMs: 2000,
    externalUrl: 'mqtt://fleet.example:1883',
    access: 'devices',
    discoveryPrefix: 'homeassistant',
  });
  t.equal(config.discovery.enabled, false);
  t.equal(config.libvirtEvents, false);
  await t.rejects(loadConfig({ ...NO_FILE, CLOUDLET_DISCOVERY: 'maybe' }), { code: 'INVALID_PARAMETER', message: /discovery\.enabled must be true or false/ });
  await t.rejects(loadConfig({ ...NO_FILE, CLOUDLET_MQTT_PORT: '70000' }), { code: 'INVALID_PARAMETER', message: /mqtt\.port must be a port number/ });
});

t.test('the KD face mode, MQTT access and the limits come from the file and the environment, checked', async (t) => {
  t.match(
    await loadConfig({ ...NO_FILE }),
    {
      kdApi: 'plain',
      mqtt: { access: 'devices' },
      packages: { maxUploadBytes: 1024 ** 3 },
      limits: {
        concurrentLaunches: 2,
        queuedLaunches: 8,
        requestsPerSecond: 20,
        requestBurst: 60,
        jsonBodyBytes: 65536,
        bodyIdleMs: 8000,
        bodyMinBytesPerSecond: 4096,
        bodyRateWindowMs: 8000,
        readinessTimeoutMs: 120000,
      },
    },
    'defaults: KD plain (as KD), MQTT for paired devices, two launches at once',
  );
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-config-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'agent.json');
  await writeFile(file, JSON.stringify({ kdApi: 'encrypted', mqtt: { access: 'anonymous-read' }, limits: { concurrentLaunches: 4, requestBurst: 10 } }));
  const config = await loadConfig({ CLOUDLET_CONFIG: file, CLOUDLET_LAUNCH_QUEUE: '0', CLOUDLET_BODY_IDLE_MS: '2000', CLOUDLET_PACKAGE_MAX_BYTES: '1000000' });
  t.equal(config.kdApi, 'encrypted');
  t.equal(config.mqtt.access, 'anonymous-read');
  t.same(config.limits, {
    concurrentLaunches: 4,
    queuedLaunches: 0,
    requestsPerSecond: 20,
    requestBurst: 10,
    jsonBodyBytes: 65536,
    bodyIdleMs: 2000,
    bodyMinBytesPerSecond: 4096,
    bodyRateWindowMs: 8000,
    readinessTimeoutMs: 120000,
    anonymousInstancesPerAddress: 2,
    anonymousInstances: 8,
    mqttConnectionsPerAddress: 16,
    connectionsPerDevice: 8,
  });
  t.match(
    (await loadConfig({ ...NO_FILE, CLOUDLET_KD_INSTANCES_PER_ADDRESS: '1', CLOUDLET_KD_INSTANCES: '0' })).limits,
    { anonymousInstancesPerAddress: 1, anonymousInstances: 0 },
    "the open KD face's bounds (0: no anonymous start at all)",
  );
  t.equal(config.packages.maxUploadBytes, 1000000);
  t.equal((await loadConfig({ ...NO_FILE, CLOUDLET_KD_API: 'off' })).kdApi, 'off');
  await t.rejects(loadConfig({ ...NO_FILE, CLOUDLET_KD_API: 'secret' }), { code: 'INVALID_PARAMETER', message: /kdApi must be plain, encrypted, off/ });
  await t.rejects(loadConfig({ ...NO_FILE, CLOUDLET_MQTT_ACCESS: 'open' }), { code: 'INVALID_PARAMETER', message: /mqtt\.access/ });
  await t.rejects(loadConfig({ ...NO_FILE, CLOUDLET_MAX_LAUNCHES: '0' }), { code: 'INVALID_PARAMETER', message: /limits\.concurrentLaunches/ });
  await t.rejects(loadConfig({ ...NO_FILE, CLOUDLET_BODY_IDLE_MS: '30000' }), {
    code: 'INVALID_PARAMETER',
    message: /limits\.bodyIdleMs must be a whole number from 100 to 10000/,
  });
});

t.test('the minimum pace of request bodies and the bound on readiness timeouts come from the environment, checked', async (t) => {
  const config = await loadConfig({ ...NO_FILE, CLOUDLET_BODY_MIN_RATE: '0', CLOUDLET_BODY_RATE_WINDOW_MS: '5000', CLOUDLET_READINESS_TIMEOUT_MS: '30000' });
  t.match(config.limits, { bodyMinBytesPerSecond: 0, bodyRateWindowMs: 5000, readinessTimeoutMs: 30000 }, '0 turns the minimum rate off');
  await t.rejects(loadConfig({ ...NO_FILE, CLOUDLET_BODY_RATE_WINDOW_MS: '100' }), {
    code: 'INVALID_PARAMETER',
    message: /limits\.bodyRateWindowMs must be a whole number from 1000 to 600000/,
  });
  await t.rejects(loadConfig({ ...NO_FILE, CLOUDLET_READINESS_TIMEOUT_MS: '3600000' }), {
    code: 'INVALID_PARAMETER',
    message: /limits\.readinessTimeoutMs must be a whole number from 1000 to 600000/,
  });
});

t.test("Home Assistant's discovery prefix and the metrics credential come from the file and the environment, checked", async (t) => {
  t.equal((await loadConfig({ ...NO_FILE })).mqtt.discoveryPrefix, 'homeassistant', "HA's own default prefix");
  t.equal((await loadConfig({ ...NO_FILE, CLOUDLET_MQTT_DISCOVERY_PREFIX: 'ha/site-1' })).mqtt.discoveryPrefix, 'ha/site-1');
  t.equal((await loadConfig({ ...NO_FILE, CLOUDLET_MQTT_DISCOVERY_PREFIX: '' })).mqtt.discoveryPrefix, null, 'empty: not published');
  for (const prefix of ['ha/#', 'ha/+/x', '/ha', 'ha/', 'ha//x', 'h a']) {
    await t.rejects(
      loadConfig({ ...NO_FILE, CLOUDLET_MQTT_DISCOVERY_PREFIX: prefix }),
      { code: 'INVALID_PARAMETER', message: /mqtt\.discoveryPrefix/ },
      prefix,
    );
  }
  t.same((await loadConfig({ ...NO_FILE })).metrics, { token: null, tokenFile: null }, 'no credential: the operator alone scrapes');
  const token = 'a-long-enough-metrics-token';
  t.same((await loadConfig({ ...NO_FILE, CLOUDLET_METRICS_TOKEN: token, CLOUDLET_METRICS_TOKEN_FILE: '/etc/cloudlet/metrics-token' })).metrics, {
    token,
    tokenFile: '/etc/cloudlet/metrics-token',
  });
  for (const bad of ['short', 'has white space in it, long enough']) {
    await t.rejects(loadConfig({ ...NO_FILE, CLOUDLET_METRICS_TOKEN: bad }), { code: 'INVALID_PARAMETER', message: /metrics\.token/ }, bad);
  }
});

t.test('the fleet uplink: TLS and credentials from files, a bounded queue, and no password outside TLS', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-config-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'agent.json');
  t.match(DEFAULT_CONFIG.mqtt, {
    externalUrl: null,
    externalCaFile: null,
    externalPasswordFile: null,
    externalKeepaliveSeconds: 30,
    externalQueueLimit: 10000,
  });
  const uplink = (mqtt: Record<string, unknown>) => writeFile(file, JSON.stringify({ mqtt })).then(() => loadConfig({ CLOUDLET_CONFIG: file }));
  t.match(
    (
      await uplink({
        externalUrl: 'mqtts://fleet.example:8883',
        externalCaFile: '/etc/cloudlet/fleet-ca.pem',
        externalUsername: 'site-7',
        externalPasswordFile: '/etc/cloudlet/fleet-password',
        externalKeepaliveSeconds: 10,
        externalQueueLimit: 500,
      })
    ).mqtt,
    {
      externalCaFile: '/etc/cloudlet/fleet-ca.pem',
      externalUsername: 'site-7',
      externalPasswordFile: '/etc/cloudlet/fleet-password',
      externalKeepaliveSeconds: 10,
      externalQueueLimit: 500,
    },
  );
  const refusals: Array<[Record<string, unknown>, RegExp]> = [
    [{ externalUrl: 'mqtt://fleet.example:1883', externalUsername: 'site-7', externalPasswordFile: '/p' }, /a password crosses a network only inside TLS/],
    [{ externalUrl: 'mqtt://fleet.example:1883', externalCaFile: '/ca.pem' }, /need mqtts:\/\/ or wss:\/\//],
    [{ externalUrl: 'mqtts://fleet.example', externalCertFile: '/c.pem' }, /externalCertFile and mqtt\.externalKeyFile go together/],
    [{ externalUrl: 'mqtts://fleet.example', externalPasswordFile: '/p' }, /externalPasswordFile needs mqtt\.externalUsername/],
    [{ externalUrl: 'mqtts://site-7:secret@fleet.example' }, /must not carry credentials/],
    [{ externalUrl: 'http://fleet.example' }, /must be mqtt:\/\/, mqtts:\/\/, ws:\/\/ or wss:\/\//],
    [{ externalQueueLimit: 0 }, /mqtt\.externalQueueLimit must be a whole number from 1 to 50000/],
    [{ externalKeepaliveSeconds: 0 }, /mqtt\.externalKeepaliveSeconds must be a whole number from 1 to 65535/],
  ];
  for (const [mqtt, message] of refusals) await t.rejects(uplink(mqtt), { code: 'INVALID_PARAMETER', message }, JSON.stringify(mqtt));
  t.equal(
    (await uplink({ externalUrl: 'mqtt://127.0.0.1:1883', externalUsername: 'site-7', externalPasswordFile: '/p' })).mqtt.externalUsername,
    'site-7',
    'a password may go to a broker on loopback',
  );
});
