/**
 * The gate on a peer's libvirt control channel (docs/handoff.md): a handoff's source libvirtd talks to this cloudlet's
 * libvirtd through the agents' relay, and this libvirtd would do anything root may ask of it. So the relay reads
 * libvirt's RPC framing (a 4-byte length, then program, version, procedure, type, serial and status, XDR-encoded) of
 * every message the peer sends, and passes only the calls an incoming peer-to-peer migration makes, each a bounded
 * number of times; the Prepare call must carry the destination XML this cloudlet issued and its own socket URIs. Any
 * other message ends the channel.
 */
import { Transform, type TransformCallback } from 'node:stream';
import { CloudletError } from '../errors';

const REMOTE_PROGRAM = 0x20008086;
const KEEPALIVE_PROGRAM = 0x6b656570;
const PROGRAM_VERSION = 1;
const HEADER_BYTES = 28;
/** libvirt's own limit is 32 MiB; an incoming migration's largest call (Prepare: the domain XML and a cookie) is a few KiB. */
export const MAX_RPC_MESSAGE_BYTES = 1024 * 1024;
const CALL = 0;
const MESSAGE = 2;
/** Keepalive's PING and PONG: libvirt's own liveness check on the connection. */
const KEEPALIVE_PROCEDURES = new Set([1, 2]);

/** The remote procedures an incoming P2P migration calls (remote_protocol.x), and how often each may come. */
export const MIGRATION_PROCEDURES: ReadonlyMap<number, { name: string; times: number }> = new Map([
  [66, { name: 'AUTH_LIST', times: 2 }],
  [1, { name: 'CONNECT_OPEN', times: 1 }],
  [60, { name: 'CONNECT_SUPPORTS_FEATURE', times: 32 }],
  [360, { name: 'CONNECT_REGISTER_CLOSE_CALLBACK', times: 1 }],
  [303, { name: 'DOMAIN_MIGRATE_PREPARE3_PARAMS', times: 1 }],
  [306, { name: 'DOMAIN_MIGRATE_FINISH3_PARAMS', times: 1 }],
  [361, { name: 'CONNECT_UNREGISTER_CLOSE_CALLBACK', times: 1 }],
  [2, { name: 'CONNECT_CLOSE', times: 1 }],
]);
const PREPARE3_PARAMS = 303;

/** What the Prepare call must carry: the domain as this cloudlet issued it, and its sockets' URIs. */
export interface IssuedMigration {
  /** Whether a domain XML is the one issued (libvirt sends it re-formatted: the same domain, not the same bytes). */
  isIssuedDomain(xml: string): boolean;
  migrateUri: string;
  disksUri: string;
}

/** Typed parameters (remote_typed_param) by name; string values only, the others as null. */
export function readTypedParams(body: Buffer): Map<string, string | null> {
  const reader = new XdrReader(body);
  const count = reader.uint();
  if (count > 64) throw new Error(`${count} typed parameters`);
  const params = new Map<string, string | null>();
  for (let i = 0; i < count; i++) {
    const name = reader.string();
    const type = reader.uint();
    if (type === 7) params.set(name, reader.string());
    else {
      params.set(name, null);
      reader.skip(type === 3 || type === 4 || type === 5 ? 8 : 4);
    }
  }
  return params;
}

class XdrReader {
  private offset = 0;
  constructor(private readonly buffer: Buffer) {}
  uint(): number {
    if (this.offset + 4 > this.buffer.length) throw new Error('truncated');
    const value = this.buffer.readUInt32BE(this.offset);
    this.offset += 4;
    return value;
  }
  string(): string {
    const length = this.uint();
    if (this.offset + length > this.buffer.length) throw new Error('truncated string');
    const text = this.buffer.toString('utf8', this.offset, this.offset + length);
    this.offset += (length + 3) & ~3;
    return text;
  }
  skip(bytes: number): void {
    this.offset += bytes;
  }
}

/**
 * The peer-to-libvirtd direction of the control channel: passes whole allowed messages on, and fails (ending the
 * channel) at the first one that is not, saying which.
 */
export class LibvirtCallFilter extends Transform {
  private pending: Buffer = Buffer.alloc(0);
  private readonly calls = new Map<number, number>();

  constructor(private readonly issued: IssuedMigration) {
    super();
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.pending = this.pending.length ? Buffer.concat([this.pending, chunk]) : chunk;
    try {
      while (this.pending.length >= 4) {
        const length = this.pending.readUInt32BE(0);
        if (length < HEADER_BYTES || length > MAX_RPC_MESSAGE_BYTES) throw refused(`a message of ${length} bytes`);
        if (this.pending.length < length) break;
        const message = this.pending.subarray(0, length);
        this.check(message);
        this.push(message);
        this.pending = this.pending.subarray(length);
      }
      callback();
    } catch (err) {
      callback(err as Error);
    }
  }

  private check(message: Buffer): void {
    const program = message.readUInt32BE(4);
    const version = message.readUInt32BE(8);
    const procedure = message.readInt32BE(12);
    const type = message.readInt32BE(16);
    if (version !== PROGRAM_VERSION) throw refused(`version ${version} of program ${program.toString(16)}`);
    if (program === KEEPALIVE_PROGRAM && type === MESSAGE && KEEPALIVE_PROCEDURES.has(procedure)) return;
    const allowed = program === REMOTE_PROGRAM && type === CALL ? MIGRATION_PROCEDURES.get(procedure) : undefined;
    if (!allowed) throw refused(`procedure ${procedure} (program ${program.toString(16)}, type ${type})`);
    const times = (this.calls.get(procedure) ?? 0) + 1;
    if (times > allowed.times) throw refused(`${allowed.name} a ${times}th time`);
    this.calls.set(procedure, times);
    if (procedure === PREPARE3_PARAMS) this.checkPrepare(message.subarray(HEADER_BYTES));
  }

  private checkPrepare(body: Buffer): void {
    let params: Map<string, string | null>;
    try {
      params = readTypedParams(body);
    } catch (err) {
      throw refused(`an unreadable Prepare (${(err as Error).message})`);
    }
    const xml = params.get('destination_xml');
    if (typeof xml !== 'string' || !this.issued.isIssuedDomain(xml)) throw refused('a Prepare with a domain other than the one this cloudlet issued');
    if ((params.get('migrate_uri') ?? this.issued.migrateUri) !== this.issued.migrateUri) throw refused('a Prepare with a migration URI of its own');
    if ((params.get('disks_uri') ?? this.issued.disksUri) !== this.issued.disksUri) throw refused('a Prepare with a disks URI of its own');
  }
}

function refused(what: string): CloudletError {
  return new CloudletError('HANDOFF_REFUSED', `the peer's libvirt control channel sent ${what}: not part of an incoming migration`);
}
