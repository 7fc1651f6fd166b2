/**
 * When the rest of an upload is due, at the pace its current request keeps. A synthesis may take its launch slot
 * shortly before the last byte (so the restore overlaps the end of the upload) but not while a client sends slowly:
 * the pace is judged over at least MIN_OBSERVED_MS of the request, so a quick burst followed by a drip does not count.
 */
const MIN_OBSERVED_MS = 1000;

export class ArrivalPace {
  private readonly startedAt = performance.now();

  /** `received`: the upload's bytes when its request began. */
  constructor(private readonly received: number) {}

  /** True once the request ran long enough to judge it and, at its pace, the bytes still missing arrive within `ms`. */
  dueWithin(received: number, total: number, ms: number): boolean {
    const elapsed = performance.now() - this.startedAt;
    if (elapsed < MIN_OBSERVED_MS) return false;
    const perMs = (received - this.received) / elapsed;
    return perMs > 0 && (total - received) / perMs <= ms;
  }
}
