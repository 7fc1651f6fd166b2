// Test app packages: busybox httpd with a page and CGI probes, built by the real packaging CLI, and the cleanup of
// every sandbox an agent left under its data directory.
import { execFile } from 'node:child_process';
import { chmod, copyFile, mkdir, mkdtemp, readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { SandboxCgroup, openCgroups } from '../../agent/src/sandbox/cgroups';
import { ROOT } from './agent';

const run = promisify(execFile);
export const PACKAGE_CLI = path.join(ROOT, 'dist', 'agent', 'src', 'cli', 'cloudlet-package.js');
export const PAGE = 'hello from a sandbox\n';

const cgi = (body: string) => `#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n${body}\n`;

export interface HttpdPackageOptions {
  appId: string;
  hostSecret: string;
  memoryMib?: number;
  zstd?: boolean;
  pids?: number;
  dataMib?: number;
  /** The packaging CLI's --readiness (default http:/) and --readiness-timeout-ms. */
  readiness?: string;
  readinessTimeoutMs?: number;
  /** More CGI scripts (name → shell body), under /cgi-bin/. */
  cgi?: Record<string, string>;
  /** Shell run as the app's first process before it becomes httpd (`exec` is appended; "&" runs httpd daemonized). */
  startup?: string;
}

/**
 * Build a busybox httpd package into `scratch` and return its tarball. CGI scripts: /cgi-bin/probe reports what the
 * app can see and do (key=value lines), /cgi-bin/hog allocates memory without end, /cgi-bin/drip answers 200 and then
 * a byte a second without end. `readiness` is the packaging CLI's --readiness (default http:/).
 */
export async function buildHttpdPackage(scratch: string, options: HttpdPackageOptions): Promise<string> {
  const dir = await mkdtemp(path.join(scratch, 'app-'));
  await mkdir(path.join(dir, 'bin'));
  await copyFile('/bin/busybox', path.join(dir, 'bin', 'busybox'));
  await chmod(path.join(dir, 'bin', 'busybox'), 0o755);
  await symlink('busybox', path.join(dir, 'bin', 'sh'));
  await symlink('busybox', path.join(dir, 'bin', 'true'));
  await mkdir(path.join(dir, 'www', 'cgi-bin'), { recursive: true });
  await writeFile(path.join(dir, 'www', 'index.html'), PAGE);
  const attempt = (key: string, command: string) => `${command} 2>/dev/null && echo ${key}=yes || echo ${key}=no`;
  await writeFile(
    path.join(dir, 'www', 'cgi-bin', 'probe'),
    cgi(
      [
        attempt('read_host_file', `cat ${options.hostSecret}`),
        attempt('write_app', 'touch /app/written'),
        attempt('write_root', 'touch /written'),
        attempt('write_data', 'touch /data/written'),
        'echo "uid=$(id -u)"',
        'echo "processes=$(cat /proc/[0-9]*/comm | sort | tr "\\n" " ")"',
        'echo "no_new_privs=$(grep NoNewPrivs /proc/self/status | tr -dc 0-9)"',
      ].join('\n'),
    ),
    { mode: 0o755 },
  );
  // tail keeps the whole "line" of an endless stream without newlines in memory.
  await writeFile(path.join(dir, 'www', 'cgi-bin', 'hog'), cgi('tail /dev/zero'), { mode: 0o755 });
  await writeFile(path.join(dir, 'www', 'cgi-bin', 'drip'), cgi('while :; do printf .; sleep 1; done'), { mode: 0o755 });
  for (const [name, body] of Object.entries(options.cgi ?? {})) await writeFile(path.join(dir, 'www', 'cgi-bin', name), cgi(body), { mode: 0o755 });
  const httpd = ['/app/bin/busybox', 'httpd', '-f', '-p', '8080', '-h', '/app/www'];
  const command = options.startup ? ['/app/bin/sh', '-c', `${options.startup}\nexec ${httpd.join(' ')}`] : httpd;
  const tarball = path.join(scratch, `${options.appId}.tar.${options.zstd ? 'zst' : 'gz'}`);
  await run(process.execPath, [
    PACKAGE_CLI,
    '--app-id',
    options.appId,
    '--port',
    '8080',
    '--dir',
    dir,
    '--output',
    tarball,
    '--memory-mib',
    String(options.memoryMib ?? 32),
    '--cpus',
    '0.5',
    '--readiness',
    options.readiness ?? 'http:/',
    ...(options.readinessTimeoutMs ? ['--readiness-timeout-ms', String(options.readinessTimeoutMs)] : []),
    '--description',
    'busybox httpd',
    ...(options.pids ? ['--pids', String(options.pids)] : []),
    ...(options.dataMib ? ['--data-mib', String(options.dataMib)] : []),
    ...(options.zstd ? ['--zstd'] : []),
    '--',
    ...command,
  ]);
  return tarball;
}

/** Sandbox state files of the instances under an agent's data directory. */
export async function sandboxesUnder(dataDir: string): Promise<{ id: string; pid: number | null }[]> {
  const instances = path.join(dataDir, 'instances');
  const found: { id: string; pid: number | null }[] = [];
  for (const entry of await readdir(instances).catch(() => [])) {
    const state = await readFile(path.join(instances, entry, 'sandbox.json'), 'utf8').catch(() => null);
    if (state) found.push({ id: entry, pid: (JSON.parse(state) as { pid: number | null }).pid });
  }
  return found;
}

/** Kill every sandbox an agent left under `dataDir` (a test's teardown; the agent itself leaves them running). */
export async function destroySandboxesUnder(dataDir: string): Promise<void> {
  const layout = await openCgroups();
  for (const { id } of await sandboxesUnder(dataDir)) await new SandboxCgroup(layout, id).destroy();
}

/** Whether the sandbox's cgroup still exists in any hierarchy. */
export async function cgroupExists(id: string): Promise<boolean> {
  const layout = await openCgroups();
  const { name } = new SandboxCgroup(layout, id);
  const found = await Promise.all(
    layout.parents.map((p) =>
      readdir(path.join(p, name)).then(
        () => true,
        () => false,
      ),
    ),
  );
  return found.some(Boolean);
}

export async function tempDir(prefix: string): Promise<string> {
  return mkdtemp(path.join(os.tmpdir(), prefix));
}
