// The `cloudlet` CLI's verbs for the mechanisms, against the real agent over loopback, as the operator on the box
// runs them: services, Base VMs and recipes (On-Demand), app packages started in a real sandbox (Application
// Virtualization), health, and `cloudlet top` following a launch live, as plain lines in a pipe and as a screen
// redrawn in place on a terminal (a pty from script(1)) that q quits. Forward ports 27410-27429.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import { AgentProcess, agentDataDir, testGuestDir } from './support/agent';
import { buildHttpdPackage, destroySandboxesUnder, PAGE, tempDir } from './support/app-package';
import { CLI, cli } from './support/cli';
import { until } from './support/poll';

const SERVICE = 'org.cloudlet.demo.http';
const APP = 'org.test.cli-httpd';

let agent: AgentProcess;
let scratch = '';
let at: string[] = [];

t.before(async () => {
  scratch = await tempDir('cloudlet-cli-mechanisms-');
  agent = await AgentProcess.start({ portRange: '27410-27429' });
  at = ['--cloudlet', `127.0.0.1:${agent.apiPort}`];
});
t.teardown(async () => {
  await agent.stop();
  await destroySandboxesUnder(agent.dataDir);
  await agent.dispose();
  await rm(scratch, { recursive: true, force: true });
});

/** `cloudlet ...args` run in the background, as the operator on the box; what it printed so far, and how it ended. */
function background(args: string[], via: string[] = []) {
  const env = { ...process.env, CLOUDLET_DATA_DIR: agentDataDir(agent.apiPort)!, CLOUDLET_PORT: String(agent.apiPort) };
  const [command, ...argv] = via.length ? [...via] : [process.execPath, CLI, ...args];
  const child: ChildProcess = spawn(command!, argv, { env, stdio: ['pipe', 'pipe', 'pipe'] });
  const run = { child, stdout: '', stderr: '', exit: new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code))) };
  child.stdout!.on('data', (chunk: Buffer) => (run.stdout += chunk.toString('utf8')));
  child.stderr!.on('data', (chunk: Buffer) => (run.stderr += chunk.toString('utf8')));
  return run;
}

const printed = (run: { stdout: string }, pattern: RegExp) =>
  until(
    async () => run.stdout,
    (out) => pattern.test(out),
    60000,
  );

t.test('services: import, show, list and remove a Cached VM service; health', async (tt) => {
  const imported = await cli(['service', 'import', testGuestDir(), '--json', ...at]);
  tt.equal(imported.code, 0, imported.stderr);
  tt.equal(imported.json.id, SERVICE);
  const shown = await cli(['service', 'show', SERVICE, ...at]);
  tt.match(shown.stdout, new RegExp(`^${SERVICE.replaceAll('.', '\\.')} `), shown.stderr);
  tt.match((await cli(['services', ...at])).stdout, SERVICE);
  const health = await cli(['health', '--json', ...at]);
  tt.equal(health.code, 0, health.stderr);
  tt.match(health.json, { ok: true, checks: [{ name: 'libvirt', ok: true }] });
  const missing = await cli(['service', 'show', 'no.such.service', '--json', ...at]);
  tt.equal(missing.code, 3, 'not found: exit 3');
  tt.equal(missing.json.error.code, 'SERVICE_NOT_FOUND');
  tt.equal(missing.stderr.trim().split('\n').length, 1, 'one line on stderr');
  const noConsole = await cli(['console', 'no-such-instance', '--json', ...at]);
  tt.equal(noConsole.json?.error.code, 'INSTANCE_NOT_FOUND', noConsole.stderr);
  const removed = await cli(['service', 'remove', SERVICE, ...at]);
  tt.equal(removed.code, 0, removed.stderr);
  tt.equal((await cli(['services', '--json', ...at])).json.services.length, 0, 'gone from the catalog');
});

