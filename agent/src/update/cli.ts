#!/usr/bin/env node
/**
 * cloudlet-update: field updates of the agent on an appliance (see updater.ts and docs/appliance.md).
 *
 *   cloudlet-update FILE        install a signed bundle, switch to it, keep it if healthy, else roll back
 *   cloudlet-update --recover   (the unit's ExecStartPre) roll back an update interrupted before it was confirmed
 *   cloudlet-update --status    print the last update's record
 *
 * Exit status: 0 done (or nothing to do), 1 refused or rolled back (the box runs the old release), 2 usage,
 * 3 the rollback failed too (the box needs attention). The last line on stderr names the error code.
 */
import { execFile } from 'node:child_process';
import { parseArgs } from 'node:util';
import { loadConfig } from '../config';
import { asCloudletError } from '../errors';
import { createLogger } from '../log';
import { agentUrl } from '../system/agent-probe';
import { restartUnit } from '../system/systemd';
import { loadTrustedKeys } from './bundle';
import { ReleaseStore } from './releases';
import { applyUpdate, recoverInterruptedUpdate } from './updater';

const UNIT = 'cloudlet-agent.service';
const USAGE =
  'usage: cloudlet-update FILE | --recover | --status  [--home DIR] [--factory DIR] [--keys DIR] [--api URL]\n' +
  '                [--deadline SECONDS] [--stable SECONDS] [--restart-command SHELL_COMMAND]';

async function main(): Promise<number> {
  const log = createLogger('cloudlet-update');
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      recover: { type: 'boolean', default: false },
      status: { type: 'boolean', default: false },
      home: { type: 'string', default: '/var/lib/cloudlet-agent' },
      factory: { type: 'string', default: '/usr/lib/cloudlet-agent/release' },
      keys: { type: 'string', default: '/etc/cloudlet/update-keys' },
      api: { type: 'string' },
      deadline: { type: 'string', default: '120' },
      stable: { type: 'string', default: '10' },
      'restart-command': { type: 'string' },
    },
  });
  const store = new ReleaseStore(values.home, values.factory);
  if (values.recover) {
    await recoverInterruptedUpdate(store, log);
    return 0;
  }
  if (values.status) {
    process.stdout.write(JSON.stringify({ current: await store.current(), last: await store.record() }, null, 2) + '\n');
    return 0;
  }
  const deadline = Number(values.deadline);
  const stable = Number(values.stable);
  if (positionals.length !== 1 || !(deadline > 0) || !(stable >= 0)) {
    process.stderr.write(`${USAGE}\n`);
    return 2;
  }
  const restartCommand = values['restart-command'];
  const record = await applyUpdate({
    bundleFile: positionals[0]!,
    store,
    trustedKeys: await loadTrustedKeys(values.keys),
    // The agent's own configuration says where its API listens.
    agentUrl: values.api ?? (await loadConfig().then((config) => agentUrl(config.api.host, config.api.port))),
    restartAgent: restartCommand ? () => runShell(restartCommand) : () => restartUnit(UNIT),
    deadlineMs: deadline * 1000,
    stableMs: stable * 1000,
    log,
  });
  process.stdout.write(`${record.state} ${record.version}\n`);
  return 0;
}

function runShell(command: string): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('sh', ['-c', command], (err, _stdout, stderr) => (err ? reject(new Error(`${command}: ${stderr.trim() || err.message}`)) : resolve()));
  });
}

main().then(
  (status) => process.exit(status),
  (err: unknown) => {
    const error = asCloudletError(err);
    process.stderr.write(`cloudlet-update: ${error.code}: ${error.message}\n`);
    process.exit(error.code === 'ROLLBACK_FAILED' ? 3 : 1);
  },
);
