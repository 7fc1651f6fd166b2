/**
 * The cloudlets this one paired with (docs/fleet.md, "Between cloudlets"): the operator pairs this cloudlet to
 * another with a one-time code read out by the other's operator and the fingerprint of its certificate, as a phone
 * pairs; this cloudlet is then a device of kind `cloudlet` there, with its own token, which it keeps in
 * `<dataDir>/trust/peers.json` (0600) with the certificate it pinned. It asks each paired cloudlet for its placement
 * facts every `intervalMs`, over HTTPS pinned to that certificate, and shows them in /v1/peers next to what mDNS sees.
 */
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { CloudletError, asCloudletError, isErrno } from '../errors';
import type { Logger } from '../log';
import type { Peer } from '../core/types';
import { writeSecretFile } from '../trust/secret-file';
import { checkPlacement, type PlacementFacts } from './placement';
import { normalizeFingerprint, peerRefusal, peerSystem, pinnedCall, presentedCertificate, type PeerEndpoint } from './peer-client';

/** A cloudlet this one paired with, as kept on disk (with its credential there). */
interface StoredLink extends PeerEndpoint {
  id: string;
  /** Its host name when we paired (its own claim, checked for shape). */
  name: string;
  /** The device id it gave us, and the token that goes with it. */
  deviceId: string;
  token: string;
  pairedAt: string;
}

interface LinksFile {
  version: 1;
  links: StoredLink[];
}

/** A paired cloudlet as the API shows it: never its token. */
export interface PeerLink {
  id: string;
  name: string;
  address: string;
  port: number;
  tlsPort: number;
  fingerprint: string;
  deviceId: string;
  pairedAt: string;
  placement: (PlacementFacts & { fetchedAt: string }) | null;
  /** Why the last ask for its placement failed (null: it did not). */
  placementError: string | null;
}

/** A peer of /v1/peers: what mDNS saw of it, what pairing knows of it, or both. */
export interface PeerView {
  discovered: Peer | null;
  link: PeerLink | null;
}

export class PeerLinks {
  private readonly links = new Map<string, StoredLink>();
  private readonly facts = new Map<string, { placement: (PlacementFacts & { fetchedAt: string }) | null; error: string | null }>();
  private timer: NodeJS.Timeout | undefined;
  private polling: Promise<void> | null = null;
  private saving: Promise<void> = Promise.resolve();
  /** Addresses a pairing is under way with: a second one at once would pair twice. */
  private readonly pairing = new Set<string>();

  private constructor(
    private readonly file: string,
    private readonly options: { name: string; intervalMs: number; log: Logger; discovered: () => Peer[] },
  ) {}

  static async open(dataDir: string, options: { name: string; intervalMs: number; log: Logger; discovered: () => Peer[] }): Promise<PeerLinks> {
    const links = new PeerLinks(path.join(dataDir, 'trust', 'peers.json'), options);
    try {
      const stored = JSON.parse(await readFile(links.file, 'utf8')) as LinksFile;
      for (const link of stored.links) links.links.set(link.id, link);
    } catch (err) {
      if (!isErrno(err, 'ENOENT')) throw err;
    }
    links.timer = setInterval(() => void links.pollAll(), options.intervalMs);
    links.timer.unref();
    void links.pollAll();
    return links;
  }

  close(): void {
    clearInterval(this.timer);
  }

  /**
   * Pair with the cloudlet at `address:port`: its certificate must be the one whose fingerprint its operator read out
   * (with the code) before the code is sent, so a stranger answering at that address learns nothing.
   */
  async pair(request: { address: string; port: number; code: string; fingerprint: string }): Promise<PeerLink> {
    const expected = normalizeFingerprint(request.fingerprint);
    if (!expected) {
      throw new CloudletError('INVALID_PARAMETER', 'fingerprint must be the SHA-256 of the certificate (64 hex digits, colons optional)', {
        details: { parameter: 'fingerprint' },
      });
    }
    const taken = [...this.links.values()].find((l) => l.address === request.address && l.port === request.port);
    if (taken) {
      throw new CloudletError('CONFLICT', `already paired with ${request.address}:${request.port} (${taken.id}); forget it first to pair again`, {
        details: { peer_id: taken.id },
      });
    }
    const key = `${request.address}:${request.port}`;
    if (this.pairing.has(key)) throw new CloudletError('CONFLICT', `a pairing with ${key} is already under way`);
    this.pairing.add(key);
    try {
      return await this.pairNow(request.address, request.port, request.code, expected);
    } finally {
      this.pairing.delete(key);
    }
  }

