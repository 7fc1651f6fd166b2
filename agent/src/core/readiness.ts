import http from 'node:http';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { CloudletError } from '../errors';
import type { ReadinessProbe } from './types';

/** How long a TCP connection must stay open to count: SLIRP accepts on the host side, then drops it if the guest refuses. */
const TCP_HOLD_MS = 200;
/** The most one attempt may take, from connecting to its verdict, however the guest paces its bytes. */
const ATTEMPT_TIMEOUT_MS = 2000;
/**
 * The most of an HTTP answer's body a probe reads (counted as it passes, never kept): a longer body counts as answered
 * then. A service whose readiness page is a file it loads (1 MiB in the tests' fixture) is read whole.
 */
const PROBE_BODY_BYTES = 1 << 20;
/** The probe as the agent runs it: its timeout never longer than `maxTimeoutMs` (the guest's wish is not the box's rule). */
export function boundedProbe(probe: ReadinessProbe, maxTimeoutMs: number): ReadinessProbe {
  return probe.timeout_ms <= maxTimeoutMs ? probe : { ...probe, timeout_ms: maxTimeoutMs };
}

/**
 * One probe attempt through the forwarded port, ended after `limitMs` whatever arrives meanwhile (a hard deadline, not
 * an idle timeout); true when the service answered. An HTTP answer counts when its status is 2xx/3xx and its body
 * ended or brought PROBE_BODY_BYTES within the attempt: one that drips an endless body fails the attempt.
 */
function probeOnce(probe: ReadinessProbe, host: string, port: number, limitMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    let settled = false;
    let end = () => {};
    const settle = (ok: boolean) => {
      if (settled) return;
      settled = true;
      clearTimeout(deadline);
      clearTimeout(hold);
      end();
      resolve(ok);
    };
    const deadline = setTimeout(() => settle(false), limitMs);
    let hold: NodeJS.Timeout | undefined;
    if (probe.type === 'http') {
      const req = http.get({ host, port, path: probe.path, agent: false }, (res) => {
        if (res.statusCode === undefined || res.statusCode < 200 || res.statusCode >= 400) return settle(false);
        let read = 0;
        res.on('data', (chunk: Buffer) => {
          read += chunk.length;
          if (read >= PROBE_BODY_BYTES) settle(true);
        });
        res.on('end', () => settle(true));
        res.on('error', () => settle(false));
        res.on('close', () => settle(false));
        return undefined;
      });
      end = () => req.destroy();
      req.on('error', () => settle(false));
      return;
    }
    const socket = net.connect({ host, port });
    end = () => socket.destroy();
    socket.on('connect', () => {
      hold = setTimeout(() => settle(true), TCP_HOLD_MS);
    });
    socket.on('data', () => settle(true));
    socket.on('error', () => settle(false));
    socket.on('close', () => settle(false));
  });
}

/** `work`, unless the deadline comes first: then READINESS_TIMEOUT at the deadline, whatever `work` still waits for. */
function beforeDeadline<T>(work: Promise<T>, deadline: number, timeout: () => CloudletError): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(timeout()), Math.max(0, deadline - Date.now()));
  });
  return Promise.race([work, expired]).finally(() => clearTimeout(timer));
}

/**
 * Wait until the service answers through its forwarded port, within `timeoutMs` (else READINESS_TIMEOUT): the deadline
 * holds during an attempt as well as between them, and during the `stillAlive` check, which lets the caller stop
 * early when the VM is gone. `intervalMs` is the gap between attempts. `firstAttemptMs` bounds the first attempt
 * tighter, each next one twice as long up to ATTEMPT_TIMEOUT_MS: for a VM that served a moment ago (one that just
 * arrived from another cloudlet), whose first connection may be lost while its network settles, and should not cost
 * a whole attempt.
 */
export async function waitUntilReady(
  probe: ReadinessProbe,
  host: string,
  port: number,
  options: { timeoutMs: number; intervalMs?: number; firstAttemptMs?: number; stillAlive?: () => Promise<boolean> },
): Promise<void> {
  // Each attempt is one loopback connection: cheap enough to poll often, and every poll saved is start latency.
  const interval = options.intervalMs ?? 20;
  const deadline = Date.now() + options.timeoutMs;
  const timeout = () => new CloudletError('READINESS_TIMEOUT', `service did not become ready on ${host}:${port} within ${options.timeoutMs} ms`);
  let attempts = 0;
  let attemptMs = Math.min(ATTEMPT_TIMEOUT_MS, options.firstAttemptMs ?? ATTEMPT_TIMEOUT_MS);
  for (;;) {
    const left = deadline - Date.now();
    if (left <= 0) throw timeout();
    if (await probeOnce(probe, host, port, Math.min(attemptMs, left))) return;
    attempts++;
    attemptMs = Math.min(ATTEMPT_TIMEOUT_MS, attemptMs * 2);
    // Asking libvirt every attempt would be wasteful; every 20th is enough to notice a VM that died while booting.
    if (options.stillAlive && attempts % 20 === 0 && !(await beforeDeadline(options.stillAlive(), deadline, timeout))) {
      throw new CloudletError('LAUNCH_FAILED', 'the VM stopped before its service became ready');
    }
    await sleep(Math.min(interval, Math.max(0, deadline - Date.now())));
  }
}
