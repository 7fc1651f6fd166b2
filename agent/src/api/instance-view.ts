/**
 * What one caller may see of the instances, on /v1, /v1/events and MQTT alike. The operator sees them all; a paired
 * device only the instances it uses (started or joined), and of their `owners` only its own entries, so no device
 * learns another device's id or instances. A stream (an events socket, an MQTT connection) keeps following an
 * instance it was shown until the news that ends it for the device: its last state, or the device leaving it.
 */
import type { CloudletEvent } from '../core/events';
import type { Instance } from '../core/types';
import { CloudletError } from '../errors';
import { deviceIdOf, type Caller } from '../trust/access';

export class InstanceView {
  /** Instances this stream was shown and has not yet seen the end of (for the device). */
  private readonly followed = new Set<string>();

  /** `deviceId` null: the operator's (or, with anonymous MQTT, everyone's) view of all instances. */
  constructor(private readonly deviceId: string | null) {}

  static of(caller: Caller): InstanceView {
    return new InstanceView(deviceIdOf(caller) ?? null);
  }

  /** The instances this caller may see, as it may see them; a stream follows them from now on. */
  list(instances: Instance[]): Instance[] {
    const shown = instances.filter((instance) => this.uses(instance.owners));
    for (const instance of shown) this.followed.add(instance.id);
    return shown.map((instance) => this.redacted(instance));
  }

  /** One instance as this caller may see it; another device's is one that does not exist. */
  one(instance: Instance): Instance {
    if (!this.uses(instance.owners)) throw new CloudletError('INSTANCE_NOT_FOUND', `no instance with id ${instance.id}`, { details: { instance_id: instance.id } });
    return this.redacted(instance);
  }

  /** The instance (or its wire shape) with only this caller's entries in `owners`. */
  redacted<T extends { owners: string[] }>(instance: T): T {
    const own = this.deviceId;
    return own === null ? instance : { ...instance, owners: instance.owners.filter((owner) => owner === own) };
  }

  /** The event as this stream may see it, or null when it is about an instance that is not the caller's. */
  event(event: CloudletEvent): CloudletEvent | null {
    if (event.type === 'progress') return this.follows(event.instanceId, null, false) ? event : null;
    const last = event.state === 'stopped' || event.state === 'crashed';
    return this.follows(event.instance.id, event.instance.owners, last) ? { ...event, instance: this.redacted(event.instance) } : null;
  }

  /**
   * Whether news of instance `id` reaches this stream. `owners`: who uses it now (null when the news does not say, as
   * launch progress or a cleared MQTT topic); `last`: nothing more will be said of it.
   */
  follows(id: string, owners: readonly string[] | null, last: boolean): boolean {
    if (this.deviceId === null) return true;
    const shown = this.followed.has(id) || (owners !== null && owners.includes(this.deviceId));
    // A device that left a shared instance sees that news (its use gone), then nothing more of it.
    if (!shown || last || (owners !== null && !owners.includes(this.deviceId))) this.followed.delete(id);
    else this.followed.add(id);
    return shown;
  }

  private uses(owners: readonly string[]): boolean {
    return this.deviceId === null || owners.includes(this.deviceId);
  }
}
