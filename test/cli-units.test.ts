// The CLI's pure parts: how it reads a cloudlet address, ranks cloudlets like SEI's client-lib, and draws progress.
import t from 'tap';
import { parseCloudlet } from '../agent/src/cli/client';
import { formatBytes, progressLine } from '../agent/src/cli/progress';
import { cpuBasedRank, rankCloudlets, type KdSystemInfo } from '../agent/src/cli/ranking';

const system = (cores: number, usage: number): KdSystemInfo => ({
  cpu_info: { max_cores: cores, usage, speed: '2400.000', cache: 8192 },
  memory_info: { max_memory: 8e9, free_memory: 4e9 },
});

t.test('a cloudlet is named HOST, HOST:PORT, [V6]:PORT or an http:// URL; the port defaults to 9999', async (tt) => {
  tt.same(parseCloudlet('box.local'), { host: 'box.local', port: 9999 });
  tt.same(parseCloudlet('10.0.0.5:8080'), { host: '10.0.0.5', port: 8080 });
  tt.same(parseCloudlet('[fe80::1]:9999'), { host: 'fe80::1', port: 9999 });
  tt.same(parseCloudlet('http://10.0.0.5:9999/'), { host: '10.0.0.5', port: 9999 });
  tt.throws(() => parseCloudlet('box:99999'), { code: 'USAGE' });
  tt.throws(() => parseCloudlet('a:b:c'), { code: 'USAGE' });
});

t.test("ranking is client-lib's CpuBasedRanker: 100 × max_cores − usage, best first, rank ≤ 0 never eligible", async (tt) => {
  tt.equal(cpuBasedRank(system(4, 12.5)), 387.5);
  const ranked = await rankCloudlets(['busy', 'idle', 'gone', 'saturated'], async (name) => {
    if (name === 'gone') throw new Error('ECONNREFUSED');
    return { busy: system(2, 150), idle: system(2, 10), saturated: system(1, 100) }[name]!;
  });
  tt.same(
    ranked.map((r) => [r.cloudlet, r.rank, r.eligible]),
    [
      ['idle', 190, true],
      ['busy', 50, true],
      ['saturated', 0, false],
      ['gone', null, false],
    ],
  );
  tt.equal(ranked[3]!.error, 'ECONNREFUSED');
});

t.test('a cloudlet whose /api/system gives no CPU figures is not ranked, and never eligible', async (tt) => {
  const ranked = await rankCloudlets(['liar', 'idle'], async (name) =>
    name === 'liar' ? ({ cpu_info: { max_cores: 'many', usage: null }, memory_info: {} } as unknown as KdSystemInfo) : system(2, 10),
  );
  tt.same(
    ranked.map((r) => [r.cloudlet, r.rank, r.eligible]),
    [
      ['idle', 190, true],
      ['liar', null, false],
    ],
  );
});

t.test('the progress line shows the bar, the share, the bytes and the rate', async (tt) => {
  tt.equal(formatBytes(512), '512 B');
  tt.equal(formatBytes(3 * 1024 * 1024 + 17), '3.0 MiB');
  tt.equal(progressLine(5 * 1024 * 1024, 10 * 1024 * 1024, 2 * 1024 * 1024, 10), '[#####.....]  50%  5.0 MiB / 10.0 MiB  2.0 MiB/s');
  tt.equal(progressLine(10, 10, 0, 4), '[####] 100%  10 B / 10 B  0 B/s');
});
