// wrk (Debian's wrk, a multi-threaded C load generator) as the benchmarks' HTTP load: runs it, optionally pinned to
// some CPUs, and reads its report (requests/s, the latency distribution of `--latency`, failures).
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

export interface WrkOptions {
  url: string;
  connections: number;
  seconds: number;
  threads: number;
  headers?: Record<string, string>;
  /** CPUs (taskset's list form, e.g. "1") wrk may run on; absent: any. */
  cpus?: string;
}

export interface WrkResult {
  requests: number;
  rps: number;
  p50Ms: number;
  p99Ms: number;
  /** Socket errors (connect, read, write, timeout) and replies that were not 2xx/3xx. */
  failed: number;
}

export async function wrk(options: WrkOptions): Promise<WrkResult> {
  const args = [`-t${options.threads}`, `-c${options.connections}`, `-d${options.seconds}s`, '--latency'];
  for (const [name, value] of Object.entries(options.headers ?? {})) args.push('-H', `${name}: ${value}`);
  args.push(options.url);
  const [file, argv] = options.cpus ? ['taskset', ['-c', options.cpus, 'wrk', ...args]] : ['wrk', args];
  const { stdout } = await promisify(execFile)(file, argv, { timeout: (options.seconds + 30) * 1000 });
  return parseWrk(stdout);
}

/** wrk's report: "Requests/sec: N", "N requests in ...", the `--latency` table (50% ... 99%), any failures. */
export function parseWrk(report: string): WrkResult {
  const number = (pattern: RegExp, what: string) => {
    const match = pattern.exec(report);
    if (!match) throw new Error(`wrk's report has no ${what}:\n${report}`);
    return match;
  };
  const percentile = (p: number) => {
    const [, value, unit] = number(new RegExp(`^\\s+${p}%\\s+([\\d.]+)(us|ms|s)\\s*$`, 'm'), `${p}% latency`);
    return Number(value) * { us: 0.001, ms: 1, s: 1000 }[unit as 'us' | 'ms' | 's'];
  };
  const sockets = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(report);
  const non2xx = /Non-2xx or 3xx responses: (\d+)/.exec(report);
  const failed = (sockets ? sockets.slice(1).reduce((sum, n) => sum + Number(n), 0) : 0) + (non2xx ? Number(non2xx[1]) : 0);
  return {
    requests: Number(number(/^\s*(\d+) requests in /m, 'request count')[1]),
    rps: Number(number(/^Requests\/sec:\s+([\d.]+)/m, 'Requests/sec')[1]),
    p50Ms: percentile(50),
    p99Ms: percentile(99),
    failed,
  };
}
