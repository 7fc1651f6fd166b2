/**
 * A handoff as its source runs it (docs/handoff.md): one of this cloudlet's running instances moves, live, to a
 * paired cloudlet that holds the same service. The target is asked first (it refuses before anything moves); then
 * the relay opens, libvirt migrates the VM peer-to-peer through it (only the disk's top layer travels), and once the
 * VM runs there the target proves it serves and lists it; only then is it released here, announced `moved`. If the
 * migration fails, libvirt cancels it and the VM runs on here, untouched; the target is told to drop what it made.
 */
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { CloudletError, asCloudletError } from '../errors';
import type { Logger } from '../log';
import type { MovedTo } from '../core/events';
import type { InstanceRecord } from '../core/types';
import { faultPoint } from '../system/fault-points';
import { HANDOFF_ID, migrationUris, openSourceRelay, type HandoffChannel } from './handoff-relay';
import type { HandoffHost, IssuedHandoff } from './handoff-target';
import { peerRefusal, pinnedCall, pinnedStream, type PeerEndpoint, type PeerReply } from './peer-client';
import type { PeerLinks } from './peer-links';

type PeerCredential = PeerEndpoint & { id: string; name: string; token: string };

/** The target's error codes a refusal is passed on with (anything else is HANDOFF_FAILED). */
const PASSED_ON = new Set(['HANDOFF_TARGET_LACKS_SERVICE', 'HANDOFF_IN_PROGRESS', 'HANDOFF_REFUSED']);

export class OutgoingHandoffs {
  /** Instances being handed off: one handoff per instance at a time. */
  private readonly moving = new Set<string>();

  constructor(
    private readonly host: HandoffHost,
    private readonly links: Pick<PeerLinks, 'peers' | 'credentialOf'>,
    private readonly sha256: (file: string) => Promise<string>,
    private readonly log: Logger,
  ) {}

  /** Move instance `id` to the paired cloudlet `target` (a peer id, or `auto`: the best-ranked one holding its service). */
  async handOff(id: string, target: string): Promise<MovedTo> {
    if (this.moving.has(id)) throw new CloudletError('HANDOFF_IN_PROGRESS', `instance ${id} is being handed off already`, { details: { instance_id: id } });
    this.moving.add(id);
    try {
      return await this.host.registry.handOff(id, async (record) => {
        if (record.mechanism !== 'cached-vm') {
          throw new CloudletError('HANDOFF_REFUSED', `only Cached VM instances move to another cloudlet (this one is ${record.mechanism})`);
        }
        const service = this.host.services.get(record.serviceId);
        const digest = await this.sha256(path.join(service.dir, service.manifest.disk));
        return this.move(record, this.peer(target, record.serviceId, digest), digest);
      });
    } finally {
      this.moving.delete(id);
    }
  }

  /** The paired cloudlet named, or the best-ranked one whose placement lists the service with the same image. */
  private peer(target: string, serviceId: string, digest: string): PeerCredential {
    if (target !== 'auto') {
      const link = this.links.credentialOf(target);
      if (!link) throw new CloudletError('HANDOFF_TARGET_UNKNOWN', `no paired cloudlet ${target}`, { details: { peer_id: target } });
      return link;
    }
    const holding = this.links
      .peers()
      .flatMap((p) => (p.link?.placement?.services.some((s) => s.service_id === serviceId && s.disk_sha256 === digest) ? [p.link] : []))
      .sort((a, b) => b.placement!.memory.free_bytes - a.placement!.memory.free_bytes || a.placement!.load_average[0] - b.placement!.load_average[0]);
    const best = holding[0] && this.links.credentialOf(holding[0].id);
    if (!best)
      throw new CloudletError('HANDOFF_TARGET_UNKNOWN', `no paired cloudlet holds ${serviceId} with the same image`, { details: { service_id: serviceId } });
    return best;
  }

