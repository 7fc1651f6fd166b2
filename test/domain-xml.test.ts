// Domain XML of an instance: built fresh for a cold boot, or retargeted from the XML saved with a memory state.
import t from 'tap';
import { buildDomainXml, metadataElement, parseMetadataElement, retargetSavedDomainXml, type DomainSpec } from '../agent/src/vm/domain-xml';
import type { InstanceRecord } from '../agent/src/core/types';

const record = (id: string, hostPort: number): InstanceRecord => ({
  id, serviceId: 'org.example.svc', mechanism: 'cached-vm', state: 'starting', bindAddress: '127.0.0.1', hostPort, guestPort: 8080,
  shareable: true, users: 1, owners: [], launch: 'memory-state', createdAt: '2026-11-25T00:00:00.000Z', readyAt: null,
  dir: `/data/instances/${id}`, readiness: { type: 'http', path: '/', timeout_ms: 60000 },
});

const spec = (id: string, hostPort: number): DomainSpec => ({
  name: `cloudlet-org.example.svc-${id.slice(0, 8)}`, uuid: id, type: 'qemu', memoryMib: 128, vcpus: 1,
  disk: `/data/instances/${id}/disk.qcow2`, boot: { kernel: '/data/services/svc/vmlinuz', initrd: '/data/services/svc/initrd.img', cmdline: 'console=ttyS0' },
  consoleLog: `/data/instances/${id}/console.log`, forward: { bindAddress: '127.0.0.1', hostPort, guestPort: 8080 }, metadata: record(id, hostPort),
});

const A = '11111111-1111-4111-8111-111111111111';
const B = '22222222-2222-4222-8222-222222222222';

/** How libvirt writes a domain back (double quotes, a <console> mirroring the serial port, our element reformatted). */
function asLibvirtSavesIt(xml: string): string {
  return xml
    .replace(/'/g, '"')
    .replace(/(<serial type="file">[\s\S]*?<\/serial>)/, (serial) => `${serial}\n    <console type="file">${/<source path="[^"]*"\/>/.exec(serial)![0]}<target type="serial" port="0"/></console>`)
    .replace(/<metadata>/, '<metadata>\n    ')
    .replace(/<type arch="x86_64" machine="pc">/, '<type arch="x86_64" machine="pc-i440fx-7.2">');
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
  const stripped = (x: string) => x.replace(/<metadata>[\s\S]*<\/metadata>/, '').replace(/[12]{8}-[12]{4}-4[12]{3}-8[12]{3}-[12]{12}|2100[01]|[12]{8}/g, 'X').replace(/'/g, '"');
  t.equal(stripped(retargeted), stripped(saved), 'the rest of the XML is untouched');
});

t.test('a saved state whose XML lacks our forward is refused as an image we did not make', async (t) => {
  const foreign = asLibvirtSavesIt(buildDomainXml(spec(A, 21000))).replace(/<qemu:commandline>[\s\S]*<\/qemu:commandline>/, '');
  t.throws(() => retargetSavedDomainXml(foreign, spec(B, 21001)), { code: 'INVALID_IMAGE', message: /user-mode netdev/ });
});
