/**
 * The JSON wire shapes of the agent's state, shared by the /v1 face, /v1/events and the MQTT topics: keys are
 * snake_case on the wire, and the mapping from the camelCase core types lives here and nowhere else. Also what one
 * caller may see of the instances (InstanceView), on all three alike. The operator sees them all; a paired device
 * only the instances it uses (started or joined), and of their `owners` only its own entries, so no device learns
 * another device's id or instances. A stream (an events socket, an MQTT connection) keeps following an instance it
 * was shown until the news that ends it for the device: its last state, or the device leaving it.
 * This module imports neither a face nor telemetry: both import it.
 */
import { isFinalState, type CloudletEvent, type MovedTo } from '../core/events';
import type { Endpoint, HealthReport, Instance, Package, Service, StartResult, StopResult, SystemInfo } from '../core/types';
import type { PeerView } from '../fleet/peer-links';
import type { LaunchTimings } from '../core/timing';
import { CloudletError } from '../errors';
import { deviceIdOf, type Caller } from '../trust/access';

/** Where things are on the host is the operator's to know: a device's answers carry no host path. */
export const hostDir = (caller: Caller, dir: string): { dir?: string } => (caller.kind === 'admin' ? { dir } : {});

export function serviceJson(service: Service, caller: Caller) {
  // The manifest is already in its snake_case file format.
  return { id: service.id, ...hostDir(caller, service.dir), imported_at: service.importedAt, manifest: service.manifest, ...poolJson(service) };
}

/** A service's warm pool (PoolStatus has no camelCase keys), when the facade listed it with one. */
export const poolJson = (service: Service): { pool?: Service['pool'] } => (service.pool ? { pool: service.pool } : {});

export function packageJson(appPackage: Package, caller: Caller) {
  // The manifest is already in its snake_case file format.
  return {
    id: appPackage.id,
    sha256: appPackage.sha256,
    ...hostDir(caller, appPackage.dir),
    imported_at: appPackage.importedAt,
    manifest: appPackage.manifest,
  };
}

export function instanceJson(instance: Instance) {
  return {
    id: instance.id,
    service_id: instance.serviceId,
    mechanism: instance.mechanism,
    state: instance.state,
    bind_address: instance.bindAddress,
    host_port: instance.hostPort,
    guest_port: instance.guestPort,
    shareable: instance.shareable,
    users: instance.users,
    owners: instance.owners,
    launch: instance.launch,
    created_at: instance.createdAt,
    ready_at: instance.readyAt,
  };
}

export function startResultJson(result: StartResult) {
  return {
    instance: instanceJson(result.instance),
    endpoint: endpointJson(result.endpoint),
    joined: result.joined,
    ...(result.timings ? { timings: timingsJson(result.timings) } : {}),
  };
}

export function endpointJson(endpoint: Endpoint) {
  return { address: endpoint.address, port: endpoint.port };
}

export function timingsJson(t: LaunchTimings) {
  return { total_ms: t.totalMs, libvirt_ms: t.libvirtMs, guest_ms: t.guestMs, agent_ms: t.agentMs };
}

export function stopResultJson(result: StopResult) {
  return { destroyed: result.destroyed, users: result.users };
}

export function systemJson(info: SystemInfo) {
  return {
    hostname: info.hostname,
    agent_version: info.agentVersion,
    cpu: { cores: info.cpu.cores, usage_percent: info.cpu.usagePercent, speed_mhz: info.cpu.speedMhz, cache_kb: info.cpu.cacheKb },
    memory: { total_bytes: info.memory.totalBytes, free_bytes: info.memory.freeBytes },
    hypervisor: {
      uri: info.hypervisor.uri,
      domain_type: info.hypervisor.domainType,
      libvirt_version: info.hypervisor.libvirtVersion,
    },
    instances: info.instances,
    discovery: { state: info.discovery.state, name: info.discovery.name, ...(info.discovery.detail ? { detail: info.discovery.detail } : {}) },
  };
}

/**
 * A peer of /v1/peers: what mDNS saw (null fields when it was not seen), and for a cloudlet this one paired with, the
 * pairing and the placement facts it last gave (never its token).
 */
