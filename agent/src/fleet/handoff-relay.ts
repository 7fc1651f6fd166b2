/**
 * The channels of a handoff (docs/handoff.md), carried between the two agents and nowhere else. libvirt's peer-to-peer
 * migration makes three kinds of connection, each to a UNIX socket path that is the same on both cloudlets (each has
 * its own /run): the source libvirtd's to the target libvirtd (`libvirt`), the source QEMU's migration stream
 * (`memory`) and its disk copy over NBD (`disk`). On the source the agent listens on those paths; each connection it
 * accepts is carried over a WebSocket of its own to the target agent (pinned TLS, the cloudlet credential from pairing,
 * the handoff id the target issued), which connects it to its libvirtd through the RPC gate (handoff-rpc.ts) or to the
 * socket its QEMU listens on. No TCP port is opened for any of it.
 */
import { chown, mkdir, rm } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { pipeline } from 'node:stream';
import type { Duplex } from 'node:stream';
import type { Logger } from '../log';

export const HANDOFF_CHANNELS = ['libvirt', 'memory', 'disk'] as const;
export type HandoffChannel = (typeof HANDOFF_CHANNELS)[number];

/** Where the sockets of handoff `id` are, on either cloudlet: under /run, which each cloudlet has of its own. */
export const HANDOFF_SOCKET_ROOT = '/run/cloudlet-handoff';
export const handoffSocketDir = (id: string) => path.join(HANDOFF_SOCKET_ROOT, id);
export const handoffSocket = (id: string, channel: HandoffChannel) => path.join(handoffSocketDir(id), `${channel}.sock`);
/** QEMU's migration stream and disk copy of handoff `id`: the same socket paths on either side. */
export const migrationUris = (id: string) => ({ migrateUri: `unix://${handoffSocket(id, 'memory')}`, disksUri: `unix://${handoffSocket(id, 'disk')}` });
/** A handoff id as the target issues it: it names a directory, so nothing else is accepted. */
export const HANDOFF_ID = /^ho-[0-9a-f]{24}$/;

/**
 * The one place a stream transform goes on a channel, source side (the memory stream reduced against the base the
 * target holds is the next one): each entry turns what the source QEMU sends into what travels. None yet.
 */
const OUTGOING_TRANSFORMS: Partial<Record<HandoffChannel, () => Duplex>> = {};

/** The source's listening sockets of one handoff. */
export interface SourceRelay {
  /** The URI the source libvirtd connects to as the target's. */
  readonly dconnuri: string;
  /** Bytes carried towards the target, per channel. */
  readonly sent: Record<HandoffChannel, number>;
  close(): Promise<void>;
}

/**
 * Listen on the handoff's socket paths; `connect` opens the channel to the target for each connection accepted.
 * QEMU (`qemu`: its user) connects to the memory and disk sockets; libvirtd (root) to the control socket.
 */
export async function openSourceRelay(
  id: string,
  connect: (channel: HandoffChannel) => Promise<Duplex>,
  qemu: { uid: number; gid: number } | null,
  log: Logger,
): Promise<SourceRelay> {
  const dir = handoffSocketDir(id);
  await mkdir(HANDOFF_SOCKET_ROOT, { recursive: true, mode: 0o711 });
  await mkdir(dir, { mode: 0o755 });
  const servers: net.Server[] = [];
  const open = new Set<net.Socket | Duplex>();
  const sent = { libvirt: 0, memory: 0, disk: 0 };
  const close = async () => {
    for (const stream of open) stream.destroy();
    await Promise.all(servers.map((server) => new Promise((resolve) => server.close(resolve))));
    await rm(dir, { recursive: true, force: true });
  };
  try {
    for (const channel of HANDOFF_CHANNELS) {
      const server = net.createServer((local) => {
        open.add(local);
        local.on('close', () => open.delete(local));
        // Not read until the channel to the target is open: what the client sent meanwhile waits in the socket.
        local.pause();
        connect(channel).then(
          (remote) => {
            open.add(remote);
            local.on('data', (chunk: Buffer) => (sent[channel] += chunk.length));
            const transform = OUTGOING_TRANSFORMS[channel]?.();
            const outgoing = transform ? [local, transform, remote] : [local, remote];
            pipeline(outgoing as [Duplex, Duplex], () => local.destroy());
            pipeline(remote, local, () => remote.destroy());
          },
          (err: Error) => {
            log(`handoff ${id}: cannot open its ${channel} channel to the target: ${err.message}`);
            local.destroy();
          },
        );
      });
      servers.push(server);
      const socket = handoffSocket(id, channel);
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(socket, resolve);
      });
      if (channel !== 'libvirt' && qemu) await chown(socket, qemu.uid, qemu.gid);
    }
  } catch (err) {
    await close();
    throw err;
  }
  return { dconnuri: `qemu+unix:///system?socket=${handoffSocket(id, 'libvirt')}`, sent, close };
}

/** No handoff outlives its agent: the socket directories of one that was under way when it stopped go at start. */
export function sweepHandoffSockets(): Promise<void> {
  return rm(HANDOFF_SOCKET_ROOT, { recursive: true, force: true });
}

/** The target's directory for the sockets its QEMU listens on: QEMU's own (it creates them there). */
export async function makeTargetSocketDir(id: string, qemu: { uid: number; gid: number } | null): Promise<void> {
  const dir = handoffSocketDir(id);
  // QEMU passes through the root to its own directory; nobody lists the root.
  await mkdir(HANDOFF_SOCKET_ROOT, { recursive: true, mode: 0o711 });
  await mkdir(dir, { mode: 0o700 });
  if (qemu) await chown(dir, qemu.uid, qemu.gid);
}

/** Carries a channel that arrived from the source to `local`, `inbound` (if any) checking what goes in. */
export function joinChannel(remote: Duplex, local: net.Socket, inbound: Duplex | null, onEnd: (err: Error | null) => void): void {
  let ended = false;
  const end = (err: Error | null | undefined) => {
    if (ended) return;
    ended = true;
    remote.destroy();
    local.destroy();
    onEnd(err ?? null);
  };
  pipeline(inbound ? [remote, inbound, local] : [remote, local], end);
  pipeline(local, remote, end);
}
