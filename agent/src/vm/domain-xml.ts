import type { Document, Element } from '@xmldom/xmldom';
import { CloudletError } from '../errors';
import type { InstanceRecord } from '../core/types';
import { canonicalXml, childElements, onlyChild, optionalChild, parseXml, serializeXml, setText, textOf, type XmlRefusal } from './xml-dom';

/** Our <metadata> element: every fact an agent needs to adopt the instance after a restart lives in libvirt. */
export const METADATA_URI = 'urn:cloudlet:agent:instance:1';
export const METADATA_KEY = 'cloudlet';

export interface Forward {
  bindAddress: string;
  hostPort: number;
  guestPort: number;
}

export interface DomainSpec {
  name: string;
  uuid: string;
  type: 'kvm' | 'qemu';
  memoryMib: number;
  vcpus: number;
  disk: string;
  boot: { kernel: string; initrd: string | null; cmdline: string } | null;
  consoleLog: string;
  /** null: no forward yet (a warm pool's VM gets its own through QEMU's monitor when it is assigned). */
  forward: Forward | null;
  /** The instance's record, kept in the domain's <metadata>. */
  record: InstanceRecord;
  /** A read-only ISO attached as an IDE CD-ROM (a cloud-init config drive), absent for most instances. */
  cdrom?: string;
}

const escapeXml = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;');

/** The element as virDomainSetMetadata takes it: unqualified, libvirt puts it in our namespace itself. */
export function metadataElement(record: InstanceRecord): string {
  return `<instance>${escapeXml(JSON.stringify(record))}</instance>`;
}

/** The same element inside a domain's XML, where it must carry the namespace. */
function metadataBlock(record: InstanceRecord): string {
  const ns = METADATA_KEY;
  return `<metadata><${ns}:instance xmlns:${ns}="${METADATA_URI}">${escapeXml(JSON.stringify(record))}</${ns}:instance></metadata>`;
}

/**
 * Parse the element libvirt hands back from virDomainGetMetadata (or the one inside a whole domain's XML); null when
 * it is not ours or not readable.
 */
export function parseMetadataElement(xml: string): InstanceRecord | null {
  try {
    const root = parseXml(xml, (message) => new CloudletError('INVALID_IMAGE', message)).documentElement!;
    const element = root.localName === 'instance' ? root : root.getElementsByTagNameNS(METADATA_URI, 'instance')[0];
    if (!element) return null;
    const record = JSON.parse(textOf(element)) as InstanceRecord;
    return typeof record.id === 'string' && typeof record.serviceId === 'string' ? record : null;
  } catch {
    return null;
  }
}

/**
 * User-mode networking with one forwarded port. Given through <qemu:commandline> because libvirt's <interface
 * type='user'> has no port forwards in 9.0 and a monitor-added hostfwd is lost on restore; the argv is part of the
 * domain XML, so it is saved with the memory state. The guest is restricted to its forwarded port (restrict=on).
 * The NIC gets a fixed PCI slot: libvirt's own disk takes the first free one before these arguments are applied.
 */
function netdevArg(f: Forward | null): string {
  return f ? `user,id=cl0,restrict=on,hostfwd=${hostfwdRule(f)}` : 'user,id=cl0,restrict=on';
}

/** A forward as QEMU's `hostfwd=` option and its monitor's `hostfwd_add` both take it; the netdev is `cl0`. */
export function hostfwdRule(f: Forward): string {
  return `tcp:${f.bindAddress}:${f.hostPort}-:${f.guestPort}`;
}

export const NETDEV_ID = 'cl0';
/** The NIC on the user-mode netdev, at its fixed PCI slot. */
const NIC_ARG = 'virtio-net-pci,netdev=cl0,bus=pci.0,addr=0x10';

