/**
 * The agent's only door to systemd: readiness and watchdog notifications (sd_notify(3)), and restarting the agent's
 * unit for the updater (systemctl).
 *
 * Node has no unix datagram sockets, so notifications go through libsystemd's own sd_notify, called through ffi-rs on
 * the libuv threadpool. That keeps NotifyAccess=main in the unit: the alternative, spawning `systemd-notify`, needs
 * NotifyAccess=all (any process of the unit, qemu-img included, could then claim readiness) and a fork per ping.
 * Outside systemd (NOTIFY_SOCKET unset: development, tests) every notification is a no-op and libsystemd is never
 * loaded.
 */
import { execFile } from 'node:child_process';
import { DataType, load, open as openLibrary } from 'ffi-rs';
import { CloudletError } from '../errors';
import type { HealthReport } from '../core/types';
import type { Logger } from '../log';
import { waitUntilHealthy } from './agent-probe';

const LIBSYSTEMD = 'libsystemd';
const LIBSYSTEMD_SONAME = 'libsystemd.so.0';

/** Sends one notification (e.g. "READY=1") to the service manager; resolves false when there is none. */
export type Notifier = (state: string) => Promise<boolean>;

let libsystemdOpen = false;

/** sd_notify(3) through libsystemd; a no-op without NOTIFY_SOCKET. */
export const notifySystemd: Notifier = async (state) => {
  if (!process.env.NOTIFY_SOCKET) return false;
  if (!libsystemdOpen) {
    try {
      openLibrary({ library: LIBSYSTEMD, path: LIBSYSTEMD_SONAME });
    } catch (err) {
      throw new CloudletError('INTERNAL', `NOTIFY_SOCKET is set but ${LIBSYSTEMD_SONAME} cannot be loaded: install the Debian package libsystemd0`, {
        cause: err,
      });
    }
    libsystemdOpen = true;
  }
  // sd_notify returns > 0 when sent, 0 without a socket, a negative errno on failure.
  const sent = await load({
    library: LIBSYSTEMD,
    funcName: 'sd_notify',
    retType: DataType.I32,
    paramsType: [DataType.I32, DataType.String],
    paramsValue: [0, state],
    runInNewThread: true,
  });
  if (sent < 0) throw new CloudletError('INTERNAL', `sd_notify(${JSON.stringify(state.split('\n')[0])}) failed with errno ${-sent}`);
  return sent > 0;
};

/**
 * The watchdog interval systemd asked for (WatchdogSec=), as sd_watchdog_enabled(3) reads it: WATCHDOG_USEC, meant for
 * us only when WATCHDOG_PID is unset or is our pid. Null when there is no watchdog.
 */
export function watchdogIntervalMs(env: NodeJS.ProcessEnv = process.env): number | null {
  const usec = Number(env.WATCHDOG_USEC);
  if (!env.WATCHDOG_USEC || !Number.isFinite(usec) || usec <= 0) return null;
  if (env.WATCHDOG_PID && Number(env.WATCHDOG_PID) !== process.pid) return null;
  return usec / 1000;
}

/**
 * Feeds systemd's watchdog from the agent's own health checks: every half interval (as sd_watchdog_enabled(3)
 * advises) it runs them and pings only when they pass, logging each failing check otherwise. A check that hangs (a
 * stuck libvirt call) or an event loop that stops turning withholds the ping the same way, and systemd restarts the
 * agent once WatchdogSec passes without one.
 */
export class Watchdog {
  private timer: NodeJS.Timeout | undefined;
  private checking = false;

  constructor(
    private readonly intervalMs: number,
    private readonly health: () => Promise<HealthReport>,
    private readonly notify: Notifier,
    private readonly log: Logger,
  ) {}

  start(): void {
    this.timer = setInterval(() => void this.tick(), this.intervalMs / 2);
  }

  stop(): void {
    clearInterval(this.timer);
  }

  /** One check-and-ping; exposed so tests can drive it without waiting for the timer. */
  async tick(): Promise<void> {
    if (this.checking) {
      this.log('watchdog: the previous health check is still running; withholding the ping');
      return;
    }
    this.checking = true;
    try {
      const report = await this.health();
      if (report.ok) {
        await this.notify('WATCHDOG=1');
        return;
      }
      const failing = report.checks.filter((c) => !c.ok && !c.optional).map((c) => `${c.name}${c.detail ? ` (${c.detail})` : ''}`);
      this.log(`watchdog: withholding the ping: failing ${failing.join(', ')}`);
    } catch (err) {
      this.log(`watchdog: no ping: ${(err as Error).message}`);
    } finally {
      this.checking = false;
    }
  }
}

/** `systemctl reset-failed` then `restart`: a unit that hit its start limit (a crashing release) starts again too. */
export async function restartUnit(unit: string): Promise<void> {
  await systemctl(['reset-failed', unit]);
  await systemctl(['restart', '--no-block', unit]);
}

function systemctl(args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('systemctl', args, { encoding: 'utf8' }, (err, _stdout, stderr) => {
      if (err) reject(new CloudletError('INTERNAL', `systemctl ${args.join(' ')} failed: ${stderr.trim() || err.message}`, { cause: err }));
      else resolve();
    });
  });
}

/**
 * Under systemd (Type=notify): wait until the API really answers a health request, then send READY=1, and start the
 * watchdog if WatchdogSec= asked for one. Returns the watchdog to stop at shutdown; null outside systemd.
 */
export async function announceReady(
  apiUrl: string,
  health: () => Promise<HealthReport>,
  log: Logger,
  notify: Notifier = notifySystemd,
): Promise<Watchdog | null> {
  if (!process.env.NOTIFY_SOCKET) return null;
  // No deadline of our own: the unit's TimeoutStartSec= decides how long a start may take.
  const answered = await waitUntilHealthy(apiUrl, { version: null, deadlineMs: Number.MAX_SAFE_INTEGER, stableMs: 0 });
  if (!answered.ok) return null;
  await notify(`READY=1\nSTATUS=serving on ${apiUrl}`);
  const intervalMs = watchdogIntervalMs();
  if (intervalMs === null) return null;
  const watchdog = new Watchdog(intervalMs, health, notify, log);
  watchdog.start();
  log(`ready; feeding the watchdog every ${intervalMs / 2} ms while the health checks pass`);
  return watchdog;
}
