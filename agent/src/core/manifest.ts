import { CloudletError } from '../errors';
import type { DirectBoot, ReadinessProbe, ServiceManifest } from './types';

/** Service ids are reverse-DNS-like names: they become directory names and parts of libvirt domain names. */
export const SERVICE_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/;
/** Files named by a manifest live in the service directory itself: a bare name, never a path. */
const FILE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export const LIMITS = { memoryMib: { min: 32, max: 65536 }, vcpus: { min: 1, max: 64 }, timeoutMs: { min: 1000, max: 600000 }, poolSize: { max: 16 } };

/** Reads the fields of a parsed manifest (a service's or an app package's); every problem names the field. */
export class ManifestReader {
  private constructor(readonly raw: Record<string, unknown>) {}

  static of(json: unknown): ManifestReader {
    if (typeof json !== 'object' || json === null || Array.isArray(json)) {
      throw new CloudletError('INVALID_MANIFEST', 'manifest.json must hold a JSON object');
    }
    return new ManifestReader(json as Record<string, unknown>);
  }

  fail(field: string, problem: string): never {
    throw new CloudletError('INVALID_MANIFEST', `manifest.json: ${field} ${problem}`, { details: { field } });
  }

  string(field: string, value: unknown = this.raw[field], pattern?: RegExp): string {
    if (typeof value !== 'string' || value.length === 0) this.fail(field, 'must be a non-empty string');
    if (value.length > 1000) this.fail(field, 'is longer than 1000 characters');
    if (pattern && !pattern.test(value)) this.fail(field, `has an invalid value ${JSON.stringify(value)}`);
    return value;
  }

  integer(field: string, min: number, max: number, value: unknown = this.raw[field]): number {
    if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
      this.fail(field, `must be an integer from ${min} to ${max}`);
    }
    return value;
  }

  tags(): string[] {
    const tags = this.raw.tags === undefined ? [] : this.raw.tags;
    if (!Array.isArray(tags) || tags.length > 32 || !tags.every((t) => typeof t === 'string' && t.length > 0 && t.length <= 64)) {
      this.fail('tags', 'must be a list of at most 32 short strings');
    }
    return tags as string[];
  }

  /** An optional boolean, false when absent. */
  flag(field: string): boolean {
    const value = this.raw[field];
    if (value !== undefined && typeof value !== 'boolean') this.fail(field, 'must be true or false');
    return value === true;
  }

  fileName(field: string, value: unknown): string {
    return this.string(field, value, FILE_NAME);
  }
}

export function readiness(r: ManifestReader, value: unknown): ReadinessProbe {
  if (typeof value !== 'object' || value === null) r.fail('readiness', 'must be an object {type, ...}');
  const v = value as Record<string, unknown>;
  const timeout_ms = v.timeout_ms === undefined ? 60000 : r.integer('readiness.timeout_ms', LIMITS.timeoutMs.min, LIMITS.timeoutMs.max, v.timeout_ms);
  if (v.type === 'tcp') return { type: 'tcp', timeout_ms };
  if (v.type === 'http') {
    const path = v.path === undefined ? '/' : r.string('readiness.path', v.path, /^\/[\x21-\x7e]*$/);
    return { type: 'http', path, timeout_ms };
  }
  return r.fail('readiness.type', 'must be "http" or "tcp"');
}

function boot(r: ManifestReader, value: unknown): DirectBoot | null {
  if (value === null || value === undefined) return null;
  if (typeof value !== 'object') r.fail('boot', 'must be an object {kernel, initrd, cmdline} or null');
  const v = value as Record<string, unknown>;
  return {
    kernel: r.fileName('boot.kernel', v.kernel),
    initrd: v.initrd === null || v.initrd === undefined ? null : r.fileName('boot.initrd', v.initrd),
    cmdline:
      v.cmdline === undefined
        ? ''
        : typeof v.cmdline === 'string' && v.cmdline.length <= 2000 && !/[\0\n]/.test(v.cmdline)
          ? v.cmdline
          : r.fail('boot.cmdline', 'must be a single-line string'),
  };
}

/** Validate a parsed manifest.json; every problem names the field. */
export function parseManifest(json: unknown): ServiceManifest {
  const r = ManifestReader.of(json);
  const raw = r.raw;
  if (raw.format !== 1) r.fail('format', 'must be 1');
  return {
    format: 1,
    service_id: r.string('service_id', raw.service_id, SERVICE_ID),
    version: r.string('version'),
    description: raw.description === undefined ? '' : r.string('description'),
    tags: r.tags(),
    port: r.integer('port', 1, 65535),
    memory_mib: r.integer('memory_mib', LIMITS.memoryMib.min, LIMITS.memoryMib.max),
    vcpus: raw.vcpus === undefined ? 1 : r.integer('vcpus', LIMITS.vcpus.min, LIMITS.vcpus.max),
    shareable: r.flag('shareable'),
    readiness: readiness(r, raw.readiness ?? { type: 'tcp' }),
    disk: r.fileName('disk', raw.disk),
    state: raw.state === null || raw.state === undefined ? null : r.fileName('state', raw.state),
    boot: boot(r, raw.boot),
    ...(raw.pool_size === undefined ? {} : { pool_size: r.integer('pool_size', 0, LIMITS.poolSize.max) }),
  };
}

/** The files a manifest names, each relative to the service directory. */
export function manifestFiles(m: ServiceManifest): string[] {
  return [m.disk, m.state, m.boot?.kernel, m.boot?.initrd].filter((f): f is string => typeof f === 'string');
}
