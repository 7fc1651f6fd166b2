// A Node program of the tests' own run on another host of a test network (a phone's, a cloudlet's or the fleet
// broker host's namespaces: `via` is the command prefix that enters them), driven over its stdio with JSON lines: the
// test sends requests ({id, op, args}) and gets one answer each ({id, result} or {id, error}); the program may also
// report events ({event}) at any time. Both ends are here: start() for the test, serveRequests() for the program.
import { spawn, type ChildProcess } from 'node:child_process';
import readline from 'node:readline';

export class RemoteProcess {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (result: any) => void; reject: (err: Error) => void }>();
  private stderr = '';

  private constructor(
    private readonly child: ChildProcess,
    readonly program: string,
    private readonly onEvent: (event: any) => void,
  ) {
    readline.createInterface({ input: child.stdout! }).on('line', (line) => this.receive(line));
    child.stderr!.on('data', (chunk: Buffer) => (this.stderr = (this.stderr + chunk.toString()).slice(-4000)));
    child.once('exit', (code, signal) => {
      for (const { reject } of this.pending.values()) reject(new Error(`${program} exited (${code ?? signal}): ${this.stderr}`));
      this.pending.clear();
    });
  }

  /** Starts `node program` under `via`; `onEvent` gets each event the program reports. */
  static start(via: string[], program: string, onEvent: (event: any) => void = () => {}): RemoteProcess {
    // Without tap's NODE_OPTIONS preload: the program is no test of its own.
    const { NODE_OPTIONS: _preload, ...env } = process.env;
    const child = spawn(via[0]!, [...via.slice(1), process.execPath, program], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    return new RemoteProcess(child, program, onEvent);
  }

  /** Sends a request and waits for its answer (rejects with the program's error message, or if it exits first). */
  request(op: string, args: Record<string, unknown> = {}): Promise<any> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return Promise.reject(new Error(`${this.program} has exited: ${this.stderr}`));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.child.stdin!.write(`${JSON.stringify({ id, op, args })}\n`);
    });
  }

  /** Ends the program (SIGTERM) and waits for it to be gone. */
  async close(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((resolve) => this.child.once('exit', resolve));
    this.child.kill('SIGTERM');
    await exited;
  }

  private receive(line: string): void {
    let message: { id?: number; result?: unknown; error?: string; event?: unknown };
    try {
      message = JSON.parse(line);
    } catch {
      return void (this.stderr += `${line}\n`);
    }
    if (message.event !== undefined) return this.onEvent(message.event);
    const waiter = this.pending.get(message.id!);
    if (!waiter) return;
    this.pending.delete(message.id!);
    if (message.error !== undefined) waiter.reject(new Error(message.error));
    else waiter.resolve(message.result);
  }
}

/** The program's side: answers each request with its handler, in order of arrival; returns how to report events. */
export function serveRequests(handlers: Record<string, (args: any) => Promise<unknown>>): { report(event: unknown): void } {
  const write = (message: unknown) => process.stdout.write(`${JSON.stringify(message)}\n`);
  readline.createInterface({ input: process.stdin }).on('line', (line) => {
    const { id, op, args } = JSON.parse(line) as { id: number; op: string; args: unknown };
    const handler = handlers[op];
    if (!handler) return write({ id, error: `no request ${op}` });
    handler(args).then(
      (result) => write({ id, result: result ?? null }),
      (err: Error) => write({ id, error: err.message }),
    );
  });
  // The test ends the program with SIGTERM (or closes its stdin): exit at once, whatever is open.
  process.once('SIGTERM', () => process.exit(0));
  process.stdin.once('end', () => process.exit(0));
  return { report: (event) => write({ event }) };
}
