/**
 * The HTTP access log. A line per request on stderr (the journal, on a box) was the largest single cost of a request
 * under load, and a journal full of successful polls hides what an operator looks for. So: a request answered 1xx-3xx
 * is written only at `debug` level; a refusal or a failure (4xx, 5xx) and a client that left before its answer are
 * written at `info` too, as before, up to REFUSAL_LINES a window, so that a flood of refusals is counted, not written;
 * and once a window (a minute) one line counts what was served, by class.
 */
import type { Logger } from '../log';

/** Everything (`debug`), or what went wrong plus the counts (`info`). */
export type AccessLogLevel = 'info' | 'debug';

export const WINDOW_MS = 60_000;
/** Refusals written one by one per window at `info`; the rest are only counted. */
export const REFUSAL_LINES = 300;

interface Counts {
  ok: number;
  clientErrors: number;
  serverErrors: number;
  aborted: number;
  /** Refusals counted but not written one by one. */
  unwritten: number;
}

const zero = (): Counts => ({ ok: 0, clientErrors: 0, serverErrors: 0, aborted: 0, unwritten: 0 });

export class AccessLog {
  private counts = zero();
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly log: Logger,
    private readonly level: AccessLogLevel,
  ) {
    this.timer = setInterval(() => this.summarize(), WINDOW_MS);
    this.timer.unref();
  }

  /** One answered request: `url` as it may be logged (credentials redacted), its status or 'aborted', its duration. */
  record(method: string, url: string, status: number | 'aborted', ms: number): void {
    const c = this.counts;
    if (status === 'aborted') c.aborted++;
    else if (status >= 500) c.serverErrors++;
    else if (status >= 400) c.clientErrors++;
    else c.ok++;
    const refused = status === 'aborted' || status >= 400;
    if (this.level === 'debug' || (refused && c.clientErrors + c.serverErrors + c.aborted <= REFUSAL_LINES)) {
      this.log(`${method} ${url} ${status} ${ms}ms`);
    } else if (refused) c.unwritten++;
  }

  /** Writes the window's counts (nothing when nothing was served) and starts a new window. */
  summarize(): void {
    const c = this.counts;
    this.counts = zero();
    const total = c.ok + c.clientErrors + c.serverErrors + c.aborted;
    if (total === 0) return;
    const unwritten = c.unwritten ? `; ${c.unwritten} refusals not written one by one` : '';
    this.log(
      `${total} requests in the last ${WINDOW_MS / 1000} s: ${c.ok} answered, ${c.clientErrors} refused (4xx), ${c.serverErrors} failed (5xx), ` +
        `${c.aborted} left before the answer${unwritten}`,
    );
  }

  close(): void {
    clearInterval(this.timer);
    this.summarize();
  }
}
