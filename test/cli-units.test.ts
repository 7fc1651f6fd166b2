// The CLI's pure parts: how it reads a cloudlet address, ranks cloudlets like SEI's client-lib, draws progress, and
// what `cloudlet top` makes of the event stream.
import t from 'tap';
import { parseCloudlet } from '../agent/src/cli/client';
import { formatBytes, progressLine } from '../agent/src/cli/progress';
import { cpuBasedRank, rankCloudlets, type KdSystemInfo } from '../agent/src/cli/ranking';
import { TopView } from '../agent/src/cli/top';

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

// ---- cloudlet top: what it makes of the /v1/events messages --------------------------------------------------------

const instance = (id: string, state: string, extra: Record<string, unknown> = {}) => ({
  id,
  service_id: 'org.example.echo',
  mechanism: 'cached-vm',
  state,
  host_port: 20001,
  users: 1,
  ...extra,
});

t.test('top follows a launch from the snapshot to ready, one plain line per change and per phase', async (tt) => {
  const view = new TopView();
  tt.same(view.apply(JSON.stringify({ type: 'snapshot', instances: [] })), [], 'an empty snapshot says nothing');
  tt.match(view.apply(JSON.stringify({ type: 'instance', state: 'starting', instance: instance('i-1', 'starting'), at: '2026-01-02T03:04:05Z' })), [
    /^03:04:05 starting +i-1 org\.example\.echo cached-vm port 20001$/,
  ]);
  const progress = (phase: string, percent: number) => JSON.stringify({ type: 'progress', instance_id: 'i-1', service_id: 'x', phase, percent });
  tt.match(view.apply(progress('restoring', 10)), [/restoring/]);
  tt.same(view.apply(progress('restoring', 60)), [], 'the same phase further on: no new line');
  tt.match(view.screen('top', 200, 30).join('\n'), /i-1 .*starting .*\[######\.\.\.\.\] 60% restoring/, 'the screen shows the progress');
  tt.match(view.apply(JSON.stringify({ type: 'instance', state: 'ready', instance: instance('i-1', 'ready') })), [/ready +i-1/]);
  tt.match(view.screen('top', 200, 30)[0], /1 instance\(s\), 0 starting; launches seen: 1 ready, 0 failed/);
  tt.match(view.apply(JSON.stringify({ type: 'instance', state: 'stopped', reason: 'requested', instance: instance('i-1', 'stopped') })), [
    /stopped +i-1 .*\(requested\)$/,
  ]);
  tt.match(view.screen('top', 200, 30)[0], /0 instance\(s\)/, 'a stopped instance leaves the table');
});

t.test('top believes nothing from the wire: control characters escaped, junk ignored, the screen bounded', async (tt) => {
  const view = new TopView();
  const hostile = 'evil\x1b]52;c;cm0gLXJmIH4=\x07\n03:00:00 ready   forged\u202e';
  const lines = view.apply(JSON.stringify({ type: 'snapshot', instances: [instance('i-2', 'ready', { service_id: hostile, mechanism: '\x1b[2J' })] }));
  const screen = view.screen(hostile, 80, 10);
  for (const line of [...lines, ...screen]) tt.notMatch(line, /[\x00-\x1f\x7f-\x9f\u202e]/, `no raw control character: ${JSON.stringify(line)}`);
  tt.match(lines[0], /evil\\x1b\]52;c;cm0gLXJmIH4=\\x07\\x0a03:00:00 ready {3}forged\\u202e/, 'shown as escapes, on one line');
  for (const junk of ['not json', 'null', '[]', '{"type":"instance"}', '{"type":"progress","instance_id":"nope","phase":"x"}', '{"type":"snapshot"}']) {
    tt.same(view.apply(junk), [], `ignored: ${junk}`);
  }
  tt.ok(screen.length < 10 && screen.every((line) => line.length <= 80), 'the screen fits the terminal');
  for (let i = 0; i < 5000; i++) view.apply(JSON.stringify({ type: 'instance', state: 'starting', instance: instance(`x-${i}`, 'starting') }));
  tt.match(view.screen('top', 80, 5)[0], /4096 instance\(s\)/, 'a cloudlet inventing instances does not grow the CLI without end');
});
