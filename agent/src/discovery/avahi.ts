/**
 * Zeroconf discovery through Avahi's D-Bus API: the only module that speaks D-Bus. It publishes the cloudlet as
 * `_cloudlet._tcp` (what KD-Cloudlet clients browse for) plus `_cloudlet-agent._tcp` with richer facts, and keeps the
 * list of peer cloudlets it sees. The system bus is whatever DBUS_SYSTEM_BUS_ADDRESS names (else the standard one).
 *
 * Without a system bus or without avahi-daemon the agent runs on and reports discovery as unavailable; when Avahi
 * (re)appears on the bus (NameOwnerChanged), everything is registered again.
 *
 * Avahi D-Bus API (avahi 0.8): org.freedesktop.Avahi.Server at /, EntryGroup and ServiceBrowser objects created by it;
 * constants from avahi-common/defs.h.
 */
import os from 'node:os';
import type { Message, MessageBus } from 'dbus-next';
import type { PartsReporter } from '../core/optional-parts';
import type { CloudletApi, DiscoveryStatus, DiscoveryView, Peer } from '../core/types';
import type { Logger } from '../log';

/** Loaded when discovery starts: with discovery off the agent does not carry it (~2 MB of private memory). */
const dbus = () => require('dbus-next') as typeof import('dbus-next');

const AVAHI = 'org.freedesktop.Avahi';
const SERVER = 'org.freedesktop.Avahi.Server';
const ENTRY_GROUP = 'org.freedesktop.Avahi.EntryGroup';
const SERVICE_BROWSER = 'org.freedesktop.Avahi.ServiceBrowser';
const DBUS = 'org.freedesktop.DBus';

const IF_UNSPEC = -1;
const PROTO_UNSPEC = -1;
/** AvahiServerState */
const SERVER_REGISTERING = 1;
const SERVER_RUNNING = 2;
const SERVER_COLLISION = 3;
/** AvahiEntryGroupState */
const GROUP_ESTABLISHED = 2;
const GROUP_COLLISION = 3;
const GROUP_FAILURE = 4;
/** AvahiLookupResultFlags: the service is one this very Avahi publishes (ours). */
const LOOKUP_RESULT_OUR_OWN = 16;

/** What KD-Cloudlet clients browse for; its TXT must be exactly one `encryption=` entry (client-lib splits on "="). */
export const CLOUDLET_SERVICE_TYPE = '_cloudlet._tcp';
/** Our own type, free to carry more TXT entries. */
export const AGENT_SERVICE_TYPE = '_cloudlet-agent._tcp';
/** A bus that does not answer within this is taken as absent. */
const BUS_TIMEOUT_MS = 3000;
/** Instance changes are folded into one TXT update per this period. */
const TXT_UPDATE_DELAY_MS = 1000;

export interface DiscoveryOptions {
  api: CloudletApi;
  /** The HTTP API port actually bound. */
  port: number;
  agentVersion: string;
  log: Logger;
  /** Where discovery says whether it runs, and when not, why and what to do: one log line per new reason. */
  parts: PartsReporter;
  /** The KD face is the encrypted one (`kdApi: encrypted`): KD clients choose how to call from the TXT. */
  kdEncrypted?: boolean;
}

/** The `_cloudlet._tcp` TXT: KD-Cloudlet's single entry, which client-lib reads to pick plain or encrypted calls. */
/** What the operator can do when discovery cannot run. */
const FIX = {
  bus: 'run the D-Bus system bus (apt install dbus; systemctl start dbus) and restart the agent, or turn discovery off (discovery.enabled: false, CLOUDLET_DISCOVERY=off)',
  avahi:
    'install and start avahi-daemon (apt install avahi-daemon; systemctl enable --now avahi-daemon): the agent publishes as soon as it appears, no restart needed; or turn discovery off (CLOUDLET_DISCOVERY=off)',
  publish: "see avahi-daemon's log (journalctl -u avahi-daemon); the agent publishes again when avahi-daemon restarts",
};

function kdCloudletTxt(encrypted: boolean): string[] {
  return [`encryption=${encrypted ? 'enabled' : 'disabled'}`];
}

