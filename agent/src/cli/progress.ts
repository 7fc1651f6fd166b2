/** A one-line progress bar for long transfers, redrawn in place on a terminal and silent elsewhere (pipes, logs). */
import { escaped } from './terminal';

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

/** `[#########...........]  45%  12.3 MiB / 27.0 MiB  8.1 MiB/s` */
export function progressLine(done: number, total: number, bytesPerSecond: number, width = 24): string {
  const fraction = total > 0 ? Math.min(1, done / total) : 1;
  const filled = Math.round(fraction * width);
  const percent = `${Math.floor(fraction * 100)}%`.padStart(4);
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${percent}  ${formatBytes(done)} / ${formatBytes(total)}  ${formatBytes(Math.round(bytesPerSecond))}/s`;
}

export class ProgressBar {
  private readonly startedAt = Date.now();
  private lastDrawAt = 0;

  constructor(
    private readonly out: NodeJS.WriteStream,
    private readonly total: number,
    private readonly label: string,
    private readonly initial = 0,
  ) {}

  update(done: number): void {
    if (!this.out.isTTY) return;
    const now = Date.now();
    // At most ten redraws a second: a terminal is slower than a loopback download.
    if (now - this.lastDrawAt < 100 && done < this.total) return;
    this.lastDrawAt = now;
    const rate = ((done - this.initial) * 1000) / Math.max(1, now - this.startedAt);
    this.out.write(`\r${escaped(this.label)} ${progressLine(done, this.total, rate)}\x1b[K`);
  }

  finish(): void {
    if (this.out.isTTY) this.out.write('\n');
  }
}
