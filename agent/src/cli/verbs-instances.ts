/**
 * The verbs of the launch path: the services a cloudlet offers (and, for the operator, importing, removing and capturing
 * them), and starting, listing and stopping their instances, and an instance's console.
 */
import path from 'node:path';
import { CliError } from './errors';
import { escaped, shown } from './terminal';
import { listing, type Verb } from './verb';

export const servicesVerb: Verb = {
  summary: 'list the services the cloudlet offers',
  usage: 'cloudlet services',
  run: async ({ cloudlet }) => {
    const { services } = await (
      await cloudlet()
    ).call<{
      services: Array<{ id: string; manifest: { version: string; description: string; shareable: boolean }; pool?: { target: number; ready: number } }>;
    }>('GET', '/v1/services');
    // WARM: pooled VMs ready for an instant start, of the pool's current target (docs/warm-pool.md).
    return listing('services', services, ['SERVICE', 'VERSION', 'SHAREABLE', 'WARM', 'DESCRIPTION'], (s) => [
      s.id,
      s.manifest.version,
      s.manifest.shareable ? 'yes' : 'no',
      s.pool && s.pool.target > 0 ? `${s.pool.ready}/${s.pool.target}` : '-',
      s.manifest.description,
    ]);
  },
};

export const instancesVerb: Verb = {
  summary: 'list the running instances',
  usage: 'cloudlet instances',
  run: async ({ cloudlet }) => {
    const { instances } = await (
      await cloudlet()
    ).call<{ instances: Array<{ id: string; service_id: string; state: string; host_port: number; users: number }> }>('GET', '/v1/instances');
    return listing('instances', instances, ['INSTANCE', 'SERVICE', 'STATE', 'PORT', 'USERS'], (i) => [
      i.id,
      i.service_id,
      i.state,
      String(i.host_port),
      String(i.users),
    ]);
  },
};

export const startVerb: Verb = {
  summary: 'start (or join) an instance of a service; prints the endpoint once it is ready',
  usage: 'cloudlet start SERVICE_ID [--no-join]',
  options: { 'no-join': { type: 'boolean' } },
  optionHelp: ['--no-join          always start a new instance, even of a shareable service that is running'],
  args: [1, 1],
  acts: true,
  run: async ({ cloudlet, args, values }) => {
    const result = await (
      await cloudlet()
    ).call<StartResultJson>('POST', '/v1/instances', {
      service_id: args[0],
      join: !values['no-join'],
    });
    return { json: result, text: startedText(result) };
  },
};

/** A start result (of a service, an app package or a recipe) for people: which instance, and where to reach it. */
export interface StartResultJson {
  instance: { id: string; service_id: string; mechanism: string; launch: string };
  endpoint: { address: string; port: number };
  joined: boolean;
}

export function startedText(result: StartResultJson): string {
  return [
    shown`${result.joined ? 'joined' : 'started'} ${result.instance.id} (${result.instance.mechanism}, ${result.instance.launch})`,
    shown`endpoint ${result.endpoint.address}:${result.endpoint.port}`,
  ].join('\n');
}

export const stopVerb: Verb = {
  summary: 'stop (release) an instance',
  usage: 'cloudlet stop INSTANCE_ID',
  args: [1, 1],
  acts: true,
  run: async ({ cloudlet, args }) => {
    const result = await (await cloudlet()).call<{ destroyed: boolean; users: number }>('DELETE', `/v1/instances/${encodeURIComponent(args[0]!)}`);
    return { json: result, text: result.destroyed ? shown`stopped ${args[0]}` : shown`released ${args[0]} (${result.users} user(s) left)` };
  },
};

/** A handoff copies the disk's top layer and the memory of a live VM over the LAN. */
const HANDOFF_TIMEOUT_MS = 10 * 60_000;

