import { access, mkdir, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Logger } from '../log';
import type { InstanceEnding, InstanceRuntime } from './runtime';
import type { InstanceRecord } from './types';

/** What keeping in agreement with the runtimes needs of the registry. */
export interface SyncedRegistry {
  /** The instances it lists. */
  listed(): InstanceRecord[];
  /** Whether it lists `id` or is launching it. */
  tracks(id: string): boolean;
  /** Whether it has the mechanism the record names (an instance of another one is not adopted). */
  knows(record: InstanceRecord): boolean;
  /** List an instance found running at start (and finish its launch if it was starting). */
  adoptRecord(record: InstanceRecord): void;
  /** Release the instance if it is no longer running and not being launched. */
  endIfGone(id: string, ending: InstanceEnding): Promise<void>;
  /** Release what devices whose authorization ended still hold. */
  releaseEndedOwners(): Promise<void>;
}

/**
 * Keeps the registry in agreement with its runtimes, which are the truth: adopts what they run at start, notices the
 * instances that end outside the agent (the runtimes' events, and polling as the safety net), and converges again
 * after a runtime's connection came back.
 */
export interface ReconcileCost {
  lastMs: number;
  medianMs: number;
  maxMs: number;
}

/** How many of the last reconcile polls reconcileCost() covers (10 s at the default interval). */
const COSTED_TICKS = 10;

export class RuntimeSync {
  private reconcileTimer: NodeJS.Timeout | undefined;
  /** The wall time of the last COSTED_TICKS polls, oldest first. */
  private readonly tickMs: number[] = [];

  constructor(
    private readonly registry: SyncedRegistry,
    private readonly runtimes: InstanceRuntime[],
    private readonly instancesDir: string,
    /** Where unfinished work lives (captures); an instance found there at start is a leftover. */
    private readonly stagingDir: string,
    private readonly log: Logger,
  ) {}

  /** Adopt the instances the runtimes still run, end leftovers of the staging area, and sweep directories of no instance. */
  async adopt(): Promise<void> {
    await mkdir(this.instancesDir, { recursive: true, mode: 0o755 });
    for (const runtime of this.runtimes) {
      for (const record of await runtime.listInstances()) {
        if (isInside(this.instancesDir, record.dir) && this.registry.knows(record)) {
          // Records written before instances had owners have none.
          this.registry.adoptRecord({ ...record, owners: record.owners ?? [] });
        } else if (isInside(this.stagingDir, record.dir)) {
          // Work that never finished (a state capture cut by a restart): its files went with the staging area.
          this.log(`ending unfinished instance ${record.id} (${record.serviceId})`);
          await runtime.destroy(record.id);
        }
        // Anything else belongs to another agent sharing this libvirt (another data directory): not ours to touch.
      }
    }
    await this.sweepDirectories();
  }

  /**
   * Watch for instances that ended outside the agent (killed, crashed, destroyed by hand): through the runtimes'
   * own events when they have them and `useEvents` is set (noticed within milliseconds), and by polling every
   * `intervalMs` as the safety net for anything an event could not tell (a lost connection, an agent restart).
   */
  startReconciling(intervalMs: number, useEvents: boolean): void {
    for (const runtime of this.runtimes) {
      runtime.onReconnected?.(() => {
        this.resync(runtime).catch((err: Error) => this.log(`converging with the runtime after reconnecting failed: ${err.message}`));
      });
    }
    if (useEvents) {
      for (const runtime of this.runtimes) {
        runtime
          .watchEnded?.((id, ending) => {
            this.registry.endIfGone(id, ending).catch((err: Error) => this.log(`handling the end of ${id} failed: ${err.message}`));
          })
          .catch((err: Error) => this.log(`no lifecycle events, polling only: ${err.message}`));
      }
    }
    let lastProblem: string | null = null;
    const tick = async () => {
      const started = performance.now();
      try {
        await this.reconcile();
        this.tickMs.push(performance.now() - started);
        if (this.tickMs.length > COSTED_TICKS) this.tickMs.shift();
        lastProblem = null;
      } catch (err) {
        // Once per distinct problem: a hypervisor that is down fails every poll the same way until it is back.
        if ((err as Error).message !== lastProblem) this.log(`reconcile failed: ${(err as Error).message}`);
        lastProblem = (err as Error).message;
      }
      this.reconcileTimer = setTimeout(() => void tick(), intervalMs);
      this.reconcileTimer.unref();
    };
    this.reconcileTimer = setTimeout(() => void tick(), intervalMs);
    this.reconcileTimer.unref();
  }

  stopReconciling(): void {
    clearTimeout(this.reconcileTimer);
  }

  /** What the reconcile poll costs (wall time, its runtime calls included): the last tick's, and the median and most of the last few. */
  reconcileCost(): ReconcileCost | null {
    const last = this.tickMs.at(-1);
    if (last === undefined) return null;
    const sorted = [...this.tickMs].sort((a, b) => a - b);
    return { lastMs: last, medianMs: sorted[Math.floor(sorted.length / 2)]!, maxMs: sorted.at(-1)! };
  }

  /** Release the listed instances no runtime runs any more, and the uses of devices whose authorization ended. */
  async reconcile(): Promise<void> {
    // The runtimes are asked at once: libvirt's domain list waits on a libuv thread while the sandboxes answer.
    const running = new Set((await Promise.all(this.runtimes.map((runtime) => runtime.running()))).flatMap((ids) => [...ids]));
    for (const record of this.registry.listed()) {
      if (!running.has(record.id)) await this.registry.endIfGone(record.id, { state: 'stopped', reason: 'vanished' });
    }
    await this.registry.releaseEndedOwners();
  }

  /**
   * After a runtime's connection came back: release the instances that ended while it was away (with their events),
   * end domains of ours that nobody tracks any more (a launch that failed while the runtime was unreachable could not
   * end its own), and delete instance directories that belong to no instance.
   */
  async resync(runtime: InstanceRuntime): Promise<void> {
    for (const record of await runtime.listInstances()) {
      const untracked = isInside(this.instancesDir, record.dir) && !this.registry.tracks(record.id);
      // A capture in the staging area owns its directory until it is done; one whose directory is gone is over.
      const abandonedCapture = isInside(this.stagingDir, record.dir) && !(await exists(record.dir));
      if (!untracked && !abandonedCapture) continue;
      this.log(`ending instance ${record.id} of ${record.serviceId}, which no launch or capture owns any more`);
      await runtime.destroy(record.id);
      if (untracked) await rm(record.dir, { recursive: true, force: true });
    }
    await this.reconcile();
    await this.sweepDirectories();
  }

  private async sweepDirectories(): Promise<void> {
    for (const entry of await readdir(this.instancesDir)) {
      if (!this.registry.tracks(entry)) await rm(path.join(this.instancesDir, entry), { recursive: true, force: true });
    }
  }
}

const isInside = (dir: string, file: string) => file.startsWith(dir + path.sep);

const exists = (file: string) =>
  access(file).then(
    () => true,
    () => false,
  );
