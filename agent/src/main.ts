#!/usr/bin/env node
// libvirt calls run on libuv's threadpool (one thread each while they block); the default 4 would queue a second
// VM start behind three slow ones. Must be set before the pool's first use.
process.env.UV_THREADPOOL_SIZE ??= '16';

import { performance } from 'node:perf_hooks';
import { startHttpServer } from './api/http-server';
import { loadConfig } from './config';
import { Cloudlet } from './core/cloudlet';
import { createLogger } from './log';

async function main(): Promise<void> {
  const log = createLogger('cloudlet-agent');
  const config = await loadConfig();
  const cloudlet = await Cloudlet.open(config, log);
  const server = await startHttpServer({ api: cloudlet, host: config.api.host, port: config.api.port, logger: createLogger('http') });
  // performance.now() counts from the process's start: the start-to-listening time includes Node's own boot.
  log(`listening on ${config.api.host}:${server.port} after ${Math.round(performance.now())} ms; data in ${config.dataDir}`);

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    log(`${signal}: stopping; running instances keep running and are adopted at the next start`);
    await server.close();
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
