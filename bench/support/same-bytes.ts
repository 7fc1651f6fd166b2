// Starts bench/support/same-bytes-server.ts, the node:http process that answers given paths with canned replies:
// bench http's baseline, and bench scale's control (what the machine adds to any server's latency).
import { spawn, type ChildProcess } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { ROOT } from '../../test/support/agent';

export interface CannedReply {
  status: number;
  headers: Record<string, string>;
  body: string;
}

export interface SameBytesServer {
  proc: ChildProcess;
  port: number;
  stop: () => void;
}

/** Writes `replies` (by path) to `file` and starts the server on them; resolves once it listens. */
export async function startSameBytesServer(replies: Record<string, CannedReply>, file: string): Promise<SameBytesServer> {
  await writeFile(file, JSON.stringify(replies));
  const proc = spawn(process.execPath, [path.join(ROOT, 'dist', 'bench', 'support', 'same-bytes-server.js'), file], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const port = await new Promise<number>((resolve, reject) => {
    proc.on('error', reject);
    proc.on('exit', (code) => reject(new Error(`the node:http server exited with ${code}`)));
    proc.stdout.once('data', (d: Buffer) => resolve(Number(d.toString().trim())));
  });
  return {
    proc,
    port,
    stop: () => {
      proc.removeAllListeners('exit');
      proc.kill();
    },
  };
}
