// Two network namespaces a test makes for itself, joined by a veth pair created inside the first with its peer moved
// straight to the second: it never exists in the root namespace, so nothing a test multicasts reaches the machine's
// own networks. Processes enter a namespace with `nsenter --net=/run/netns/NAME`.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface NamespaceSide {
  namespace: string;
  /** The veth end's name inside that namespace (at most 15 characters). */
  link: string;
  address: string;
}

/** Makes both namespaces, the veth pair, a /24 address on each end, and brings the ends and loopback up. */
export async function joinNamespaces(a: NamespaceSide, b: NamespaceSide): Promise<void> {
  await run('ip', ['netns', 'add', a.namespace]);
  await run('ip', ['netns', 'add', b.namespace]);
  await run('ip', ['-n', a.namespace, 'link', 'add', a.link, 'type', 'veth', 'peer', 'name', b.link, 'netns', b.namespace]);
  for (const side of [a, b]) {
    await run('ip', ['-n', side.namespace, 'addr', 'add', `${side.address}/24`, 'dev', side.link]);
    await run('ip', ['-n', side.namespace, 'link', 'set', 'lo', 'up']);
    await run('ip', ['-n', side.namespace, 'link', 'set', side.link, 'up']);
  }
}

/** Deletes the namespaces (and with them the veth pair); a namespace already gone is no error. */
export async function deleteNamespaces(...sides: NamespaceSide[]): Promise<void> {
  for (const side of sides) await run('ip', ['netns', 'del', side.namespace]).catch(() => {});
}
