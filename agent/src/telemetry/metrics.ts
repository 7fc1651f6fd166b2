/**
 * Prometheus metrics: the one module that owns the prom-client registry. The places that count call into it through
 * small interfaces they declare themselves (the request pipeline's RequestObserver, the libvirt connection's call
 * observer); the launches and synthesized bytes are read off the core's event bus, and the gauges (instances, MQTT
 * clients) are read when scraped. Every label takes a bounded set of values: route patterns, never raw paths.
 * The metric names are documented in docs/telemetry.md.
 */
import { performance } from 'node:perf_hooks';
import { createHash, timingSafeEqual } from 'node:crypto';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { CloudletEvent } from '../core/events';
import type { CloudletApi, MechanismName } from '../core/types';

/** Seconds: a TCG boot takes tens of seconds, a memory-state restore on KVM one or two. */
const LAUNCH_BUCKETS = [0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300];
/** Seconds: most libvirt calls take a millisecond or two; a save or restore can take many seconds. */
const LIBVIRT_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
/** Methods a route may have; any other a client sends is counted as `other`, so a client cannot add label values. */
const KNOWN_METHODS = new Set(['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS']);

/** A launch being watched: from its `starting` event to ready or its end. */
interface Launch {
  mechanism: MechanismName;
  startedAt: number;
  waitingReadyAt: number | null;
  synthesizedBytes: number;
}

export class AgentMetrics {
  private readonly registry = new Registry();
  private readonly launches = new Map<string, Launch>();
  private mqttClients: () => number = () => 0;
  private instances: CloudletApi['listInstances'] = () => [];
  private readonly launchCount: Counter<'mechanism' | 'outcome'>;
  private readonly launchDuration: Histogram<'mechanism'>;
  private readonly readiness: Histogram<'mechanism'>;
  private readonly uploadedBytes: Counter<'route'>;
  private readonly synthesizedBytes: Counter;
  private readonly libvirtCalls: Histogram<'call'>;
  /** Requests answered since the last scrape, by route, method and status joined by newlines (none is in a label). */
  private readonly answeredSinceScrape = new Map<string, number>();

  /** Made before the core (libvirt's calls are counted from the first); `watch` then connects it to the core. */
  constructor() {
    const registers = [this.registry];
    // Event-loop lag (nodejs_eventloop_lag_*), heap, GC, CPU and file descriptors of the agent process.
    collectDefaultMetrics({ register: this.registry });
    // Read through arrows: inside collect(), `this` is the gauge.
    const instances = () => this.instances();
    const mqttClients = () => this.mqttClients();
    new Gauge({
      name: 'cloudlet_instances',
      help: 'Instances by mechanism and state',
      labelNames: ['mechanism', 'state'] as const,
      registers,
      collect() {
        this.reset();
        for (const instance of instances()) this.inc({ mechanism: instance.mechanism, state: instance.state });
      },
    });
    new Gauge({
      name: 'cloudlet_mqtt_clients',
      help: 'Clients connected to the embedded MQTT broker (TCP and WebSocket)',
      registers,
      collect() {
        this.set(mqttClients());
      },
    });
    this.launchCount = new Counter({
      name: 'cloudlet_launches_total',
      help: 'Launches of new instances by mechanism and outcome (ready, failed, cancelled); joins of a shared instance are not launches',
      labelNames: ['mechanism', 'outcome'] as const,
      registers,
    });
    this.launchDuration = new Histogram({
      name: 'cloudlet_launch_duration_seconds',
      help: 'From a launch being accepted (queue wait included) to its instance being ready',
      labelNames: ['mechanism'] as const,
      buckets: LAUNCH_BUCKETS,
      registers,
    });
    this.readiness = new Histogram({
      name: 'cloudlet_launch_readiness_seconds',
      help: "From a launched instance running to its readiness probe's first success",
      labelNames: ['mechanism'] as const,
      buckets: LAUNCH_BUCKETS,
      registers,
    });
    this.uploadedBytes = new Counter({
      name: 'cloudlet_uploaded_bytes_total',
      help: 'Request body bytes of accepted uploads (overlays, packages, apps, images) by route',
      labelNames: ['route'] as const,
      registers,
    });
    this.synthesizedBytes = new Counter({
      name: 'cloudlet_synthesized_bytes_total',
      help: 'VM overlay bytes applied by VM Synthesis launches',
      registers,
    });
    const answered = this.answeredSinceScrape;
    new Counter({
      name: 'cloudlet_http_requests_total',
      help: 'HTTP requests answered, by route pattern (unmatched: no route), method and status (aborted: the client left first)',
      labelNames: ['route', 'method', 'status'] as const,
      registers,
      // Requests are tallied in a plain map as they are answered (a labelled inc per request counted under load)
      // and added here when scraped.
      collect() {
        for (const [key, count] of answered) {
          const [route, method, status] = key.split('\n') as [string, string, string];
          this.inc({ route, method, status }, count);
        }
        answered.clear();
      },
    });
    this.libvirtCalls = new Histogram({
      name: 'cloudlet_libvirt_call_duration_seconds',
      help: 'Calls through the libvirt shim, by function, failed ones included',
      labelNames: ['call'] as const,
      buckets: LIBVIRT_BUCKETS,
      registers,
    });
  }