export function buildDomainXml(s: DomainSpec): string {
  const boot = s.boot
    ? [
        `<kernel>${escapeXml(s.boot.kernel)}</kernel>`,
        s.boot.initrd ? `<initrd>${escapeXml(s.boot.initrd)}</initrd>` : '',
        `<cmdline>${escapeXml(s.boot.cmdline)}</cmdline>`,
      ]
    : [`<boot dev='hd'/>`];
  return [
    `<domain type='${s.type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>`,
    `  <name>${escapeXml(s.name)}</name>`,
    `  <uuid>${s.uuid}</uuid>`,
    `  ${metadataBlock(s.record)}`,
    `  <memory unit='MiB'>${s.memoryMib}</memory>`,
    `  <vcpu>${s.vcpus}</vcpu>`,
    `  <os>`,
    `    <type arch='x86_64' machine='pc'>hvm</type>`,
    ...boot.filter(Boolean).map((l) => `    ${l}`),
    `  </os>`,
    `  <features><acpi/></features>`,
    s.type === 'kvm' ? `  <cpu mode='host-passthrough'/>` : '',
    `  <clock offset='utc'/>`,
    `  <on_poweroff>destroy</on_poweroff>`,
    `  <on_reboot>restart</on_reboot>`,
    `  <on_crash>destroy</on_crash>`,
    `  <devices>`,
    `    <disk type='file' device='disk'>`,
    `      <driver name='qemu' type='qcow2'/>`,
    `      <source file='${escapeXml(s.disk)}'/>`,
    `      <target dev='vda' bus='virtio'/>`,
    `    </disk>`,
    s.cdrom
      ? `    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='${escapeXml(s.cdrom)}'/><target dev='hdc' bus='ide'/><readonly/></disk>`
      : '',
    `    <serial type='file'><source path='${escapeXml(s.consoleLog)}'/><target port='0'/></serial>`,
    `    <controller type='usb' model='none'/>`,
    `    <memballoon model='none'/>`,
    `  </devices>`,
    `  <qemu:commandline>`,
    `    <qemu:arg value='-netdev'/>`,
    `    <qemu:arg value='${netdevArg(s.forward)}'/>`,
    `    <qemu:arg value='-device'/>`,
    `    <qemu:arg value='${NIC_ARG}'/>`,
    `  </qemu:commandline>`,
    `</domain>`,
  ]
    .filter((l) => l !== '')
    .join('\n');
}

const QEMU_NS = 'http://libvirt.org/schemas/domain/qemu/1.0';

const invalidImage: XmlRefusal = (message) => new CloudletError('INVALID_IMAGE', `saved memory state: its domain XML ${message}`);

/** A saved domain XML parsed, refused unless it is one <domain>. */
function parseDomain(xml: string, refuse: XmlRefusal): Document {
  const doc = parseXml(xml, refuse);
  if (doc.documentElement!.nodeName !== 'domain') throw refuse('is not a <domain>');
  return doc;
}

/**
 * Give a saved domain the identity and files of a new instance, in place: name, UUID, record, disk, console log,
 * CD-ROM medium, forward and boot files. Every other element stays as it was saved, or QEMU cannot load the state.
 * Each of those must be there exactly once (a second <metadata>, disk or user-mode netdev is not ours).
 */
function retargetDomain(doc: Document, s: DomainSpec, refuse: XmlRefusal): void {
  const domain = doc.documentElement!;
  setText(onlyChild(domain, 'name', refuse), s.name);
  const uuid = onlyChild(domain, 'uuid', refuse);
  setText(uuid, s.uuid);
  const metadata = doc.importNode(parseXml(metadataBlock(s.record), refuse).documentElement!, true);
  const saved = optionalChild(domain, 'metadata', refuse);
  if (saved) domain.replaceChild(metadata, saved);
  else domain.insertBefore(metadata, uuid.nextSibling);

  const devices = onlyChild(domain, 'devices', refuse);
  const disks = childElements(devices, 'disk');
  const systemDisks = disks.filter((d) => d.getAttribute('device') === 'disk');
  if (systemDisks.length !== 1 || systemDisks[0]!.getAttribute('type') !== 'file') throw refuse(`has ${systemDisks.length} disks, not one file disk`);
  onlyChild(systemDisks[0]!, 'source', refuse).setAttribute('file', s.disk);
  // A CD-ROM saved with the state (the config drive a provisioned VM booted with) comes back empty: its file was the
  // provisioning's, and an ejected medium leaves the devices, and so the state, as they were.
  for (const cdrom of disks.filter((d) => d.getAttribute('device') === 'cdrom')) {
    for (const medium of [...childElements(cdrom, 'source'), ...childElements(cdrom, 'backingStore')]) cdrom.removeChild(medium);
  }
  // The serial port and libvirt's mirrored <console> both name the log file.
  for (const port of [...childElements(devices, 'serial'), ...childElements(devices, 'console')]) {
    if (port.getAttribute('type') === 'file') onlyChild(port, 'source', refuse).setAttribute('path', s.consoleLog);
  }
  const commandline = childElements(domain).filter((e) => e.namespaceURI === QEMU_NS && e.localName === 'commandline');
  const netdevs = commandline
    .flatMap((c) => childElements(c))
    .filter((a) => a.localName === 'arg' && (a.getAttribute('value') ?? '').startsWith('user,id=cl0,'));
  if (commandline.length !== 1 || netdevs.length !== 1) throw refuse('has no single user-mode netdev of ours');
  netdevs[0]!.setAttribute('value', netdevArg(s.forward));
  if (s.boot) {
    const os = onlyChild(domain, 'os', refuse);
    setText(onlyChild(os, 'kernel', refuse), s.boot.kernel);
    if (s.boot.initrd) setText(onlyChild(os, 'initrd', refuse), s.boot.initrd);
  }
}

