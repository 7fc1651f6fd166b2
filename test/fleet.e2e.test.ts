// A fleet, end to end: three whole cloudlets side by side (each in its own network, mount and UTS namespaces, with
// its own libvirtd, D-Bus, Avahi and agent: support/fleet.ts) on a test bridge, and a phone on that bridge. The
// subtests run in order; the last one tears the fleet down and checks nothing is left.
import t from 'tap';
import net from 'node:net';
import { testGuestDir } from './support/agent';
import { API_PORT, type CloudletBox } from './support/cloudlet-box';
import { cli } from './support/cli';
import { Fleet, type Phone } from './support/fleet';

const NAMES = ['cloudlet-a', 'cloudlet-b', 'cloudlet-c'];
const SERVICE = 'org.cloudlet.demo.http';
const GUEST_CONTENT = /hello from the cloudlet demo service/;

let fleet: Fleet;
let phone: Phone;

t.before(async () => {
  fleet = await Fleet.start({ cloudlets: NAMES });
  phone = await fleet.addPhone();
});
t.teardown(async () => {
  await fleet?.stop();
});

/** The operator at a cloudlet's own console: the CLI on the box, aimed at its agent on loopback. */
function operatorCli(box: CloudletBox, ...args: string[]) {
  return cli([...args, '--cloudlet', `127.0.0.1:${API_PORT}`, '--json'], {
    via: box.enter(),
    env: { CLOUDLET_DATA_DIR: box.dataDir, CLOUDLET_PORT: String(API_PORT) },
  });
}

/** Whether anything in the test's own (root) namespace accepts a connection on 127.0.0.1:port. */
function rootListens(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

t.test('discovery from the phone finds all three cloudlets, each with its own name, address and KD TXT, and ranks them', async (tt) => {
  const r = await phone.cli('discover', '--interface', phone.address, '--timeout', '2000', '--json');
  tt.equal(r.code, 0, r.stderr);
  const found = r.json.cloudlets as Array<{ name: string; host: string; address: string; port: number; encryption: string; rank: number; eligible: boolean }>;
  tt.same(found.map((c) => c.name).sort(), NAMES, 'three cloudlets, by their own host names: no "#2" renaming');
  for (const box of fleet.cloudlets) {
    tt.match(
      found.find((c) => c.name === box.name),
      { host: `${box.name}.local`, address: box.address, port: API_PORT, encryption: 'disabled', eligible: true },
      `${box.name} is reached at its own address on the bridge`,
    );
  }
  const ranks = found.map((c) => c.rank);
  tt.same(
    ranks,
    [...ranks].sort((a, b) => b - a),
    'best-ranked first',
  );
});

t.test('a phone starts a service on the best-ranked cloudlet and reaches the Service VM at the address and port returned', async (tt) => {
  for (const box of fleet.cloudlets) {
    const imported = await box.operator('POST', '/v1/services', { path: testGuestDir() });
    tt.equal(imported.status, 201, `${box.name} has the service`);
  }
  const discovered = await phone.cli('discover', '--interface', phone.address, '--timeout', '2000', '--json');
  const best = fleet.cloudlet(discovered.json.cloudlets[0].name);

  // A verb that acts only goes to a cloudlet the phone paired with: the operator of the best one reads out a code.
  const window = await operatorCli(best, 'pair', 'open');
  tt.equal(window.code, 0, window.stderr);
  const paired = await phone.cli('pair', window.json.code, '--cloudlet', `${best.address}:${API_PORT}`, '--name', 'phone', '--json');
  tt.equal(paired.code, 0, paired.stderr);

  // No --cloudlet: the CLI discovers, ranks, and takes the best-ranked cloudlet it paired with, as an app would.
  const started = await phone.cli('start', SERVICE, '--interface', phone.address, '--timeout', '2000', '--json');
  tt.equal(started.code, 0, started.stderr);
  const { address, port } = started.json.endpoint as { address: string; port: number };
  tt.equal(address, best.address, "the endpoint is the cloudlet's address on the phone's network");
  const page = await phone.http('GET', `http://${address}:${port}/`);
  tt.equal(page.status, 200);
  tt.match(page.body, GUEST_CONTENT, 'the phone reaches its Service VM there');
  tt.notOk(await rootListens(port), "the forward lives in the cloudlet's namespace, not in the machine's");
  tt.equal((await best.domains()).length, 1, "the VM runs under the cloudlet's own libvirtd");
  for (const other of fleet.cloudlets.filter((c) => c !== best)) tt.same(await other.domains(), [], `${other.name} runs no VM`);

  const stopped = await phone.cli('stop', started.json.instance.id, '--interface', phone.address, '--timeout', '2000', '--json');
  tt.equal(stopped.code, 0, stopped.stderr);
  tt.same(await best.domains(), [], 'stopping it leaves no domain');
});

t.test('tear-down leaves no namespace, process, domain or file', async (tt) => {
  await fleet.stop();
  tt.same(await fleet.leftovers(), []);
});
