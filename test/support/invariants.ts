// What must hold of an agent's data directory and host after any crash and restart (docs/reliability.md), checked in
// one place for every fault test: nothing orphaned (domain, clone, staging file, port, sandbox), nothing half-made
// listed, and every instance that was ready before the fault still listed and served.
import { readdir, readFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Test } from 'tap';
import { checkImage } from '../../agent/src/images/qemu-img';
import { type AgentProcess, domainsUnder, fetchText } from './agent';

/** An instance that was ready before the fault, and what its forwarded port answers. */
export interface ServedInstance {
  id: string;
  port: number;
  content: RegExp;
}

interface ListedInstance {
  id: string;
  state: string;
  mechanism: string;
  host_port: number;
}

const listedInstances = async (agent: AgentProcess): Promise<ListedInstance[]> => (await agent.get('/v1/instances')).json.instances;
const entries = (dir: string) => readdir(dir).catch(() => [] as string[]);

/** Waits until no instance is between states (an adopted launch finishing or being removed). */
export async function settled(agent: AgentProcess, timeoutMs = 90000): Promise<ListedInstance[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const instances = await listedInstances(agent);
    if (instances.every((i) => i.state === 'ready') || Date.now() > deadline) return instances;
    await sleep(200);
  }
}

/** Ids of the instances whose sandbox processes (pasta, bwrap and what runs in it) still run, from their command lines. */
export async function sandboxProcessesUnder(dataDir: string): Promise<Map<string, number[]>> {
  const marker = path.join(dataDir, 'instances') + path.sep;
  const found = new Map<string, number[]>();
  for (const pid of await entries('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    const at = cmdline.indexOf(marker);
    if (at < 0) continue;
    const id = cmdline.slice(at + marker.length).split(/[/\0]/)[0]!;
    found.set(id, [...(found.get(id) ?? []), Number(pid)]);
  }
  return found;
}

export function portIsFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/**
 * Every promise of docs/reliability.md's crash rows, as tap assertions under `what`. Waits first for adopted launches
 * to finish (or be removed), so it judges a settled agent.
 */
export async function assertRecovered(
  t: Test,
  agent: AgentProcess,
  what: string,
  opts: { portRange: [number, number]; served: ServedInstance[] },
): Promise<void> {
  const instances = await settled(agent);
  const dataDir = agent.dataDir;
  t.same(
    instances.filter((i) => i.state !== 'ready').map((i) => `${i.id} ${i.state}`),
    [],
    `${what}: every listed instance is ready`,
  );
  const listed = new Set(instances.map((i) => i.id));

  const domains = await domainsUnder(dataDir);
  const vmIds = instances.filter((i) => i.mechanism !== 'app-virt').map((i) => i.id);
  t.same([...domains].sort(), vmIds.sort(), `${what}: the domains of this data directory are exactly the listed VM instances`);
  t.same(
    (await entries(path.join(dataDir, 'instances'))).filter((e) => !listed.has(e)),
    [],
    `${what}: no instance directory (clone, config drive, state) without an instance`,
  );
  t.same(await entries(path.join(dataDir, 'tmp')), [], `${what}: nothing in the staging area`);

  const sandboxes = await sandboxProcessesUnder(dataDir);
  t.same(
    [...sandboxes.keys()].filter((id) => !listed.has(id)),
    [],
    `${what}: no sandbox process without an instance`,
  );

  const servicesDir = path.join(dataDir, 'services');
  const services: Array<{ id: string; dir: string; manifest: { disk: string; state: string | null } }> = (await agent.get('/v1/services')).json.services;
  t.same((await entries(servicesDir)).sort(), services.map((s) => s.id).sort(), `${what}: every service directory is a listed service`);
  for (const service of services) {
    await checkImage(path.join(service.dir, service.manifest.disk), 'qcow2').then(
      () => t.pass(`${what}: ${service.id}'s disk verifies`),
      (err: Error) => t.fail(`${what}: ${service.id}'s disk does not verify: ${err.message}`),
    );
    const files = await entries(service.dir);
    const named = [service.manifest.disk, service.manifest.state].filter(Boolean) as string[];
    t.same(
      named.filter((f) => !files.includes(f)),
      [],
      `${what}: ${service.id} has every file its manifest names`,
    );
  }
  const packages: Array<{ sha256: string }> = (await agent.get('/v1/packages')).json.packages;
  t.same((await entries(path.join(dataDir, 'packages'))).sort(), packages.map((p) => p.sha256).sort(), `${what}: every package directory is a listed package`);
  const bases: Array<{ digest: string }> = (await agent.get('/v1/bases')).json.bases;
  t.same((await entries(path.join(dataDir, 'bases'))).sort(), bases.map((b) => b.digest).sort(), `${what}: every base directory is a listed base`);
  const apps: Array<{ id: string }> = (await agent.get('/v1/apps')).json.apps;
  t.same((await entries(path.join(dataDir, 'apps'))).sort(), apps.map((a) => a.id).sort(), `${what}: every app directory is a listed app`);

  const held = new Set(instances.map((i) => i.host_port));
  const leaked: number[] = [];
  for (let port = opts.portRange[0]; port <= opts.portRange[1]; port++) {
    if (!held.has(port) && !(await portIsFree(port))) leaked.push(port);
  }
  t.same(leaked, [], `${what}: every forward port but the ready instances' is free`);

  for (const before of opts.served) {
    t.ok(listed.has(before.id), `${what}: ${before.id}, ready before the fault, is still listed`);
    t.match(await fetchText(before.port).catch((err: Error) => err.message), before.content, `${what}: ${before.id} still answers on port ${before.port}`);
  }
}
