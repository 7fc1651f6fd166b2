/**
 * `cloudlet top`: a live view of the instances and their launch progress, from the /v1/events WebSocket. On a
 * terminal it redraws one screen in place (the alternate screen, restored on exit) and `q` or Ctrl-C quits; elsewhere
 * it writes one plain line per change (or, with --json, each event as one JSON line) until interrupted.
 */
import type WebSocket from 'ws';
import type { CloudletClient } from './client';
import { CliError } from './errors';
import { jsonLine } from './terminal';
import { TopView } from './top';
import type { Verb } from './verb';

/** At most this many redraws a second: a launch's progress comes faster than anyone reads. */
const REDRAW_MS = 100;
/** A client that fell too far behind is closed with this code by the cloudlet; it reconnects to a fresh snapshot. */
const CLOSE_TRY_AGAIN = 1013;
/** The cloudlet closes the sockets of a device whose authorization ended with this code. */
const CLOSE_POLICY = 1008;

/** q, Q, Ctrl-C (raw mode turns it into a byte rather than a signal), Ctrl-D. */
const QUIT_KEYS = new Set([0x71, 0x51, 0x03, 0x04]);

const ALT_SCREEN_ON = '\x1b[?1049h\x1b[?25l';
const ALT_SCREEN_OFF = '\x1b[?25h\x1b[?1049l';

export const topVerb: Verb = {
  summary: 'a live view of the instances and their launch progress (q or Ctrl-C quits)',
  usage: 'cloudlet top',
  optionHelp: [
    'On a terminal: one screen, redrawn in place. Otherwise: one line per change, until interrupted;',
    'with --json, every /v1/events message as one JSON line.',
  ],
  run: async ({ cloudlet, values }) => {
    const client = await cloudlet();
    const view = new TopView();
    const screen = process.stdout.isTTY && !values.json;
    const out = (line: string) => process.stdout.write(`${line}\n`);
    let draw = () => {};
    let stopDrawing = () => {};
    if (screen) ({ draw, stop: stopDrawing } = screenDrawer(view, `cloudlet top  ${client.label}`));
    try {
      await watch(client, {
        message: (raw) => {
          const lines = view.apply(raw);
          if (screen) return draw();
          if (!values.json) return lines.forEach(out);
          try {
            out(jsonLine(JSON.parse(raw)));
          } catch {
            // Not JSON: not an event, nothing to pass on.
          }
        },
      });
    } finally {
      stopDrawing();
    }
    return { json: undefined, text: '', streamed: true };
  },
};

/** Follows the events until the user quits (resolves) or the cloudlet ends the stream (rejects). */
function watch(client: CloudletClient, on: { message: (raw: string) => void }): Promise<void> {
  return new Promise((resolve, reject) => {
    let socket: WebSocket;
    let quitting = false;
    const keys = (data: Buffer) => {
      if (data.some((byte) => QUIT_KEYS.has(byte))) quit();
    };
    const cleanUp = () => {
      process.off('SIGINT', quit);
      process.off('SIGTERM', quit);
      if (process.stdin.isTTY) {
        process.stdin.off('data', keys);
        process.stdin.setRawMode(false);
        process.stdin.pause();
      }
    };
    const quit = () => {
      quitting = true;
      cleanUp();
      socket.close(1000);
      socket.terminate();
      resolve();
    };
    const fail = (err: CliError) => {
      if (quitting) return;
      quitting = true;
      cleanUp();
      socket.terminate();
      reject(err);
    };
    const connect = () => {
      socket = client.socket('/v1/events');
      socket.on('message', (data: Buffer, binary: boolean) => {
        if (!binary) on.message(data.toString('utf8'));
      });
      socket.on('unexpected-response', (_req, res) => void client.refusal(res).then(fail));
      socket.on('error', (err) => fail(err instanceof CliError ? err : client.unreachable(err)));
      socket.on('close', (code: number, reason: Buffer) => {
        if (quitting) return;
        if (code === CLOSE_TRY_AGAIN) return connect();
        if (code === CLOSE_POLICY) return fail(new CliError('DEVICE_REVOKED', "the cloudlet ended this device's authorization"));
        fail(
          new CliError('CONNECTION_CUT', `the cloudlet closed the event stream (${code}${reason.length ? ` ${reason.toString('utf8').slice(0, 100)}` : ''})`),
        );
      });
    };
    process.on('SIGINT', quit);
    process.on('SIGTERM', quit);
    if (process.stdin.isTTY) {
      process.stdin.setRawMode(true);
      process.stdin.on('data', keys);
      process.stdin.resume();
    }
    connect();
  });
}

/** Draws the view on the terminal's alternate screen, at most every REDRAW_MS and once a second for the clock. */
function screenDrawer(view: TopView, title: string) {
  let pending: NodeJS.Timeout | undefined;
  const paint = () => {
    pending = undefined;
    const { columns = 80, rows = 24 } = process.stdout;
    const lines = view.screen(`${title}  ${new Date().toISOString().slice(11, 19)}`, columns, rows);
    process.stdout.write(`\x1b[H${lines.join('\x1b[K\n')}\x1b[K\x1b[J`);
  };
  const draw = () => {
    pending ??= setTimeout(paint, REDRAW_MS);
  };
  process.stdout.write(ALT_SCREEN_ON);
  paint();
  const clock = setInterval(draw, 1000);
  process.stdout.on('resize', draw);
  return {
    draw,
    stop: () => {
      clearInterval(clock);
      clearTimeout(pending);
      process.stdout.off('resize', draw);
      process.stdout.write(ALT_SCREEN_OFF);
    },
  };
}
