// The `cloudlet` CLI against a rogue cloudlet named on its command line (test/support/rogue-cloudlet.ts, on loopback):
// whatever the server answers, the CLI writes only plain file names where the user asked, sends the operator's
// token only to the agent its configuration names, prints server strings escaped, and reads answers with a size cap.
// (test/cli-rogue-discovery.test.ts has the same rogue found by mDNS.)
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { ROOT } from './support/agent';
import { cli, type CliResult } from './support/cli';
import { HOSTILE, PAYLOAD, ROGUE_APPS, startRogueCloudlet, type RogueCloudlet } from './support/rogue-cloudlet';

const ADMIN_TOKEN = 'cla_the-operators-own-token';
/** Raw control characters a terminal acts on: ESC, BEL, 8-bit CSI, the right-to-left override. */
const RAW_CONTROL = /[\x1b\x07\x9b\u202e]/;

let rogue: RogueCloudlet;
let scratch = '';
let env: Record<string, string> = {};

t.before(async () => {
  rogue = await startRogueCloudlet();
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-cli-trust-'));
  // The CLI runs as the operator of a box whose agent listens elsewhere: it can read the admin token.
  await mkdir(path.join(scratch, 'data', 'trust'), { recursive: true });
  await writeFile(path.join(scratch, 'data', 'trust', 'admin-token'), `${ADMIN_TOKEN}\n`);
  env = {
    CLOUDLET_DATA_DIR: path.join(scratch, 'data'),
    CLOUDLET_PORT: '9999',
    XDG_CONFIG_HOME: path.join(scratch, 'config'),
    CLOUDLET_CONFIG: path.join(ROOT, 'test', 'support', 'no-config.json'),
  };
});

t.teardown(async () => {
  await rogue.close();
  await rm(scratch, { recursive: true, force: true });
});

const atRogue = (...args: string[]) => [...args, '--cloudlet', `127.0.0.1:${rogue.port}`];
const run = (args: string[], options: { cwd?: string; env?: Record<string, string> } = {}): Promise<CliResult> =>
  cli(args, { cwd: options.cwd ?? scratch, env: { ...env, ...options.env } });

t.test('download writes only a plain file name the cloudlet proposes, in the current directory', async (tt) => {
  const cwd = path.join(scratch, 'downloads', 'here');
  await mkdir(path.join(cwd, 'sub'), { recursive: true });
  await writeFile(ROGUE_APPS.absolute!, "the user's own file\n");
  tt.teardown(() => rm(ROGUE_APPS.absolute!, { force: true }));
  for (const id of ['absolute', 'dotdot', 'slash', 'dotfile']) {
    const r = await run(atRogue('download', id, '--json'), { cwd });
    tt.equal(r.code, 1, `${id} (${ROGUE_APPS[id]}): refused`);
    tt.equal(r.json?.error.code, 'UNSAFE_FILE_NAME', id);
    tt.equal(r.stderr.trim().split('\n').length, 1, 'one line on stderr');
  }
  tt.equal(await readFile(ROGUE_APPS.absolute!, 'utf8'), "the user's own file\n", 'an absolute path is not overwritten');
  tt.same(await readdir(path.dirname(cwd)), ['here'], 'nothing written next to the current directory (../)');
  tt.same((await readdir(cwd)).sort(), ['sub'], 'no dotfile, no .part, nothing in sub/');
  tt.same(await readdir(path.join(cwd, 'sub')), []);

  const plain = await run(atRogue('download', 'plain', '--json'), { cwd });
  tt.equal(plain.code, 0, plain.stderr);
  tt.same(await readFile(path.join(cwd, 'plain.apk')), PAYLOAD, 'a plain name is saved in the current directory');
  const chosen = await run(atRogue('download', 'dotdot', '-o', path.join(cwd, 'chosen.apk')), { cwd });
  tt.equal(chosen.code, 0, `a name the user chose with -o is theirs to choose: ${chosen.stderr}`);
});

