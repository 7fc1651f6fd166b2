/**
 * Who holds the uses of an instance, and who may release which: a paired device (its own uses only), an anonymous
 * caller of the plain KD face (only a use an anonymous caller holds: never the operator's, never a device's), the
 * operator (any). Anonymous uses are also bounded, per address and in all (limits.anonymousInstances*), since anyone
 * on the network may start them.
 */
import { CloudletError } from '../errors';
import type { InstanceRecord, Stopper } from './types';

/** The holders of an instance's uses besides the operator's (users minus both lists). */
export interface UseHolders {
  owners: string[];
  anonymous: string[];
}

export function holdersOf(record: InstanceRecord): UseHolders {
  return { owners: record.owners, anonymous: record.anonymous ?? [] };
}

/** The holders once `user` holds one more use. */
export function withUse(holders: UseHolders, user: Stopper): UseHolders {
  if (typeof user === 'object' && 'device' in user) return { ...holders, owners: [...holders.owners, user.device] };
  if (typeof user === 'object') return { ...holders, anonymous: [...holders.anonymous, user.anonymous] };
  return holders;
}

/**
 * The holders once `by` released one use of the instance; null when `by` holds no use it may release. An anonymous
 * caller releases its own address's use first, else another anonymous one (KD's instance id is what entitles it, and a
 * phone's address may change); the operator its own, else an anonymous one, else the last device's.
 */
export function withoutOneUse(record: InstanceRecord, by: Stopper): UseHolders | null {
  const { owners, anonymous } = holdersOf(record);
  const operatorUses = record.users - owners.length - anonymous.length;
  if (typeof by === 'object' && 'device' in by) {
    const at = owners.indexOf(by.device);
    return at === -1 ? null : { owners: owners.filter((_, i) => i !== at), anonymous };
  }
  if (typeof by === 'object') {
    if (anonymous.length === 0) return null;
    const own = anonymous.indexOf(by.anonymous);
    const at = own === -1 ? anonymous.length - 1 : own;
    return { owners, anonymous: anonymous.filter((_, i) => i !== at) };
  }
  if (operatorUses > 0) return { owners, anonymous };
  if (anonymous.length > 0) return { owners, anonymous: anonymous.slice(0, -1) };
  return { owners: owners.slice(0, -1), anonymous };
}

export interface AnonymousLimits {
  /** Uses one address (an IPv6 /64) may hold through the plain KD face. */
  perAddress: number;
  /** Uses all anonymous callers together may hold. */
  total: number;
}

/**
 * Admission of anonymous starts: the uses held (read from the instance records, so a restart forgets none) plus the
 * starts still running (so a burst of concurrent starts cannot pass the check together) stay within the limits.
 */
export class AnonymousQuota {
  private readonly inFlight = new Map<string, number>();
  private inFlightTotal = 0;

  constructor(
    private readonly limits: AnonymousLimits,
    private readonly held: () => InstanceRecord[],
  ) {}

  /** Runs `start` for `address` within the limits, else throws QUOTA_EXCEEDED without running it. */
  async run<T>(address: string, start: () => Promise<T>): Promise<T> {
    const held = this.held().flatMap((record) => record.anonymous ?? []);
    const fromAddress = held.filter((a) => a === address).length + (this.inFlight.get(address) ?? 0);
    if (fromAddress >= this.limits.perAddress) {
      throw new CloudletError(
        'QUOTA_EXCEEDED',
        `this address already holds ${fromAddress} instance(s) started without credentials, the most one address may; stop one first, or pair this device`,
        { details: { limit: this.limits.perAddress, scope: 'address' } },
      );
    }
    if (held.length + this.inFlightTotal >= this.limits.total) {
      throw new CloudletError(
        'QUOTA_EXCEEDED',
        `${held.length + this.inFlightTotal} instances started without credentials are running, the most the cloudlet allows; try again later, or pair this device`,
        { details: { limit: this.limits.total, scope: 'cloudlet' } },
      );
    }
    this.inFlight.set(address, (this.inFlight.get(address) ?? 0) + 1);
    this.inFlightTotal++;
    try {
      return await start();
    } finally {
      this.inFlightTotal--;
      const left = this.inFlight.get(address)! - 1;
      if (left === 0) this.inFlight.delete(address);
      else this.inFlight.set(address, left);
    }
  }
}

/** `owners` without the first `uses` entries of `owner`. */
export function withoutUses(owners: string[], owner: string, uses: number): string[] {
  let left = uses;
  return owners.filter((o) => o !== owner || left-- <= 0);
}
