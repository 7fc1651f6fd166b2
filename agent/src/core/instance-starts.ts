import os from 'node:os';
import { CloudletError } from '../errors';
import type { Mechanism } from './mechanism';
import type { InstanceRegistry } from './instances';
import type { Endpoint, Instance, StartResult, Stopper, Workload } from './types';

/** Addresses that mean "every interface": a client connects to the one it reached the API on. */
export const WILDCARD = new Set(['0.0.0.0', '::', '']);

/** How a device's authorization stands: null while it may act, else how it ended (trust/devices.ts). */
export type DeviceStanding = 'not-paired' | 'revoked' | 'expired' | null;

/** Who asks for a start (StartRequest): a device, an anonymous caller of the KD face, else the operator. */
export interface StartedBy {
  deviceId?: string;
  anonymousFrom?: string;
  /** The host the client reached the API on: the endpoint's address when the forward is bound to all. */
  clientHost?: string;
}

/**
 * Every start on someone's behalf, whatever the mechanism (Cached VM, app package, on-demand, synthesis): the registry
 * launches or joins, and a start for a device whose authorization ended meanwhile is undone.
 */
export class InstanceStarts {
  /** See attachDeviceStanding; every device is in good standing until told otherwise. */
  private deviceStanding: (deviceId: string) => DeviceStanding = () => null;

  constructor(private readonly registry: InstanceRegistry) {}

  /**
   * Which devices may still hold instances (null: in good standing, else how its authorization ended): the reconciler
   * releases the uses of any other (a release that failed at the device's end, libvirt being unreachable, is retried
   * until it succeeds), and a start for a device whose authorization ended while it launched is undone.
   */
  attachDeviceStanding(standing: (deviceId: string) => DeviceStanding): void {
    this.deviceStanding = standing;
    this.registry.setOwnerStanding((id) => standing(id) === null);
  }

  /**
   * The device's authorization may have ended while its VM was launching, possibly before the registry listed the
   * instance for releasing; its use is then given back, and the start fails as the device's next request would.
   */
  async start<W extends Workload>(
    workload: W,
    join: boolean,
    mechanism: Mechanism<W>,
    { deviceId, anonymousFrom, clientHost }: StartedBy,
  ): Promise<StartResult> {
    const user: Stopper = deviceId !== undefined ? { device: deviceId } : anonymousFrom !== undefined ? { anonymous: anonymousFrom } : 'operator';
    const started = await this.registry.start(workload, join, mechanism, user);
    const standing = deviceId === undefined ? null : this.deviceStanding(deviceId);
    if (deviceId !== undefined && standing) {
      // Already released (the registry listed it in time) is as good.
      await this.registry.stop(started.instance.id, { device: deviceId }).catch(() => {});
      throw new CloudletError(
        standing === 'expired' ? 'DEVICE_EXPIRED' : standing === 'revoked' ? 'DEVICE_REVOKED' : 'UNAUTHENTICATED',
        `the authorization of device ${deviceId} ended while its instance was starting`,
        { details: { device_id: deviceId } },
      );
    }
    return { ...started, endpoint: this.endpointFor(started.instance, clientHost) };
  }

  /** The address a client should connect to: the forward's own address, or the one the client reached us on. */
  endpointFor(instance: Instance, clientHost?: string): Endpoint {
    const address = WILDCARD.has(instance.bindAddress) ? (clientHost ?? os.hostname()) : instance.bindAddress;
    return { address, port: instance.hostPort };
  }
}
