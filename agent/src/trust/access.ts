/**
 * Who may call what. Every route of every face has an access level: `open` (no credential: health, discovery-level
 * info, pairing claims, public downloads), `services` (seeing the services and starting and stopping instances of
 * them: a device or the operator, and also a client without a credential where the access policy lets unpaired
 * clients start services), `device` (a paired device's bearer token, or the admin token) or `admin` (the admin token,
 * from loopback only). The HTTP server asks the gate once per request, before it reads a body, and `admit` decides
 * for every face alike (docs/security.md#one-access-policy).
 */
import net from 'node:net';
import { timingSafeEqual } from 'node:crypto';
import { CloudletError, asCloudletError, withoutDetail } from '../errors';
import type { Stopper } from '../core/types';
import { sha256, type DeviceRegistry, type PairedDevice } from './devices';

export type Access = 'open' | 'services' | 'device' | 'admin';

/**
 * The one access policy of every face: whether a client without a credential may see the services and start (and
 * stop its own) instances of them, as KD-Cloudlet's plain mode lets any client. Such uses are anonymous: bounded per
 * address and in all (`limits.anonymousInstances*`), and kept apart from every device's and the operator's.
 */
export interface AccessPolicy {
  anonymousServices: boolean;
}

/** The policy the configuration gives: unpaired clients may start services where the KD face is plain (the default). */
export function accessPolicy(kdApi: 'plain' | 'encrypted' | 'off'): AccessPolicy {
  return { anonymousServices: kdApi === 'plain' };
}

export type Caller = { kind: 'admin' } | { kind: 'device'; device: PairedDevice } | { kind: 'anonymous' };

/** The paired device a caller is; undefined for the operator and anonymous callers. */
export function deviceIdOf(caller: Caller): string | undefined {
  return caller.kind === 'device' ? caller.device.id : undefined;
}

/** Who a caller is when it holds or releases a use of an instance; an anonymous one by its address (addressKey). */
export function stopperOf(caller: Caller, remoteAddress: string): Stopper {
  return caller.kind === 'device' ? { device: caller.device.id } : caller.kind === 'admin' ? 'operator' : { anonymous: addressKey(remoteAddress) };
}

/**
 * An error as `caller` may see it: a failed launch's console tail is the instance's console, which only the operator
 * may read (GET /v1/instances/:id/console); the guest may have printed anything there.
 */
export function seenBy(error: CloudletError, caller: Caller | undefined): CloudletError {
  return error.details?.console_tail === undefined || caller?.kind === 'admin' ? error : withoutDetail(error, 'console_tail');
}

/** How a request reached the agent. */
export interface Transport {
  remoteAddress: string;
  /** Over the TLS listener. */
  secure: boolean;
}

export interface AccessGate {
  /** Who a request's credential names (anonymous without one); throws when it names no one or may not be used here. */
  identify(token: string | undefined, transport: Transport): Caller;
  /** What an anonymous caller may do besides the open routes (absent: nothing). */
  readonly policy?: AccessPolicy;
}

/** What identify said of a credential: its holder, or why it was refused. */
export type Identity = Caller | CloudletError;

/** identify, with a refusal returned rather than thrown: one credential check serves the rate limit and the access check. */
export function identityOf(gate: AccessGate, token: string | undefined, transport: Transport): Identity {
  try {
    return gate.identify(token, transport);
  } catch (err) {
    return asCloudletError(err);
  }
}

/**
 * The caller a route of `access` lets in, given who the credential names; else throws the reason. A paired cloudlet
 * is let in only where `peers` says a cloudlet may ask (the deliberate list of docs/security.md), open routes
 * included: what it may do with its credential is that list and nothing else. `policy`: what unpaired callers may do.
 */
export function admit(access: Access, identity: Identity, policy?: AccessPolicy, peers = false): Caller {
  if (!peers && !(identity instanceof CloudletError) && identity.kind === 'device' && identity.device.kind === 'cloudlet') {
    throw new CloudletError('PEER_NOT_ALLOWED', `a paired cloudlet may not call this route (docs/security.md lists what it may ask)`, {
      details: { device_id: identity.device.id },
    });
  }
  if (access === 'open') {
    // Open to all, but a valid credential still says who calls (the operator is not rate-limited; a device's KD
    // start records it as the owner); an invalid one is no reason to refuse what anyone may do. A secret sent in
    // clear over a network is still refused (TLS_REQUIRED).
    if (identity instanceof CloudletError) {
      if (identity.code === 'TLS_REQUIRED') throw identity;
      return { kind: 'anonymous' };
    }
    return identity;
  }
  if (identity instanceof CloudletError) throw identity;
  // No credential at all, where the policy lets unpaired clients use services; one that fails is refused, never
  // taken for none, so a phone learns that its pairing ended.
  if (access === 'services' && identity.kind === 'anonymous' && policy?.anonymousServices === true) return identity;
  if (identity.kind === 'anonymous')
    throw new CloudletError('UNAUTHENTICATED', 'this route needs a credential: Authorization: Bearer <token> (pair this device first)');
  if (access === 'admin' && identity.kind === 'device') {
    throw new CloudletError('ADMIN_ONLY', 'this route is for the operator on the cloudlet (the admin credential, from loopback)');
  }
  return identity;
}