export class AvahiDiscovery implements DiscoveryView {
  private bus: MessageBus | null = null;
  private current: DiscoveryStatus = { state: 'unavailable', name: null, detail: 'connecting to the system bus' };
  /** Bumped whenever Avahi goes or comes: work begun for an older Avahi is dropped. */
  private generation = 0;
  private group: string | null = null;
  /** The instance name Avahi gave us after a collision; null: the host name. */
  private alternativeName: string | null = null;
  private browser: string | null = null;
  /** Browser signals that arrived before ServiceBrowserNew returned the browser's path. */
  private early: Message[] | null = null;
  private readonly found = new Map<string, Peer>();
  private txtTimer: NodeJS.Timeout | undefined;
  private readonly unsubscribe: () => void;

  private constructor(private readonly options: DiscoveryOptions) {
    this.unsubscribe = options.api.subscribe((event) => {
      if (event.type === 'instance' && !this.txtTimer) {
        this.txtTimer = setTimeout(() => {
          this.txtTimer = undefined;
          void this.updateAgentTxt();
        }, TXT_UPDATE_DELAY_MS);
        this.txtTimer.unref();
      }
    });
  }

  /** Connects in the background and never fails: without a bus or Avahi the status says so and the agent serves on. */
  static start(options: DiscoveryOptions): AvahiDiscovery {
    const discovery = new AvahiDiscovery(options);
    void discovery.connect();
    return discovery;
  }

  status(): DiscoveryStatus {
    return { ...this.current };
  }