t.test('recipes: add from a file, list, show, remove; a bad recipe is refused with its code', async (tt) => {
  const base = await cli(['base', 'import', testGuestDir(), '--name', 'busybox', '--json', ...at]);
  tt.equal(base.code, 0, base.stderr);
  const file = path.join(scratch, 'hello.json');
  const recipe = { format: 1, service_id: 'org.test.hello', version: '1', base: 'busybox', port: 8080, script: '#!/bin/sh\necho hi\n', description: 'hello' };
  await writeFile(file, JSON.stringify(recipe));
  const added = await cli(['recipe', 'add', file, ...at]);
  tt.equal(added.code, 0, added.stderr);
  tt.match(added.stdout, /stored the recipe org\.test\.hello 1 \(on busybox\)/);
  const listed = await cli(['recipe', 'list', '--json', ...at]);
  tt.match(listed.json.recipes, [{ id: 'org.test.hello', base: 'busybox', port: 8080, cache: 'on-request' }]);
  const shown = await cli(['recipe', 'show', 'org.test.hello', '--json', ...at]);
  tt.equal(shown.json.recipe.script, recipe.script, 'the whole recipe');

  await writeFile(file, JSON.stringify({ ...recipe, base: 'no-such-base' }));
  const refused = await cli(['recipe', 'add', file, '--json', ...at]);
  tt.equal(refused.code, 3, 'an unknown base: not found');
  tt.equal(refused.json.error.code, 'BASE_NOT_FOUND');
  await writeFile(file, '{ not json');
  tt.equal((await cli(['recipe', 'add', file, '--json', ...at])).json.error.code, 'INVALID_RECIPE', 'not JSON: refused before sending');

  tt.equal((await cli(['recipe', 'remove', 'org.test.hello', ...at])).code, 0);
  const gone = await cli(['recipe', 'show', 'org.test.hello', '--json', ...at]);
  tt.equal(gone.code, 3);
  tt.equal(gone.json.error.code, 'RECIPE_NOT_FOUND');
  tt.equal((await cli(['recipe', 'frobnicate', 'x', ...at])).code, 2, 'an unknown action: usage');
});

t.test('app packages: upload, list, show, start in a sandbox while `top` follows it live, stop, remove', async (tt) => {
  const hostSecret = path.join(scratch, 'secret');
  await mkdir(path.dirname(hostSecret), { recursive: true });
  await writeFile(hostSecret, 'not for sandboxes\n');
  const tarball = await buildHttpdPackage(scratch, { appId: APP, hostSecret });

  const top = background(['top', ...at]);
  tt.teardown(() => top.child.kill('SIGKILL'));

  const uploaded = await cli(['package', 'upload', tarball, '--json', ...at]);
  tt.equal(uploaded.code, 0, uploaded.stderr);
  tt.match(uploaded.json, { id: APP, sha256: /^[0-9a-f]{64}$/ });
  tt.match((await cli(['package', 'list', '--json', ...at])).json.packages, [{ id: APP, manifest: { port: 8080 } }]);
  tt.match((await cli(['package', 'show', APP, ...at])).stdout, /port 8080, 32 MiB/);

  const started = await cli(['package', 'start', APP, '--json', ...at]);
  tt.equal(started.code, 0, started.stderr);
  tt.match(started.json, { instance: { mechanism: 'app-virt', state: 'ready' }, joined: false });
  const { id } = started.json.instance;
  const page = await fetch(`http://${started.json.endpoint.address}:${started.json.endpoint.port}/`).then((r) => r.text());
  tt.equal(page, PAGE, 'the endpoint serves the app');

  await printed(top, new RegExp(`ready +${id} ${APP.replaceAll('.', '\\.')} app-virt`));
  tt.match(top.stdout, new RegExp(`starting +${id} `), 'top showed it starting');
  tt.match(top.stdout, new RegExp(`progress +${id} .*% `), 'and its launch progress');

  tt.equal((await cli(['stop', id, ...at])).code, 0);
  await printed(top, new RegExp(`stopped +${id} .*\\(requested\\)`));
  top.child.kill('SIGINT');
  tt.equal(await top.exit, 0, 'Ctrl-C ends top cleanly');
  tt.equal(top.stderr, '', 'nothing on stderr');

  tt.equal((await cli(['package', 'remove', APP, ...at])).code, 0);
  tt.equal((await cli(['package', 'show', APP, '--json', ...at])).code, 3, 'gone');
});

t.test('top on a terminal draws one screen in place and q quits it, restoring the terminal', async (tt) => {
  // script(1) gives the CLI a pseudo-terminal; what it drew comes back on script's stdout.
  const command = [process.execPath, CLI, 'top', ...at].map((arg) => `'${arg}'`).join(' ');
  const top = background([], ['script', '-qfec', `stty cols 100 rows 20; exec ${command}`, '/dev/null']);
  tt.teardown(() => top.child.kill('SIGKILL'));
  await printed(top, /INSTANCE +SERVICE +MECHANISM +STATE +PORT +USERS +PROGRESS/);
  tt.match(top.stdout, /\x1b\[\?1049h/, 'on the alternate screen');
  tt.match(top.stdout, new RegExp(`cloudlet top +127\\.0\\.0\\.1:${agent.apiPort}`), 'which cloudlet');
  top.child.stdin!.write('q');
  tt.equal(await top.exit, 0, 'q quits');
  tt.match(top.stdout, /\x1b\[\?25h\x1b\[\?1049l/, 'the cursor and the screen are restored');
});

t.test('top without a credential the cloudlet accepts: one line, exit 1, the code', async (tt) => {
  const r = await cli(['top', '--json', ...at], { env: { CLOUDLET_DATA_DIR: scratch } });
  tt.equal(r.code, 1, r.stderr);
  tt.equal(r.json?.error.code, 'UNAUTHENTICATED');
  tt.equal(r.stderr.trim().split('\n').length, 1);
});