export function peerJson({ discovered, link }: PeerView) {
  return {
    name: discovered?.name ?? link!.name,
    host: discovered?.host ?? null,
    address: discovered?.address ?? link!.address,
    port: discovered?.port ?? link!.port,
    txt: discovered?.txt ?? {},
    interface: discovered?.interface ?? null,
    seen_at: discovered?.seenAt ?? null,
    paired: link ? { id: link.id, device_id: link.deviceId, tls_port: link.tlsPort, tls_fingerprint: link.fingerprint, paired_at: link.pairedAt } : null,
    placement: link?.placement ? { ...withoutFetchedAt(link.placement), fetched_at: link.placement.fetchedAt } : null,
    placement_error: link?.placementError ?? null,
  };
}

function withoutFetchedAt<T extends { fetchedAt: string }>(facts: T): Omit<T, 'fetchedAt'> {
  const { fetchedAt: _fetchedAt, ...rest } = facts;
  return rest;
}

/** The first message on the /v1/events WebSocket: the instances as they are when the client connects. */
export function eventsSnapshotJson(instances: Instance[]) {
  return { type: 'snapshot', instances: instances.map(instanceJson) };
}

/** The JSON of an event on the /v1/events WebSocket and of the MQTT instance topics: the same shapes as the routes. */
export function eventJson(event: CloudletEvent) {
  if (event.type === 'progress') {
    return {
      type: 'progress',
      instance_id: event.instanceId,
      service_id: event.serviceId,
      phase: event.phase,
      percent: event.percent,
      ...(event.bytes ? { bytes_done: event.bytes.done, bytes_total: event.bytes.total } : {}),
      at: event.at,
    };
  }
  return {
    type: 'instance',
    state: event.state,
    ...(event.reason ? { reason: event.reason } : {}),
    ...(event.movedTo ? { moved_to: movedToJson(event.movedTo) } : {}),
    instance: { ...instanceJson(event.instance), state: event.state },
    at: event.at,
  };
}

/** Where a handed-off instance runs now (docs/handoff.md): the cloudlet (its peer id here) and the new endpoint. */
export function movedToJson(to: MovedTo) {
  return { cloudlet_id: to.cloudletId, name: to.name, address: to.address, port: to.port, api_port: to.apiPort };
}

export function healthJson(report: HealthReport) {
  return {
    ok: report.ok,
    checks: report.checks.map(({ name, ok, detail, optional }) => ({
      name,
      ok,
      ...(optional ? { optional } : {}),
      ...(detail === undefined ? {} : { detail }),
    })),
    ...(report.parts ? { parts: report.parts.map(({ part, state, reason, fix }) => ({ part, state, reason, fix })) } : {}),
    ...(report.load ? { load: { reconcile_ms: report.load.reconcileMs, event_loop_delay_ms: report.load.eventLoopDelayMs } } : {}),
  };
}

// ---- what one caller may see ----------------------------------------------------------------------------------

/** Not a device id (those are 1-64 characters): what an anonymous caller's view compares owners with. */
const NO_DEVICE = '';

export class InstanceView {
  /** Instances this stream was shown and has not yet seen the end of (for the device). */
  private readonly followed = new Set<string>();

  /** `deviceId` null: the operator's (or, with anonymous MQTT, everyone's) view of all instances. */
  constructor(private readonly deviceId: string | null) {}

  static of(caller: Caller): InstanceView {
    // An anonymous caller (a start the access policy allows without pairing) is a device of no id: it sees no owner.
    return new InstanceView(caller.kind === 'admin' ? null : (deviceIdOf(caller) ?? NO_DEVICE));
  }

  /** The instances this caller may see, as it may see them; a stream follows them from now on. */
  list(instances: Instance[]): Instance[] {
    const shown = instances.filter((instance) => this.uses(instance.owners));
    for (const instance of shown) this.followed.add(instance.id);
    return shown.map((instance) => this.redacted(instance));
  }

  /** One instance as this caller may see it; another device's is one that does not exist. */
  one(instance: Instance): Instance {
    if (!this.uses(instance.owners))
      throw new CloudletError('INSTANCE_NOT_FOUND', `no instance with id ${instance.id}`, { details: { instance_id: instance.id } });
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
    const last = isFinalState(event.state);
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
