// manifest.json of a cached service: what is accepted, what is refused, and how refusals name the field.
import t from 'tap';
import { manifestFiles, parseManifest } from '../agent/src/core/manifest';

const VALID = {
  format: 1,
  service_id: 'org.example.face',
  version: '2',
  description: 'Face recognition',
  tags: ['vision'],
  port: 9000,
  memory_mib: 512,
  vcpus: 2,
  shareable: true,
  readiness: { type: 'http', path: '/health', timeout_ms: 30000 },
  disk: 'disk.qcow2',
  state: 'state.sav',
  boot: { kernel: 'vmlinuz', initrd: 'initrd.img', cmdline: 'console=ttyS0' },
};

t.test('a complete manifest is accepted as written', async (t) => {
  t.same(parseManifest(VALID), VALID);
  t.same(manifestFiles(parseManifest(VALID)), ['disk.qcow2', 'state.sav', 'vmlinuz', 'initrd.img']);
});

t.test('optional fields get safe defaults', async (t) => {
  const m = parseManifest({ format: 1, service_id: 'min', version: '1', port: 80, memory_mib: 64, disk: 'd.qcow2' });
  t.same(m.tags, []);
  t.equal(m.description, '');
  t.equal(m.vcpus, 1);
  t.equal(m.shareable, false, 'sharing is opt-in');
  t.same(m.readiness, { type: 'tcp', timeout_ms: 60000 });
  t.equal(m.state, null);
  t.equal(m.boot, null);
});

t.test('each kind of bad manifest is refused with INVALID_MANIFEST naming the field', async (t) => {
  const cases: Array<[string, unknown, string]> = [
    ['not an object', [], ''],
    ['wrong format', { ...VALID, format: 2 }, 'format'],
    ['missing service_id', { ...VALID, service_id: undefined }, 'service_id'],
    ['service_id with a slash', { ...VALID, service_id: 'a/b' }, 'service_id'],
    ['service_id starting with a dot', { ...VALID, service_id: '..x' }, 'service_id'],
    ['port out of range', { ...VALID, port: 0 }, 'port'],
    ['port not an integer', { ...VALID, port: '80' }, 'port'],
    ['too little memory', { ...VALID, memory_mib: 1 }, 'memory_mib'],
    ['too many vcpus', { ...VALID, vcpus: 1000 }, 'vcpus'],
    ['tags not strings', { ...VALID, tags: [1] }, 'tags'],
    ['shareable not boolean', { ...VALID, shareable: 'yes' }, 'shareable'],
    ['unknown probe type', { ...VALID, readiness: { type: 'icmp' } }, 'readiness.type'],
    ['probe path not absolute', { ...VALID, readiness: { type: 'http', path: 'health' } }, 'readiness.path'],
    ['probe timeout too short', { ...VALID, readiness: { type: 'tcp', timeout_ms: 10 } }, 'readiness.timeout_ms'],
    ['disk outside the directory', { ...VALID, disk: '../disk.qcow2' }, 'disk'],
    ['disk as an absolute path', { ...VALID, disk: '/etc/passwd' }, 'disk'],
    ['state in a subdirectory', { ...VALID, state: 'x/state.sav' }, 'state'],
    ['kernel missing from boot', { ...VALID, boot: { initrd: 'i' } }, 'boot.kernel'],
    ['multi-line cmdline', { ...VALID, boot: { kernel: 'k', cmdline: 'a\nb' } }, 'boot.cmdline'],
  ];
  for (const [name, manifest, field] of cases) {
    t.throws(() => parseManifest(manifest), { code: 'INVALID_MANIFEST', status: 422, message: new RegExp(field.replace('.', '\\.')) }, name);
  }
});
