/** The verbs of the launch path: the services a cloudlet offers, and starting, listing and stopping their instances. */
import { shown } from './terminal';
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
    ).call<{ instance: { id: string }; endpoint: { address: string; port: number }; joined: boolean }>('POST', '/v1/instances', {
      service_id: args[0],
      join: !values['no-join'],
    });
    return {
      json: result,
      text: [shown`${result.joined ? 'joined' : 'started'} ${result.instance.id}`, shown`endpoint ${result.endpoint.address}:${result.endpoint.port}`].join(
        '\n',
      ),
    };
  },
};

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
