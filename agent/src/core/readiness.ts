import http from 'node:http';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { CloudletError } from '../errors';
import type { ReadinessProbe } from './types';

/** How long a TCP connection must stay open to count: SLIRP accepts on the host side, then drops it if the guest refuses. */
const TCP_HOLD_MS = 200;
const ATTEMPT_TIMEOUT_MS = 2000;

/** One probe attempt through the forwarded port; true when the service answered. */
function probeOnce(probe: ReadinessProbe, host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    if (probe.type === 'http') {
      const req = http.get({ host, port, path: probe.path, agent: false, timeout: ATTEMPT_TIMEOUT_MS }, (res) => {
        res.resume();
        const ok = res.statusCode !== undefined && res.statusCode >= 200 && res.statusCode < 400;
        res.on('end', () => resolve(ok));
        res.on('error', () => resolve(false));
      });
      req.on('timeout', () => req.destroy());
      req.on('error', () => resolve(false));
      return;
    }
    const socket = net.connect({ host, port });
    let settled = false;
    const settle = (ok: boolean) => {
      if (settled) return;
      settled = true;
      clearTimeout(hold);
      socket.destroy();
      resolve(ok);
    };
    let hold: NodeJS.Timeout | undefined;
    socket.setTimeout(ATTEMPT_TIMEOUT_MS, () => settle(false));
    socket.on('connect', () => { hold = setTimeout(() => settle(true), TCP_HOLD_MS); });
    socket.on('data', () => settle(true));
    socket.on('error', () => settle(false));
    socket.on('close', () => settle(false));
  });
}

/**
 * Wait until the service answers through its forwarded port. `intervalMs` is the gap between attempts; the
 * deadline is the probe's own timeout. `stillAlive` lets the caller stop early when the VM is gone.
 */
export async function waitUntilReady(
  probe: ReadinessProbe,
  host: string,
  port: number,
  options: { intervalMs?: number; timeoutMs?: number; stillAlive?: () => Promise<boolean> } = {},
): Promise<void> {
  // Each attempt is one loopback connection: cheap enough to poll often, and every poll saved is start latency.
  const interval = options.intervalMs ?? 20;
  const deadline = Date.now() + (options.timeoutMs ?? probe.timeout_ms);
  let attempts = 0;
  for (;;) {
    if (await probeOnce(probe, host, port)) return;
    attempts++;
    if (Date.now() >= deadline) {
      throw new CloudletError('READINESS_TIMEOUT', `service did not become ready on ${host}:${port} within ${options.timeoutMs ?? probe.timeout_ms} ms`);
    }
    // Asking libvirt every attempt would be wasteful; every 20th is enough to notice a VM that died while booting.
    if (options.stillAlive && attempts % 20 === 0 && !(await options.stillAlive())) {
      throw new CloudletError('LAUNCH_FAILED', 'the VM stopped before its service became ready');
    }
    await sleep(interval);
  }
}
