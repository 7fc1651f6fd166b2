import { CloudletError } from '../errors';
import type { InstanceRecord } from '../core/types';

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
  forward: Forward;
  metadata: InstanceRecord;
  /** A read-only ISO attached as an IDE CD-ROM (a cloud-init config drive), absent for most instances. */
  cdrom?: string;
}

const escapeXml = (s: string) =>
  s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;');
const unescapeXml = (s: string) =>
  s.replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&quot;/g, '"').replace(/&apos;/g, "'").replace(/&amp;/g, '&');

/** The element as virDomainSetMetadata takes it: unqualified, libvirt puts it in our namespace itself. */
export function metadataElement(meta: InstanceRecord): string {
  return `<instance>${escapeXml(JSON.stringify(meta))}</instance>`;
}

/** The same element inside a domain's XML, where it must carry the namespace. */
function metadataBlock(meta: InstanceRecord): string {
  const ns = METADATA_KEY;
  return `<metadata><${ns}:instance xmlns:${ns}="${METADATA_URI}">${escapeXml(JSON.stringify(meta))}</${ns}:instance></metadata>`;
}

/** Parse the element libvirt hands back from virDomainGetMetadata; null when it is not ours or not readable. */
export function parseMetadataElement(xml: string): InstanceRecord | null {
  const m = /<(?:[\w-]+:)?instance\b[^>]*>([\s\S]*)<\/(?:[\w-]+:)?instance>/.exec(xml);
  if (!m) return null;
  try {
    const meta = JSON.parse(unescapeXml(m[1])) as InstanceRecord;
    return typeof meta.id === 'string' && typeof meta.serviceId === 'string' ? meta : null;
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
function netdevArg(f: Forward): string {
  return `user,id=cl0,restrict=on,hostfwd=tcp:${f.bindAddress}:${f.hostPort}-:${f.guestPort}`;
}

export function buildDomainXml(s: DomainSpec): string {
  const boot = s.boot
    ? [`<kernel>${escapeXml(s.boot.kernel)}</kernel>`, s.boot.initrd ? `<initrd>${escapeXml(s.boot.initrd)}</initrd>` : '', `<cmdline>${escapeXml(s.boot.cmdline)}</cmdline>`]
    : [`<boot dev='hd'/>`];
  return [
    `<domain type='${s.type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>`,
    `  <name>${escapeXml(s.name)}</name>`,
    `  <uuid>${s.uuid}</uuid>`,
    `  ${metadataBlock(s.metadata)}`,
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
    s.cdrom ? `    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='${escapeXml(s.cdrom)}'/><target dev='hdc' bus='ide'/><readonly/></disk>` : '',
    `    <serial type='file'><source path='${escapeXml(s.consoleLog)}'/><target port='0'/></serial>`,
    `    <controller type='usb' model='none'/>`,
    `    <memballoon model='none'/>`,
    `  </devices>`,
    `  <qemu:commandline>`,
    `    <qemu:arg value='-netdev'/>`,
    `    <qemu:arg value='${netdevArg(s.forward)}'/>`,
    `    <qemu:arg value='-device'/>`,
    `    <qemu:arg value='virtio-net-pci,netdev=cl0,bus=pci.0,addr=0x10'/>`,
    `  </qemu:commandline>`,
    `</domain>`,
  ].filter((l) => l !== '').join('\n');
}

/** Replace the first match; `replacement` gets the match's groups. Missing elements mean a state we did not make. */
function replaceOnce(xml: string, pattern: RegExp, replacement: (...groups: string[]) => string, what: string): string {
  if (!pattern.test(xml)) throw new CloudletError('INVALID_IMAGE', `saved memory state: its domain XML has no ${what}`);
  return xml.replace(pattern, (...args: string[]) => replacement(...args));
}

/**
 * Give the domain XML saved with a memory state (libvirt's full description of the VM that was saved) the identity
 * and files of a new instance. Only identity, paths, the forward and metadata change: the devices must stay exactly
 * as they were saved, or QEMU cannot load the state.
 */
export function retargetSavedDomainXml(saved: string, s: DomainSpec): string {
  let xml = saved;
  xml = replaceOnce(xml, /<name>[^<]*<\/name>/, () => `<name>${escapeXml(s.name)}</name>`, '<name>');
  xml = replaceOnce(xml, /<uuid>[^<]*<\/uuid>/, () => `<uuid>${s.uuid}</uuid>`, '<uuid>');
  const metadata = metadataBlock(s.metadata);
  xml = /<metadata>[\s\S]*?<\/metadata>/.test(xml)
    ? xml.replace(/<metadata>[\s\S]*?<\/metadata>/, () => metadata)
    : xml.replace(/(<uuid>[^<]*<\/uuid>)/, (u) => `${u}\n  ${metadata}`);
  xml = replaceOnce(xml, /(<disk\b[^>]*device=['"]disk['"][^>]*>[\s\S]*?<source file=)(['"])[^'"]*\2/,
    (_m, head) => `${head}'${escapeXml(s.disk)}'`, 'disk source');
  // The serial port and libvirt's mirrored <console> both name the log file.
  xml = xml.replace(/(<(?:serial|console) type=['"]file['"]>[\s\S]*?<source path=)(['"])[^'"]*\2/g,
    (_m, head: string) => `${head}'${escapeXml(s.consoleLog)}'`);
  // A CD-ROM saved with the state (the config drive a provisioned VM booted with) comes back empty: its file was the
  // provisioning's, and an ejected medium leaves the devices, and so the state, as they were.
  xml = xml.replace(/(<disk\b[^>]*device=['"]cdrom['"][^>]*>)([\s\S]*?)(<\/disk>)/g,
    (_m, open: string, inner: string, close: string) => `${open}${inner.replace(/<source\b[^>]*\/>\s*|<backingStore\/>\s*/g, '')}${close}`);
  xml = replaceOnce(xml, /<qemu:arg value=(['"])user,id=cl0,[^'"]*\1\s*\/>/, () => `<qemu:arg value='${netdevArg(s.forward)}'/>`, 'user-mode netdev');
  if (s.boot) {
    const { kernel, initrd } = s.boot;
    xml = xml.replace(/<kernel>[^<]*<\/kernel>/, () => `<kernel>${escapeXml(kernel)}</kernel>`);
    if (initrd) xml = xml.replace(/<initrd>[^<]*<\/initrd>/, () => `<initrd>${escapeXml(initrd)}</initrd>`);
  }
  return xml;
}
