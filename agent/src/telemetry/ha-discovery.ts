/**
 * Home Assistant MQTT discovery: the retained config messages that make a cloudlet appear in Home Assistant as one
 * device with its entities, read straight off the agent's own topic tree (docs/telemetry.md). Read-only: no entity
 * has a command topic, so nothing in HA can command the box. The keys are HA's documented ones (MQTT discovery and the
 * binary_sensor and sensor platforms); the online status has no availability of its own (it is the availability: HA
 * shows the box disconnected, and every other entity unavailable, once the status topic says offline).
 */
import { createHash } from 'node:crypto';
import type { Instance, Service } from '../core/types';
import type { TopicTree } from './mqtt';

type Component = 'binary_sensor' | 'sensor';

/** One entity's config message: where it goes (under the prefix) and what it says. */
export interface DiscoveryConfig {
  topic: string;
  payload: string;
}

/** Pulls a field out of the JSON state topic; `None` (HA's "no value") when the payload is empty or not JSON. */
const field = (path: string) => `{{ value_json.${path} if value_json is defined else None }}`;

export class HomeAssistantDiscovery {
  /** The cloudlet's id in HA (device identifier, node id, entity id prefix): its topic root, as HA allows ids. */
  readonly nodeId: string;
  private readonly device: Record<string, unknown>;
  private readonly origin: Record<string, unknown>;

  constructor(
    readonly prefix: string,
    private readonly topics: TopicTree,
    hostname: string,
    agentVersion: string,
  ) {
    this.nodeId = slug(topics.root);
    this.device = { identifiers: [this.nodeId], name: hostname, model: 'Cloudlet', manufacturer: 'Cloudlet agent', sw_version: agentVersion };
    this.origin = { name: 'cloudlet-agent', sw_version: agentVersion };
  }

  /** True for a config topic of this cloudlet's device (another cloudlet may share the prefix on a fleet broker). */
  owns(topic: string): boolean {
    return topic.startsWith(`${this.prefix}/`) && topic.endsWith('/config') && topic.split('/').at(-3) === this.nodeId;
  }

  /** Every config message for the cloudlet as it is: the host's entities, one per service, one per instance. */
  configs(services: Service[], instances: Instance[]): DiscoveryConfig[] {
    const { status, metrics } = this.topics;
    return [
      // Its state is the availability of all the others, so it has none itself.
      this.entity('binary_sensor', 'online', 'Online', status, false, {
        value_template: field('state'),
        payload_on: 'online',
        payload_off: 'offline',
        device_class: 'connectivity',
        entity_category: 'diagnostic',
      }),
      this.entity('sensor', 'instances', 'Running instances', metrics, true, {
        value_template: field('instances'),
        state_class: 'measurement',
        icon: 'mdi:server',
      }),
      this.entity('sensor', 'cpu', 'CPU usage', metrics, true, {
        value_template: field('cpu_usage_percent'),
        unit_of_measurement: '%',
        state_class: 'measurement',
        icon: 'mdi:cpu-64-bit',
      }),
      this.entity('sensor', 'memory_available', 'Memory available', metrics, true, {
        value_template: field('memory_free_bytes'),
        device_class: 'data_size',
        unit_of_measurement: 'B',
        state_class: 'measurement',
      }),
      this.entity('sensor', 'disk_free', 'Disk free', metrics, true, {
        value_template: field('disk_free_bytes'),
        device_class: 'data_size',
        unit_of_measurement: 'B',
        state_class: 'measurement',
      }),
      this.entity('sensor', 'last_provisioned', 'Last provisioning', metrics, true, {
        value_template: '{{ value_json.last_provisioned_at if value_json is defined and value_json.last_provisioned_at else None }}',
        device_class: 'timestamp',
      }),
      ...services.map((service) =>
        this.entity('binary_sensor', objectIdOf('service', service.id), `${service.id} running`, this.topics.service(service.id), true, {
          value_template: "{{ ('ON' if value_json.instances > 0 else 'OFF') if value_json is defined else None }}",
          device_class: 'running',
          json_attributes_topic: this.topics.service(service.id),
        }),
      ),
      ...instances.map((instance) =>
        this.entity(
          'sensor',
          objectIdOf('instance', instance.id),
          `Instance ${instance.id.slice(0, 8)} (${instance.serviceId})`,
          this.topics.instance(instance.id),
          true,
          {
            value_template: field('state'),
            icon: 'mdi:application-cog',
            json_attributes_topic: this.topics.instance(instance.id),
          },
        ),
      ),
    ];
  }

  private entity(component: Component, objectId: string, name: string, stateTopic: string, available: boolean, keys: Record<string, unknown>): DiscoveryConfig {
    const uniqueId = `${this.nodeId}_${objectId}`;
    return {
      topic: `${this.prefix}/${component}/${this.nodeId}/${objectId}/config`,
      payload: JSON.stringify({
        name,
        unique_id: uniqueId,
        // object_id for HA before 2025.10, default_entity_id from then on (object_id goes in 2026.4).
        object_id: uniqueId,
        default_entity_id: `${component}.${uniqueId}`,
        device: this.device,
        origin: this.origin,
        state_topic: stateTopic,
        ...(available
          ? {
              availability_topic: this.topics.status,
              availability_template: field('state'),
              payload_available: 'online',
              payload_not_available: 'offline',
            }
          : {}),
        ...keys,
      }),
    };
  }
}

/**
 * A service's or instance's id as HA takes it in topics and entity ids; when that changes the id (`org.a.b`, `A`), a
 * digest of the id follows, so that ids differing only in case or punctuation stay apart.
 */
function objectIdOf(kind: string, id: string): string {
  const slugged = slug(id);
  return slugged === id ? `${kind}_${id}` : `${kind}_${slugged}_${createHash('sha256').update(id).digest('hex').slice(0, 8)}`;
}

/** An id as HA takes it in topics and entity ids: lower-case letters, digits and `_`. */
function slug(id: string): string {
  return id.toLowerCase().replace(/[^a-z0-9_]/g, '_');
}
