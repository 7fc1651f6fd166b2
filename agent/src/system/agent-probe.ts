/**
 * Asks a running agent, over its own HTTP API, whether it is healthy and which version it is. Used for systemd
 * readiness (the agent probes itself: "ready" means the API really answers) and by the updater (is the new release
 * the one serving, and is it healthy).
 */
import { setTimeout as sleep } from 'node:timers/promises';

const PROBE_TIMEOUT_MS = 2000;
const POLL_INTERVAL_MS = 250;

export interface AgentStatus {
  healthy: boolean;
  /** agent_version from /v1/system; null when the agent did not answer. */
  version: string | null;
  /** Why it is not healthy: the failing checks, or the connection error. */
  problem: string | null;
}

/** The API's base URL for a listen address: a wildcard address is probed on loopback. */
export function agentUrl(host: string, port: number): string {
  const address = host === '0.0.0.0' || host === '' ? '127.0.0.1' : host === '::' ? '[::1]' : host.includes(':') ? `[${host}]` : host;
  return `http://${address}:${port}`;
}

export async function probeAgent(baseUrl: string): Promise<AgentStatus> {
  try {
    const health = (await getJson(`${baseUrl}/v1/health`)) as { ok?: boolean; checks?: { name: string; ok: boolean; optional?: boolean; detail?: string }[] };
    const system = (await getJson(`${baseUrl}/v1/system`)) as { agent_version?: string };
    const failing = (health.checks ?? []).filter((c) => !c.ok && !c.optional).map((c) => `${c.name}${c.detail ? ` (${c.detail})` : ''}`);
    return {
      healthy: health.ok === true,
      version: system.agent_version ?? null,
      problem: health.ok === true ? null : `failing ${failing.join(', ') || 'health'}`,
    };
  } catch (err) {
    return { healthy: false, version: null, problem: `no answer: ${(err as Error).message}` };
  }
}

/**
 * Polls until the agent at baseUrl is healthy, reports `version` (any version when null), and has stayed so for
 * `stableMs` (an agent that answers once and then crashes is not healthy). Returns the last problem seen on timeout.
 */
export async function waitUntilHealthy(
  baseUrl: string,
  opts: { version: string | null; deadlineMs: number; stableMs: number },
): Promise<{ ok: true } | { ok: false; problem: string }> {
  const deadline = Date.now() + opts.deadlineMs;
  let healthySince: number | null = null;
  let problem = 'not probed yet';
  while (Date.now() < deadline) {
    const status = await probeAgent(baseUrl);
    const rightVersion = opts.version === null || status.version === opts.version;
    if (status.healthy && rightVersion) {
      healthySince ??= Date.now();
      if (Date.now() - healthySince >= opts.stableMs) return { ok: true };
    } else {
      healthySince = null;
      problem = status.problem ?? `version ${status.version} is serving, not ${opts.version}`;
    }
    await sleep(POLL_INTERVAL_MS);
  }
  return { ok: false, problem };
}

async function getJson(url: string): Promise<unknown> {
  const res = await fetch(url, { signal: AbortSignal.timeout(PROBE_TIMEOUT_MS) });
  const body = await res.json();
  // /v1/health answers 503 with the same body when a check fails: that is an answer, not an error.
  if (!res.ok && res.status !== 503) throw new Error(`${url} answered ${res.status}`);
  return body;
}
