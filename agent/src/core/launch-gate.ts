/**
 * Admission control for launches: at most `concurrent` launches run at once (on a 2-core TCG box a third restore
 * only slows the other two down); the ones over the bound wait their turn in arrival order, and when `queue` of
 * them are already waiting a new one is refused with BUSY at once, so a phone learns to come back rather than hang.
 * A slot is held from the launch's first hypervisor call to ready, and never for longer than `readyWithinMs` of
 * waiting for the service to answer: no client-supplied timeout can make a slot last longer.
 */
import { CloudletError } from '../errors';

export interface LaunchLimits {
  /** Launches (from first libvirt call to ready) that may run at the same time. */
  concurrent: number;
  /** Launches that may wait for a slot; one more is refused with BUSY. */
  queue: number;
  /** The longest any launch waits for its service to answer, whatever its readiness probe asks for. */
  readyWithinMs: number;
}

/** What a refused launch is told to wait before retrying (a Cached VM restore takes seconds here). */
const BUSY_RETRY_AFTER_S = 5;

export class LaunchGate {
  private running = 0;
  private readonly waiting: (() => void)[] = [];
  /** Slots lent to background work (filling the warm pool): counted only by background work, so launches never wait for them. */
  private lent = 0;
  private readonly freed = new Set<() => void>();

  constructor(readonly limits: LaunchLimits) {}

  /** Runs `launch` when a slot is free; throws BUSY without running it when the queue is full. */
  async run<T>(launch: () => Promise<T>): Promise<T> {
    const release = await this.acquire();
    try {
      return await launch();
    } finally {
      release();
    }
  }

  /** One launch's claim on a slot: taken at most once (`admit`), given back when the launch ends (`release`). */
  slot(): { admit: () => Promise<void>; release: () => void } {
    let taking: Promise<() => void> | null = null;
    return {
      admit: async () => {
        await (taking ??= this.acquire());
      },
      release: () => {
        void taking?.then(
          (giveBack) => giveBack(),
          () => {},
        );
      },
    };
  }

  /**
   * A slot for background work, only if one is free now: no launch waits and launches plus background work leave one.
   * Background work yields its slot: launches do not count it, so a start never waits behind it (the CPU is shared
   * for a while, nothing more). null when none is free; `onFreed` says when to ask again.
   */
  tryLend(): (() => void) | null {
    if (this.waiting.length > 0 || this.running + this.lent >= this.limits.concurrent) return null;
    this.lent++;
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      this.lent--;
      this.tellFreed();
    };
  }

  /** Call listener whenever a slot is given back (returns what stops that). */
  onFreed(listener: () => void): () => void {
    this.freed.add(listener);
    return () => this.freed.delete(listener);
  }

  private tellFreed(): void {
    for (const listener of this.freed) listener();
  }

  /** Waits for a slot (BUSY when the queue is full) and returns what gives it back; calling that again does nothing. */
  async acquire(): Promise<() => void> {
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
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      const next = this.waiting.shift();
      if (next) next();
      else {
        this.running--;
        this.tellFreed();
      }
    };
  }
}
