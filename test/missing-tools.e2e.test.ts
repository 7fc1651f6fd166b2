// A tool the agent runs that is not installed is a typed error for the request that needed it, never the end of the
// agent: every child process the agent spawns has an 'error' listener. Here zstd is missing from the agent's PATH
// while it imports a zstd-compressed app package.
import { mkdir, mkdtemp, readdir, rm, symlink } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { AgentProcess } from './support/agent';
import { buildHttpdPackage } from './support/app-package';

/** A directory of links to every program on this PATH but `missing`: a PATH on which it is not installed. */
async function pathWithout(missing: string, dir: string): Promise<string> {
  await mkdir(dir);
  const linked = new Set<string>([missing]);
  for (const bin of (process.env.PATH ?? '').split(':').filter(Boolean)) {
    for (const name of await readdir(bin).catch(() => [] as string[])) {
      if (linked.has(name)) continue;
      linked.add(name);
      await symlink(path.join(bin, name), path.join(dir, name));
    }
  }
  return dir;
}

t.test('without zstd installed, importing a zstd package is IMAGE_TOOL_FAILED and the agent keeps serving', async (t) => {
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-missing-tool-'));
  t.teardown(() => rm(scratch, { recursive: true, force: true }));
  const tarball = await buildHttpdPackage(scratch, { appId: 'org.test.zstd-app', hostSecret: '/nonexistent', zstd: true });
  const agent = await AgentProcess.start({ portRange: '22980-22989', env: { PATH: await pathWithout('zstd', path.join(scratch, 'bin')) } });
  t.teardown(() => agent.dispose());

  const imported = await agent.post('/v1/packages', { path: tarball });
  t.equal(imported.status, 500, imported.body);
  t.equal(imported.json?.code, 'IMAGE_TOOL_FAILED');
  t.match(imported.json?.message, /zstd not found: install the Debian package zstd/);
  t.equal(agent.pid !== undefined && (await agent.get('/v1/health')).status, 200, 'the agent still serves');
  t.same((await agent.get('/v1/packages')).json.packages, [], 'nothing was imported');
  t.same(await readdir(path.join(agent.dataDir, 'tmp')), [], 'and no staging is left');
});
