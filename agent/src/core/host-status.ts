import { constants as fsConstants } from 'node:fs';
import { access } from 'node:fs/promises';
import os from 'node:os';
import type { CloudletError } from '../errors';
import type { HypervisorLink } from './adapters';
import { LoopDelay } from '../system/loop-delay';
import type { ReconcileCost } from './instance-sync';
import { HostMonitor } from './system-info';
import type { OptionalPart } from './optional-parts';
import type { DiscoveryView, HealthCheck, HealthReport, Peer, SystemInfo } from './types';

// From dist/agent/src/core/ up to the repository (or installed package) root.
export const AGENT_VERSION: string = (require('../../../../package.json') as { version: string }).version;

export interface HostStatusParts {
  hypervisor: HypervisorLink;
  dataDir: string;
  /** How many instances run now. */
  instances: () => number;
  /** Why app packages cannot run here (the host lacks what sandboxes need), or null when they can. */
  sandboxProblem: CloudletError | null;
  /** What the reconcile poll costs (InstanceRegistry.reconcileCost). */
  reconcileCost: () => ReconcileCost | null;
}

/** What the box reports about itself: the facts clients rank cloudlets by, the health report, and discovery's view. */
export class HostStatus {
  private readonly host = new HostMonitor();
  private readonly loopDelay = new LoopDelay();
  private discovery: DiscoveryView | null = null;
  private optionalParts: { list(): OptionalPart[] } | null = null;

  constructor(private readonly parts: HostStatusParts) {}

  /** Discovery starts after the HTTP server (it publishes the port actually bound) and reports through this. */
  attachDiscovery(view: DiscoveryView): void {
    this.discovery = view;
  }

  /** The optional parts (discovery, HTTPS, MQTT) are started by main.ts, which tracks where each stands. */
  attachParts(parts: { list(): OptionalPart[] }): void {
    this.optionalParts = parts;
  }

  peers(): Peer[] {
    return this.discovery?.peers() ?? [];
  }

  async systemInfo(): Promise<SystemInfo> {
    const h = await this.host.facts();
    const { hypervisor } = this.parts;
    return {
      hostname: os.hostname(),
      agentVersion: AGENT_VERSION,
      cpu: { cores: h.cores, usagePercent: h.usagePercent, speedMhz: h.speedMhz, cacheKb: h.cacheKb },
      memory: { totalBytes: h.totalBytes, freeBytes: h.freeBytes },
      hypervisor: { uri: hypervisor.uri, domainType: hypervisor.domainType, libvirtVersion: hypervisor.libvirtVersion },
      instances: this.parts.instances(),
      discovery: this.discovery?.status() ?? { state: 'disabled', name: null },
    };
  }

  async health(): Promise<HealthReport> {
    const { hypervisor, dataDir, sandboxProblem } = this.parts;
    const libvirt = await hypervisor.isAlive();
    const checks: HealthCheck[] = [{ name: 'libvirt', ok: libvirt, ...(libvirt ? {} : { detail: `connection to ${hypervisor.uri} is not alive` }) }];
    // A root file system gone read-only (ext4 errors=remount-ro) leaves the API up but every start failing.
    const dataDirProblem = await access(dataDir, fsConstants.W_OK).then(
      () => null,
      (err: Error) => err.message,
    );
    checks.push({ name: 'data-dir', ok: dataDirProblem === null, ...(dataDirProblem ? { detail: dataDirProblem } : {}) });
    if (sandboxProblem) checks.push({ name: 'sandboxes', ok: false, optional: true, detail: sandboxProblem.message });
    const discovery = this.discovery?.status();
    if (discovery && discovery.state !== 'disabled') {
      const ok = discovery.state === 'published' || discovery.state === 'registering';
      checks.push({ name: 'discovery', ok, optional: true, ...(ok || !discovery.detail ? {} : { detail: discovery.detail }) });
    }
    const round = (ms: number) => Math.round(ms * 100) / 100;
    const reconcile = this.parts.reconcileCost();
    const load = {
      reconcileMs: reconcile && { last: round(reconcile.lastMs), median: round(reconcile.medianMs), max: round(reconcile.maxMs) },
      eventLoopDelayMs: this.loopDelay.figures(),
    };
    return { ok: checks.every((c) => c.ok || c.optional), checks, load, ...(this.optionalParts ? { parts: this.optionalParts.list() } : {}) };
  }
}
