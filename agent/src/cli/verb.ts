/** What a verb of the `cloudlet` CLI is (main.ts dispatches to them by name), and the shape of a list verb's result. */
import type { ParseArgsConfig } from 'node:util';
import type { CloudletClient } from './client';
import { table } from './terminal';

export type Options = NonNullable<ParseArgsConfig['options']>;
export type Values = Record<string, string | boolean | undefined>;

export interface Context {
  values: Values;
  args: string[];
  /** The cloudlet to talk to, resolved on first use (discovery takes a moment). */
  cloudlet: () => Promise<CloudletClient>;
}

export interface Verb {
  summary: string;
  usage: string;
  options?: Options;
  optionHelp?: string[];
  /** Positional arguments: their count must be within [min, max] (default none). */
  args?: [number, number];
  /**
   * Whether the verb acts on the cloudlet (starts, uploads, changes it) rather than reads: then a discovered
   * cloudlet must be a paired one. A function of the arguments for a verb with both kinds of action.
   */
  acts?: boolean | ((args: string[]) => boolean);
  /** What to print: `text` for people, `json` with --json; nothing when the verb wrote its output as it went (`streamed`). */
  run(context: Context): Promise<{ json: unknown; text: string; streamed?: boolean }>;
}

/** A list verb's result: `{<what>: [...]}` for scripts, a table (or "no <what>") for people. */
export function listing<T>(what: string, items: T[], header: string[], row: (item: T) => string[]): { json: unknown; text: string } {
  return { json: { [what]: items }, text: items.length === 0 ? `no ${what}` : table(header, items.map(row)) };
}
