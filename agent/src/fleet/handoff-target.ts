/**
 * A handoff as its target sees it (docs/handoff.md): a paired cloudlet offers one of its running instances; this
 * cloudlet checks it holds the same service (the disk image's digest), prepares for it (an overlay over its own copy
 * of the image, a forward port of its own, the domain XML it will run as) and issues a handoff id, bound to that
 * cloudlet's credential and to a deadline. The channels of that handoff (handoff-relay.ts) are let through only for
 * it, the libvirt one through the RPC gate (handoff-rpc.ts). Once the VM runs here the source says so (`complete`):
 * this cloudlet proves it serves and lists it. An offer that is abandoned, or that runs out, leaves nothing: no
 * domain, file or port; one whose VM does run here when it runs out is adopted (the source died after the move).
 */
import { randomBytes } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { CloudletError } from '../errors';
import type { Logger } from '../log';
import { domainName } from '../core/instance-launch';
import type { InstanceRegistry } from '../core/instances';
import type { PortAllocator } from '../core/ports';
import { boundedProbe, waitUntilReady } from '../core/readiness';
import type { InstanceRecord, Service } from '../core/types';
import { createLinkedClone } from '../images/qemu-img';
import { faultPoint } from '../system/fault-points';
import { handoffDomainXml, isIssuedHandoffDomain } from '../vm/domain-xml';
import type { Hypervisor } from '../vm/hypervisor';
import { instanceDomainSpec, instanceFiles } from '../vm/instance-domain';
import { LibvirtCallFilter, type IssuedMigration } from './handoff-rpc';
import { HANDOFF_ID, handoffSocket, handoffSocketDir, joinChannel, makeTargetSocketDir, migrationUris, type HandoffChannel } from './handoff-relay';

/** What a handoff needs of this cloudlet's core (compose.ts hands it over). */
export interface HandoffHost {
  hypervisor: Hypervisor;
  registry: Pick<InstanceRegistry, 'handOff' | 'expectArrival' | 'arrived' | 'get'>;
  ports: PortAllocator;
  services: { get(id: string): Service };
  instancesDir: string;
  bindAddress: string;
  readyWithinMs: number;
}

/** How long an offer stands: the whole migration must be done by then (a bounded VM on a slow link is minutes). */
export const HANDOFF_OFFER_MS = 10 * 60_000;
/** How soon an offer that ran out while libvirt was unreachable is looked at again. */
const HANDOFF_RETRY_MS = 60_000;
/** The largest domain XML a peer may send (the agent's own are a few KiB). */
export const MAX_OFFERED_XML_BYTES = 64 * 1024;
/**
 * The first proof attempt's bound for an arrived VM (each next one twice as long): it served at its source a moment
 * ago, so a first connection lost while its network settles here is retried at once, not after a whole attempt.
 */
const ARRIVAL_FIRST_ATTEMPT_MS = 250;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** What the source offers, checked. */
export interface HandoffOffer {
  instanceId: string;
  serviceId: string;
  diskSha256: string;
  domainXml: string;
}

/** The target's answer to an offer: what the source migrates with. */
export interface IssuedHandoff {
  handoffId: string;
  /** The domain as it runs here. */
  destXml: string;
  migrateUri: string;
  disksUri: string;
  /** The instance's forward here. */
  port: number;
}

interface Arrival {
  id: string;
  deviceId: string;
  record: InstanceRecord;
  issued: IssuedMigration;
  deadline: NodeJS.Timeout | undefined;
  /** Set once its arrival is being proven (and then listed). */
  arriving?: Promise<{ ready: boolean; port: number }>;
}

export class IncomingHandoffs {
  private readonly arrivals = new Map<string, Arrival>();

  constructor(
    private readonly host: HandoffHost,
    private readonly sha256: (file: string) => Promise<string>,
    private readonly log: Logger,
  ) {}