  peers(): Peer[] {
    return [...this.found.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  async close(): Promise<void> {
    this.unsubscribe();
    clearTimeout(this.txtTimer);
    this.generation++;
    const bus = this.bus;
    this.bus = null;
    // Avahi withdraws a client's entry groups (goodbye packets) when its bus connection ends.
    bus?.disconnect();
  }

  /** A state that keeps phones from finding the cloudlet comes with what to do about it (`fix`). */
  private setStatus(state: 'registering' | 'published'): void;
  private setStatus(state: 'unavailable' | 'failed', detail: string, fix: string): void;
  private setStatus(state: DiscoveryStatus['state'], detail?: string, fix?: string): void {
    const name = state === 'unavailable' ? null : this.instanceName();
    const changed = state !== this.current.state || name !== this.current.name;
    this.current = { state, name, ...(detail ? { detail } : {}) };
    if (detail !== undefined && fix !== undefined) {
      this.options.parts.off('discovery', detail, fix);
      return;
    }
    this.options.parts.on('discovery');
    if (changed) this.options.log(`discovery ${state}${name ? ` as "${name}"` : ''}`);
  }

  private instanceName(): string {
    return this.alternativeName ?? os.hostname();
  }

  private async connect(): Promise<void> {
    try {
      const bus = dbus().systemBus();
      this.bus = bus;
      bus.on('error', (err: Error) => {
        this.generation++;
        this.setStatus('unavailable', `system bus: ${err.message}`, FIX.bus);
      });
      bus.on('message', (message: Message) => this.onMessage(message));
      // Match rules first, then the questions: no signal can slip between the answer and the subscription.
      await this.busCall(DBUS, '/org/freedesktop/DBus', DBUS, 'AddMatch', 's', [`type='signal',sender='${DBUS}',member='NameOwnerChanged',arg0='${AVAHI}'`]);
      await this.busCall(DBUS, '/org/freedesktop/DBus', DBUS, 'AddMatch', 's', [`type='signal',sender='${AVAHI}'`]);
      const present = (await this.busCall(DBUS, '/org/freedesktop/DBus', DBUS, 'NameHasOwner', 's', [AVAHI]))[0] as boolean;
      if (present) await this.avahiAppeared();
      else this.setStatus('unavailable', 'avahi-daemon is not on the system bus: phones cannot find this cloudlet', FIX.avahi);
    } catch (err) {
      this.setStatus('unavailable', `no system bus (${(err as Error).message}): phones cannot find this cloudlet`, FIX.bus);
    }
  }

  private async busCall(destination: string, path: string, iface: string, member: string, signature = '', body: unknown[] = []): Promise<unknown[]> {
    const bus = this.bus;
    if (!bus) throw new Error('discovery is closed');
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${member}: no answer from the bus within ${BUS_TIMEOUT_MS} ms`)), BUS_TIMEOUT_MS);
    });
    try {
      const reply = await Promise.race([bus.call(new (dbus().Message)({ destination, path, interface: iface, member, signature, body })), timeout]);
      return (reply?.body ?? []) as unknown[];
    } finally {
      clearTimeout(timer);
    }
  }

  private avahi(path: string, iface: string, member: string, signature = '', body: unknown[] = []): Promise<unknown[]> {
    return this.busCall(AVAHI, path, iface, member, signature, body);
  }

  private onMessage(m: Message): void {
    if (m.type !== dbus().MessageType.SIGNAL) return;
    if (m.interface === DBUS && m.member === 'NameOwnerChanged' && m.body[0] === AVAHI) {
      if (m.body[2]) this.guard(this.avahiAppeared());
      else this.avahiGone();
    } else if (m.interface === SERVER && m.member === 'StateChanged') {
      this.guard(this.onServerState(m.body[0] as number));
    } else if (m.interface === ENTRY_GROUP && m.member === 'StateChanged' && m.path === this.group) {
      this.guard(this.onGroupState(m.body[0] as number, m.body[1] as string));
    } else if (m.interface === SERVICE_BROWSER) {
      if (this.early) this.early.push(m);
      else if (m.path === this.browser) this.onBrowserSignal(m);
    }
  }

  private guard(work: Promise<void>): void {
    work.catch((err: Error) => this.setStatus('failed', err.message, FIX.publish));
  }

  private async avahiAppeared(): Promise<void> {
    const generation = ++this.generation;
    this.group = null;
    this.browser = null;
    this.found.clear();
    this.setStatus('registering');
    const [state] = (await this.avahi('/', SERVER, 'GetState')) as [number];
    if (generation !== this.generation) return;
    await this.browse(generation);
    if (state === SERVER_RUNNING) await this.publish(generation);
  }

  private avahiGone(): void {
    this.generation++;
    this.group = null;
    this.browser = null;
    this.found.clear();
    this.setStatus('unavailable', 'avahi-daemon left the system bus; waiting for it to return', FIX.avahi);
  }

  /** Host name changes and host name collisions take the server back to registering; entries must then be redone. */
  private async onServerState(state: number): Promise<void> {
    if (state === SERVER_RUNNING) {
      await this.publish(this.generation);
    } else if (state === SERVER_REGISTERING || state === SERVER_COLLISION) {
      this.alternativeName = null; // the host name may be new: start from it again
      if (this.group) await this.avahi(this.group, ENTRY_GROUP, 'Reset');
      this.setStatus('registering');
    }
  }

  private async onGroupState(state: number, error: string): Promise<void> {
    if (state === GROUP_ESTABLISHED) {
      this.setStatus('published');
    } else if (state === GROUP_COLLISION) {
      // Another host publishes this name: take Avahi's alternative ("name #2") and keep the API's view in step.
      const [alternative] = (await this.avahi('/', SERVER, 'GetAlternativeServiceName', 's', [this.instanceName()])) as [string];
      this.options.log(`discovery: the name "${this.instanceName()}" is taken on the network; using "${alternative}"`);
      this.alternativeName = alternative;
      if (this.group) await this.avahi(this.group, ENTRY_GROUP, 'Reset');
      await this.publish(this.generation);
    } else if (state === GROUP_FAILURE) {
      this.setStatus('failed', `Avahi could not publish: ${error}`, FIX.publish);
    }
  }

  private async publish(generation: number): Promise<void> {
    if (generation !== this.generation) return;
    if (!this.group) {
      const [path] = (await this.avahi('/', SERVER, 'EntryGroupNew')) as [string];
      if (generation !== this.generation) return;
      this.group = path;
    }
    const name = this.instanceName();
    this.setStatus('registering');
    await this.addService(name, CLOUDLET_SERVICE_TYPE, kdCloudletTxt(this.options.kdEncrypted ?? false));
    await this.addService(name, AGENT_SERVICE_TYPE, await this.agentTxt());
    await this.avahi(this.group, ENTRY_GROUP, 'Commit');
  }

  private async addService(name: string, type: string, txt: string[]): Promise<void> {
    await this.avahi(this.group!, ENTRY_GROUP, 'AddService', 'iiussssqaay', [
      IF_UNSPEC,
      PROTO_UNSPEC,
      0,
      name,
      type,
      '',
      '',
      this.options.port,
      txt.map((entry) => Buffer.from(entry)),
    ]);
  }

  private async agentTxt(): Promise<string[]> {
    const info = await this.options.api.systemInfo();
    return [
      'txtvers=1',
      `id=${info.hostname}`,
      `version=${this.options.agentVersion}`,
      'api=kd-cloudlet,v1',
      `instances=${info.instances}`,
      `free_memory_mb=${Math.round(info.memory.freeBytes / 2 ** 20)}`,
    ];
  }

  private async updateAgentTxt(): Promise<void> {
    if (!this.group || this.current.state !== 'published') return;
    try {
      await this.avahi(this.group, ENTRY_GROUP, 'UpdateServiceTxt', 'iiusssaay', [
        IF_UNSPEC,
        PROTO_UNSPEC,
        0,
        this.instanceName(),
        AGENT_SERVICE_TYPE,
        '',
        (await this.agentTxt()).map((entry) => Buffer.from(entry)),
      ]);
    } catch (err) {
      this.options.log(`discovery: TXT update failed: ${(err as Error).message}`);
    }
  }

  /** avahi 0.8 has no ServiceBrowserPrepare: signals are held from before ServiceBrowserNew until its path is known. */
  private async browse(generation: number): Promise<void> {
    this.early = [];
    try {
      const [path] = (await this.avahi('/', SERVER, 'ServiceBrowserNew', 'iissu', [IF_UNSPEC, PROTO_UNSPEC, CLOUDLET_SERVICE_TYPE, '', 0])) as [string];
      if (generation !== this.generation) return;
      this.browser = path;
      for (const m of this.early) if (m.path === path) this.onBrowserSignal(m);
    } finally {
      this.early = null;
    }
  }

  private onBrowserSignal(m: Message): void {
    const [iface, protocol, name, type, domain, flags] = m.body as [number, number, string, string, string, number];
    const key = `${iface}/${protocol}/${name}`;
    if (m.member === 'ItemRemove') this.found.delete(key);
    if (m.member !== 'ItemNew' || flags & LOOKUP_RESULT_OUR_OWN) return;
    const generation = this.generation;
    void (async () => {
      const resolved = await this.avahi('/', SERVER, 'ResolveService', 'iisssiu', [iface, protocol, name, type, domain, PROTO_UNSPEC, 0]);
      const [interfaceName] = (await this.avahi('/', SERVER, 'GetNetworkInterfaceNameByIndex', 'i', [iface])) as [string];
      if (generation !== this.generation) return;
      const [, , , , , host, , address, port, txt] = resolved as [number, number, string, string, string, string, number, string, number, Buffer[]];
      this.found.set(key, { name, host, address, port, txt: parseTxt(txt), interface: interfaceName, seenAt: new Date().toISOString() });
    })().catch((err: Error) => this.options.log(`discovery: cannot resolve peer "${name}": ${err.message}`));
  }
}

/** DNS-SD TXT entries are `key=value` (RFC 6763 §6.3); a bare key is a flag with an empty value. */
function parseTxt(entries: Buffer[]): Record<string, string> {
  const txt: Record<string, string> = {};
  for (const entry of entries) {
    const text = Buffer.from(entry).toString('utf8');
    const eq = text.indexOf('=');
    if (eq > 0) txt[text.slice(0, eq)] = text.slice(eq + 1);
    else if (text) txt[text] = '';
  }
  return txt;
}
