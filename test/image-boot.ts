// ./build.sh image-test: boots the appliance image under QEMU (TCG: no KVM on these machines) with user-mode
// networking, the agent's API port forwarded to 127.0.0.1 only, and checks what a box in the field must do by itself:
// systemd starts the agent (a Type=notify unit, so "Started" means the agent said READY=1 after its API answered), the
// first boot gave the box its own host name, the API answers /api/services and /v1/health, and the agent is still the
// same healthy one after a watchdog period. Not part of ./build.sh test: it takes minutes (docs/appliance.md).
import { spawn, spawnSync } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { agentUrl, probeAgent } from '../agent/src/system/agent-probe';
import { request } from './support/agent';

const AGENT_PORT = 9999;
/** The forward ports this team's tests may use. */
const FORWARD_PORTS = { first: 22200, last: 22299 };
const BOOT_DEADLINE_MS = 15 * 60_000;
/** Longer than the unit's WatchdogSec=30s: a watchdog that is not fed would have restarted the agent by then. */
const WATCHDOG_PERIOD_MS = 40_000;

async function main(image: string): Promise<boolean> {
  const work = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-image-test-'));
  const overlay = path.join(work, 'overlay.qcow2');
  const consoleLog = path.join(work, 'console.log');
  // The image itself stays pristine: the first boot's changes go to a throwaway overlay.
  const created = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.resolve(image), '-F', 'raw', overlay], { encoding: 'utf8' });
  if (created.status !== 0) throw new Error(`qemu-img create: ${created.stderr}`);
  const port = await freeForwardPort();
  const url = agentUrl('127.0.0.1', port);
  const started = Date.now();
  const qemu = spawn(
    'qemu-system-x86_64',
    [
      '-accel',
      'tcg',
      '-cpu',
      'max',
      '-smp',
      '2',
      '-m',
      '2048',
      '-display',
      'none',
      '-no-reboot',
      '-serial',
      `file:${consoleLog}`,
      '-monitor',
      'none',
      '-drive',
      `file=${overlay},if=virtio,format=qcow2`,
      '-netdev',
      `user,id=net0,hostfwd=tcp:127.0.0.1:${port}-:${AGENT_PORT}`,
      '-device',
      'virtio-net-pci,netdev=net0',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let qemuError = '';
  qemu.stderr.on('data', (c: Buffer) => {
    qemuError += c.toString();
  });
  const qemuExited = new Promise<void>((resolve) => qemu.once('exit', () => resolve()));
  let running = true;
  void qemuExited.then(() => {
    running = false;
  });
  const stopQemu = () => {
    if (running) qemu.kill('SIGKILL');
  };
  process.once('SIGINT', stopQemu);
  process.once('SIGTERM', stopQemu);

  const results: { name: string; ok: boolean; detail: string }[] = [];
  const check = (name: string, ok: boolean, detail = '') => {
    results.push({ name, ok, detail });
    process.stdout.write(`${ok ? 'ok' : 'not ok'} ${results.length} - ${name}${detail ? ` # ${detail}` : ''}\n`);
  };
  try {
    process.stdout.write(`booting ${image} (TCG), API forwarded to 127.0.0.1:${port}\n`);
    let status = await probeAgent(url);
    while (!status.healthy && running && Date.now() - started < BOOT_DEADLINE_MS) {
      await sleep(1000);
      status = await probeAgent(url);
    }
    const readyMs = Date.now() - started;
    check('the agent answers /v1/health with ok', status.healthy, status.problem ?? `version ${status.version}`);
    if (!status.healthy) {
      if (!running) process.stdout.write(`qemu ended: ${qemuError.trim()}\n`);
      return false;
    }
    process.stdout.write(`boot-to-ready: ${(readyMs / 1000).toFixed(1)} s\n`);

    process.stdout.write(`health: ${(await request(port, 'GET', '/v1/health')).body}\n`);
    const services = await request(port, 'GET', '/api/services');
    check('the agent answers /api/services', services.status === 200 && services.json !== undefined, `status ${services.status}`);
    const system = await request(port, 'GET', '/v1/system');
    const hostname = String(system.json?.hostname ?? '');
    check('the first boot named the box cloudlet-<id>', /^cloudlet-[0-9a-f]{8}$/.test(hostname), hostname);

    await sleep(WATCHDOG_PERIOD_MS);
    const later = await probeAgent(url);
    const consoleLater = await readFile(consoleLog, 'utf8');
    check('the agent is still healthy after a watchdog period', later.healthy, later.problem ?? '');
    // Printed only once the agent sent READY=1 (Type=notify), which may be a moment after the API first answered.
    check('systemd started the agent as a notify unit', /Started .*cloudlet-agent\.service/.test(consoleLater));
    check('systemd saw no watchdog timeout or agent failure', !/cloudlet-agent\.service: (Watchdog timeout|Failed|Main process exited)/i.test(consoleLater));
    return results.every((r) => r.ok);
  } finally {
    stopQemu();
    await qemuExited;
    const passed = results.filter((r) => r.ok).length;
    process.stdout.write(`${passed} passed, ${results.length - passed} failed\n`);
    if (results.some((r) => !r.ok))
      process.stdout.write(`console tail:\n${(await readFile(consoleLog, 'utf8').catch(() => '')).split('\n').slice(-40).join('\n')}\n`);
    await rm(work, { recursive: true, force: true });
  }
}

async function freeForwardPort(): Promise<number> {
  for (let port = FORWARD_PORTS.first; port <= FORWARD_PORTS.last; port++) {
    const free = await new Promise<boolean>((resolve) => {
      const s = net
        .createServer()
        .once('error', () => resolve(false))
        .listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
    });
    if (free) return port;
  }
  throw new Error(`no free port in ${FORWARD_PORTS.first}-${FORWARD_PORTS.last}`);
}

const image = process.argv[2];
if (!image) {
  process.stderr.write('usage: node dist/test/image-boot.js IMAGE\n');
  process.exit(2);
}
main(image).then(
  (ok) => process.exit(ok ? 0 : 1),
  (err: Error) => {
    process.stderr.write(`image-test: ${err.message}\n`);
    process.exit(1);
  },
);
