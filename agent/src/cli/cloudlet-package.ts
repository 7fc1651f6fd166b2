#!/usr/bin/env node
/**
 * cloudlet-package: write an app package (docs/app-packages.md) from a directory or a static binary.
 *
 *   cloudlet-package --app-id ID --port PORT (--dir DIR | --binary FILE) [options] --output FILE.tar.gz -- COMMAND [ARG...]
 *
 * --dir copies DIR as the package's app/ (it is /app in the sandbox); --binary puts FILE at app/bin/<name>.
 * Options: --version V (default 1.0), --description TEXT, --tag T (repeatable), --env NAME=VALUE (repeatable),
 * --memory-mib N (default 128), --cpus N (default 1), --shareable, --readiness http:/PATH | tcp,
 * --readiness-timeout-ms N, --zstd (zstd instead of gzip; needs the zstd tool).
 * The manifest is checked with the agent's own rules before anything is written.
 */
import { cp, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createWriteStream } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { parseArgs } from 'node:util';
import { create } from 'tar';
import { zstdEncodeStream } from '../images/zstd';
import { parsePackageManifest } from '../packages/manifest';

const USAGE = 'usage: cloudlet-package --app-id ID --port PORT (--dir DIR | --binary FILE) --output FILE [options] -- COMMAND [ARG...]';

function readinessOption(value: string | undefined, timeoutMs: number): unknown {
  if (value === undefined || value === 'tcp') return { type: 'tcp', timeout_ms: timeoutMs };
  if (value.startsWith('http:')) return { type: 'http', path: value.slice('http:'.length) || '/', timeout_ms: timeoutMs };
  throw new Error(`--readiness must be tcp or http:/PATH, got ${value}`);
}

async function main(argv: string[]): Promise<void> {
  const { values: o, positionals: command } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      'app-id': { type: 'string' },
      port: { type: 'string' },
      dir: { type: 'string' },
      binary: { type: 'string' },
      output: { type: 'string' },
      version: { type: 'string', default: '1.0' },
      description: { type: 'string' },
      tag: { type: 'string', multiple: true, default: [] },
      env: { type: 'string', multiple: true, default: [] },
      'memory-mib': { type: 'string', default: '128' },
      cpus: { type: 'string', default: '1' },
      pids: { type: 'string' },
      'data-mib': { type: 'string' },
      shareable: { type: 'boolean', default: false },
      readiness: { type: 'string' },
      'readiness-timeout-ms': { type: 'string', default: '30000' },
      zstd: { type: 'boolean', default: false },
    },
  });
  if (!o.output || !o.dir === !o.binary || command.length === 0) throw new Error(USAGE);
  const manifest = parsePackageManifest({
    format: 1,
    app_id: o['app-id'],
    version: o.version,
    ...(o.description ? { description: o.description } : {}),
    tags: o.tag,
    command,
    port: Number(o.port),
    env: Object.fromEntries(
      o.env.map((pair) => {
        const at = pair.indexOf('=');
        if (at < 1) throw new Error(`--env takes NAME=VALUE, got ${pair}`);
        return [pair.slice(0, at), pair.slice(at + 1)];
      }),
    ),
    memory_mib: Number(o['memory-mib']),
    cpus: Number(o.cpus),
    ...(o.pids ? { pids: Number(o.pids) } : {}),
    ...(o['data-mib'] ? { data_mib: Number(o['data-mib']) } : {}),
    shareable: o.shareable,
    readiness: readinessOption(o.readiness, Number(o['readiness-timeout-ms'])),
  });
  const staging = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-package-'));
  try {
    const app = path.join(staging, 'app');
    if (o.dir) await cp(o.dir, app, { recursive: true, verbatimSymlinks: true });
    else await cp(o.binary!, path.join(app, 'bin', path.basename(o.binary!)));
    await writeFile(path.join(staging, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
    const tarball = create({ cwd: staging, portable: true, gzip: !o.zstd }, ['manifest.json', 'app']);
    if (o.zstd) await pipeline(tarball, zstdEncodeStream(), createWriteStream(o.output));
    else await pipeline(tarball, createWriteStream(o.output));
    process.stdout.write(`${o.output}: ${manifest.app_id} ${manifest.version}\n`);
  } finally {
    await rm(staging, { recursive: true, force: true });
  }
}

main(process.argv.slice(2)).catch((err: Error & { code?: string }) => {
  process.stderr.write(`cloudlet-package: ${err.code ? `${err.code}: ` : ''}${err.message}\n`);
  process.exit(1);
});
