// Runs the real `cloudlet` CLI as a child process, the way a person or a script would, and keeps what it printed.
import { execFile } from 'node:child_process';
import path from 'node:path';
import { agentDataDir, ROOT } from './agent';

export const CLI = path.join(ROOT, 'dist', 'agent', 'src', 'cli', 'main.js');

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
  /** stdout parsed as JSON when it is JSON (every --json run), else undefined. */
  json: any;
}

/**
 * `cloudlet ...args`; `via` prefixes the command (e.g. nsenter into a test's network namespace). Aimed with
 * `--cloudlet 127.0.0.1:PORT` at an agent the tests started, it runs as the operator on that box would: with the
 * agent's configuration in its environment (CLOUDLET_DATA_DIR, where the CLI finds the admin token, and CLOUDLET_PORT,
 * the only port the CLI sends that token to).
 */
export function cli(args: string[], options: { via?: string[]; cwd?: string; env?: Record<string, string> } = {}): Promise<CliResult> {
  const [command, ...argv] = [...(options.via ?? []), process.execPath, CLI, ...args];
  const target = args[args.indexOf('--cloudlet') + 1];
  const port = args.includes('--cloudlet') && target?.startsWith('127.0.0.1:') ? Number(target.slice('127.0.0.1:'.length)) : NaN;
  const dataDir = agentDataDir(port);
  const env = { ...process.env, ...(dataDir ? { CLOUDLET_DATA_DIR: dataDir, CLOUDLET_PORT: String(port) } : {}), ...options.env };
  return new Promise((resolve) => {
    execFile(command!, argv, { timeout: 120000, cwd: options.cwd, env }, (err, stdout, stderr) => {
      let json: unknown;
      try {
        json = JSON.parse(stdout);
      } catch {
        json = undefined;
      }
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0;
      resolve({ code, stdout, stderr, json });
    });
  });
}
