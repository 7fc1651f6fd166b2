// `cloudlet` with no --cloudlet, on a LAN where a rogue advertises itself over mDNS: ranking is not trust. Network
// namespaces this test creates (as test/cli-discovery.test.ts does): the "lan" one runs the DNS-SD responders, the
// "phone" one runs the CLI and the rogue cloudlet (test/support/rogue-cloudlet.ts) on its own loopback, the way every
// forwarded instance port on a cloudlet is a loopback listener. The rogue claims 9999 idle cores, so it ranks first.
import { spawn, type ChildProcess } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { ROOT } from './support/agent';
import { cli, type CliResult } from './support/cli';
import { deleteNamespaces, joinNamespaces, type NamespaceSide } from './support/netns-pair';
import type { RogueRequest } from './support/rogue-cloudlet';
import { selfSignedCertificate } from './support/self-signed';

const RESPONDER = path.join(ROOT, 'dist', 'test', 'support', 'mdns-responder.js');
const ROGUE = path.join(ROOT, 'dist', 'test', 'support', 'rogue-cloudlet.js');
const LAN_NS = `clt-lan-${process.pid}`;
const PHONE_NS = `clt-phone-${process.pid}`;
const LAN_IP = '10.77.8.1';
const PHONE_IP = '10.77.8.2';
const LAN_SIDE: NamespaceSide = { namespace: LAN_NS, link: 'cltl', address: LAN_IP };
const PHONE_SIDE: NamespaceSide = { namespace: PHONE_NS, link: 'cltp', address: PHONE_IP };
// The namespaces are ours: the ports KD clients and the HTTPS listener use are free there.
const ROGUE_PORT = 9999;
const ROGUE_TLS_PORT = 9443;
const ADMIN_TOKEN = 'cla_the-operators-own-token';
const ROGUE_NAME = 'rogue\x1b]0;owned\x07';
const RAW_CONTROL = /[\x1b\x07]/;

const children: ChildProcess[] = [];
const requests: RogueRequest[] = [];
let scratch = '';
let env: Record<string, string> = {};

