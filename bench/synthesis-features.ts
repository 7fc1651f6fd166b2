// ./build.sh bench synthesis-features — what the base chunk index and persistent overlay uploads cost and save.
//
// A 384 MiB base disk (300 MiB of incompressible blocks, the rest zero) as a qcow2:
// - building its chunk index (in a worker, as an import does), and the worst stall of the event loop meanwhile
//   (a 5 ms timer's lateness);
// - what overlay creation then does with the index (load it, make its lookup keys) against what it does without one
//   (hash every non-zero 4 KiB block of the raw disk).
// And 256 MiB through a persistent upload session (written, fdatasync'd every 8 MiB, read back by the consumer):
// its throughput, against spooling the same bytes to a file with one fsync at the end (the baseline: what keeping
// the bytes on disk costs at least), and to set against a link's.
// Ends with one line of JSON.
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdtemp, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { promisify } from 'node:util';
import { buildChunkIndex, chunkHash, readChunkIndex } from '../agent/src/vm/chunk-index';
import { UploadSessions } from '../agent/src/synthesis/uploads';
import { median, round, runsOf, sized } from './support/measure';

const run = promisify(execFile);
const RUNS = runsOf(3);
const DATA_MIB = sized(300, 24);
const DISK_MIB = sized(384, 32);
const UPLOAD_MIB = sized(256, 16);
const BLOCK = 4096;

async function timed(work: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await work();
  return performance.now() - t0;
}

/** Runs `work` while measuring how late a 5 ms timer fires at worst: how long the event loop was held. */
async function withLag(work: () => Promise<unknown>): Promise<{ ms: number; lagMs: number }> {
  let lagMs = 0;
  let last = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    lagMs = Math.max(lagMs, now - last - 5);
    last = now;
  }, 5);
  try {
    return { ms: await timed(work), lagMs };
  } finally {
    clearInterval(timer);
  }
}

async function indexBench(scratch: string) {
  const raw = path.join(scratch, 'disk.raw');
  await writeFile(raw, Buffer.concat([randomBytes(DATA_MIB << 20), Buffer.alloc((DISK_MIB - DATA_MIB) << 20)]));
  const disk = path.join(scratch, 'disk.qcow2');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, disk]);
  const index = path.join(scratch, 'chunk-index.bin');
  const builds = [];
  for (let i = 0; i < RUNS; i++) builds.push(await withLag(() => buildChunkIndex(disk, null, index)));
  const loads = [];
  for (let i = 0; i < RUNS; i++) {
    loads.push(
      await timed(async () => {
        for (const chunk of (await readChunkIndex(index)).disk) chunk.hash.toString('base64');
      }),
    );
  }
  const bytes = await readFile(raw);
  const zero = Buffer.alloc(BLOCK);
  const rehashes = [];
  for (let i = 0; i < RUNS; i++) {
    rehashes.push(
      await timed(async () => {
        for (let at = 0; at < bytes.length; at += BLOCK) {
          const block = bytes.subarray(at, at + BLOCK);
          if (!block.equals(zero)) chunkHash(block).toString('base64');
        }
      }),
    );
  }
  return {
    disk_mib: DISK_MIB,
    index_bytes: (await stat(index)).size,
    build_ms: round(median(builds.map((b) => b.ms))),
    build_event_loop_stall_ms: round(Math.max(...builds.map((b) => b.lagMs))),
    create_with_index_ms: round(median(loads)),
    create_rehash_ms: round(median(rehashes)),
  };
}

async function uploadBench(scratch: string) {
  const chunk = Buffer.alloc(64 << 10, 7);
  const bytes = UPLOAD_MIB << 20;
  const body = () =>
    Readable.from(
      (function* () {
        for (let sent = 0; sent < bytes; sent += chunk.length) yield chunk;
      })(),
    );
  const rates = [];
  const spoolRates = [];
  for (let i = 0; i < RUNS; i++) {
    const spool = path.join(scratch, `spool-${i}`);
    spoolRates.push(
      UPLOAD_MIB /
        ((await timed(async () => {
          await pipeline(body(), createWriteStream(spool));
          const file = await open(spool, 'r+');
          await file.datasync();
          await file.close();
        })) /
          1000),
    );
    await rm(spool);
    const sessions = new UploadSessions<number, object>(
      path.join(scratch, `uploads-${i}`),
      async (stream) => {
        let n = 0;
        for await (const c of stream) n += (c as Buffer).length;
        return n;
      },
      60_000,
      1000,
      () => {},
    );
    await sessions.load();
    const upload = await sessions.create(bytes, {});
    const ms = await timed(async () => {
      const outcome = await sessions.append(upload.id, 0, body());
      if (!outcome.complete || outcome.result !== bytes) throw new Error('the upload did not complete');
    });
    rates.push(UPLOAD_MIB / (ms / 1000));
  }
  return {
    upload_mib: UPLOAD_MIB,
    upload_mib_per_s: round(median(rates)),
    spool_mib_per_s: round(median(spoolRates)),
    upload_vs_spool: round(median(rates) / median(spoolRates), 2),
  };
}

void (async () => {
  const scratch = await mkdtemp(path.join(process.env.BENCH_DIR ?? os.tmpdir(), 'cloudlet-bench-synthesis-features-'));
  try {
    const index = await indexBench(scratch);
    const result = {
      bench: 'synthesis-features',
      ...index,
      create_index_speedup: round(index.create_rehash_ms / index.create_with_index_ms, 1),
      ...(await uploadBench(scratch)),
      runs: RUNS,
    };
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
})();
