/** The verbs about cloudlets themselves: which ones the LAN offers (mDNS, ranked), and what one of them is. */
import type { DiscoveredCloudlet } from './discovery';
import { formatBytes } from './progress';
import type { Ranked } from './ranking';
import { shown, table } from './terminal';
import { CliError } from './errors';
import { listing, type Verb } from './verb';
import { discoverRanked } from './which-cloudlet';

export const discoverVerb: Verb = {
  summary: 'find cloudlets on the LAN (mDNS) and rank them as SEI client-lib does',
  usage: 'cloudlet discover [--interface ADDR] [--timeout MS]',
  optionHelp: ["Rank = 100 × max_cores − CPU usage from each one's /api/system; a rank ≤ 0 is never chosen."],
  run: async ({ values }) => {
    const ranked = await discoverRanked(values);
    const rows = ranked.map(rankedJson);
    return {
      json: { cloudlets: rows },
      text:
        rows.length === 0
          ? 'no cloudlet answered'
          : table(
              ['NAME', 'ADDRESS', 'RANK', 'ENCRYPTION'],
              rows.map((r) => [r.name, `${r.address}:${r.port}`, r.rank === null ? `unreachable (${r.error})` : String(r.rank), r.encryption ?? '-']),
            ),
    };
  },
};

export const systemVerb: Verb = {
  summary: 'show the cloudlet: host, CPU, memory, hypervisor, instances',
  usage: 'cloudlet system',
  run: async ({ cloudlet }) => {
    const client = await cloudlet();
    const info = await client.call<{
      hostname: string;
      agent_version: string;
      cpu: { cores: number; usage_percent: number };
      memory: { total_bytes: number; free_bytes: number };
      instances: number;
    }>('GET', '/v1/system');
    return {
      json: { cloudlet: client.label, ...info },
      text: [
        shown`${info.hostname} (${client.label}), agent ${info.agent_version}`,
        shown`cpu: ${info.cpu.cores} cores, ${info.cpu.usage_percent}% used`,
        shown`memory: ${formatBytes(info.memory.free_bytes)} free of ${formatBytes(info.memory.total_bytes)}`,
        shown`instances: ${info.instances}`,
      ].join('\n'),
    };
  },
};

export const healthVerb: Verb = {
  summary: "the cloudlet's health checks (libvirt, data directory, discovery...); exit 1 when it is unhealthy",
  usage: 'cloudlet health',
  run: async ({ cloudlet }) => {
    // 503 carries the same report: an unhealthy cloudlet is an answer, shown, not an error message.
    const { status, json } = await (
      await cloudlet()
    ).raw<{ ok: boolean; checks: Array<{ name: string; ok: boolean; optional?: boolean; detail?: string }> }>('GET', '/v1/health');
    if (!json || !Array.isArray(json.checks)) throw new CliError('BAD_ANSWER', `the cloudlet answered /v1/health with ${status} and no report`);
    const report = listing('checks', json.checks, ['CHECK', 'OK', 'DETAIL'], (c) => [
      c.name,
      c.ok ? 'ok' : c.optional ? 'off (optional)' : 'FAILED',
      c.detail ?? '',
    ]);
    const failed = json.checks.filter((c) => !c.ok && !c.optional).map((c) => `${c.name}${c.detail ? ` (${c.detail})` : ''}`);
    if (!json.ok) throw new CliError('UNHEALTHY', `the cloudlet is unhealthy: ${failed.join('; ') || 'no detail'}`);
    return { json, text: report.text };
  },
};

function rankedJson(r: Ranked<DiscoveredCloudlet>) {
  return {
    name: r.cloudlet.name,
    host: r.cloudlet.host,
    address: r.cloudlet.address,
    port: r.cloudlet.port,
    encryption: r.cloudlet.txt.encryption ?? null,
    rank: r.rank,
    eligible: r.eligible,
    ...(r.error ? { error: r.error } : {}),
  };
}
