#!/usr/bin/env node
/**
 * `cloudlet`: the command line for people at a terminal (an app developer, an operator, a laptop playing the phone).
 * One verb per task; every verb has --help, prints a table (or JSON with --json) and exits with a status from
 * errors.ts. The cloudlet is the one named by --cloudlet or $CLOUDLET, else the best-ranked one found by mDNS (for a
 * verb that acts, a paired one: which-cloudlet.ts). Whatever a cloudlet answers is printed escaped (terminal.ts).
 * This module parses the command line and dispatches; the verbs live by area in verbs-*.ts (their shape: verb.ts).
 */
import { parseArgs } from 'node:util';
import type { CloudletClient } from './client';
import { CliError, EXIT } from './errors';
import { escaped, jsonLine } from './terminal';
import type { Context, Options, Values, Verb } from './verb';
import { addAppVerb, appsVerb, downloadVerb, removeAppVerb } from './verbs-apps';
import { discoverVerb, healthVerb, systemVerb } from './verbs-cloudlet';
import { consoleVerb, handoffVerb, instancesVerb, serviceVerb, servicesVerb, startVerb, stopVerb } from './verbs-instances';
import { packageVerb } from './verbs-packages';
import { devicesVerb, pairVerb, peerVerb } from './verbs-pairing';
import { recipeVerb } from './verbs-recipes';
import { baseVerb, synthesizeVerb } from './verbs-synthesis';
import { topVerb } from './verbs-top';
import { chooseCloudlet } from './which-cloudlet';

/** Taken by every verb: any of them may have to discover its cloudlet. */
const DISCOVERY_OPTIONS: Options = { interface: { type: 'string' }, timeout: { type: 'string' } };

/** Every verb, in the order `cloudlet --help` lists them. */
const VERBS: Record<string, Verb> = {
  discover: discoverVerb,
  system: systemVerb,
  health: healthVerb,
  services: servicesVerb,
  service: serviceVerb,
  apps: appsVerb,
  instances: instancesVerb,
  top: topVerb,
  start: startVerb,
  stop: stopVerb,
  handoff: handoffVerb,
  console: consoleVerb,
  recipe: recipeVerb,
  package: packageVerb,
  download: downloadVerb,
  'add-app': addAppVerb,
  synthesize: synthesizeVerb,
  base: baseVerb,
  'remove-app': removeAppVerb,
  pair: pairVerb,
  devices: devicesVerb,
  peer: peerVerb,
};

const COMMON_HELP = [
  'Common options:',
  '  --cloudlet HOST[:PORT]  the cloudlet to use (default: $CLOUDLET, else the best-ranked one mDNS finds;',
  '                          for a verb that acts, the best-ranked one this machine paired with)',
  '  --interface ADDR        discovery: IPv4 address of the interface to query mDNS on (default: all)',
  '  --timeout MS            discovery: how long to listen for answers (default 1500)',
  '  --json                  print JSON (errors too: {"error": {"code", "message"}})',
  '  -h, --help              this help',
];

function mainHelp(): string {
  const width = Math.max(...Object.keys(VERBS).map((v) => v.length));
  return [
    'usage: cloudlet VERB [options]',
    '',
    'Verbs:',
    ...Object.entries(VERBS).map(([name, verb]) => `  ${name.padEnd(width)}  ${verb.summary}`),
    '',
    ...COMMON_HELP,
    '',
    "Run `cloudlet VERB --help` for a verb's options. Exit status: 0 ok, 1 refused or failed, 2 usage",
    '(or a verb that acts with only unpaired cloudlets discovered), 3 not found, 4 no cloudlet reachable, 5 checksum mismatch.',
  ].join('\n');
}

function verbHelp(name: string, verb: Verb): string {
  return [`usage: ${verb.usage}`, '', verb.summary, ...(verb.optionHelp ? ['', ...verb.optionHelp.map((l) => `  ${l}`)] : []), '', ...COMMON_HELP]
    .join('\n')
    .replace('VERB', name);
}

export async function run(argv: string[]): Promise<number> {
  // Common options may come before the verb (`cloudlet --cloudlet box:9999 services`): the verb is the first known one.
  const at = argv.findIndex((arg) => Object.hasOwn(VERBS, arg));
  const name = at >= 0 ? argv[at]! : undefined;
  const rest = at >= 0 ? [...argv.slice(0, at), ...argv.slice(at + 1)] : argv;
  const json = rest.includes('--json');
  try {
    if (!name) {
      const takesValue = new Set(['--cloudlet', '--interface', '--timeout']);
      const stray = argv.find((arg, i) => !arg.startsWith('-') && !takesValue.has(argv[i - 1] ?? ''));
      if (stray && stray !== 'help') throw new CliError('USAGE', `unknown verb "${stray}"; run cloudlet --help`);
      process.stdout.write(`${mainHelp()}\n`);
      return argv.length > 0 ? EXIT.OK : EXIT.USAGE;
    }
    const verb = VERBS[name]!;
    let parsed;
    try {
      parsed = parseArgs({
        args: rest,
        allowPositionals: true,
        strict: true,
        options: { ...verb.options, ...DISCOVERY_OPTIONS, cloudlet: { type: 'string' }, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
      });
    } catch (err) {
      throw new CliError('USAGE', `${(err as Error).message}; run cloudlet ${name} --help`);
    }
    const values = parsed.values as Values;
    if (values.help) {
      process.stdout.write(`${verbHelp(name, verb)}\n`);
      return EXIT.OK;
    }
    const [min, max] = verb.args ?? [0, 0];
    if (parsed.positionals.length < min || parsed.positionals.length > max) throw new CliError('USAGE', `usage: ${verb.usage}`);
    let client: Promise<CloudletClient> | undefined;
    const context: Context = {
      values,
      args: parsed.positionals,
      cloudlet: () => (client ??= chooseCloudlet(values, name, typeof verb.acts === 'function' ? verb.acts(parsed.positionals) : verb.acts === true)),
    };
    const result = await verb.run(context);
    if (result.streamed) return EXIT.OK;
    process.stdout.write(`${json ? jsonLine(result.json) : result.text}\n`);
    return EXIT.OK;
  } catch (err) {
    const error = err instanceof CliError ? err : new CliError('FAILED', (err as Error).message);
    if (json) process.stdout.write(`${jsonLine({ error: { code: error.code, message: error.message } })}\n`);
    // One line, escaped: the message may carry a cloudlet's own text.
    process.stderr.write(`cloudlet: ${escaped(error.message)}\n`);
    return error.exitCode;
  }
}

if (require.main === module) {
  void run(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
