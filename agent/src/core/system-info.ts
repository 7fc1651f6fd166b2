import { readFile } from 'node:fs/promises';
import os from 'node:os';

export interface HostFacts {
  cores: number;
  usagePercent: number;
  speedMhz: string;
  cacheKb: number;
  totalBytes: number;
  freeBytes: number;
}

interface CpuSample {
  idle: number;
  total: number;
}

function sampleCpu(): CpuSample {
  let idle = 0;
  let total = 0;
  for (const cpu of os.cpus()) {
    const t = cpu.times;
    idle += t.idle;
    total += t.user + t.nice + t.sys + t.irq + t.idle;
  }
  return { idle, total };
}

/**
 * Host CPU and memory in the terms KD-Cloudlet clients rank cloudlets by. CPU usage is measured between two calls
 * (the first call measures since boot), so a client polling /api/system sees recent load, not a lifetime average.
 */
export class HostMonitor {
  private last: CpuSample = sampleCpu();
  private cpuinfo: { speedMhz: string; cacheKb: number } | undefined;

  async facts(): Promise<HostFacts> {
    const now = sampleCpu();
    const dTotal = now.total - this.last.total;
    const usagePercent = dTotal > 0 ? Math.round((1 - (now.idle - this.last.idle) / dTotal) * 1000) / 10 : 0;
    this.last = now;
    this.cpuinfo ??= await readCpuinfo();
    return {
      cores: Math.max(os.cpus().length, 1),
      usagePercent,
      ...this.cpuinfo,
      totalBytes: os.totalmem(),
      freeBytes: await availableMemory(),
    };
  }
}

async function readCpuinfo(): Promise<{ speedMhz: string; cacheKb: number }> {
  const text = await readFile('/proc/cpuinfo', 'utf8').catch(() => '');
  const speed = /^cpu MHz\s*:\s*([\d.]+)/m.exec(text)?.[1] ?? String(os.cpus()[0]?.speed ?? 0);
  const cache = Number(/^cache size\s*:\s*(\d+)/m.exec(text)?.[1] ?? 0);
  return { speedMhz: speed, cacheKb: cache };
}

/** MemAvailable is what a new VM can really get; os.freemem() ignores reclaimable page cache. */
export async function availableMemory(): Promise<number> {
  const text = await readFile('/proc/meminfo', 'utf8').catch(() => '');
  const kb = /^MemAvailable:\s*(\d+)/m.exec(text)?.[1];
  return kb ? Number(kb) * 1024 : os.freemem();
}
