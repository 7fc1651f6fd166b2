/**
 * The JSON Schemas (2020-12, as OpenAPI 3.1 takes them) of the /v1 wire shapes: what wire-shapes.ts and the v1*.ts
 * route modules answer. openapi.ts puts them under `components.schemas`; test/openapi.e2e.test.ts checks live
 * answers against them. The error's `code` enum is ERROR_CODES itself, never a copy.
 */
import { ERROR_CODES } from '../errors';

type Schema = Record<string, unknown>;

export const ref = (name: string): Schema => ({ $ref: `#/components/schemas/${name}` });

const str: Schema = { type: 'string' };
const int: Schema = { type: 'integer' };
const bool: Schema = { type: 'boolean' };
const num: Schema = { type: 'number' };
const time: Schema = { type: 'string', format: 'date-time' };
const strings: Schema = { type: 'array', items: str };
const nullable = (schema: Schema): Schema => ({ anyOf: [schema, { type: 'null' }] });
const enumOf = (...values: string[]): Schema => ({ type: 'string', enum: values });

/** An object with exactly these properties, all required unless named in `optional`. */
function object(properties: Record<string, Schema>, optional: string[] = []): Schema {
  return { type: 'object', properties, required: Object.keys(properties).filter((key) => !optional.includes(key)) };
}

const readiness: Schema = {
  oneOf: [object({ type: { const: 'http' }, path: str, timeout_ms: int }), object({ type: { const: 'tcp' }, timeout_ms: int })],
};

const instanceState = enumOf('starting', 'ready', 'stopping');
/** An instance event also tells the end of an instance: its final state. */
const eventState = enumOf('starting', 'ready', 'stopping', 'stopped', 'crashed', 'moved');

function instance(state: Schema): Schema {
  return object({
    id: str,
    service_id: str,
    mechanism: enumOf('cached-vm', 'app-virt', 'on-demand', 'synthesis'),
    state,
    bind_address: str,
    host_port: int,
    guest_port: int,
    shareable: bool,
    users: int,
    owners: strings,
    launch: enumOf('memory-state', 'cold-boot', 'warm-pool', 'handoff'),
    created_at: time,
    ready_at: nullable(time),
  });
}

