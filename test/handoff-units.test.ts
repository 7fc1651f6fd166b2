// What a peer may send in a handoff, checked without a VM (docs/handoff.md): the gate on its libvirt control channel
// (libvirt's RPC framing, only an incoming migration's calls, the Prepare carrying the XML this cloudlet issued), and
// the domain XML it offers (nothing the agent's own domains do not have), and what its credential opens.
import t from 'tap';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { CloudletError } from '../agent/src/errors';
import { LibvirtCallFilter, MAX_RPC_MESSAGE_BYTES, MIGRATION_PROCEDURES } from '../agent/src/fleet/handoff-rpc';
import type { CloudletApi, InstanceRecord, ProvisioningApi } from '../agent/src/core/types';
import { v1Face } from '../agent/src/api/v1';
import type { FleetView } from '../agent/src/api/v1-fleet';
import type { TrustView } from '../agent/src/api/v1-trust';
import { buildDomainXml, handoffDomainXml, isIssuedHandoffDomain, type DomainSpec } from '../agent/src/vm/domain-xml';

const REMOTE = 0x20008086;
const KEEPALIVE = 0x6b656570;
const ISSUED_XML = '<domain>issued</domain>';
const ISSUED = {
  isIssuedDomain: (xml: string) => xml === ISSUED_XML,
  migrateUri: 'unix:///run/cloudlet-handoff/ho-1/memory.sock',
  disksUri: 'unix:///run/cloudlet-handoff/ho-1/disk.sock',
};

const xdrString = (text: string) => {
  const bytes = Buffer.from(text);
  const padded = Buffer.alloc(4 + ((bytes.length + 3) & ~3));
  padded.writeUInt32BE(bytes.length, 0);
  bytes.copy(padded, 4);
  return padded;
};
const u32 = (value: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0, 0);
  return b;
};

function message(procedure: number, { program = REMOTE, type = 0, body = Buffer.alloc(0) } = {}): Buffer {
  const header = Buffer.concat([u32(28 + body.length), u32(program), u32(1), u32(procedure), u32(type), u32(1), u32(0)]);
  return Buffer.concat([header, body]);
}

/** A Prepare3Params call with string parameters, as libvirt encodes it. */
function prepare(params: Record<string, string>): Buffer {
  const entries = Object.entries(params).map(([name, value]) => Buffer.concat([xdrString(name), u32(7), xdrString(value)]));
  return message(303, { body: Buffer.concat([u32(entries.length), ...entries, u32(0), u32(0)]) });
}

/** What the filter lets through of `input` (sent in small pieces, as a socket would), or its refusal. */
async function through(input: Buffer): Promise<{ passed: Buffer; error: Error | null }> {
  const chunks: Buffer[] = [];
  const pieces = Array.from({ length: Math.ceil(input.length / 7) }, (_, i) => input.subarray(i * 7, i * 7 + 7));
  const error = await pipeline(
    Readable.from(pieces),
    new LibvirtCallFilter(ISSUED),
    new Writable({
      write(chunk: Buffer, _encoding, callback) {
        chunks.push(chunk);
        callback();
      },
    }),
  ).then(
    () => null,
    (err: Error) => err,
  );
  return { passed: Buffer.concat(chunks), error };
}

const MIGRATION = [66, 60, 1, 60, 360, 60, 60].map((p) => message(p));

t.test("an incoming migration's calls pass whole, keepalives included", async (tt) => {
  const input = Buffer.concat([
    ...MIGRATION,
    message(1, { program: KEEPALIVE, type: 2 }),
    prepare({ destination_xml: ISSUED_XML, migrate_uri: ISSUED.migrateUri, disks_uri: ISSUED.disksUri }),
    message(306),
    message(361),
    message(2),
  ]);
  const { passed, error } = await through(input);
  tt.equal(error, null);
  tt.same(passed, input, 'byte for byte');
});

t.test('anything else ends the channel at that message, which never reaches libvirtd', async (tt) => {
  const first = prepare({ destination_xml: ISSUED_XML });
  // [what, the bad message, what legitimately passed before it]
  const cases: Array<[string, Buffer, Buffer?]> = [
    ['a call no migration makes (virDomainCreateXML)', message(10)],
    ['a reply sent as if libvirtd', message(1, { type: 1 })],
    ['another program', message(1, { program: 0x11223344 })],
    ['a second Prepare', Buffer.concat([first, first]), first],
    ['a Prepare with a domain of its own', prepare({ destination_xml: '<domain>mine</domain>' })],
    ['a Prepare without the issued domain', prepare({ migrate_uri: ISSUED.migrateUri })],
    ['a Prepare aiming QEMU elsewhere', prepare({ destination_xml: ISSUED_XML, migrate_uri: 'unix:///etc/x.sock' })],
    ['an oversized message', Buffer.concat([u32(MAX_RPC_MESSAGE_BYTES + 1), Buffer.alloc(24)])],
  ];
  for (const [what, bad, before] of cases) {
    const { passed, error } = await through(Buffer.concat([message(66), bad, message(2)]));
    tt.ok(error instanceof CloudletError && error.code === 'HANDOFF_REFUSED', `${what}: refused`);
    tt.same(passed, Buffer.concat([message(66), ...(before ? [before] : [])]), `${what}: only what came before it passed`);
  }
  tt.ok(
    [...MIGRATION_PROCEDURES.values()].every((p) => p.times >= 1),
    'every listed call is bounded',
  );
});

