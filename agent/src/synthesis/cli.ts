#!/usr/bin/env node
/**
 * cloudlet-overlay: the app developer's tool for VM Synthesis (docs/overlay-format.md).
 *
 *   cloudlet-overlay create --base DIR --disk FILE [--state FILE] --service MANIFEST --out FILE [--key PEM] [--level N]
 *   cloudlet-overlay keygen PRIVATE.pem PUBLIC.pem
 *
 * `create` prints what the overlay saved: changed blocks and pages, zeros elided, copies from the base and from the
 * overlay itself, literal bytes and the compressed size. The cloudlet trusts a signing key once its PUBLIC.pem is in
 * the agent's `<data dir>/overlay-keys/`.
 */
import { generateKeyPairSync } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { parseManifest } from '../core/manifest';
import { createOverlay } from './create';

const USAGE = `usage:
  cloudlet-overlay create --base DIR --disk FILE [--state FILE] --service MANIFEST --out FILE [--key PEM] [--level N]
  cloudlet-overlay keygen PRIVATE.pem PUBLIC.pem`;
const DEFAULT_LEVEL = 19;

async function create(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      base: { type: 'string' },
      disk: { type: 'string' },
      state: { type: 'string' },
      service: { type: 'string' },
      out: { type: 'string' },
      key: { type: 'string' },
      level: { type: 'string' },
    },
  });
  if (!values.base || !values.disk || !values.service || !values.out) throw new Error(USAGE);
  const level = Number(values.level ?? DEFAULT_LEVEL);
  if (!Number.isInteger(level) || level < 1 || level > 19) throw new Error('--level must be an integer from 1 to 19');
  const started = Date.now();
  const stats = await createOverlay({
    baseDir: path.resolve(values.base),
    disk: path.resolve(values.disk),
    state: values.state ? path.resolve(values.state) : null,
    service: parseManifest(JSON.parse(await readFile(values.service, 'utf8'))),
    out: path.resolve(values.out),
    ...(values.key ? { signingKey: values.key } : {}),
    level,
    parallelism: os.cpus().length,
  });
  const mib = (blocks: number) => `${((blocks * 4096) / 2 ** 20).toFixed(1)} MiB`;
  process.stderr.write(
    [
      `disk: ${stats.disk_changed_blocks} changed blocks (${mib(stats.disk_changed_blocks)}); memory: ${stats.memory_pages} pages (${mib(stats.memory_pages)})`,
      `zero (elided): ${stats.zero}; from the base disk: ${stats.from_base_disk}; from the base memory: ${stats.from_base_memory}; from the overlay itself: ${stats.from_overlay}; XOR with the base: ${stats.xor}`,
      `literal: ${stats.literal} blocks/pages; ${stats.raw_frame_bytes} bytes in ${stats.frames} frames → ${stats.overlay_bytes} bytes after zstd -${level} (${((Date.now() - started) / 1000).toFixed(1)} s)`,
    ].join('\n') + '\n',
  );
  process.stdout.write(`${JSON.stringify(stats)}\n`);
}

async function keygen(args: string[]): Promise<void> {
  const [privatePath, publicPath] = args;
  if (!privatePath || !publicPath) throw new Error(USAGE);
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  await writeFile(privatePath, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600, flag: 'wx' });
  await writeFile(publicPath, publicKey.export({ type: 'spki', format: 'pem' }), { flag: 'wx' });
}

const [command, ...rest] = process.argv.slice(2);
const commands: Record<string, (args: string[]) => Promise<void>> = { create, keygen };
(commands[command ?? ''] ?? (() => Promise.reject(new Error(USAGE))))(rest).catch((err: Error) => {
  process.stderr.write(`cloudlet-overlay: ${err.message}\n`);
  process.exit(1);
});
