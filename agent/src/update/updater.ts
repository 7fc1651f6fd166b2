/**
 * Field updates of the agent, Mender's install → verify → commit/rollback cycle at the agent level:
 *
 *   install   check the bundle's signature, unpack it next to the running release (nothing running changes yet)
 *   switch    record "verifying", point `current` at it, restart the agent
 *   verify    the new agent must report healthy, as the bundle's version, for a settling time within a deadline
 *   commit    record "committed", delete releases older than the previous one
 *   rollback  otherwise: point `current` back, restart, wait for the old agent to be healthy, delete the bad release
 *
 * A bad bundle (unsigned, corrupt) is refused before anything is switched. If the updater itself dies while
 * verifying (power cut, kill), `recoverInterruptedUpdate` — run by the unit before every agent start — rolls back.
 */
import type { KeyObject } from 'node:crypto';
import { CloudletError } from '../errors';
import type { Logger } from '../log';
import { waitUntilHealthy } from '../system/agent-probe';
import { openBundle } from './bundle';
import { releaseVersion, type ReleaseStore, type UpdateRecord } from './releases';

export interface UpdateOptions {
  bundleFile: string;
  store: ReleaseStore;
  trustedKeys: KeyObject[];
  /** The running agent's API, e.g. http://127.0.0.1:9999. */
  agentUrl: string;
  /** Restart the agent so it runs what `current` points at (systemctl on the appliance). */
  restartAgent: () => Promise<void>;
  /** How long a restarted agent has to become healthy. */
  deadlineMs: number;
  /** How long it must then stay healthy. */
  stableMs: number;
  log: Logger;
}

export async function applyUpdate(opts: UpdateOptions): Promise<UpdateRecord> {
  const { store, log } = opts;
  const unlock = await store.lock();
  try {
    const bundle = await openBundle(opts.bundleFile, opts.trustedKeys);
    const version = bundle.header.version;
    const from = await store.current();
    const fromVersion = await releaseVersion(from);
    if (fromVersion === version) throw new CloudletError('CONFLICT', `version ${version} is already the running release`);
    const to = await store.install(bundle);
    log(`installed ${version} in ${to}; switching from ${fromVersion}`);

    const record: UpdateRecord = { state: 'verifying', version, from, to, at: new Date().toISOString() };
    await store.writeRecord(record);
    await store.switchTo(to);
    const verdict = await opts.restartAgent().then(
      () => waitUntilHealthy(opts.agentUrl, { version, deadlineMs: opts.deadlineMs, stableMs: opts.stableMs }),
      (err: Error) => ({ ok: false as const, problem: `the restart failed: ${err.message}` }),
    );
    if (verdict.ok) {
      const committed: UpdateRecord = { ...record, state: 'committed', at: new Date().toISOString() };
      await store.writeRecord(committed);
      await store.prune([to, from]);
      log(`committed ${version}`);
      return committed;
    }

    log(`${version} is not healthy after ${opts.deadlineMs} ms (${verdict.problem}); rolling back to ${fromVersion}`);
    await store.switchTo(from);
    // A failed restart is not the end here: the service manager keeps restarting a crashing agent from `current`
    // anyway, so what decides is whether the old release comes back healthy.
    await opts.restartAgent().catch((err: Error) => log(`the restart for the rollback failed (${err.message}); waiting for the agent anyway`));
    const back = await waitUntilHealthy(opts.agentUrl, { version: fromVersion, deadlineMs: opts.deadlineMs, stableMs: opts.stableMs });
    if (!back.ok) {
      throw new CloudletError('ROLLBACK_FAILED', `rolled back to ${fromVersion}, which is not healthy either: ${back.problem}`, { details: { from, to } });
    }
    await store.prune([from]);
    await store.writeRecord({ ...record, state: 'rolled-back', reason: verdict.problem, at: new Date().toISOString() });
    throw new CloudletError('UPDATE_ROLLED_BACK', `${version} did not become healthy (${verdict.problem}); rolled back to ${fromVersion}, which is serving`, {
      details: { version, rolledBackTo: fromVersion, reason: verdict.problem },
    });
  } finally {
    await unlock();
  }
}

/**
 * Before an agent start: an update left "verifying" with no live updater was interrupted, so go back to the release
 * it replaced (unconfirmed means not good, as in Mender). Returns the record written, or null when nothing was to do.
 * Runs under an updater's own restarts too, which it then leaves alone (the updater holds the lock). An unreadable
 * record never stops the start: see recoverUnreadableRecord.
 */
export async function recoverInterruptedUpdate(store: ReleaseStore, log: Logger): Promise<UpdateRecord | null> {
  const record = await store.record();
  if (record === null || (await store.lockHolder())) return null;
  if (record === 'unreadable') return recoverUnreadableRecord(store, log);
  if (record.state !== 'verifying') return null;
  log(`the update to ${record.version} was interrupted before it was confirmed healthy; going back to ${record.from}`);
  await store.switchTo(record.from);
  await store.prune([record.from]);
  const rolledBack: UpdateRecord = { ...record, state: 'rolled-back', reason: 'interrupted before it was confirmed healthy', at: new Date().toISOString() };
  await store.writeRecord(rolledBack);
  return rolledBack;
}

/**
 * A torn or empty update.json (a disk that lost it) says nothing of whether the release `current` points at was ever
 * confirmed healthy. Unconfirmed means not good, and the only release known good without a record is the factory
 * one: the box goes back to it (installed releases are kept, to be updated to again). The record is set aside.
 */
async function recoverUnreadableRecord(store: ReleaseStore, log: Logger): Promise<UpdateRecord | null> {
  const current = await store.current();
  await store.setAsideRecord();
  if (current === store.factoryDir) {
    log('update.json was unreadable (set aside as update.json.unreadable); the factory release runs, so nothing is to undo');
    return null;
  }
  log(
    `update.json was unreadable (set aside as update.json.unreadable): whether ${current} was confirmed healthy is unknown; going back to the factory release ${store.factoryDir}`,
  );
  await store.switchTo(store.factoryDir);
  const version = await releaseVersion(current).catch(() => 'unknown');
  const rolledBack: UpdateRecord = {
    state: 'rolled-back',
    version,
    from: store.factoryDir,
    to: current,
    reason: 'its update record was unreadable',
    at: new Date().toISOString(),
  };
  await store.writeRecord(rolledBack);
  return rolledBack;
}