  /** Prepare for an instance the paired cloudlet `deviceId` offers; refused before anything is made when it cannot come. */
  async offer(deviceId: string, offer: HandoffOffer): Promise<IssuedHandoff> {
    const { host } = this;
    if (!UUID.test(offer.instanceId)) throw new CloudletError('INVALID_PARAMETER', 'instance_id must be a UUID', { details: { parameter: 'instance_id' } });
    const known = (() => {
      try {
        return host.registry.get(offer.instanceId);
      } catch {
        return null;
      }
    })();
    if (known || [...this.arrivals.values()].some((a) => a.record.id === offer.instanceId)) {
      throw new CloudletError('HANDOFF_IN_PROGRESS', `instance ${offer.instanceId} is here already, or on its way`, {
        details: { instance_id: offer.instanceId },
      });
    }
    const service = this.heldService(offer);
    const disk = path.join(service.dir, service.manifest.disk);
    if ((await this.sha256(disk).catch(() => null)) !== offer.diskSha256) {
      throw new CloudletError('HANDOFF_TARGET_LACKS_SERVICE', `this cloudlet holds another image of ${offer.serviceId} (its digest differs)`, {
        details: { service_id: offer.serviceId },
      });
    }
    const id = `ho-${randomBytes(12).toString('hex')}`;
    const port = await host.ports.reserve();
    const now = new Date().toISOString();
    const m = service.manifest;
    const record: InstanceRecord = {
      id: offer.instanceId,
      serviceId: service.id,
      mechanism: 'cached-vm',
      state: 'ready',
      bindAddress: host.bindAddress,
      hostPort: port,
      guestPort: m.port,
      shareable: m.shareable,
      // The source's users are devices paired there: here the instance is the operator's until a phone joins it.
      users: 1,
      owners: [],
      anonymous: [],
      launch: 'handoff',
      createdAt: now,
      readyAt: now,
      dir: path.join(host.instancesDir, offer.instanceId),
      readiness: m.readiness,
    };
    host.registry.expectArrival(record.id, record);
    try {
      const spec = instanceDomainSpec(service, domainName(service.id, record.id), record, host.hypervisor.domainType);
      const destXml = handoffDomainXml(offer.domainXml, spec, (message) => new CloudletError('HANDOFF_REFUSED', `the offered domain ${message}`));
      // A fresh overlay: the disk copy writes only what the source's top layer holds, over this cloudlet's own base.
      await rm(record.dir, { recursive: true, force: true });
      await mkdir(record.dir, { mode: 0o755 });
      await createLinkedClone(disk, instanceFiles(record.dir).disk, 'qcow2');
      await makeTargetSocketDir(id, await host.hypervisor.qemuIdentity());
      const issued = { isIssuedDomain: (xml: string) => isIssuedHandoffDomain(xml, spec), ...migrationUris(id) };
      const arrival: Arrival = { id, deviceId, record, issued, deadline: undefined };
      this.arm(arrival, HANDOFF_OFFER_MS);
      this.arrivals.set(id, arrival);
      this.log(`handoff ${id}: ${offer.instanceId} of ${service.id} offered by device ${deviceId}; its forward here is port ${port}`);
      return { handoffId: id, port, destXml, ...migrationUris(id) };
    } catch (err) {
      await this.undo(id, record);
      throw err;
    }
  }

  private heldService(offer: HandoffOffer): Service {
    try {
      const service = this.host.services.get(offer.serviceId);
      if (service.manifest.disk) return service;
    } catch {
      /* not held: said below */
    }
    throw new CloudletError('HANDOFF_TARGET_LACKS_SERVICE', `this cloudlet does not hold the service ${offer.serviceId}`, {
      details: { service_id: offer.serviceId },
    });
  }

  /** The arrival a channel or call of `deviceId` names; HANDOFF_NOT_FOUND for any other cloudlet's or one that ended. */
  private arrival(deviceId: string, id: string): Arrival {
    const arrival = HANDOFF_ID.test(id) ? this.arrivals.get(id) : undefined;
    if (!arrival || arrival.deviceId !== deviceId)
      throw new CloudletError('HANDOFF_NOT_FOUND', `no handoff ${id} offered by this cloudlet`, { details: { handoff_id: id } });
    return arrival;
  }

  /** Throws unless `deviceId` may open a channel of handoff `id` (one that has not arrived yet). */
  checkChannel(deviceId: string, id: string): void {
    if (this.arrival(deviceId, id).arriving) throw new CloudletError('HANDOFF_NOT_FOUND', `handoff ${id} is over`, { details: { handoff_id: id } });
  }

  /** The local end of a channel of handoff `id`, joined to `remote`: the libvirtd (through the RPC gate) or QEMU's socket. */
  connectChannel(deviceId: string, id: string, channel: HandoffChannel, remote: Duplex): void {
    const arrival = this.arrival(deviceId, id);
    if (channel === 'memory') faultPoint('handoff:target-mid-migrate');
    const local = net.connect(channel === 'libvirt' ? this.host.hypervisor.socketPath : handoffSocket(id, channel));
    const gate = channel === 'libvirt' ? new LibvirtCallFilter(arrival.issued) : null;
    joinChannel(remote, local, gate, (err) => {
      if (err && err instanceof CloudletError) this.log(`handoff ${id}: ${err.message}; its ${channel} channel is closed`);
      // The source's libvirtd is done with this one (migrated, failed, or its agent died): settle it now.
      if (channel === 'libvirt') void this.settle(id, 'channel');
    });
  }

