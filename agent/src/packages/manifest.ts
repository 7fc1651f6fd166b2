import { ManifestReader, SERVICE_ID, readiness } from '../core/manifest';
import type { PackageManifest } from '../core/types';

const LIMITS = { memoryMib: { min: 16, max: 65536 }, cpus: { min: 0.01, max: 64 }, pids: { min: 8, max: 65536 }, args: 256, argLength: 4096, env: 128 };
const DEFAULTS = { pids: 128, dataMib: 8 };
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,127}$/;

function command(r: ManifestReader): string[] {
  const value = r.raw.command;
  if (!Array.isArray(value) || value.length === 0 || value.length > LIMITS.args) r.fail('command', `must be a list of 1 to ${LIMITS.args} strings`);
  if (!value.every((a) => typeof a === 'string' && a.length <= LIMITS.argLength && !a.includes('\0'))) {
    r.fail('command', `must hold strings of at most ${LIMITS.argLength} characters without NUL`);
  }
  if (!(value[0] as string).startsWith('/')) r.fail('command', 'must start with an absolute path inside the sandbox (the package is at /app)');
  return value as string[];
}

function environment(r: ManifestReader): Record<string, string> {
  const value = r.raw.env ?? {};
  if (typeof value !== 'object' || value === null || Array.isArray(value)) r.fail('env', 'must be an object of strings');
  const entries = Object.entries(value as Record<string, unknown>);
  if (entries.length > LIMITS.env) r.fail('env', `must have at most ${LIMITS.env} variables`);
  for (const [name, v] of entries) {
    if (!ENV_NAME.test(name)) r.fail(`env.${name}`, 'is not a valid variable name');
    if (typeof v !== 'string' || v.length > LIMITS.argLength || v.includes('\0')) r.fail(`env.${name}`, 'must be a string without NUL');
  }
  return Object.fromEntries(entries) as Record<string, string>;
}

function cpus(r: ManifestReader): number {
  const value = r.raw.cpus ?? 1;
  if (typeof value !== 'number' || !(value >= LIMITS.cpus.min && value <= LIMITS.cpus.max)) {
    r.fail('cpus', `must be a number from ${LIMITS.cpus.min} to ${LIMITS.cpus.max}`);
  }
  return value;
}

function pids(r: ManifestReader): number {
  return r.raw.pids === undefined ? DEFAULTS.pids : r.integer('pids', LIMITS.pids.min, LIMITS.pids.max);
}

/** /data is memory (a tmpfs): more of it than the memory limit would end in the OOM killer instead of ENOSPC. */
function dataMib(r: ManifestReader, memoryMib: number): number {
  return r.raw.data_mib === undefined ? Math.min(DEFAULTS.dataMib, memoryMib) : r.integer('data_mib', 1, memoryMib);
}

/** Validate a parsed package manifest.json; every problem names the field (INVALID_MANIFEST). */
export function parsePackageManifest(json: unknown): PackageManifest {
  const r = ManifestReader.of(json);
  if (r.raw.format !== 1) r.fail('format', 'must be 1');
  const memoryMib = r.integer('memory_mib', LIMITS.memoryMib.min, LIMITS.memoryMib.max);
  return {
    format: 1,
    app_id: r.string('app_id', r.raw.app_id, SERVICE_ID),
    version: r.string('version'),
    description: r.raw.description === undefined ? '' : r.string('description'),
    tags: r.tags(),
    command: command(r),
    port: r.integer('port', 1, 65535),
    env: environment(r),
    memory_mib: memoryMib,
    cpus: cpus(r),
    pids: pids(r),
    data_mib: dataMib(r, memoryMib),
    shareable: r.flag('shareable'),
    readiness: readiness(r, r.raw.readiness ?? { type: 'tcp' }),
  };
}
