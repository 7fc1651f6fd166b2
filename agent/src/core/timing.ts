import { performance } from 'node:perf_hooks';

/** Where a start spent its time: waiting on libvirt, waiting on the guest to answer, or in the agent itself. */
export interface LaunchTimings {
  totalMs: number;
  libvirtMs: number;
  guestMs: number;
  agentMs: number;
}

type Phase = 'libvirt' | 'guest';

/** Attributes a launch's wall time to phases, so the agent's own overhead is measured rather than guessed. */
export class PhaseTimer {
  private readonly started = performance.now();
  private readonly spent: Record<Phase, number> = { libvirt: 0, guest: 0 };

  async time<T>(phase: Phase, work: () => Promise<T>): Promise<T> {
    const t0 = performance.now();
    try {
      return await work();
    } finally {
      this.spent[phase] += performance.now() - t0;
    }
  }

  summary(): LaunchTimings {
    const round = (ms: number) => Math.round(ms * 10) / 10;
    const total = performance.now() - this.started;
    return {
      totalMs: round(total),
      libvirtMs: round(this.spent.libvirt),
      guestMs: round(this.spent.guest),
      agentMs: round(total - this.spent.libvirt - this.spent.guest),
    };
  }
}
