/**
 * What placement needs to know of a cloudlet (`GET /v1/placement`, which a paired cloudlet may ask): the services it
 * holds with the digests of their images, free memory, CPU, load and running instances. The shape is the wire's, and
 * checkPlacement is how a cloudlet reads another's: every field checked and bounded, nothing else kept.
 */
import { CloudletError } from '../errors';

export interface PlacementFacts {
  name: string;
  agent_version: string;
  services: Array<{ service_id: string; version: string; disk_sha256: string | null; memory_mib: number; vcpus: number; has_state: boolean }>;
  packages: Array<{ app_id: string; version: string; sha256: string }>;
  memory: { total_bytes: number; free_bytes: number };
  cpu: { cores: number; usage_percent: number };
  /** The 1, 5 and 15 minute load averages. */
  load_average: [number, number, number];
  instances: { running: number };
}

/** More than any box holds; a peer claiming more is not believed at all. */
const MAX_ENTRIES = 2000;
const MAX_TEXT = 200;

function bad(what: string): never {
  throw new CloudletError('PEER_REFUSED', `the other cloudlet's placement is malformed: ${what}`);
}

function text(value: unknown, what: string): string {
  if (typeof value !== 'string' || value.length > MAX_TEXT) bad(`${what} is not a string of at most ${MAX_TEXT} characters`);
  return value;
}

function amount(value: unknown, what: string): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) bad(`${what} is not a number ≥ 0`);
  return value;
}

function digest(value: unknown, what: string): string {
  if (typeof value !== 'string' || !/^[0-9a-f]{64}$/.test(value)) bad(`${what} is not a SHA-256 in hex`);
  return value;
}

function list(value: unknown, what: string): unknown[] {
  if (!Array.isArray(value) || value.length > MAX_ENTRIES) bad(`${what} is not a list of at most ${MAX_ENTRIES}`);
  return value;
}

function record(value: unknown, what: string): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) bad(`${what} is not an object`);
  return value as Record<string, unknown>;
}

/** Another cloudlet's placement, checked field by field (PEER_REFUSED naming the first bad field). */
export function checkPlacement(value: unknown): PlacementFacts {
  const body = record(value, 'the answer');
  const memory = record(body.memory, 'memory');
  const cpu = record(body.cpu, 'cpu');
  const load = list(body.load_average, 'load_average');
  if (load.length !== 3) bad('load_average does not have three figures');
  return {
    name: text(body.name, 'name'),
    agent_version: text(body.agent_version, 'agent_version'),
    services: list(body.services, 'services').map((entry, i) => {
      const s = record(entry, `services[${i}]`);
      if (typeof s.has_state !== 'boolean') bad(`services[${i}].has_state is not a boolean`);
      return {
        service_id: text(s.service_id, `services[${i}].service_id`),
        version: text(s.version, `services[${i}].version`),
        disk_sha256: s.disk_sha256 === null ? null : digest(s.disk_sha256, `services[${i}].disk_sha256`),
        memory_mib: amount(s.memory_mib, `services[${i}].memory_mib`),
        vcpus: amount(s.vcpus, `services[${i}].vcpus`),
        has_state: s.has_state,
      };
    }),
    packages: list(body.packages, 'packages').map((entry, i) => {
      const p = record(entry, `packages[${i}]`);
      return {
        app_id: text(p.app_id, `packages[${i}].app_id`),
        version: text(p.version, `packages[${i}].version`),
        sha256: digest(p.sha256, `packages[${i}].sha256`),
      };
    }),
    memory: { total_bytes: amount(memory.total_bytes, 'memory.total_bytes'), free_bytes: amount(memory.free_bytes, 'memory.free_bytes') },
    cpu: { cores: amount(cpu.cores, 'cpu.cores'), usage_percent: amount(cpu.usage_percent, 'cpu.usage_percent') },
    load_average: [amount(load[0], 'load_average[0]'), amount(load[1], 'load_average[1]'), amount(load[2], 'load_average[2]')],
    instances: { running: amount(record(body.instances, 'instances').running, 'instances.running') },
  };
}
