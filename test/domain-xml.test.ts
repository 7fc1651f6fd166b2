// Domain XML of an instance: built fresh for a cold boot, or retargeted from the XML saved with a memory state.
import t from 'tap';
import { CloudletError } from '../agent/src/errors';
import {
  buildDomainXml,
  metadataElement,
  parseMetadataElement,
  retargetSavedDomainXml,
  synthesizedDomainXml,
  type DomainSpec,
} from '../agent/src/vm/domain-xml';
import type { InstanceRecord } from '../agent/src/core/types';

const record = (id: string, hostPort: number): InstanceRecord => ({
  id,
  serviceId: 'org.example.svc',
  mechanism: 'cached-vm',
  state: 'starting',
  bindAddress: '127.0.0.1',
  hostPort,
  guestPort: 8080,
  shareable: true,
  users: 1,
  owners: [],
  launch: 'memory-state',
  createdAt: '2026-11-25T00:00:00.000Z',
  readyAt: null,
  dir: `/data/instances/${id}`,
  readiness: { type: 'http', path: '/', timeout_ms: 60000 },
});

const spec = (id: string, hostPort: number): DomainSpec => ({
  name: `cloudlet-org.example.svc-${id.slice(0, 8)}`,
  uuid: id,
  type: 'qemu',
  memoryMib: 128,
  vcpus: 1,
  disk: `/data/instances/${id}/disk.qcow2`,
  boot: { kernel: '/data/services/svc/vmlinuz', initrd: '/data/services/svc/initrd.img', cmdline: 'console=ttyS0' },
  consoleLog: `/data/instances/${id}/console.log`,
  forward: { bindAddress: '127.0.0.1', hostPort, guestPort: 8080 },
  record: record(id, hostPort),
});

const A = '11111111-1111-4111-8111-111111111111';
const B = '22222222-2222-4222-8222-222222222222';

