// A real agent run the way the appliance runs it: from the release `current` points at, restarted whenever it exits
// (systemd's Restart=always), with its pid in a file so a restart command can stop it (systemctl restart's part).
import { ChildProcess, spawn } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { freePort, registerAgent, ROOT } from './agent';

const RESTART_DELAY_MS = 300;

export class SupervisedAgent {
  /** How many times the agent process ended and was started again. */
  restarts = 0;
  log = '';
  readonly pidFile: string;
  private proc: ChildProcess | undefined;
  private stopping = false;

  private constructor(
    private readonly home: string,
    readonly apiPort: number,
    private readonly env: NodeJS.ProcessEnv,
  ) {
    this.pidFile = path.join(home, 'agent.pid');
  }

  /** Supervise the agent of `home`/current, with its data in dataDir; its forwards use ports of forwardRange. */
  static async start(home: string, dataDir: string, forwardRange: string): Promise<SupervisedAgent> {
    const apiPort = await freePort();
    const agent = new SupervisedAgent(home, apiPort, {
      ...process.env,
      CLOUDLET_PORT: String(apiPort),
      CLOUDLET_API_HOST: '127.0.0.1',
      CLOUDLET_DATA_DIR: dataDir,
      CLOUDLET_FORWARD_ADDRESS: '127.0.0.1',
      CLOUDLET_PORT_RANGE: forwardRange,
      CLOUDLET_SEED_DIR: '',
      CLOUDLET_CONFIG: path.join(ROOT, 'test', 'support', 'no-config.json'),
      CLOUDLET_DISCOVERY: 'off',
      CLOUDLET_POOL_BUDGET_MIB: '0',
      CLOUDLET_MQTT_HOST: '127.0.0.1',
      CLOUDLET_MQTT_PORT: String(await freePort()),
      CLOUDLET_TLS_PORT: '0',
      // Test releases carry no node_modules of their own: the tree's serves them all.
      NODE_PATH: path.join(ROOT, 'node_modules'),
    });
    registerAgent(apiPort, dataDir);
    await agent.spawn();
    return agent;
  }

  get url(): string {
    return `http://127.0.0.1:${this.apiPort}`;
  }

  /**
   * The shell command cloudlet-update runs to restart the agent. Like `systemctl restart` it succeeds whatever the
   * agent's state: an agent that just crashed is being restarted already.
   */
  get restartCommand(): string {
    return `kill -TERM "$(cat '${this.pidFile}')" 2>/dev/null || true`;
  }

  private async spawn(): Promise<void> {
    if (this.stopping) return;
    const proc = spawn(process.execPath, [path.join(this.home, 'current', 'dist', 'agent', 'src', 'main.js')], {
      env: this.env,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.proc = proc;
    const collect = (c: Buffer) => {
      this.log += c.toString();
    };
    proc.stdout?.on('data', collect);
    proc.stderr?.on('data', collect);
    proc.once('exit', () => {
      if (this.stopping) return;
      this.restarts++;
      setTimeout(() => void this.spawn(), RESTART_DELAY_MS);
    });
    await writeFile(this.pidFile, String(proc.pid));
  }

  async stop(): Promise<void> {
    this.stopping = true;
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
    proc.kill('SIGTERM');
    await exited;
  }
}