/**
 * Give the domain XML saved with a memory state (libvirt's full description of the VM that was saved) the identity
 * and files of a new instance. Only identity, paths, the forward and metadata change: the devices must stay exactly
 * as they were saved, or QEMU cannot load the state.
 */
export function retargetSavedDomainXml(saved: string, s: DomainSpec, refuse: XmlRefusal = invalidImage): string {
  const doc = parseDomain(saved, refuse);
  retargetDomain(doc, s, refuse);
  return serializeXml(doc);
}

/**
 * The domain a synthesized memory state is restored with. It is the base's own saved domain (the cloudlet's, never
 * the overlay's), retargeted to the instance, with the memory and vCPUs of the overlay's service. The domain XML the
 * overlay's memory state carries (the phone's bytes) is only compared with it: retargeted the same way, it must be the
 * same element by element and device by device, or the overlay is refused (`refuseOverlay` says how).
 */
export function synthesizedDomainXml(baseSaved: string, overlaySaved: string, s: DomainSpec, refuseOverlay: XmlRefusal): string {
  const reference = parseDomain(baseSaved, invalidImage);
  retargetDomain(reference, s, invalidImage);
  const domain = reference.documentElement!;
  for (const name of ['memory', 'currentMemory']) {
    const element = optionalChild(domain, name, invalidImage);
    if (!element) continue;
    element.setAttribute('unit', 'KiB');
    setText(element, String(s.memoryMib * 1024));
  }
  setText(onlyChild(domain, 'vcpu', invalidImage), String(s.vcpus));
  const claimed = parseDomain(overlaySaved, refuseOverlay);
  retargetDomain(claimed, s, refuseOverlay);
  const difference = firstDifference(claimed.documentElement!, domain);
  if (difference) throw refuseOverlay(`differs from the base's: ${difference}`);
  return serializeXml(reference);
}

/** Where `claimed` first differs from `reference`: the element, and within <devices> the device; null if nowhere. */
function firstDifference(claimed: Element, reference: Element): string | null {
  if (canonicalXml(claimed) === canonicalXml(reference)) return null;
  const where = `<${claimed.nodeName}>`;
  const a = childElements(claimed);
  const b = childElements(reference);
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    const x = a[i];
    const y = b[i];
    if (!y) return `an extra <${x!.nodeName}> in ${where}`;
    if (!x) return `no <${y.nodeName}> in ${where}`;
    if (canonicalXml(x) === canonicalXml(y)) continue;
    if (x.nodeName === 'devices' && y.nodeName === 'devices') return firstDifference(x, y);
    return x.nodeName === y.nodeName ? `${where} element ${i + 1}, <${x.nodeName}>` : `<${x.nodeName}> where the base has <${y.nodeName}> in ${where}`;
  }
  return `the attributes of ${where}`;
}

/** What a domain handed over by another cloudlet may hold at its top level, and among its devices (the agent's own domains' elements). */
const HANDOFF_DOMAIN_ELEMENTS = new Set([
  'name',
  'uuid',
  'metadata',
  'memory',
  'currentMemory',
  'vcpu',
  'os',
  'features',
  'cpu',
  'clock',
  'on_poweroff',
  'on_reboot',
  'on_crash',
  'devices',
  'commandline',
]);
const HANDOFF_DEVICES = new Set(['disk', 'controller', 'serial', 'console', 'input', 'audio', 'memballoon']);
/** Dropped from a handed-over domain: this cloudlet's libvirtd sets them itself (its labels, cgroup partition, emulator). */
const HANDOFF_DROPPED = new Set(['seclabel', 'resource']);

/**
 * The domain a handed-over instance runs as here (docs/handoff.md): the migratable XML the other cloudlet sent (which
 * must describe the same machine, or libvirt refuses the migration), given this cloudlet's identity and files: its
 * disk (an overlay over its own copy of the service's image), console log, boot files, forward and record. A peer's
 * XML is hostile: anything the agent's own domains do not have is refused (a device, a QEMU argument, a boot loader),
 * and the memory, vCPUs and kernel command line must be this cloudlet's service's.
 */
