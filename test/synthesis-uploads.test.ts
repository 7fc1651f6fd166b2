// Overlay upload sessions on their own (no agent, no VM): bytes reach the synthesis in order over many requests, a
// synthesis runs only while a request sends bytes, a session survives a restart with the bytes it committed and its
// synthesis starts over from byte 0, stale sessions and stalled uploads end, and nothing is left on disk. Plus a base disk's chunk index, written and read back.
import t from 'tap';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { appendFile, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import { buildChunkIndex, readChunkIndex } from '../agent/src/vm/chunk-index';
import { CloudletError } from '../agent/src/errors';
import { UploadSessions } from '../agent/src/synthesis/uploads';

const run = promisify(execFile);
const OVERLAY = Buffer.from(Array.from({ length: 3 << 20 }, (_, i) => (i * 7919) % 251));
const sha = (bytes: Buffer) => createHash('sha256').update(bytes).digest('hex');

let root: string;
t.beforeEach(async () => {
  root = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-uploads-'));
});
t.afterEach(() => rm(root, { recursive: true, force: true }));

/** Sessions whose "synthesis" reads every byte and answers with its SHA-256 (and the session's tag). */
function sessions(idleMs = 60_000, perOwner?: number) {
  return new UploadSessions<string, { tag: string; owner?: string }>(
    root,
    async (stream, bytes, meta) => {
      const chunks: Buffer[] = [];
      for await (const chunk of stream) chunks.push(chunk as Buffer);
      const all = Buffer.concat(chunks);
      if (all.length !== bytes) throw new Error(`read ${all.length} of ${bytes} bytes`);
      return `${meta.tag}:${sha(all)}`;
    },
    idleMs,
    60_000,
    () => {},
    perOwner === undefined ? undefined : { ownerOf: (meta) => meta.owner, max: perOwner },
  );
}

/** A request body that delivers `bytes` and then breaks off, as a cut connection does. */
function cutBody(bytes: Buffer): Readable {
  return new Readable({
    read() {
      this.push(bytes);
      this.destroy(new Error('ECONNRESET'));
    },
  });
}

t.test('bytes sent over several requests reach the synthesis in order, and a finished upload leaves no files', async (tt) => {
  const uploads = sessions();
  const upload = await uploads.create(OVERLAY.length, { tag: 'a' });
  const first = await uploads.append(upload.id, 0, Readable.from([OVERLAY.subarray(0, 1000)]));
  tt.match(first, { complete: false, upload: { received: 1000, state: 'receiving' } });
  const last = await uploads.append(upload.id, 1000, Readable.from([OVERLAY.subarray(1000)]));
  tt.same(last, { complete: true, result: `a:${sha(OVERLAY)}` });
  tt.match(uploads.get(upload.id), { state: 'done', result: `a:${sha(OVERLAY)}` });
  tt.same(await readdir(root), []);
});

t.test('bytes from anywhere but where the upload stands are refused, with where to continue', async (tt) => {
  const uploads = sessions();
  const upload = await uploads.create(OVERLAY.length, { tag: 'a' });
  await uploads.append(upload.id, 0, cutBody(OVERLAY.subarray(0, 5000)));
  await tt.rejects(uploads.append(upload.id, 4000, Readable.from([OVERLAY.subarray(4000)])), { code: 'CONFLICT', details: { received: 5000 } });
});

t.test('after a restart a session continues at its committed byte and its synthesis reads from byte 0 again', async (tt) => {
  const before = sessions();
  const upload = await before.create(OVERLAY.length, { tag: 'kept' });
  const cut = await before.append(upload.id, 0, cutBody(OVERLAY.subarray(0, 1 << 20)));
  tt.match(cut, { complete: false, upload: { received: 1 << 20 } });
  // Bytes written after the last commit (a torn tail) are not trusted.
  await appendFile(path.join(root, upload.id, 'overlay.part'), Buffer.alloc(777, 0xee));

  const after = sessions();
  await after.load();
  tt.match(after.get(upload.id), { received: 1 << 20, state: 'receiving' });
  const done = await after.append(upload.id, 1 << 20, Readable.from([OVERLAY.subarray(1 << 20)]));
  tt.same(done, { complete: true, result: `kept:${sha(OVERLAY)}` }, 'the synthesis saw every byte once, in order, with its options');
  tt.same(await readdir(root), []);
});

t.test('a session idle for too long and a directory that is no session are deleted at start', async (tt) => {
  const id = '00000000-0000-4000-8000-000000000001';
  await mkdir(path.join(root, id));
  await writeFile(
    path.join(root, id, 'session.json'),
    JSON.stringify({ id, bytes: 10, received: 2, meta: { tag: 'old' }, updated_at: new Date(Date.now() - 120_000).toISOString() }),
  );
  await writeFile(path.join(root, id, 'overlay.part'), 'ab');
  await mkdir(path.join(root, 'not-an-upload'));
  const uploads = sessions(60_000);
  await uploads.load();
  tt.same(await readdir(root), []);
  tt.throws(() => uploads.get(id), { code: 'NOT_FOUND' });
});

/** Sessions whose synthesis is recorded: how many started, how many are running, what each read before it ended. */
function watchedSessions(idleMs = 60_000) {
  const seen = { started: 0, running: 0, ended: [] as { read: number; error: string | null }[] };
  const uploads = new UploadSessions<number, { tag: string }>(
    root,
    async (stream) => {
      seen.started++;
      seen.running++;
      let read = 0;
      try {
        for await (const chunk of stream) read += (chunk as Buffer).length;
        seen.ended.push({ read, error: null });
        return read;
      } catch (err) {
        seen.ended.push({ read, error: (err as Error).message });
        throw err;
      } finally {
        seen.running--;
      }
    },
    idleMs,
    60_000,
    () => {},
  );
  return { uploads, seen };
}

const settled = () => new Promise((resolve) => setTimeout(resolve, 50));

t.test('a synthesis runs only while a request sends bytes: a cut upload stops it, the next request starts another from byte 0', async (tt) => {
  const { uploads, seen } = watchedSessions();
  const upload = await uploads.create(OVERLAY.length, { tag: 'a' });
  await settled();
  tt.equal(seen.started, 0, 'creating the upload starts no synthesis');

  tt.match(await uploads.append(upload.id, 0, cutBody(OVERLAY.subarray(0, 5000))), { complete: false });
  await settled();
  tt.equal(seen.running, 0, 'the cut upload holds no synthesis');
  tt.match(seen.ended, [{ read: 5000, error: /paused at byte 5000/ }], 'it read what arrived, then stopped');
  tt.match(uploads.get(upload.id), { state: 'receiving', received: 5000, error: null }, "the pause is not the upload's outcome");
  tt.same((await readdir(path.join(root, upload.id))).sort(), ['overlay.part', 'session.json'], 'its bytes stay');

  const done = await uploads.append(upload.id, 5000, Readable.from([OVERLAY.subarray(5000)]));
  tt.same(done, { complete: true, result: OVERLAY.length }, "the next request's synthesis read every byte from byte 0");
  tt.equal(seen.started, 2);
  tt.same(await readdir(root), []);
});

t.test('a request that comes while the paused synthesis still cleans up starts the next one once it is done', async (tt) => {
  let cleaning: Promise<void> = Promise.resolve();
  let release!: () => void;
  const order: string[] = [];
  const uploads = new UploadSessions<number, object>(
    root,
    async (stream) => {
      await cleaning;
      order.push('start');
      let read = 0;
      try {
        for await (const chunk of stream) read += (chunk as Buffer).length;
        return read;
      } catch (err) {
        cleaning = new Promise((resolve) => {
          release = resolve;
        });
        await cleaning;
        order.push('cleaned');
        throw err;
      }
    },
    60_000,
    60_000,
    () => {},
  );
  const upload = await uploads.create(OVERLAY.length, {});
  await uploads.append(upload.id, 0, cutBody(OVERLAY.subarray(0, 1000)));
  await settled();
  const rest = uploads.append(upload.id, 1000, Readable.from([OVERLAY.subarray(1000)]));
  await settled();
  tt.same(order, ['start'], 'no second synthesis while the first one cleans up');
  release();
  tt.same(await rest, { complete: true, result: OVERLAY.length });
  tt.same(order, ['start', 'cleaned', 'start']);
});

t.test('a reloaded session starts no synthesis until bytes come; one with all its bytes starts it at once', async (tt) => {
  const before = watchedSessions();
  const partial = await before.uploads.create(OVERLAY.length, { tag: 'partial' });
  await before.uploads.append(partial.id, 0, cutBody(OVERLAY.subarray(0, 1 << 20)));
  const complete = await before.uploads.create(1000, { tag: 'complete' });
  // All bytes committed, but the synthesis cut by a restart before it read them: written as that agent left it.
  await writeFile(path.join(root, complete.id, 'overlay.part'), OVERLAY.subarray(0, 1000));
  await writeFile(
    path.join(root, complete.id, 'session.json'),
    JSON.stringify({ id: complete.id, bytes: 1000, received: 1000, meta: { tag: 'complete' }, updated_at: new Date().toISOString() }),
  );
  await settled();

  const after = watchedSessions();
  await after.uploads.load();
  await settled();
  tt.equal(after.seen.started, 1, "only the complete session's synthesis started");
  tt.match(after.uploads.get(complete.id), { state: 'done', result: 1000 });
  tt.match(after.uploads.get(partial.id), { state: 'receiving', received: 1 << 20 });
  const done = await after.uploads.append(partial.id, 1 << 20, Readable.from([OVERLAY.subarray(1 << 20)]));
  tt.same(done, { complete: true, result: OVERLAY.length });
  tt.equal(after.seen.started, 2);
});

t.test('a synthesis waiting for every byte (before it takes a launch slot) is paused when no request sends them', async (tt) => {
  const waits: string[] = [];
  const uploads = new UploadSessions<string, object>(
    root,
    async (stream, _bytes, _meta, arrived) => {
      // Reads nothing (as a synthesis whose applying is held up would), only waits for the rest of the upload.
      await arrived().then(
        () => waits.push('arrived'),
        (err: Error) => {
          waits.push(err.message);
          throw err;
        },
      );
      let read = 0;
      for await (const chunk of stream) read += (chunk as Buffer).length;
      return `read ${read}`;
    },
    60_000,
    60_000,
    () => {},
  );
  const upload = await uploads.create(OVERLAY.length, {});
  tt.match(await uploads.append(upload.id, 0, cutBody(OVERLAY.subarray(0, 5000))), { complete: false });
  await settled();
  tt.match(waits, [/paused at byte 5000/], 'the cut request ends the wait: nothing is held for a client that sends nothing');
  tt.match(uploads.get(upload.id), { state: 'receiving', received: 5000, error: null }, 'and the upload stays open');
  const done = await uploads.append(upload.id, 5000, Readable.from([OVERLAY.subarray(5000)]));
  tt.same(done, { complete: true, result: `read ${OVERLAY.length}` });
  tt.match(waits, [/paused/, 'arrived'], "the next request's synthesis went on once every byte was in");
});

t.test('a request the server cuts off (too slow) is refused with where the upload stands; its bytes stay', async (tt) => {
  const uploads = sessions();
  const upload = await uploads.create(OVERLAY.length, { tag: 'a' });
  const tooSlow = new Readable({
    read() {
      this.push(OVERLAY.subarray(0, 3000));
      this.destroy(new CloudletError('REQUEST_TIMEOUT', 'The request body arrives too slowly'));
    },
  });
  await tt.rejects(uploads.append(upload.id, 0, tooSlow), { code: 'REQUEST_TIMEOUT', details: { upload_id: upload.id, received: 3000 } });
  tt.match(uploads.get(upload.id), { state: 'receiving', received: 3000 });
  const done = await uploads.append(upload.id, 3000, Readable.from([OVERLAY.subarray(3000)]));
  tt.same(done, { complete: true, result: `a:${sha(OVERLAY)}` });
});

t.test('an upload that stalls is abandoned: it fails and its files go', async (tt) => {
  const uploads = sessions(100);
  const upload = await uploads.create(OVERLAY.length, { tag: 'a' });
  await uploads.append(upload.id, 0, cutBody(OVERLAY.subarray(0, 1000)));
  await new Promise((resolve) => setTimeout(resolve, 400));
  tt.match(uploads.get(upload.id), { state: 'failed', error: { code: 'OVERLAY_INVALID', message: /stalled at byte 1000/ } });
  tt.same(await readdir(root), []);
});

t.test('more bytes than announced fail the upload', async (tt) => {
  const uploads = sessions();
  const upload = await uploads.create(10, { tag: 'a' });
  await tt.rejects(uploads.append(upload.id, 0, Readable.from([Buffer.alloc(11)])), { code: 'OVERLAY_INVALID' });
  tt.equal(uploads.get(upload.id).state, 'failed');
});

t.test('an owner may have only so many unfinished uploads; another owner, and one without an owner, still may create', async (tt) => {
  const uploads = sessions(60_000, 2);
  const first = await uploads.create(OVERLAY.length, { tag: 'a', owner: 'alice' });
  const second = await uploads.create(10, { tag: 'a', owner: 'alice' });
  await tt.rejects(uploads.create(10, { tag: 'a', owner: 'alice' }), { code: 'TOO_MANY_UPLOADS', details: { limit: 2 } });
  await uploads.create(10, { tag: 'b', owner: 'bob' });
  for (let i = 0; i < 3; i += 1) await uploads.create(10, { tag: 'operator' });
  // Creates racing each other count against the limit too.
  const racing = await Promise.allSettled([1, 2, 3].map(() => uploads.create(10, { tag: 'c', owner: 'carol' })));
  tt.same(racing.map((r) => r.status).sort(), ['fulfilled', 'fulfilled', 'rejected']);

  // A finished upload and a failed one no longer count.
  await uploads.append(first.id, 0, Readable.from([OVERLAY]));
  const third = await uploads.create(10, { tag: 'a', owner: 'alice' });
  await tt.rejects(uploads.create(10, { tag: 'a', owner: 'alice' }), { code: 'TOO_MANY_UPLOADS' });
  await tt.rejects(uploads.append(second.id, 0, Readable.from([Buffer.alloc(11)])), { code: 'OVERLAY_INVALID' });
  await uploads.create(10, { tag: 'a', owner: 'alice' });
  tt.equal(uploads.get(third.id).state, 'receiving');
});

t.test('an idle upload holds no open file: only a request sending bytes or a synthesis reading them does', async (tt) => {
  const uploads = sessions();
  const openFiles = async () => (await readdir('/proc/self/fd')).length;
  const before = await openFiles();
  for (let i = 0; i < 20; i += 1) {
    const upload = await uploads.create(OVERLAY.length, { tag: 'a' });
    await uploads.append(upload.id, 0, cutBody(OVERLAY.subarray(0, 1000)));
  }
  // The paused syntheses close their readers as they end.
  await new Promise((resolve) => setTimeout(resolve, 200));
  tt.ok((await openFiles()) < before + 5, 'twenty idle uploads hold no file descriptors');
});

t.test("a base disk's chunk index, built in a worker, lists every non-zero 4 KiB block with its MD5", async (tt) => {
  const raw = Buffer.alloc(1 << 20);
  for (const block of [0, 3, 200]) raw.fill(block + 1, block * 4096, block * 4096 + 4096);
  await writeFile(path.join(root, 'disk.raw'), raw);
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', path.join(root, 'disk.raw'), path.join(root, 'disk.qcow2')]);
  await buildChunkIndex(path.join(root, 'disk.qcow2'), null, path.join(root, 'chunk-index.bin'));
  const index = await readChunkIndex(path.join(root, 'chunk-index.bin'));
  tt.same(
    index.disk.map((c) => c.offset),
    [0, 3 * 4096, 200 * 4096],
  );
  tt.same(index.disk[1]!.hash, createHash('md5').update(Buffer.alloc(4096, 4)).digest());
  tt.equal(index.memory, null);
  tt.same(await readdir(root), ['chunk-index.bin', 'disk.qcow2', 'disk.raw'], 'written atomically: no temporary file left');
  await tt.rejects(buildChunkIndex(path.join(root, 'missing.qcow2'), null, path.join(root, 'other.bin')), /indexing the base/);
  await writeFile(path.join(root, 'damaged.bin'), (await readFile(path.join(root, 'chunk-index.bin'))).subarray(0, 40));
  await tt.rejects(readChunkIndex(path.join(root, 'damaged.bin')));
});
