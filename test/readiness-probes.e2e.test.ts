// Readiness probes end, through the real agent and a real sandbox: an app package whose readiness page answers 200 and
// then drips a byte a second without end, and asks for a 600 s readiness timeout, fails its start with
// READINESS_TIMEOUT once the agent's own bound (limits.readinessTimeoutMs) is over, and leaves nothing behind.
import { rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import { AgentProcess, type HttpResult } from './support/agent';
import { buildHttpdPackage, destroySandboxesUnder, sandboxesUnder, tempDir } from './support/app-package';

const READY_WITHIN_MS = 4000;
let agent: AgentProcess;

t.before(async () => {
  agent = await AgentProcess.start({ portRange: '23310-23329', env: { CLOUDLET_READINESS_TIMEOUT_MS: String(READY_WITHIN_MS) } });
});
t.teardown(async () => {
  if (!agent) return;
  await agent.stop();
  await destroySandboxesUnder(agent.dataDir);
  await agent.dispose();
});

/** The start's answer, or 'no answer' when the agent kept it waiting far beyond any deadline (a hang, made a failure). */
function answerOf(start: Promise<HttpResult>): Promise<HttpResult | 'no answer'> {
  let guard: NodeJS.Timeout | undefined;
  return Promise.race([
    start,
    new Promise<'no answer'>((resolve) => {
      guard = setTimeout(() => resolve('no answer'), 15 * READY_WITHIN_MS);
    }),
  ]).finally(() => clearTimeout(guard));
}

t.test("an app whose readiness page drips an endless body fails its start within the agent's bound, leaving nothing", async (tt) => {
  const scratch = await tempDir('cloudlet-drip-');
  tt.teardown(() => rm(scratch, { recursive: true, force: true }));
  const hostSecret = path.join(scratch, 'host-secret');
  await writeFile(hostSecret, 'unused\n');
  const tarball = await buildHttpdPackage(scratch, { appId: 'org.test.drip', hostSecret, readiness: 'http:/cgi-bin/drip', readinessTimeoutMs: 600000 });
  const imported = await agent.post('/v1/packages', { path: tarball });
  tt.equal(imported.status, 201, imported.body);

  const answer = await answerOf(agent.post('/v1/instances', { service_id: 'org.test.drip' }));
  tt.not(answer, 'no answer', 'the start is answered: neither the endless body nor the asked-for 600 s keep it');
  if (answer === 'no answer') return;
  tt.equal(answer.status, 504, answer.body);
  tt.match(answer.json, { code: 'READINESS_TIMEOUT' });
  const waited = Number(/within (\d+) ms/.exec(answer.json.message)?.[1]);
  tt.ok(waited <= READY_WITHIN_MS, `the wait was the agent's bound (${waited} ms left of it), not the package's 600 s`);
  tt.same((await agent.get('/v1/instances')).json.instances, [], 'no instance left');
  tt.same(await sandboxesUnder(agent.dataDir), [], 'no sandbox left');
});