const LOOPBACK = new net.BlockList();
LOOPBACK.addSubnet('127.0.0.0', 8, 'ipv4');
LOOPBACK.addAddress('::1', 'ipv6');

/** Answers of isLoopback by address: a phone asks many times from one address, and BlockList.check is costly per request. */
const loopbackAnswers = new Map<string, boolean>();
/** Emptied when full, so a flood of addresses cannot grow it. */
const LOOPBACK_ANSWERS_MAX = 1024;

/** 127.0.0.0/8, ::1, and IPv4-mapped loopback, in any textual form. */
export function isLoopback(address: string): boolean {
  let answer = loopbackAnswers.get(address);
  if (answer === undefined) {
    const family = net.isIP(address);
    answer = family !== 0 && LOOPBACK.check(address, family === 6 ? 'ipv6' : 'ipv4');
    if (loopbackAnswers.size >= LOOPBACK_ANSWERS_MAX) loopbackAnswers.clear();
    loopbackAnswers.set(address, answer);
  }
  return answer;
}

/**
 * The client an address stands for, when counting what it does (rate limits, wrong pairing codes): an IPv4 address
 * (also IPv4-mapped) as itself, an IPv6 address by its /64, which one host holds whole and can pick addresses in.
 */
export function addressKey(address: string): string {
  if (!net.isIPv6(address)) return address;
  const halves = address.split('::');
  const groupsOf = (text: string | undefined) => (text ? text.split(':').flatMap((g) => (g.includes('.') ? ipv4Groups(g) : [g])) : []);
  const head = groupsOf(halves[0]);
  const tail = groupsOf(halves[1]);
  const groups = [...head, ...Array<string>(8 - head.length - tail.length).fill('0'), ...tail].map((g) => parseInt(g, 16));
  if (groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff) {
    return [groups[6]! >> 8, groups[6]! & 0xff, groups[7]! >> 8, groups[7]! & 0xff].join('.');
  }
  return `${groups
    .slice(0, 4)
    .map((g) => g.toString(16))
    .join(':')}::/64`;
}

function ipv4Groups(dotted: string): string[] {
  const [a, b, c, d] = dotted.split('.').map(Number) as [number, number, number, number];
  return [((a << 8) | b).toString(16), ((c << 8) | d).toString(16)];
}

/**
 * Secrets (tokens, pairing codes) cross a network only inside TLS: in clear they are accepted from loopback alone,
 * where there is no wire to sniff. Throws TLS_REQUIRED otherwise.
 */
export function requireConfidential(transport: Transport): void {
  if (!transport.secure && !isLoopback(transport.remoteAddress)) {
    throw new CloudletError('TLS_REQUIRED', 'credentials are only accepted over HTTPS (the TLS port) from another machine');
  }
}

/** The token of an `Authorization: Bearer <token>` header (the scheme in any case); undefined for any other form. */
export function bearerToken(authorization: string | undefined): string | undefined {
  const match = authorization === undefined ? null : /^bearer[ \t]+(\S+)[ \t]*$/i.exec(authorization);
  return match ? match[1] : undefined;
}

export class TokenGate implements AccessGate {
  private readonly adminTokenSha256: Buffer;

  constructor(
    private readonly devices: DeviceRegistry,
    adminToken: string,
    readonly policy?: AccessPolicy,
  ) {
    this.adminTokenSha256 = sha256(adminToken);
  }

  identify(token: string | undefined, transport: Transport): Caller {
    if (token === undefined) return { kind: 'anonymous' };
    requireConfidential(transport);
    // A token a device used lately is that device's: its hash need not be compared with the admin token's.
    if (!this.devices.recognizes(token) && timingSafeEqual(sha256(token), this.adminTokenSha256)) {
      if (!isLoopback(transport.remoteAddress))
        throw new CloudletError('ADMIN_ONLY', 'the admin credential is only accepted on the cloudlet itself (loopback)');
      return { kind: 'admin' };
    }
    return { kind: 'device', device: this.devices.authenticate(token) };
  }
}
