/**
 * Per-client request rate limits: one token bucket per client key (a paired device's id, or the remote IP address
 * for requests that carry no device credential), so one phone or one host hammering the API cannot starve the
 * others. A request takes a token; an empty bucket refuses it with RATE_LIMITED and how long until the next token.
 */
import { CloudletError } from '../errors';
import { addressKey } from './access';

export interface RateLimit {
  /** Tokens added per second: the sustained rate. */
  perSecond: number;
  /** Bucket size: how many requests may come at once after a quiet spell. */
  burst: number;
}

interface Bucket {
  tokens: number;
  at: number;
}

/** Buckets idle this long are full again and dropped, so the map holds only recent clients. */
const SWEEP_EVERY_MS = 60_000;
/** At most this many clients are tracked at once: a flood of new addresses cannot grow the map without bound. */
export const MAX_BUCKETS = 10_000;

export class RateLimiter {
  private readonly buckets = new Map<string, Bucket>();
  private lastSweep: number;

  constructor(
    private readonly limit: RateLimit,
    private readonly now: () => number = Date.now,
    private readonly maxBuckets = MAX_BUCKETS,
  ) {
    this.lastSweep = now();
  }

  /** Takes one token for `key`, or throws RATE_LIMITED (details.retry_after_s: whole seconds until one is back). */
  take(key: string): void {
    const now = this.now();
    this.sweep(now);
    if (!this.buckets.has(key) && this.buckets.size >= this.maxBuckets) {
      // Full: drop the buckets that are full again now; a new client waits while every tracked one is still active.
      this.sweep(now, true);
      if (this.buckets.size >= this.maxBuckets) {
        throw new CloudletError('RATE_LIMITED', 'Too many clients at once; retry in 1 s', { details: { retry_after_s: 1 } });
      }
    }
    const bucket = this.buckets.get(key) ?? { tokens: this.limit.burst, at: now };
    bucket.tokens = Math.min(this.limit.burst, bucket.tokens + ((now - bucket.at) / 1000) * this.limit.perSecond);
    bucket.at = now;
    this.buckets.set(key, bucket);
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1;
      return;
    }
    const retryAfter = Math.max(1, Math.ceil((1 - bucket.tokens) / this.limit.perSecond));
    throw new CloudletError('RATE_LIMITED', `Too many requests from ${key}; retry in ${retryAfter} s`, { details: { retry_after_s: retryAfter } });
  }

  /** take() for a client known only by its address (an IPv6 one by its /64). */
  takeForAddress(remoteAddress: string): void {
    this.take(`address ${addressKey(remoteAddress)}`);
  }

  private sweep(now: number, force = false): void {
    if (!force && now - this.lastSweep < SWEEP_EVERY_MS) return;
    this.lastSweep = now;
    const refillMs = (this.limit.burst / this.limit.perSecond) * 1000;
    for (const [key, bucket] of this.buckets) if (now - bucket.at >= refillMs) this.buckets.delete(key);
  }
}
