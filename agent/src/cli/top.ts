/**
 * What `cloudlet top` shows, apart from the terminal and the socket (verbs-top.ts): the instances and their launch
 * progress as the /v1/events messages tell them, drawn as a screen (a terminal) or as one plain line per change (a
 * pipe, a log). Every message is checked before it is believed and every string from it is printed escaped; what is
 * kept is bounded, so a cloudlet that sends without end does not grow the CLI without end.
 */
import { formatBytes } from './progress';
import { escaped } from './terminal';

/** Instances followed at once: a cloudlet runs far fewer, a rogue one may invent more. */
const MAX_INSTANCES = 4096;
/** The recent changes kept for the screen's lower part. */
const MAX_RECENT = 100;

interface Row {
  id: string;
  serviceId: string;
  mechanism: string;
  state: string;
  hostPort: number;
  users: number;
  progress?: { phase: string; percent: number; bytesDone?: number; bytesTotal?: number };
}

const text = (value: unknown): string | undefined => (typeof value === 'string' ? value : undefined);
const count = (value: unknown): number => (typeof value === 'number' && Number.isFinite(value) ? value : 0);

function rowOf(value: unknown): Row | undefined {
  if (typeof value !== 'object' || value === null) return undefined;
  const i = value as Record<string, unknown>;
  const id = text(i.id);
  if (!id) return undefined;
  return {
    id,
    serviceId: text(i.service_id) ?? '?',
    mechanism: text(i.mechanism) ?? '?',
    state: text(i.state) ?? '?',
    hostPort: count(i.host_port),
    users: count(i.users),
  };
}

function clock(at: unknown): string {
  const time = typeof at === 'string' ? new Date(at) : new Date();
  return (Number.isNaN(time.getTime()) ? new Date() : time).toISOString().slice(11, 19);
}

export class TopView {
  private readonly rows = new Map<string, Row>();
  private readonly recent: string[] = [];
  /** Launches seen since the view started, and how they ended. */
  private readonly tally = { ready: 0, failed: 0 };

  /** Takes one message off the wire; returns the plain lines it adds (none for one that is not understood). */
  apply(raw: string): string[] {
    let message: Record<string, unknown>;
    try {
      const parsed: unknown = JSON.parse(raw);
      if (typeof parsed !== 'object' || parsed === null) return [];
      message = parsed as Record<string, unknown>;
    } catch {
      return [];
    }
    if (message.type === 'snapshot' && Array.isArray(message.instances)) {
      this.rows.clear();
      for (const row of message.instances.map(rowOf)) if (row) this.keep(row);
      return [...this.rows.values()].map((row) => this.note(`${clock(undefined)} ${row.state.padEnd(8)} ${describe(row)}`));
    }
    if (message.type === 'instance') {
      const row = rowOf(message.instance);
      const state = text(message.state);
      if (!row || !state) return [];
      const reason = text(message.reason);
      const previous = this.rows.get(row.id);
      if (state === 'stopped' || state === 'crashed' || state === 'moved') {
        this.rows.delete(row.id);
        if (previous?.state === 'starting') this.tally.failed++;
      } else {
        if (state === 'ready' && previous?.state === 'starting') this.tally.ready++;
        this.keep({ ...row, state });
      }
      return [this.note(`${clock(message.at)} ${state.padEnd(8)} ${describe(row)}${reason ? ` (${reason})` : ''}`)];
    }
    if (message.type === 'progress') {
      const id = text(message.instance_id);
      const phase = text(message.phase);
      const row = id === undefined ? undefined : this.rows.get(id);
      if (!row || !phase) return [];
      const percent = Math.max(0, Math.min(100, count(message.percent)));
      const bytesTotal = count(message.bytes_total);
      const newPhase = row.progress?.phase !== phase;
      row.progress = { phase, percent, ...(bytesTotal > 0 ? { bytesDone: count(message.bytes_done), bytesTotal } : {}) };
      // The plain output gets a line per phase, not per percent: a log stays readable.
      return newPhase ? [escaped(`${clock(message.at)} ${'progress'.padEnd(8)} ${describe(row)} ${progressText(row.progress)}`)] : [];
    }
    return [];
  }

  /** The screen: a header, the instances with their launch progress, and the latest changes, in `height` lines. */
  screen(title: string, width: number, height: number): string[] {
    const rows = [...this.rows.values()].sort((a, b) => a.serviceId.localeCompare(b.serviceId) || a.id.localeCompare(b.id));
    const table = [
      ['INSTANCE', 'SERVICE', 'MECHANISM', 'STATE', 'PORT', 'USERS', 'PROGRESS'],
      ...rows.map((r) => [
        r.id.slice(0, 8),
        escaped(r.serviceId),
        escaped(r.mechanism),
        escaped(r.state),
        String(r.hostPort),
        String(r.users),
        r.state === 'starting' && r.progress ? progressText(r.progress) : '',
      ]),
    ];
    const widths = table[0]!.map((_, i) => Math.max(...table.map((cells) => cells[i]!.length)));
    const lines = [
      `${escaped(title)}  ${rows.length} instance(s), ${rows.filter((r) => r.state === 'starting').length} starting; launches seen: ${this.tally.ready} ready, ${this.tally.failed} failed`,
      '',
      ...table.map((cells) => cells.map((cell, i) => cell.padEnd(widths[i]!)).join('  ')),
    ];
    const room = height - lines.length - 3;
    if (room > 0 && this.recent.length > 0) lines.push('', 'recent:', ...this.recent.slice(-room));
    return lines.slice(0, Math.max(1, height - 1)).map((line) => line.slice(0, Math.max(1, width)));
  }

  private keep(row: Row): void {
    const previous = this.rows.get(row.id);
    if (previous?.progress && row.state === 'starting') row.progress = previous.progress;
    this.rows.delete(row.id);
    this.rows.set(row.id, row);
    if (this.rows.size > MAX_INSTANCES) this.rows.delete(this.rows.keys().next().value!);
  }

  /** An escaped line, also kept for the screen's recent changes. */
  private note(line: string): string {
    const safe = escaped(line);
    this.recent.push(safe);
    if (this.recent.length > MAX_RECENT) this.recent.shift();
    return safe;
  }
}

function describe(row: Row): string {
  return `${row.id} ${row.serviceId} ${row.mechanism}${row.hostPort ? ` port ${row.hostPort}` : ''}`;
}

function progressText(p: NonNullable<Row['progress']>): string {
  const filled = Math.round(p.percent / 10);
  const bytes = p.bytesTotal ? ` ${formatBytes(p.bytesDone ?? 0)}/${formatBytes(p.bytesTotal)}` : '';
  return `[${'#'.repeat(filled)}${'.'.repeat(10 - filled)}] ${Math.floor(p.percent)}% ${p.phase}${bytes}`;
}