export const SCHEMAS: Record<string, Schema> = {
  Error: {
    ...object({ code: { type: 'string', enum: ERROR_CODES }, message: str, details: { type: 'object' } }, ['details']),
    description: 'Every /v1 error: `code` is stable (agent/src/errors.ts), `message` is for people, `details` machine-readable facts.',
  },
  Health: object(
    {
      ok: bool,
      checks: { type: 'array', items: object({ name: str, ok: bool, optional: bool, detail: str }, ['optional', 'detail']) },
      parts: {
        type: 'array',
        items: object({
          part: enumOf('discovery', 'https', 'mqtt-tcp', 'mqtt-external'),
          state: enumOf('on', 'starting', 'off', 'disabled'),
          reason: nullable(str),
          fix: nullable(str),
        }),
      },
      load: object({
        reconcile_ms: nullable(object({ last: num, median: num, max: num })),
        event_loop_delay_ms: nullable(object({ p50: num, p99: num, max: num })),
      }),
    },
    ['parts', 'load'],
  ),
  SystemInfo: object(
    {
      hostname: str,
      agent_version: str,
      cpu: object({ cores: int, usage_percent: { type: 'number' }, speed_mhz: str, cache_kb: int }),
      memory: object({ total_bytes: int, free_bytes: int }),
      hypervisor: object({ uri: str, domain_type: str, libvirt_version: str }),
      instances: int,
      discovery: object({ state: enumOf('published', 'registering', 'unavailable', 'failed', 'disabled'), name: nullable(str), detail: str }, ['detail']),
      tls_fingerprint: nullable(str),
      tls_port: nullable(int),
    },
    ['tls_fingerprint', 'tls_port'],
  ),
  ServiceManifest: object({
    format: { const: 1 },
    service_id: str,
    version: str,
    description: str,
    tags: strings,
    port: int,
    memory_mib: int,
    vcpus: int,
    shareable: bool,
    readiness,
    disk: str,
    state: nullable(str),
    boot: nullable(object({ kernel: str, initrd: nullable(str), cmdline: str })),
  }),
  Service: {
    ...object(
      {
        id: str,
        dir: str,
        imported_at: time,
        manifest: ref('ServiceManifest'),
        pool: object({ size: int, target: int, ready: int, filling: int }),
      },
      ['dir', 'pool'],
    ),
    description: '`dir` (where it is on the host) is in the operator’s answers only; `pool`, the warm pool (docs/warm-pool.md), where it has one.',
  },
  Package: object(
    {
      id: str,
      sha256: str,
      dir: str,
      imported_at: time,
      manifest: object({
        format: { const: 1 },
        app_id: str,
        version: str,
        description: str,
        tags: strings,
        command: strings,
        port: int,
        env: { type: 'object', additionalProperties: str },
        memory_mib: int,
        cpus: { type: 'number' },
        pids: int,
        data_mib: int,
        shareable: bool,
        readiness,
      }),
    },
    ['dir'],
  ),
  Instance: instance(instanceState),
  StartResult: object(
    {
      instance: ref('Instance'),
      endpoint: object({ address: str, port: int }),
      joined: bool,
      timings: object({ total_ms: { type: 'number' }, libvirt_ms: { type: 'number' }, guest_ms: { type: 'number' }, agent_ms: { type: 'number' } }),
    },
    ['timings'],
  ),
  StopResult: object({ destroyed: bool, users: int }),
  Peer: {
    ...object({
      name: str,
      host: nullable(str),
      address: str,
      port: int,
      txt: { type: 'object', additionalProperties: str },
      interface: nullable(str),
      seen_at: nullable(time),
      paired: nullable(object({ id: str, device_id: str, tls_port: int, tls_fingerprint: str, paired_at: time })),
      placement: nullable({ allOf: [ref('Placement'), object({ fetched_at: time })] }),
      placement_error: nullable(str),
    }),
    description: 'Seen over mDNS (`seen_at`: a sighting, not a fact), paired with (`paired`), or both; `placement`: the facts a paired cloudlet gave.',
  },
  Placement: object({
    name: str,
    agent_version: str,
    services: {
      type: 'array',
      items: object({ service_id: str, version: str, disk_sha256: nullable(str), memory_mib: int, vcpus: int, has_state: bool }),
    },
    packages: { type: 'array', items: object({ app_id: str, version: str, sha256: str }) },
    memory: object({ total_bytes: int, free_bytes: int }),
    cpu: object({ cores: int, usage_percent: num }),
    load_average: { type: 'array', items: num, minItems: 3, maxItems: 3 },
    instances: object({ running: int }),
  }),
  App: object({
    id: str,
    kind: enumOf('android', 'web'),
    os_name: str,
    service_id: str,
    name: str,
    description: str,
    package_name: str,
    version: str,
    min_os_version: str,
    tags: strings,
    file_name: str,
    size: int,
    md5: str,
    sha256: str,
    added_at: time,
    download: str,
  }),
  Base: object(
    {
      digest: str,
      name: str,
      dir: str,
      memory_mib: int,
      vcpus: int,
      disk: str,
      state: nullable(str),
      boot: nullable(object({ kernel: str, initrd: nullable(str), cmdline: str })),
      manifest: ref('ServiceManifest'),
      files: { type: 'array', items: object({ name: str, bytes: int, sha256: str, download: str }) },
    },
    ['dir'],
  ),
  RecipeSummary: object({
    id: str,
    version: str,
    description: str,
    base: str,
    digest: str,
    port: int,
    files: { type: 'integer', description: 'how many files the recipe writes' },
    packages: strings,
    cache: enumOf('on-request', 'after-first-use'),
  }),
  Recipe: {
    ...object(
      {
        format: { const: 1 },
        service_id: str,
        version: str,
        description: str,
        base: str,
        port: int,
        memory_mib: nullable(int),
        vcpus: nullable(int),
        shareable: bool,
        readiness,
        files: {
          type: 'array',
          maxItems: 64,
          items: object({ path: str, content: str, encoding: enumOf('utf8', 'base64'), mode: str }, ['encoding', 'mode']),
        },
        script: str,
        packages: strings,
        cache: enumOf('on-request', 'after-first-use'),
      },
      ['description', 'memory_mib', 'vcpus', 'shareable', 'readiness', 'files', 'packages', 'cache'],
    ),
    description: 'An On-Demand VM Provisioning recipe (docs/api.md#on-demand-provisioning); file contents are base64 in answers.',
  },
  SynthesisResult: {
    allOf: [ref('StartResult')],
    properties: { kept_as: ref('Service'), keep_error: object({ code: str, message: str }) },
  },
  Upload: object(
    {
      id: str,
      bytes: int,
      received: int,
      state: enumOf('receiving', 'synthesizing', 'done', 'failed'),
      upload: str,
      result: ref('SynthesisResult'),
      error: object({ code: str, message: str }),
    },
    ['result', 'error'],
  ),
  PairingWindow: object({
    code: str,
    kind: enumOf('device', 'cloudlet'),
    expires_at: time,
    device_expires_in_minutes: nullable({ type: 'number' }),
    tls_fingerprint: str,
    tls_port: nullable(int),
  }),
  PairedCredential: object({
    device_id: str,
    name: str,
    kind: enumOf('device', 'cloudlet'),
    paired_at: time,
    expires_at: nullable(time),
    token: str,
    legacy_password: nullable(str),
    tls_fingerprint: nullable(str),
    tls_port: nullable(int),
  }),
  Device: object({
    id: str,
    name: str,
    kind: enumOf('device', 'cloudlet'),
    paired_at: time,
    expires_at: nullable(time),
    revoked_at: nullable(time),
    standing: enumOf('active', 'revoked', 'expired'),
  }),
  MovedTo: {
    description: 'Where a handed-off instance runs now (docs/handoff.md): the paired cloudlet (its peer id here), and the endpoint there.',
    ...object({ cloudlet_id: str, name: str, address: str, port: int, api_port: int }),
  },
  Event: {
    description: 'One message of the /v1/events WebSocket: a snapshot first, then instance changes and launch progress.',
    oneOf: [
      object({ type: { const: 'snapshot' }, instances: { type: 'array', items: ref('Instance') } }),
      object(
        {
          type: { const: 'instance' },
          state: eventState,
          reason: str,
          moved_to: ref('MovedTo'),
          instance: instance(eventState),
          at: time,
        },
        ['reason', 'moved_to'],
      ),
      object(
        {
          type: { const: 'progress' },
          instance_id: str,
          service_id: str,
          phase: enumOf('synthesizing', 'cloning', 'restoring', 'booting', 'provisioning', 'waiting-ready', 'ready'),
          percent: { type: 'number' },
          bytes_done: int,
          bytes_total: int,
          at: time,
        },
        ['bytes_done', 'bytes_total'],
      ),
    ],
  },
};