export function handoffDomainXml(sourceXml: string, s: DomainSpec, refuse: XmlRefusal): string {
  const doc = parseDomain(sourceXml, refuse);
  const domain = doc.documentElement!;
  if (domain.getAttribute('type') !== s.type) throw refuse(`is of type ${domain.getAttribute('type')}, not ${s.type}`);
  for (const child of childElements(domain)) {
    if (HANDOFF_DROPPED.has(child.localName!)) domain.removeChild(child);
    else if (!HANDOFF_DOMAIN_ELEMENTS.has(child.localName!) || (child.localName === 'commandline' && child.namespaceURI !== QEMU_NS)) {
      throw refuse(`has a <${child.nodeName}>, which no domain of this cloudlet has`);
    }
  }
  const memory = onlyChild(domain, 'memory', refuse);
  const kib = Number(textOf(memory)) * ({ KiB: 1, MiB: 1024, GiB: 1024 * 1024 }[memory.getAttribute('unit') || 'KiB'] ?? NaN);
  if (kib !== s.memoryMib * 1024) throw refuse(`has ${kib} KiB of memory, not the service's ${s.memoryMib} MiB`);
  if (textOf(onlyChild(domain, 'vcpu', refuse)) !== String(s.vcpus)) throw refuse(`does not have the service's ${s.vcpus} vCPUs`);
  const os = onlyChild(domain, 'os', refuse);
  for (const child of childElements(os)) {
    if (!['type', 'kernel', 'initrd', 'cmdline', 'boot'].includes(child.localName!)) throw refuse(`has a <${child.nodeName}> in <os>`);
  }
  const cmdline = optionalChild(os, 'cmdline', refuse);
  if ((cmdline ? textOf(cmdline) : null) !== (s.boot?.cmdline ?? null)) throw refuse("does not boot with the service's kernel command line");
  const devices = onlyChild(domain, 'devices', refuse);
  for (const device of childElements(devices)) {
    if (device.localName === 'emulator') devices.removeChild(device);
    else if (!HANDOFF_DEVICES.has(device.localName!)) throw refuse(`has a <${device.nodeName}> device`);
    else if ((device.localName === 'serial' || device.localName === 'console') && device.getAttribute('type') !== 'file')
      throw refuse(`has a ${device.localName} that is no file`);
  }
  for (const disk of childElements(devices, 'disk')) {
    // This cloudlet's qcow2 overlay names its own backing file; libvirt reads the chain from it.
    for (const backing of childElements(disk, 'backingStore')) disk.removeChild(backing);
  }
  retargetDomain(doc, s, refuse);
  const args = childElements(domain)
    .filter((e) => e.namespaceURI === QEMU_NS && e.localName === 'commandline')
    .flatMap((c) => childElements(c))
    .map((a) => `${a.localName}=${a.getAttribute('value') ?? ''}`);
  const ours = ['-netdev', netdevArg(s.forward), '-device', NIC_ARG].map((value) => `arg=${value}`);
  if (args.join('\n') !== ours.join('\n')) throw refuse('passes QEMU arguments of its own');
  return serializeXml(doc);
}

/**
 * Whether `xml` is the domain handoffDomainXml issued for `s`, as libvirt sends it back re-formatted (defaults,
 * aliases and addresses added): it passes the same checks, and what the issue set (name, UUID, record, disk and boot
 * files, console log, QEMU arguments) is already as `s` says.
 */
export function isIssuedHandoffDomain(xml: string, s: DomainSpec): boolean {
  const refuse: XmlRefusal = (message) => new CloudletError('HANDOFF_REFUSED', message);
  try {
    return issuedFacts(xml, refuse) === issuedFacts(handoffDomainXml(xml, s, refuse), refuse);
  } catch {
    return false;
  }
}

/** What handoffDomainXml sets, in one string. */
function issuedFacts(xml: string, refuse: XmlRefusal): string {
  const domain = parseDomain(xml, refuse).documentElement!;
  const texts = (parent: Element, names: string[]) => names.map((n) => childElements(parent, n).map(textOf).join(','));
  const os = onlyChild(domain, 'os', refuse);
  const devices = onlyChild(domain, 'devices', refuse);
  const sources = ['disk', 'serial', 'console'].flatMap((kind) =>
    childElements(devices, kind).flatMap((d) =>
      childElements(d, 'source').map((src) => `${kind}:${src.getAttribute('file') ?? src.getAttribute('path') ?? ''}`),
    ),
  );
  const args = childElements(domain)
    .filter((e) => e.namespaceURI === QEMU_NS && e.localName === 'commandline')
    .flatMap((c) => childElements(c).map((a) => a.getAttribute('value') ?? ''));
  return JSON.stringify([
    ...texts(domain, ['name', 'uuid']),
    JSON.stringify(parseMetadataElement(xml)),
    ...texts(os, ['kernel', 'initrd', 'cmdline']),
    ...sources,
    ...args,
  ]);
}
