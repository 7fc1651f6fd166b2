/**
 * The pace a request body must keep: a byte at least every `idleMs`, and at least `minBytesPerSecond` over every
 * `windowMs` (0: no minimum). A client dripping a byte just often enough to never be idle would otherwise keep its
 * connection, and whatever its request holds on the cloudlet, for as long as it likes.
 */
import { CloudletError } from '../errors';

export interface BodyPaceLimits {
  idleMs: number;
  minBytesPerSecond: number;
  windowMs: number;
}

/**
 * Watches one body. `onSlow` runs once, with REQUEST_TIMEOUT, when the body stalls or drips. Time in which the
 * server itself does not read the body (it paused the client while its consumer lags) is not counted: pause() then
 * start() again, which opens a fresh window.
 */
export class BodyPace {
  private idle: NodeJS.Timeout | undefined;
  private window: NodeJS.Timeout | undefined;
  private bytesInWindow = 0;
  private done = false;

  constructor(
    private readonly limits: BodyPaceLimits,
    private readonly onSlow: (error: CloudletError) => void,
  ) {}

  start(): void {
    if (this.done) return;
    this.pause();
    this.armIdle();
    if (this.limits.minBytesPerSecond > 0) this.openWindow();
  }

  /** `bytes` more arrived. */
  touch(bytes: number): void {
    if (this.done) return;
    this.bytesInWindow += bytes;
    this.armIdle();
  }

  /** The body is complete, or no longer wanted: nothing more is watched. */
  end(): void {
    this.done = true;
    this.pause();
  }

  pause(): void {
    clearTimeout(this.idle);
    clearTimeout(this.window);
    this.idle = undefined;
    this.window = undefined;
  }

  private armIdle(): void {
    clearTimeout(this.idle);
    const { idleMs } = this.limits;
    this.idle = setTimeout(() => this.slow(`The request body stalled: no byte for ${idleMs} ms`, { idle_ms: idleMs }), idleMs);
  }

  private openWindow(): void {
    this.bytesInWindow = 0;
    const { minBytesPerSecond, windowMs } = this.limits;
    this.window = setTimeout(() => {
      const needed = Math.ceil((minBytesPerSecond * windowMs) / 1000);
      if (this.bytesInWindow < needed) {
        this.slow(`The request body arrives too slowly: ${this.bytesInWindow} bytes in ${windowMs} ms, below the minimum of ${minBytesPerSecond} bytes/s`, {
          min_bytes_per_s: minBytesPerSecond,
          window_ms: windowMs,
          window_bytes: this.bytesInWindow,
        });
      } else {
        this.openWindow();
      }
    }, windowMs);
  }

  private slow(message: string, details: Record<string, number>): void {
    this.end();
    this.onSlow(new CloudletError('REQUEST_TIMEOUT', message, { details }));
  }
}
