// The pieces of sandbox containment that need no sandbox: the manifest's pids and /data fields, the agent's caps on
// them, and the seccomp program's shape (the e2e test proves it from inside a real sandbox).
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { loadConfig } from '../agent/src/config';
import { parsePackageManifest } from '../agent/src/packages/manifest';
import { DENIED_SYSCALLS, sandboxSeccompFilter } from '../agent/src/sandbox/seccomp';

const base = { format: 1, app_id: 'org.test.app', version: '1', command: ['/app/run'], port: 8080, memory_mib: 32 };

t.test('a package manifest bounds processes and /data, with defaults that fit the memory limit', async (t) => {
  t.match(parsePackageManifest(base), { pids: 128, data_mib: 8 }, 'defaults');
  t.match(parsePackageManifest({ ...base, pids: 16, data_mib: 32 }), { pids: 16, data_mib: 32 });
  t.throws(() => parsePackageManifest({ ...base, pids: 4 }), { code: 'INVALID_MANIFEST', message: /pids/ }, 'too few processes to run anything');
  t.throws(() => parsePackageManifest({ ...base, pids: 1e9 }), { code: 'INVALID_MANIFEST', message: /pids/ });
  t.throws(() => parsePackageManifest({ ...base, pids: '100' }), { code: 'INVALID_MANIFEST', message: /pids/ });
  t.throws(
    () => parsePackageManifest({ ...base, data_mib: 33 }),
    { code: 'INVALID_MANIFEST', message: /data_mib/ },
    '/data is memory: not more of it than the memory limit',
  );
  t.throws(() => parsePackageManifest({ ...base, data_mib: 0 }), { code: 'INVALID_MANIFEST', message: /data_mib/ });
});

t.test("the agent caps every sandbox's processes and its log, from the config file", async (t) => {
  t.match(await loadConfig({ CLOUDLET_CONFIG: undefined }), { packages: { maxPids: 1024, logBytes: 1024 * 1024 } }, 'defaults');
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-config-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'agent.json');
  await writeFile(file, JSON.stringify({ packages: { maxPids: 64, logBytes: 300000 } }));
  t.match(await loadConfig({ CLOUDLET_CONFIG: file }), { packages: { maxPids: 64, logBytes: 300000 } });
  await writeFile(file, JSON.stringify({ packages: { logBytes: 1000 } }));
  await t.rejects(loadConfig({ CLOUDLET_CONFIG: file }), { code: 'INVALID_PARAMETER', message: /packages\.logBytes/ }, 'a log cap too small to hold a read');
  await writeFile(file, JSON.stringify({ packages: { maxPids: 0 } }));
  await t.rejects(loadConfig({ CLOUDLET_CONFIG: file }), { code: 'INVALID_PARAMETER', message: /packages\.maxPids/ });
});

t.test('the seccomp program checks the ABI first, denies its list with EPERM and allows the rest', async (t) => {
  const filter = sandboxSeccompFilter('x64');
  const at = (i: number) => ({ code: filter.readUInt16LE(i * 8), jt: filter[i * 8 + 2], jf: filter[i * 8 + 3], k: filter.readUInt32LE(i * 8 + 4) });
  const length = filter.length / 8;
  t.ok(Number.isInteger(length) && length < 4096, "whole instructions, within the kernel's limit");
  t.same(
    [at(0), at(1), at(2)],
    [
      { code: 0x20, jt: 0, jf: 0, k: 4 },
      { code: 0x15, jt: 1, jf: 0, k: 0xc000003e },
      { code: 0x06, jt: 0, jf: 0, k: 0x80000000 },
    ],
    'any ABI but x86_64 (i386 through int 0x80) kills the process',
  );
  const denied = new Set<number>();
  for (let i = 0; i < length - 1; i++) {
    const { code, k } = at(i);
    if (code === 0x15 && at(i + 1).code === 0x06 && at(i + 1).k === 0x00050001) denied.add(k);
  }
  for (const name of [
    'unshare',
    'setns',
    'mount',
    'ptrace',
    'bpf',
    'keyctl',
    'perf_event_open',
    'userfaultfd',
    'io_uring_setup',
    'init_module',
    'kexec_load',
  ]) {
    t.ok(denied.has(DENIED_SYSCALLS[name]!), `${name} is denied`);
  }
  t.same(at(length - 1), { code: 0x06, jt: 0, jf: 0, k: 0x7fff0000 }, 'everything else is allowed');
  t.throws(() => sandboxSeccompFilter('arm64'), { code: 'SANDBOX_UNAVAILABLE' }, 'no filter, no sandbox, on an architecture it does not describe');
});