/** Starts a process in a namespace and resolves once it prints `ready`; each later stdout line goes to `onLine`. */
function startIn(ns: string, argv: string[], onLine: (line: string) => void = () => {}): Promise<ChildProcess> {
  const child = spawn('nsenter', [`--net=/run/netns/${ns}`, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let output = '';
  let ready = false;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${argv.join(' ')} not ready after 20 s: ${output}`)), 20000);
    child.stdout.on('data', (chunk: Buffer) => {
      output += chunk.toString();
      let newline: number;
      while ((newline = output.indexOf('\n')) >= 0) {
        const line = output.slice(0, newline);
        output = output.slice(newline + 1);
        if (ready) onLine(line);
        else if (line === 'ready') {
          ready = true;
          clearTimeout(timer);
          resolve(child);
        }
      }
    });
    child.stderr.on('data', (chunk: Buffer) => {
      output += chunk.toString();
    });
    child.on('exit', (code) => reject(new Error(`${argv.join(' ')} exited with ${code}: ${output}`)));
  });
}

/** The CLI on the phone, discovering on its LAN interface, as an operator who can read the box's admin token. */
function phoneCli(args: string[], extraEnv: Record<string, string> = {}): Promise<CliResult> {
  return cli([...args, '--interface', PHONE_IP, '--timeout', '1000'], {
    via: ['nsenter', `--net=/run/netns/${PHONE_NS}`],
    cwd: scratch,
    env: { ...env, ...extraEnv },
  });
}

t.before(async () => {
  await joinNamespaces(LAN_SIDE, PHONE_SIDE);
  scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-rogue-discovery-'));
  await mkdir(path.join(scratch, 'data', 'trust'), { recursive: true });
  await writeFile(path.join(scratch, 'data', 'trust', 'admin-token'), `${ADMIN_TOKEN}\n`);
  // The CLI could be the operator's: the admin token is readable, and the agent's configured port is the rogue's.
  env = {
    CLOUDLET_DATA_DIR: path.join(scratch, 'data'),
    CLOUDLET_PORT: String(ROGUE_PORT),
    XDG_CONFIG_HOME: path.join(scratch, 'config'),
    CLOUDLET_CONFIG: path.join(ROOT, 'test', 'support', 'no-config.json'),
  };
  const key = path.join(scratch, 'key.pem');
  const cert = path.join(scratch, 'cert.pem');
  await selfSignedCertificate('paired', key, cert);
  await startIn(PHONE_NS, [process.execPath, ROGUE, String(ROGUE_PORT), String(ROGUE_TLS_PORT), cert, key], (line) =>
    requests.push(JSON.parse(line) as RogueRequest),
  );
  // The rogue advertises an address on the phone's own loopback.
  await startIn(LAN_NS, [process.execPath, RESPONDER, LAN_IP, ROGUE_NAME, 'rogue.local', '127.0.0.1', String(ROGUE_PORT)]);
});

t.teardown(async () => {
  for (const child of children) if (child.exitCode === null) child.kill('SIGTERM');
  await Promise.all(children.filter((child) => child.exitCode === null).map((child) => new Promise((r) => child.once('exit', r))));
  await deleteNamespaces(PHONE_SIDE, LAN_SIDE);
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

/** The /v1 requests the rogue got (ranking asks /api/system of every cloudlet discovered, which is no credential). */
const v1Requests = () => requests.filter((r) => r.url.startsWith('/v1/'));

t.test("discover shows mDNS names and a discovered cloudlet's answers with control characters escaped", async (tt) => {
  const r = await phoneCli(['discover']);
  tt.equal(r.code, 0, r.stderr);
  tt.notMatch(r.stdout, RAW_CONTROL);
  tt.match(r.stdout, 'rogue\\x1b]0;owned\\x07');
  const json = await phoneCli(['discover', '--json']);
  tt.equal(json.json.cloudlets[0].name, ROGUE_NAME, '--json keeps the exact name');
});

t.test("a discovered cloudlet on loopback never gets the admin token, even on the agent's configured port", async (tt) => {
  requests.length = 0;
  const r = await phoneCli(['services', '--json']);
  tt.equal(r.code, 0, `a read-only verb may use the best-ranked cloudlet: ${r.stderr}`);
  tt.same(
    v1Requests().map((q) => [q.method, q.url, q.authorization]),
    [['GET', '/v1/services', undefined]],
    'asked without a credential',
  );
});

t.test('verbs that act refuse a cloudlet that was only discovered, with one line and exit 2', async (tt) => {
  const overlay = path.join(scratch, 'overlay.bin');
  await writeFile(overlay, 'an overlay');
  requests.length = 0;
  for (const verb of [
    ['start', 'svc'],
    ['stop', 'i-1'],
    ['synthesize', overlay],
    ['add-app', overlay, '--service', 'svc', '--name', 'App'],
    ['remove-app', 'app-1'],
    ['pair', 'open'],
    ['devices'],
    ['devices', 'revoke', 'phone-1'],
    ['base', 'import', scratch, '--name', 'b'],
  ]) {
    const r = await phoneCli([...verb, '--json']);
    tt.equal(r.code, 2, `${verb.join(' ')}: exit 2`);
    tt.equal(r.json?.error.code, 'UNTRUSTED_CLOUDLET', verb.join(' '));
    tt.equal(r.stderr.trim().split('\n').length, 1, 'one line');
    tt.match(r.stderr, /--cloudlet HOST\[:PORT\] or pair with it first/);
  }
  tt.same(v1Requests(), [], 'the rogue got no request that acts, and no credential');
});

t.test('a verb that acts goes to the discovered cloudlet this machine paired with, over HTTPS to the pinned certificate', async (tt) => {
  // A second cloudlet on the LAN, paired earlier: its certificate and device token are in credentials.json.
  const pem = await readFile(path.join(scratch, 'cert.pem'), 'utf8');
  await mkdir(path.join(scratch, 'config', 'cloudlet'), { recursive: true });
  await writeFile(
    path.join(scratch, 'config', 'cloudlet', 'credentials.json'),
    JSON.stringify({
      [`${PHONE_IP}:${ROGUE_PORT}`]: {
        device_id: 'this-laptop',
        token: 'cld_device-token',
        tls_port: ROGUE_TLS_PORT,
        tls_fingerprint: new X509Certificate(pem).fingerprint256,
        certificate: pem,
        paired_at: new Date().toISOString(),
      },
    }),
    { mode: 0o600 },
  );
  const responder = await startIn(LAN_NS, [process.execPath, RESPONDER, LAN_IP, 'paired', 'paired.local', PHONE_IP, String(ROGUE_PORT)]);
  tt.teardown(async () => {
    responder.kill('SIGTERM');
    await rm(path.join(scratch, 'config'), { recursive: true, force: true });
  });
  requests.length = 0;
  const r = await phoneCli(['start', 'svc', '--json']);
  tt.equal(r.code, 0, r.stderr);
  tt.same(
    v1Requests().map((q) => [q.method, q.url, q.authorization, q.secure]),
    [['POST', '/v1/instances', 'Bearer cld_device-token', true]],
    'only to the paired one, with its device token, over HTTPS',
  );
});
