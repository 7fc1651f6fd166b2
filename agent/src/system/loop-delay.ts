/**
 * How late the event loop runs its callbacks (what every request and timer waits on top of its own work), from
 * perf_hooks' histogram, over the last complete window, so that a figure read now says how the loop is doing now.
 */
import { monitorEventLoopDelay } from 'node:perf_hooks';

export const LOOP_WINDOW_MS = 10_000;
/** The histogram's timer period: what it records is the time between its ticks, this much of it not a delay. */
const RESOLUTION_MS = 10;

export interface LoopDelayFigures {
  p50: number;
  p99: number;
  max: number;
}

export class LoopDelay {
  private readonly histogram = monitorEventLoopDelay({ resolution: RESOLUTION_MS });
  private last: LoopDelayFigures | null = null;
  private readonly timer: NodeJS.Timeout;

  constructor() {
    this.histogram.enable();
    this.timer = setInterval(() => {
      const ms = (ns: number) => Math.max(0, Math.round((ns / 1e6 - RESOLUTION_MS) * 100) / 100);
      const h = this.histogram;
      this.last = { p50: ms(h.percentile(50)), p99: ms(h.percentile(99)), max: ms(h.max) };
      h.reset();
    }, LOOP_WINDOW_MS);
    this.timer.unref();
  }

  /** The last complete window's figures in ms (null until one is complete). */
  figures(): LoopDelayFigures | null {
    return this.last;
  }
}