export const handoffVerb: Verb = {
  summary: 'move a running instance, live, to a paired cloudlet that holds its service (docs/handoff.md)',
  usage: 'cloudlet handoff INSTANCE_ID [--to PEER_ID]',
  options: { to: { type: 'string' } },
  optionHelp: ['--to PEER_ID       the paired cloudlet (cloudlet peers); default: the best-ranked one holding the service'],
  args: [1, 1],
  acts: true,
  run: async ({ cloudlet, args, values }) => {
    const target = typeof values.to === 'string' ? values.to : 'auto';
    process.stderr.write(shown`handing ${args[0]} off to ${target === 'auto' ? 'the best paired cloudlet' : target}: it serves while it moves\n`);
    const result = await (
      await cloudlet()
    ).call<{ moved_to: { name: string; address: string; port: number } }>(
      'POST',
      `/v1/instances/${encodeURIComponent(args[0]!)}/handoff`,
      { target },
      HANDOFF_TIMEOUT_MS,
    );
    const to = result.moved_to;
    return { json: result, text: shown`moved ${args[0]} to ${to.name}\nendpoint ${to.address}:${to.port}` };
  },
};

const SERVICE_USAGE = 'cloudlet service show ID | service import DIR | service remove ID | service capture ID';
/** Capturing boots a throwaway VM until it serves, then saves its memory. */
const CAPTURE_TIMEOUT_MS = 15 * 60_000;

export const serviceVerb: Verb = {
  summary: 'one Cached VM service: show it; import, remove or capture its memory state (operator, on the cloudlet)',
  usage: SERVICE_USAGE,
  optionHelp: [
    'show ID              the service and its manifest',
    'import DIR           import the service directory DIR on the cloudlet (manifest.json, disk, memory state)',
    'remove ID            remove it from the catalog (refused while instances of it run)',
    'capture ID           boot it once and save its memory state: later starts restore it (several times faster)',
  ],
  args: [2, 2],
  acts: (args) => args[0] !== 'show',
  run: async ({ cloudlet, args }) => {
    const [action, id] = args as [string, string];
    const at = `/v1/services/${encodeURIComponent(id)}`;
    type ServiceJson = { id: string; manifest: { version: string; description: string; port: number; memory_mib: number; state: string | null } };
    const described = (s: ServiceJson) =>
      [
        shown`${s.id} ${s.manifest.version}: ${s.manifest.description}`,
        shown`port ${s.manifest.port}, ${s.manifest.memory_mib} MiB, ${s.manifest.state ? 'restores its memory state' : 'cold boots'}`,
      ].join('\n');
    if (action === 'show') {
      const service = await (await cloudlet()).call<ServiceJson>('GET', at);
      return { json: service, text: described(service) };
    }
    if (action === 'import') {
      const service = await (await cloudlet()).call<ServiceJson>('POST', '/v1/services', { path: path.resolve(id) });
      return { json: service, text: `imported ${described(service)}` };
    }
    if (action === 'remove') {
      await (await cloudlet()).call('DELETE', at);
      return { json: { removed: id }, text: shown`removed the service ${id}` };
    }
    if (action === 'capture') {
      process.stderr.write(shown`capturing ${id}: booting it until it serves, then saving its memory\n`);
      const service = await (await cloudlet()).call<ServiceJson>('POST', `${at}/state`, undefined, CAPTURE_TIMEOUT_MS);
      return { json: service, text: shown`captured the memory state of ${service.id}` };
    }
    throw new CliError('USAGE', `usage: ${SERVICE_USAGE}`);
  },
};

export const consoleVerb: Verb = {
  summary: "the end of an instance's serial console (operator, on the cloudlet)",
  usage: 'cloudlet console INSTANCE_ID [--bytes N]',
  options: { bytes: { type: 'string' } },
  optionHelp: ['--bytes N          how much of its end (default 65536, at most 1048576)'],
  args: [1, 1],
  acts: true,
  run: async ({ cloudlet, args, values }) => {
    const bytes = typeof values.bytes === 'string' ? `?bytes=${encodeURIComponent(values.bytes)}` : '';
    const text = await (await cloudlet()).text(`/v1/instances/${encodeURIComponent(args[0]!)}/console${bytes}`);
    // The guest wrote it: shown escaped, line by line (its newlines kept, every other control character visible).
    return { json: { instance_id: args[0], console: text }, text: text.split('\n').map(escaped).join('\n') };
  },
};