  /** Pairing proper: the certificate is checked against the fingerprint before the code leaves. */
  private async pairNow(address: string, port: number, code: string, expected: string): Promise<PeerLink> {
    const system = await peerSystem(address, port);
    const presented = await presentedCertificate(address, system.tlsPort);
    if (presented.fingerprint !== expected || system.fingerprint !== expected) {
      throw new CloudletError(
        'PEER_REFUSED',
        `the cloudlet at ${address} presents the certificate ${presented.fingerprint}, not ${expected} as its operator read out: not pairing`,
      );
    }
    const endpoint: PeerEndpoint = { address: address, port: port, tlsPort: system.tlsPort, fingerprint: expected, certificate: presented.pem };
    const claim = await pinnedCall(endpoint, 'POST', '/v1/pairing/claim', { body: { code, name: this.options.name, kind: 'cloudlet' } });
    const answer = claim.json as { device_id?: unknown; token?: unknown; kind?: unknown } | null;
    if (claim.status !== 201) throw peerRefusal('pairing', claim);
    if (typeof answer?.device_id !== 'string' || typeof answer.token !== 'string' || answer.token.length > 200 || answer.kind !== 'cloudlet') {
      throw new CloudletError('PEER_REFUSED', 'the other cloudlet did not pair us as a cloudlet');
    }
    const link: StoredLink = {
      ...endpoint,
      id: `peer-${randomBytes(6).toString('hex')}`,
      name: system.hostname,
      deviceId: answer.device_id.slice(0, 64),
      token: answer.token,
      pairedAt: new Date().toISOString(),
    };
    await this.save(new Map(this.links).set(link.id, link));
    this.links.set(link.id, link);
    this.options.log(`paired with the cloudlet ${link.name} at ${link.address}:${link.port} (${link.id}), certificate ${link.fingerprint}`);
    await this.poll(link);
    return this.view(link);
  }

  /** Forget a paired cloudlet here (its operator revokes us there with `cloudlet devices revoke`). */
  async forget(id: string): Promise<void> {
    if (!this.links.has(id)) throw new CloudletError('PEER_NOT_FOUND', `no paired cloudlet ${id}`, { details: { peer_id: id } });
    const remaining = new Map(this.links);
    remaining.delete(id);
    await this.save(remaining);
    this.links.delete(id);
    this.facts.delete(id);
  }

  /** A paired cloudlet with its credential, for this agent's own calls to it (a handoff); never shown. */
  credentialOf(id: string): (PeerEndpoint & { id: string; name: string; token: string }) | null {
    return this.links.get(id) ?? null;
  }

  /** Every peer: those mDNS sees, joined with what pairing knows of the same address and port, then the paired ones unseen. */
  peers(): PeerView[] {
    const links = [...this.links.values()];
    const seen = this.options.discovered().map((discovered): PeerView => {
      const link = links.find((l) => l.address === discovered.address && l.port === discovered.port);
      return { discovered, link: link ? this.view(link) : null };
    });
    const unseen = links.filter((l) => !seen.some((p) => p.link?.id === l.id)).map((l): PeerView => ({ discovered: null, link: this.view(l) }));
    return [...seen, ...unseen];
  }

  private view(link: StoredLink): PeerLink {
    const facts = this.facts.get(link.id);
    const { token: _token, certificate: _certificate, ...shown } = link;
    return { ...shown, placement: facts?.placement ?? null, placementError: facts?.error ?? null };
  }

  /** One round of asking every paired cloudlet; a round still running when the next is due is not doubled. */
  private pollAll(): Promise<void> {
    this.polling ??= Promise.all([...this.links.values()].map((link) => this.poll(link))).then(() => {
      this.polling = null;
    });
    return this.polling;
  }

  private async poll(link: StoredLink): Promise<void> {
    try {
      const reply = await pinnedCall(link, 'GET', '/v1/placement', { token: link.token });
      if (reply.status !== 200) throw peerRefusal('placement', reply);
      this.facts.set(link.id, { placement: { ...checkPlacement(reply.json), fetchedAt: new Date().toISOString() }, error: null });
    } catch (err) {
      const previous = this.facts.get(link.id);
      const message = asCloudletError(err).message;
      if (previous?.error !== message) this.options.log(`cloudlet ${link.name} (${link.id}): ${message}`);
      // What it said last stays (with its date): an unreachable peer's last facts are still facts, just old.
      this.facts.set(link.id, { placement: previous?.placement ?? null, error: message });
    }
  }

  private save(links: Map<string, StoredLink>): Promise<void> {
    const content: LinksFile = { version: 1, links: [...links.values()] };
    this.saving = this.saving.catch(() => {}).then(() => writeSecretFile(this.file, JSON.stringify(content, null, 2) + '\n'));
    return this.saving;
  }
}
