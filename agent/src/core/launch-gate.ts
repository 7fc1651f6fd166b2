/**
 * Admission control for launches: at most `concurrent` launches run at once (on a 2-core TCG box a third restore
 * only slows the other two down); the ones over the bound wait their turn in arrival order, and when `queue` of
 * them are already waiting a new one is refused with BUSY at once, so a phone learns to come back rather than hang.
 */
import { CloudletError } from '../errors';

export interface LaunchLimits {
  /** Launches (from first libvirt call to ready) that may run at the same time. */
  concurrent: number;
  /** Launches that may wait for a slot; one more is refused with BUSY. */
  queue: number;
}

/** What a refused launch is told to wait before retrying (a Cached VM restore takes seconds here). */
const BUSY_RETRY_AFTER_S = 5;

export class LaunchGate {
  private running = 0;
  private readonly waiting: (() => void)[] = [];

  constructor(private readonly limits: LaunchLimits) {}

  /** Runs `launch` when a slot is free; throws BUSY without running it when the queue is full. */
  async run<T>(launch: () => Promise<T>): Promise<T> {
    if (this.running >= this.limits.concurrent) {
      if (this.waiting.length >= this.limits.queue) {
        throw new CloudletError('BUSY', `${this.running} launches are running and ${this.waiting.length} waiting; try again later`, {
          details: { retry_after_s: BUSY_RETRY_AFTER_S, running: this.running, waiting: this.waiting.length },
        });
      }
      // The slot is handed over by the launch that frees it, so `running` never drops below the bound meanwhile.
      await new Promise<void>((resolve) => this.waiting.push(resolve));
    } else {
      this.running++;
    }
    try {
      return await launch();
    } finally {
      const next = this.waiting.shift();
      if (next) next();
      else this.running--;
    }
  }
}