t.test('base export writes only plain file names from the cloudlet, inside OUT_DIR', async (tt) => {
  const parent = path.join(scratch, 'exports');
  await mkdir(parent);
  for (const base of ['escaping', 'absolute', 'hidden', 'manifest-clash']) {
    const out = path.join(parent, base, 'out');
    const r = await run(atRogue('base', 'export', base, out, '--json'));
    tt.equal(r.code, 1, `${base}: refused`);
    tt.equal(r.json?.error.code, 'UNSAFE_FILE_NAME', base);
    tt.notOk(await stat(path.join(parent, base)).catch(() => null), `${base}: every name checked before anything is written`);
  }
  tt.notOk(await stat('/tmp/cloudlet-rogue-base-file').catch(() => null), 'no absolute path written');
  const out = path.join(parent, 'plain');
  const r = await run(atRogue('base', 'export', 'plain', out, '--json'));
  tt.equal(r.code, 0, r.stderr);
  tt.same((await readdir(out)).sort(), ['chunk-index.bin', 'disk.qcow2', 'manifest.json']);
});

t.test("the admin token goes to a loopback cloudlet only on the port the agent's configuration names", async (tt) => {
  // A forwarded instance port, or another local user's listener, on loopback: no token, even named explicitly.
  rogue.requests.length = 0;
  const elsewhere = await run(atRogue('devices', 'revoke', 'phone-1', '--json'));
  tt.equal(elsewhere.code, 0, elsewhere.stderr);
  tt.same(
    rogue.requests.map((r) => [r.url, r.authorization]),
    [['/v1/devices/phone-1/revoke', undefined]],
    'the request carried no credential',
  );

  rogue.requests.length = 0;
  const own = await run(atRogue('devices', '--json'), { env: { CLOUDLET_PORT: String(rogue.port) } });
  tt.equal(own.code, 0, own.stderr);
  tt.equal(rogue.requests[0]?.authorization, `Bearer ${ADMIN_TOKEN}`, "the configured port is the operator's own agent");
});

t.test('strings from a cloudlet reach the terminal with their control characters escaped', async (tt) => {
  for (const verb of [['services'], ['system'], ['devices'], ['stop', 'i-1']]) {
    const r = await run(atRogue(...verb));
    tt.notMatch(r.stdout, RAW_CONTROL, `${verb[0]}: stdout`);
    tt.notMatch(r.stderr, RAW_CONTROL, `${verb[0]}: stderr`);
    tt.match(r.stdout + r.stderr, 'ok\\x1b]52;c;cm0gLXJmIH4K\\x07\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\u202eevil', `${verb[0]}: shown as escapes`);
  }
  const r = await run(atRogue('services', '--json'));
  tt.notMatch(r.stdout, RAW_CONTROL, '--json: no raw control character either');
  tt.equal(r.json.services[0].id, HOSTILE, '--json: a JSON reader still gets the exact string');
  const failed = await run(atRogue('stop', 'i-1', '--json'));
  tt.equal(failed.json.error.message, HOSTILE);
  tt.equal(failed.stderr.split('\n').length, 2, 'an error message stays one line');
});

t.test('an answer larger than the CLI reads is cut off with a clear error', async (tt) => {
  const r = await run(atRogue('instances', '--json'));
  tt.equal(r.code, 1);
  tt.equal(r.json.error.code, 'RESPONSE_TOO_LARGE');
  tt.match(r.stderr, /answered with more than \d+ bytes/);

  const cwd = path.join(scratch, 'oversized');
  await mkdir(cwd);
  const download = await run(atRogue('download', 'oversized', '--json'), { cwd });
  tt.equal(download.code, 1);
  tt.equal(download.json.error.code, 'RESPONSE_TOO_LARGE', 'a download longer than announced is cut off');
  tt.same(await readdir(cwd), [], 'and deleted');
});
