// ./build.sh bench native — what the threaded shim costs per libvirt call, and what it buys: the event loop keeps
// turning. Baseline in the same run: the same libvirt call made directly and synchronously through ffi-rs.
// libvirt's test:///default driver, so the figures are the binding's, not a hypervisor's. Ends with one line of JSON.
import { DataType, load, open } from 'ffi-rs';
import { performance } from 'node:perf_hooks';
import { Connection } from '../native/libvirt';
import { sized } from './support/measure';

const CALLS = sized(5000, 500);
const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;

/** Largest gap between 1 ms timer ticks while `work` runs: how long the event loop was held. */
async function maxLoopGap(work: () => Promise<void> | void): Promise<number> {
  let last = performance.now();
  let gap = 0;
  const tick = setInterval(() => {
    const now = performance.now();
    gap = Math.max(gap, now - last);
    last = now;
  }, 1);
  await new Promise((r) => setTimeout(r, 20));
  last = performance.now();
  await work();
  const now = performance.now();
  gap = Math.max(gap, now - last);
  clearInterval(tick);
  return gap;
}

async function main() {
  const conn = await Connection.open('test:///default');
  // Baseline: libvirt called directly from the JS thread (what a naive ffi-rs binding does).
  open({ library: 'libvirt', path: 'libvirt.so.0' });
  const direct = load({
    library: 'libvirt',
    funcName: 'virConnectOpen',
    retType: DataType.External,
    paramsType: [DataType.String],
    paramsValue: ['test:///default'],
  });
  const directIsAlive = () =>
    load({ library: 'libvirt', funcName: 'virConnectIsAlive', retType: DataType.I32, paramsType: [DataType.External], paramsValue: [direct] });
  try {
    for (let i = 0; i < 200; i++) {
      directIsAlive();
      await conn.isAlive();
    } // warm up both paths

    let t0 = performance.now();
    for (let i = 0; i < CALLS; i++) directIsAlive();
    const directUs = ((performance.now() - t0) * 1000) / CALLS;

    t0 = performance.now();
    for (let i = 0; i < CALLS; i++) await conn.isAlive();
    const shimUs = ((performance.now() - t0) * 1000) / CALLS;

    // 50 ms of back-to-back libvirt calls, made both ways: does the event loop wait for them?
    const blockedGap = await maxLoopGap(() => {
      const end = performance.now() + 50;
      while (performance.now() < end) directIsAlive();
    });
    const threadedGap = await maxLoopGap(async () => {
      const end = performance.now() + 50;
      while (performance.now() < end) await Promise.all(Array.from({ length: 20 }, () => conn.isAlive()));
    });

    process.stdout.write(
      JSON.stringify({
        bench: 'native',
        calls: CALLS,
        direct_sync_call_us: round(directUs),
        shim_threaded_call_us: round(shimUs),
        shim_vs_direct: round(shimUs / directUs, 2),
        loop_gap_sync_50ms_ms: round(blockedGap),
        loop_gap_threaded_50ms_ms: round(threadedGap),
      }) + '\n',
    );
  } finally {
    await conn.close();
  }
}

main().catch((err) => {
  process.stderr.write(`bench native failed: ${err.stack ?? err}\n`);
  process.exit(1);
});