  /** Counts the core's launches from its events, and its instances when scraped. */
  watch(api: Pick<CloudletApi, 'listInstances' | 'subscribe'>): void {
    this.instances = () => api.listInstances();
    // For the agent's lifetime: nothing unsubscribes.
    api.subscribe((event) => this.onEvent(event));
  }

  /** The embedded broker reports its client count through this once it runs. */
  countMqttClients(count: () => number): void {
    this.mqttClients = count;
  }

  /** The request pipeline's RequestObserver. */
  answered(route: string, method: string, status: number | 'aborted', uploadedBytes: number): void {
    const key = `${route}\n${KNOWN_METHODS.has(method) ? method : 'other'}\n${status}`;
    this.answeredSinceScrape.set(key, (this.answeredSinceScrape.get(key) ?? 0) + 1);
    if (uploadedBytes > 0) this.uploadedBytes.inc({ route }, uploadedBytes);
  }

  /** The libvirt connection's call observer. */
  libvirtCall(call: string, seconds: number): void {
    this.libvirtCalls.observe({ call }, seconds);
  }

  /** The exposition in the Prometheus text format, and its Content-Type. */
  async exposition(): Promise<{ contentType: string; text: string }> {
    return { contentType: this.registry.contentType, text: await this.registry.metrics() };
  }

  private onEvent(event: CloudletEvent): void {
    if (event.type === 'progress') {
      const launch = this.launches.get(event.instanceId);
      if (!launch) return;
      if (event.phase === 'waiting-ready') launch.waitingReadyAt ??= performance.now();
      if (event.phase === 'synthesizing' && event.bytes && event.bytes.done > launch.synthesizedBytes) {
        this.synthesizedBytes.inc(event.bytes.done - launch.synthesizedBytes);
        launch.synthesizedBytes = event.bytes.done;
      }
      return;
    }
    const { id, mechanism } = event.instance;
    if (event.state === 'starting') {
      this.launches.set(id, { mechanism, startedAt: performance.now(), waitingReadyAt: null, synthesizedBytes: 0 });
      return;
    }
    const launch = this.launches.get(id);
    // A join, or an instance adopted at start: not a launch this process watched.
    if (!launch) return;
    if (event.state === 'ready') {
      const now = performance.now();
      this.launchCount.inc({ mechanism, outcome: 'ready' });
      this.launchDuration.observe({ mechanism }, (now - launch.startedAt) / 1000);
      if (launch.waitingReadyAt !== null) this.readiness.observe({ mechanism }, (now - launch.waitingReadyAt) / 1000);
      this.launches.delete(id);
    } else if (event.state === 'stopped' || event.state === 'crashed') {
      this.launchCount.inc({ mechanism, outcome: event.reason === 'requested' ? 'cancelled' : 'failed' });
      this.launches.delete(id);
    }
  }
}

/**
 * Who may scrape besides the operator: the holder of the metrics credential (a bearer token from the config), checked
 * in constant time (digests of equal length, so neither content nor length leaks through timing).
 */
export class MetricsCredential {
  private readonly digest: Buffer;

  constructor(token: string) {
    this.digest = sha256(token);
  }

  matches(token: string | undefined): boolean {
    return token !== undefined && timingSafeEqual(sha256(token), this.digest);
  }
}

function sha256(text: string): Buffer {
  return createHash('sha256').update(text, 'utf8').digest();
}