const record: InstanceRecord = {
  id: '6f1c0a52-3b1e-4d6a-9f7e-2a0c5d8e9b10',
  serviceId: 'org.example.svc',
  mechanism: 'cached-vm',
  state: 'ready',
  bindAddress: '0.0.0.0',
  hostPort: 20001,
  guestPort: 8080,
  shareable: true,
  users: 1,
  owners: [],
  launch: 'handoff',
  createdAt: '2026-12-03T00:00:00.000Z',
  readyAt: '2026-12-03T00:00:00.000Z',
  dir: '/b/instances/6f1c0a52-3b1e-4d6a-9f7e-2a0c5d8e9b10',
  readiness: { type: 'http', path: '/', timeout_ms: 60000 },
};
const at = (root: string, port: number): DomainSpec => ({
  name: 'cloudlet-org.example.svc-6f1c0a52',
  uuid: record.id,
  type: 'qemu',
  memoryMib: 128,
  vcpus: 1,
  disk: `${root}/instances/${record.id}/disk.qcow2`,
  boot: { kernel: `${root}/services/svc/vmlinuz`, initrd: `${root}/services/svc/initrd.img`, cmdline: 'console=ttyS0' },
  consoleLog: `${root}/instances/${record.id}/console.log`,
  forward: { bindAddress: '0.0.0.0', hostPort: port, guestPort: 8080 },
  record: { ...record, dir: `${root}/instances/${record.id}`, hostPort: port },
});
/** The source's domain, as libvirt adds to it what the handoff must drop (labels, a backing chain). */
const offered = buildDomainXml(at('/a', 20000))
  .replace('</devices>', `<emulator>/usr/bin/qemu-system-x86_64</emulator></devices><seclabel type='dynamic' model='dac'/>`)
  .replace(`<target dev='vda'`, `<backingStore type='file'><source file='/a/services/svc/disk.qcow2'/></backingStore><target dev='vda'`);
const refuse = (message: string) => new CloudletError('HANDOFF_REFUSED', message);

t.test("the target's domain is the offered machine with its own files, forward and record", async (tt) => {
  const xml = handoffDomainXml(offered, at('/b', 20001), refuse);
  tt.notMatch(xml, /\/a\//, 'no path of the source is left');
  tt.match(xml, /hostfwd=tcp:0\.0\.0\.0:20001-:8080/, 'its own forward');
  tt.match(xml, /"hostPort":20001/, 'its own record');
  tt.notMatch(xml, /seclabel|backingStore|<emulator>/, "what this cloudlet's libvirtd sets itself is dropped");
});

t.test('an offered domain with anything the agent’s own domains do not have is refused', async (tt) => {
  const cases: Array<[string, string]> = [
    ['a host device', offered.replace('</devices>', "<hostdev mode='subsystem' type='pci'/></devices>")],
    ['a QEMU argument of its own', offered.replace('</qemu:commandline>', "<qemu:arg value='-chardev'/></qemu:commandline>")],
    ['a console that is a socket', offered.replace("<serial type='file'>", "<serial type='unix'>")],
    ['more memory than the service', offered.replace("<memory unit='MiB'>128</memory>", "<memory unit='MiB'>4096</memory>")],
    ['another kernel command line', offered.replace('console=ttyS0', 'console=ttyS0 init=/bin/sh')],
    ['a firmware loader', offered.replace('</os>', '<loader>/etc/shadow</loader></os>')],
    ['a second disk', offered.replace('</devices>', "<disk type='file' device='disk'><source file='/etc/shadow'/><target dev='vdb'/></disk></devices>")],
  ];
  for (const [what, xml] of cases) {
    tt.throws(() => handoffDomainXml(xml, at('/b', 20001), refuse), { code: 'HANDOFF_REFUSED' }, what);
  }
});

t.test('a Prepare’s domain is the issued one when it is that domain re-formatted by libvirt, and nothing else', async (tt) => {
  const issued = handoffDomainXml(offered, at('/b', 20001), refuse);
  tt.ok(isIssuedHandoffDomain(issued, at('/b', 20001)), 'the issued XML');
  const reformatted = issued.replace(`<target dev='vda' bus='virtio'/>`, `<target dev='vda' bus='virtio'/><alias name='virtio-disk0'/>`);
  tt.ok(isIssuedHandoffDomain(reformatted, at('/b', 20001)), 'with what libvirt adds to it');
  tt.notOk(isIssuedHandoffDomain(issued.replace('hostfwd=tcp:0.0.0.0:20001', 'hostfwd=tcp:0.0.0.0:22'), at('/b', 20001)), 'another forward');
  tt.notOk(isIssuedHandoffDomain(issued.replace(`/b/instances/${record.id}/disk.qcow2`, '/b/services/svc/disk.qcow2'), at('/b', 20001)), 'another disk');
  tt.notOk(isIssuedHandoffDomain(issued.replace('</devices>', "<hostdev mode='subsystem' type='pci'/></devices>"), at('/b', 20001)), 'a device more');
  tt.notOk(isIssuedHandoffDomain(offered, at('/b', 20001)), 'the source’s own');
});

t.test("a cloudlet credential's routes are the deliberate list of docs/security.md, handoffs included", async (tt) => {
  const nothing = {} as CloudletApi & ProvisioningApi;
  const peerRoutes = v1Face(nothing, nothing, {} as TrustView, {} as FleetView)
    .routes.filter((r) => r.peers)
    .map((r) => `${r.method} ${r.path}`);
  tt.same(peerRoutes.sort(), ['DELETE /v1/handoffs/:id', 'GET /v1/placement', 'POST /v1/handoffs', 'POST /v1/handoffs/:id/complete']);
});