  /**
   * The control channel closed (`channel`) or the offer ran out (`deadline`): a VM that runs here arrived (its source
   * may not live to say so), and one that does not never will: what was made for it goes at once.
   */
  private async settle(id: string, why: 'channel' | 'deadline'): Promise<void> {
    const arrival = this.arrivals.get(id);
    if (!arrival || arrival.arriving) return;
    const runs = await this.host.hypervisor.runsUnpaused(arrival.record.id).catch(() => null);
    if (!this.arrivals.has(id) || arrival.arriving) return;
    // libvirt unreachable: the deadline settles it, or a later one.
    if (runs === null) {
      if (why === 'deadline') this.arm(arrival, HANDOFF_RETRY_MS);
      return;
    }
    if (runs) await this.arrive(arrival);
    else {
      this.log(`handoff ${id}: ${why === 'channel' ? "the source's libvirtd left" : 'the offer ran out'} and nothing came`);
      await this.undo(id, arrival.record);
    }
  }

  /** The source says the VM runs here: prove it serves, then list it. Resolves to whether it answered in time. */
  async complete(deviceId: string, id: string): Promise<{ ready: boolean; port: number }> {
    const arrival = this.arrival(deviceId, id);
    if (!(await this.host.hypervisor.runsUnpaused(arrival.record.id))) {
      throw new CloudletError('HANDOFF_FAILED', `instance ${arrival.record.id} of handoff ${id} does not run here`, { details: { handoff_id: id } });
    }
    return this.arrive(arrival);
  }

  /** Prove it serves, then list it; once, whoever asks first (the source's completion, the channel's end, the deadline). */
  private arrive(arrival: Arrival): Promise<{ ready: boolean; port: number }> {
    const began = Date.now();
    arrival.arriving ??= this.untilServing(arrival.record).then((ready) => {
      this.adopt(arrival, Date.now() - began);
      return { ready, port: arrival.record.hostPort };
    });
    return arrival.arriving;
  }

  /** The source gave up (its migration failed): whatever was made for it goes, a domain that came nonetheless too. */
  async abandon(deviceId: string, id: string): Promise<void> {
    const arrival = this.arrival(deviceId, id);
    // It came after all (its source's libvirtd saw a failure after the VM ran here): it stays, the one place it runs.
    if (arrival.arriving) throw new CloudletError('HANDOFF_IN_PROGRESS', `instance ${arrival.record.id} of handoff ${id} arrived here`);
    this.log(`handoff ${id}: abandoned by its source`);
    await this.undo(id, arrival.record);
  }

  private arm(arrival: Arrival, ms: number): void {
    arrival.deadline = setTimeout(() => void this.settle(arrival.id, 'deadline'), ms);
    arrival.deadline.unref();
  }

  private adopt(arrival: Arrival, provenMs: number): void {
    clearTimeout(arrival.deadline);
    // Kept a while after, so that a completion that comes after the channel's end gets its answer.
    setTimeout(() => this.arrivals.delete(arrival.id), HANDOFF_OFFER_MS).unref();
    void rm(handoffSocketDir(arrival.id), { recursive: true, force: true });
    this.host.registry.arrived(arrival.record);
    this.log(
      `handoff ${arrival.id}: ${arrival.record.id} of ${arrival.record.serviceId} arrived and serves on port ${arrival.record.hostPort} (proven in ${provenMs} ms)`,
    );
  }

  private async untilServing(record: InstanceRecord): Promise<boolean> {
    const probe = boundedProbe(record.readiness, this.host.readyWithinMs);
    const host = record.bindAddress === '0.0.0.0' || record.bindAddress === '::' ? '127.0.0.1' : record.bindAddress;
    return waitUntilReady(probe, host, record.hostPort, { timeoutMs: probe.timeout_ms, firstAttemptMs: ARRIVAL_FIRST_ATTEMPT_MS }).then(
      () => true,
      (err: Error) => {
        this.log(`instance ${record.id} arrived but did not answer in time (${err.message}); kept: it runs nowhere else`);
        return false;
      },
    );
  }

  private async undo(id: string, record: InstanceRecord): Promise<void> {
    const arrival = this.arrivals.get(id);
    if (arrival) clearTimeout(arrival.deadline);
    this.arrivals.delete(id);
    await this.host.hypervisor.destroy(record.id).catch((err: Error) => this.log(`handoff ${id}: cannot end ${record.id}: ${err.message}`));
    await rm(record.dir, { recursive: true, force: true });
    await rm(handoffSocketDir(id), { recursive: true, force: true });
    this.host.ports.release(record.hostPort);
    this.host.registry.expectArrival(record.id, null);
  }
}