/** How libvirt writes a domain back (double quotes, a <console> mirroring the serial port, our element reformatted). */
function asLibvirtSavesIt(xml: string): string {
  return xml
    .replace(/'/g, '"')
    .replace(
      /(<serial type="file">[\s\S]*?<\/serial>)/,
      (serial) => `${serial}\n    <console type="file">${/<source path="[^"]*"\/>/.exec(serial)![0]}<target type="serial" port="0"/></console>`,
    )
    .replace(/<metadata>/, '<metadata>\n    ')
    .replace(/<type arch="x86_64" machine="pc">/, '<type arch="x86_64" machine="pc-i440fx-7.2">')
    .replace(
      /<memory unit="MiB">(\d+)<\/memory>/,
      (_m, mib: string) => `<memory unit="KiB">${Number(mib) * 1024}</memory><currentMemory unit="KiB">${Number(mib) * 1024}</currentMemory>`,
    )
    .replace('<devices>', '<devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>');
}

t.test('a fresh domain carries the instance record in its metadata', async (t) => {
  const xml = buildDomainXml(spec(A, 21000));
  t.match(xml, /<domain type='qemu'/);
  t.match(xml, /hostfwd=tcp:127\.0\.0\.1:21000-:8080/, 'the forward binds the configured address');
  t.match(xml, /restrict=on/, 'the guest reaches nothing but its forward');
  t.same(parseMetadataElement(xml), record(A, 21000), 'the record round-trips through the XML');
  t.same(parseMetadataElement(metadataElement(record(A, 21000))), record(A, 21000));
  t.equal(parseMetadataElement('<other>not ours</other>'), null);
});

t.test('record values that need escaping survive the XML', async (t) => {
  const tricky = { ...record(A, 21000), serviceId: `a&b<c>"d'` };
  t.same(parseMetadataElement(metadataElement(tricky)), tricky);
});

t.test('retargeting a saved domain changes identity, files, forward and record, and nothing else', async (t) => {
  const saved = asLibvirtSavesIt(buildDomainXml(spec(A, 21000)));
  const retargeted = retargetSavedDomainXml(saved, spec(B, 21001));
  t.match(retargeted, `<uuid>${B}</uuid>`);
  t.match(retargeted, `<name>cloudlet-org.example.svc-22222222</name>`);
  t.match(retargeted, `/data/instances/${B}/disk.qcow2`);
  t.equal(retargeted.split(`/data/instances/${B}/console.log`).length - 1, 2, 'both the serial port and its console mirror move');
  t.match(retargeted, 'hostfwd=tcp:127.0.0.1:21001-:8080');
  t.same(parseMetadataElement(retargeted), record(B, 21001));
  t.notMatch(retargeted, A, 'nothing of the old instance is left');
  t.match(retargeted, 'machine="pc-i440fx-7.2"', 'the saved machine type stays: the memory state needs the same devices');
  const stripped = (x: string) =>
    x
      .replace(/<metadata>[\s\S]*<\/metadata>/, '')
      .replace(/[12]{8}-[12]{4}-4[12]{3}-8[12]{3}-[12]{12}|2100[01]|[12]{8}/g, 'X')
      .replace(/'/g, '"');
  t.equal(stripped(retargeted), stripped(saved), 'the rest of the XML is untouched');
});

t.test('a saved state whose XML lacks our forward is refused as an image we did not make', async (t) => {
  const foreign = asLibvirtSavesIt(buildDomainXml(spec(A, 21000))).replace(/<qemu:commandline>[\s\S]*<\/qemu:commandline>/, '');
  t.throws(() => retargetSavedDomainXml(foreign, spec(B, 21001)), { code: 'INVALID_IMAGE', message: /user-mode netdev/ });
});

t.test('a saved domain XML is read with a parser: a DOCTYPE, an entity or a processing instruction is refused', async (t) => {
  const saved = asLibvirtSavesIt(buildDomainXml(spec(A, 21000)));
  const hostile = {
    'a DOCTYPE declaring an entity': `<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/passwd">]>${saved}`.replace('<name>', '<name>&x;'),
    'an undeclared entity': saved.replace('<on_crash>', '<description>&x;</description><on_crash>'),
    'a processing instruction': saved.replace('<devices>', '<devices><?php echo 1; ?>'),
    'text that is not XML': `${saved}<`,
    'a second <metadata>': saved.replace('<memory', '<metadata><other/></metadata><memory'),
    'a second disk': saved.replace(
      '</disk>',
      `</disk><disk type="file" device="disk"><source file="/var/lib/cloudlet/trust/admin-token"/><target dev="vdb" bus="virtio"/></disk>`,
    ),
    'a second user-mode netdev of ours': saved.replace(
      '</qemu:commandline>',
      '<qemu:arg value="-netdev"/><qemu:arg value="user,id=cl0,restrict=off"/></qemu:commandline>',
    ),
  };
  for (const [what, xml] of Object.entries(hostile)) {
    t.throws(() => retargetSavedDomainXml(xml, spec(B, 21001)), { code: 'INVALID_IMAGE' }, what);
  }
  t.throws(
    () => retargetSavedDomainXml(hostile['an undeclared entity'], spec(B, 21001)),
    { message: 'saved memory state: its domain XML is not well-formed XML (error: entity not found:&x;)' },
    'the refusal says why, once',
  );
  t.equal(
    parseMetadataElement(`<!DOCTYPE x [<!ENTITY e "x">]><instance xmlns="${'urn:cloudlet:agent:instance:1'}">&e;</instance>`),
    null,
    'nor is a metadata element with a DOCTYPE ours',
  );
});

const refuseOverlay = (message: string) => new CloudletError('OVERLAY_INVALID', `overlay: ${message}`);
const synthesisSpec = (id: string, hostPort: number): DomainSpec => ({ ...spec(id, hostPort), memoryMib: 256 });

t.test("a synthesized VM runs with its base's saved domain, the memory of its service, and the identity of its instance", async (t) => {
  const base = asLibvirtSavesIt(buildDomainXml({ ...spec(A, 21000), memoryMib: 256 }));
  // The developer's VM: the same devices, saved on another cloudlet with its own name, files and forward.
  const overlay = asLibvirtSavesIt(
    buildDomainXml({
      ...spec(B, 24000),
      memoryMib: 256,
      disk: '/elsewhere/disk.qcow2',
      consoleLog: '/elsewhere/console.log',
      boot: { kernel: '/elsewhere/vmlinuz', initrd: '/elsewhere/initrd.img', cmdline: 'console=ttyS0' },
    }),
  );
  const C = '33333333-3333-4333-8333-333333333333';
  const xml = synthesizedDomainXml(base, overlay, synthesisSpec(C, 21002), refuseOverlay);
  t.match(xml, `<uuid>${C}</uuid>`);
  t.match(xml, `/data/instances/${C}/disk.qcow2`);
  t.match(xml, 'hostfwd=tcp:127.0.0.1:21002-:8080');
  t.match(xml, '<memory unit="KiB">262144</memory>');
  t.notMatch(xml, /elsewhere/, "nothing of the developer's files");
  t.same(parseMetadataElement(xml), record(C, 21002));
});

t.test("a synthesized memory state whose domain XML differs from the base's in any device is refused", async (t) => {
  const base = asLibvirtSavesIt(buildDomainXml({ ...spec(A, 21000), memoryMib: 256 }));
  const overlay = asLibvirtSavesIt(buildDomainXml({ ...spec(B, 24000), memoryMib: 256 }));
  const hostile: Record<string, [string, RegExp]> = {
    'a host file as a second disk': [
      overlay.replace(
        '</disk>',
        '</disk><disk type="file" device="disk"><source file="/var/lib/cloudlet/trust/admin-token"/><target dev="vdb" bus="virtio"/></disk>',
      ),
      /2 disks/,
    ],
    'a host block device': [
      overlay.replace('</disk>', '</disk><disk type="block" device="lun"><source dev="/dev/sda"/><target dev="sdb" bus="scsi"/></disk>'),
      /extra <disk>|<disk> where/,
    ],
    'a <hostdev>': [
      overlay.replace(
        '</devices>',
        '<hostdev mode="subsystem" type="pci"><source><address domain="0" bus="0" slot="3" function="0"/></source></hostdev></devices>',
      ),
      /extra <hostdev>/,
    ],
    'a <filesystem>': [
      overlay.replace('</devices>', '<filesystem type="mount"><source dir="/"/><target dir="host"/></filesystem></devices>'),
      /extra <filesystem>/,
    ],
    'another <emulator>': [overlay.replace('/usr/bin/qemu-system-x86_64', '/bin/sh'), /<emulator>/],
    'a second netdev without restrict=on': [
      overlay.replace(
        '</qemu:commandline>',
        '<qemu:arg value="-netdev"/><qemu:arg value="user,id=cl1,restrict=off,hostfwd=tcp:0.0.0.0:2222-:22"/></qemu:commandline>',
      ),
      /qemu:commandline/,
    ],
    'a second <metadata>': [overlay.replace('<memory', '<metadata><x/></metadata><memory'), /2 <metadata>/],
    'more memory than its service': [overlay.replace(/262144/g, '524288'), /<memory>/],
    'a DOCTYPE': [`<!DOCTYPE domain [<!ENTITY x "y">]>${overlay}`, /DOCTYPE/],
  };
  for (const [what, [xml, message]] of Object.entries(hostile)) {
    t.throws(() => synthesizedDomainXml(base, xml, synthesisSpec(B, 21001), refuseOverlay), { code: 'OVERLAY_INVALID', message }, what);
  }
});