  private async move(record: InstanceRecord, peer: PeerCredential, digest: string): Promise<MovedTo> {
    const { hypervisor } = this.host;
    const began = Date.now();
    const offered = await pinnedCall(peer, 'POST', '/v1/handoffs', {
      token: peer.token,
      body: { instance_id: record.id, service_id: record.serviceId, disk_sha256: digest, domain_xml: await hypervisor.migratableXml(record.id) },
    });
    if (offered.status !== 201) throw refusal(offered);
    const issued = checkIssued(offered.json);
    this.log(`handoff ${issued.handoffId}: moving ${record.id} to ${peer.name} (${peer.id}), its port there ${issued.port}`);
    const channel = (name: HandoffChannel): Promise<Duplex> => {
      // The memory stream starts once the disk is copied: the middle of the migration.
      if (name === 'memory') faultPoint('handoff:mid-migrate');
      return pinnedStream(peer, `/v1/handoff-channel?handoff=${issued.handoffId}&channel=${name}`, peer.token);
    };
    const relay = await openSourceRelay(issued.handoffId, channel, await hypervisor.qemuIdentity(), this.log);
    const migrating = Date.now();
    try {
      faultPoint('handoff:before-migrate');
      await hypervisor.migrate(
        record.id,
        { dconnuri: relay.dconnuri, migrateUri: issued.migrateUri, disksUri: issued.disksUri, destXml: issued.destXml, disk: 'vda' },
        (stats) => {
          if (stats.data_total) this.log(`handoff ${issued.handoffId}: ${stats.data_processed ?? 0} of ${stats.data_total} bytes`);
        },
      );
    } catch (err) {
      await this.giveUp(record, peer, issued.handoffId, err);
    } finally {
      await relay.close();
    }
    const migrated = Date.now();
    faultPoint('handoff:after-migrate');
    this.log(`handoff ${issued.handoffId}: ${record.id} runs at ${peer.name} now (sent ${JSON.stringify(relay.sent)} bytes)`);
    // The VM runs there and nowhere else now: a target that cannot be told adopts it when its offer runs out.
    const completed = await pinnedCall(peer, 'POST', `/v1/handoffs/${issued.handoffId}/complete`, { token: peer.token }).catch((err: Error) => {
      this.log(`handoff ${issued.handoffId}: the target was not told it is complete (${err.message}); it adopts the VM when its offer runs out`);
      return null;
    });
    if (completed && completed.status !== 200) this.log(`handoff ${issued.handoffId}: the target answered its completion ${completed.status}`);
    this.log(
      `handoff ${issued.handoffId}: done in ${Date.now() - began} ms (offer ${migrating - began} ms, migration ${migrated - migrating} ms, ` +
        `its arrival told and proven ${Date.now() - migrated} ms)`,
    );
    return { cloudletId: peer.id, name: peer.name, address: peer.address, port: issued.port, apiPort: peer.port };
  }

  /** The migration failed: libvirt cancelled it and the VM runs on here; the target drops what it made. */
  private async giveUp(record: InstanceRecord, peer: PeerCredential, handoffId: string, err: unknown): Promise<never> {
    const error = asCloudletError(err);
    this.log(`handoff ${handoffId}: the migration of ${record.id} failed: ${error.message}`);
    await pinnedCall(peer, 'DELETE', `/v1/handoffs/${handoffId}`, { token: peer.token }).catch((e: Error) =>
      this.log(`handoff ${handoffId}: the target was not told (${e.message}); its offer runs out`),
    );
    const here = await this.host.hypervisor.running().then(
      (ids) => ids.has(record.id),
      () => true,
    );
    if (!here) this.log(`handoff ${handoffId}: ${record.id} no longer runs here after the failed migration`);
    throw new CloudletError('HANDOFF_FAILED', `the handoff of ${record.id} to ${peer.name} failed; it runs on here: ${error.message}`, {
      details: { instance_id: record.id, peer_id: peer.id },
    });
  }
}

function refusal(reply: PeerReply): CloudletError {
  const refused = peerRefusal('handoff', reply);
  const code = (refused.details as { peer_code?: string } | undefined)?.peer_code;
  if (code && PASSED_ON.has(code)) return new CloudletError(code as 'HANDOFF_REFUSED', refused.message, { details: refused.details });
  return new CloudletError('HANDOFF_FAILED', refused.message, { details: refused.details });
}

/** The target's answer to the offer, checked: an id of the issued shape, a port, the XML, and URIs on its socket paths. */
function checkIssued(value: unknown): IssuedHandoff {
  const body = value as { handoff_id?: unknown; port?: unknown; destination_xml?: unknown; migrate_uri?: unknown; disks_uri?: unknown } | null;
  const id = typeof body?.handoff_id === 'string' && HANDOFF_ID.test(body.handoff_id) ? body.handoff_id : null;
  const port = body?.port;
  const xml = body?.destination_xml;
  if (!id || typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535 || typeof xml !== 'string' || xml.length > 256 * 1024) {
    throw new CloudletError('HANDOFF_FAILED', 'the target answered the offer with something else than a handoff');
  }
  // The URIs are the target's sockets, at the paths the source listens on: nothing else is taken.
  return { handoffId: id, port, destXml: xml, ...migrationUris(id) };
}
