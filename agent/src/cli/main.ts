#!/usr/bin/env node
/**
 * `cloudlet`: the command line for people at a terminal (an app developer, an operator, a laptop playing the phone).
 * One verb per task; every verb has --help, prints a table (or JSON with --json) and exits with a status from
 * errors.ts. The cloudlet is the one named by --cloudlet or $CLOUDLET, else the best-ranked one found by mDNS (for a
 * verb that acts, a paired one: which-cloudlet.ts). Whatever a cloudlet answers is printed escaped (terminal.ts).
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { bareFileName, checkedDigest, serverPath } from './answers';
import { exportBase, type BaseJson } from './base-export';
import { parseCloudlet, type CloudletClient } from './client';
import { pairWith } from './credentials';
import type { DiscoveredCloudlet } from './discovery';
import { CliError, EXIT } from './errors';
import { synthesizeOverlay } from './overlay-upload';
import { ProgressBar, formatBytes } from './progress';
import type { Ranked } from './ranking';
import { escaped, jsonLine, shown, table } from './terminal';
import { chooseCloudlet, discoverRanked } from './which-cloudlet';

type Options = NonNullable<ParseArgsConfig['options']>;
type Values = Record<string, string | boolean | undefined>;

interface Context {
  values: Values;
  args: string[];
  /** The cloudlet to talk to, resolved on first use (discovery takes a moment). */
  cloudlet: () => Promise<CloudletClient>;
}

interface Verb {
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
  run(context: Context): Promise<{ json: unknown; text: string }>;
}

const DISCOVERY_OPTIONS: Options = { interface: { type: 'string' }, timeout: { type: 'string' } };

const VERBS: Record<string, Verb> = {
  discover: {
    summary: 'find cloudlets on the LAN (mDNS) and rank them as SEI client-lib does',
    usage: 'cloudlet discover [--interface ADDR] [--timeout MS]',
    optionHelp: ["Rank = 100 × max_cores − CPU usage from each one's /api/system; a rank ≤ 0 is never chosen."],
    run: async ({ values }) => {
      const ranked = await discoverRanked(values);
      const rows = ranked.map(rankedJson);
      return {
        json: { cloudlets: rows },
        text:
          rows.length === 0
            ? 'no cloudlet answered'
            : table(
                ['NAME', 'ADDRESS', 'RANK', 'ENCRYPTION'],
                rows.map((r) => [r.name, `${r.address}:${r.port}`, r.rank === null ? `unreachable (${r.error})` : String(r.rank), r.encryption ?? '-']),
              ),
      };
    },
  },
  system: {
    summary: 'show the cloudlet: host, CPU, memory, hypervisor, instances',
    usage: 'cloudlet system',
    run: async ({ cloudlet }) => {
      const client = await cloudlet();
      const info = await client.call<{
        hostname: string;
        agent_version: string;
        cpu: { cores: number; usage_percent: number };
        memory: { total_bytes: number; free_bytes: number };
        instances: number;
      }>('GET', '/v1/system');
      return {
        json: { cloudlet: client.label, ...info },
        text: [
          shown`${info.hostname} (${client.label}), agent ${info.agent_version}`,
          shown`cpu: ${info.cpu.cores} cores, ${info.cpu.usage_percent}% used`,
          shown`memory: ${formatBytes(info.memory.free_bytes)} free of ${formatBytes(info.memory.total_bytes)}`,
          shown`instances: ${info.instances}`,
        ].join('\n'),
      };
    },
  },
  services: {
    summary: 'list the services the cloudlet offers',
    usage: 'cloudlet services',
    run: async ({ cloudlet }) => {
      const { services } = await (
        await cloudlet()
      ).call<{ services: Array<{ id: string; manifest: { version: string; description: string; shareable: boolean } }> }>('GET', '/v1/services');
      return listing('services', services, ['SERVICE', 'VERSION', 'SHAREABLE', 'DESCRIPTION'], (s) => [
        s.id,
        s.manifest.version,
        s.manifest.shareable ? 'yes' : 'no',
        s.manifest.description,
      ]);
    },
  },
  apps: {
    summary: 'list the apps (Cloudlet Push) the cloudlet offers',
    usage: 'cloudlet apps [--service ID] [--os-name NAME] [--os-version V] [--tags A,B]',
    options: { service: { type: 'string' }, 'os-name': { type: 'string' }, 'os-version': { type: 'string' }, tags: { type: 'string' } },
    optionHelp: [
      '--service ID       only apps for this service',
      '--os-name NAME     Android or web',
      '--os-version V      only apps that run on this OS version',
      '--tags A,B         only apps with one of these tags',
    ],
    run: async ({ cloudlet, values }) => {
      const query = new URLSearchParams();
      for (const [option, parameter] of [
        ['service', 'service_id'],
        ['os-name', 'os_name'],
        ['os-version', 'os_version'],
        ['tags', 'tags'],
      ] as const) {
        if (typeof values[option] === 'string') query.set(parameter, values[option]);
      }
      const { apps } = await (await cloudlet()).call<{ apps: AppJson[] }>('GET', `/v1/apps${query.size ? `?${query.toString()}` : ''}`);
      return listing('apps', apps, ['APP', 'NAME', 'KIND', 'VERSION', 'SIZE', 'SERVICE'], (a) => [
        a.id,
        a.name,
        a.kind,
        a.version,
        formatBytes(a.size),
        a.service_id,
      ]);
    },
  },
  instances: {
    summary: 'list the running instances',
    usage: 'cloudlet instances',
    run: async ({ cloudlet }) => {
      const { instances } = await (
        await cloudlet()
      ).call<{ instances: Array<{ id: string; service_id: string; state: string; host_port: number; users: number }> }>('GET', '/v1/instances');
      return listing('instances', instances, ['INSTANCE', 'SERVICE', 'STATE', 'PORT', 'USERS'], (i) => [
        i.id,
        i.service_id,
        i.state,
        String(i.host_port),
        String(i.users),
      ]);
    },
  },
  start: {
    summary: 'start (or join) an instance of a service; prints the endpoint once it is ready',
    usage: 'cloudlet start SERVICE_ID [--no-join]',
    options: { 'no-join': { type: 'boolean' } },
    optionHelp: ['--no-join          always start a new instance, even of a shareable service that is running'],
    args: [1, 1],
    acts: true,
    run: async ({ cloudlet, args, values }) => {
      const result = await (
        await cloudlet()
      ).call<{ instance: { id: string }; endpoint: { address: string; port: number }; joined: boolean }>('POST', '/v1/instances', {
        service_id: args[0],
        join: !values['no-join'],
      });
      return {
        json: result,
        text: [shown`${result.joined ? 'joined' : 'started'} ${result.instance.id}`, shown`endpoint ${result.endpoint.address}:${result.endpoint.port}`].join(
          '\n',
        ),
      };
    },
  },
  stop: {
    summary: 'stop (release) an instance',
    usage: 'cloudlet stop INSTANCE_ID',
    args: [1, 1],
    acts: true,
    run: async ({ cloudlet, args }) => {
      const result = await (await cloudlet()).call<{ destroyed: boolean; users: number }>('DELETE', `/v1/instances/${encodeURIComponent(args[0]!)}`);
      return { json: result, text: result.destroyed ? shown`stopped ${args[0]}` : shown`released ${args[0]} (${result.users} user(s) left)` };
    },
  },
  download: {
    summary: 'download an app, resuming an interrupted download, and check its SHA-256',
    usage: 'cloudlet download APP_ID [--output FILE]',
    options: { output: { type: 'string', short: 'o' } },
    optionHelp: [
      "-o, --output FILE  where to save it (default: the app's file name in the current directory, if it is a plain name)",
      'An interrupted download leaves FILE.part; running the command again resumes it.',
    ],
    args: [1, 1],
    run: async ({ cloudlet, args, values }) => {
      const client = await cloudlet();
      const app = await client.call<AppJson>('GET', `/v1/apps/${encodeURIComponent(args[0]!)}`);
      // The cloudlet only proposes a name: a plain one, in the current directory, never a path it chose.
      const output = path.resolve(typeof values.output === 'string' ? values.output : bareFileName(app.file_name, "the app's file"));
      const expected = checkedDigest({ bytes: app.size, sha256: app.sha256 }, 'the app');
      let bar: ProgressBar | undefined;
      const result = await client.download(serverPath(app.download, 'the app'), output, expected, (done, resumedFrom) => {
        bar ??= new ProgressBar(process.stderr, expected.size, path.basename(output), resumedFrom);
        bar.update(done);
      });
      bar?.finish();
      return {
        json: { app: app.id, file: output, size: app.size, sha256: app.sha256, resumed_from: result.resumedFrom, transferred: result.bytes },
        text: shown`saved ${output} (${formatBytes(app.size)}${result.resumedFrom ? `, resumed at ${formatBytes(result.resumedFrom)}` : ''}), SHA-256 verified`,
      };
    },
  },
  'add-app': {
    summary: 'add an app to the cloudlet (operator, on the cloudlet itself)',
    usage: 'cloudlet add-app FILE --service ID --name NAME [--kind android|web] [--package P] [--version V] [--min-os V] [--tags A,B] [--description TEXT]',
    options: {
      service: { type: 'string' },
      name: { type: 'string' },
      kind: { type: 'string' },
      package: { type: 'string' },
      version: { type: 'string' },
      'min-os': { type: 'string' },
      tags: { type: 'string' },
      description: { type: 'string' },
    },
    optionHelp: [
      '--service ID       the service the app is a client of (required)',
      '--name NAME        shown to users (required)',
      '--kind KIND        android (an APK, the default) or web (a zip bundle)',
      '--package P        the Android package name',
      "--version V        the app's version",
      '--min-os V         lowest OS version it runs on',
      '--tags A,B         tags phones filter by',
      '--description TEXT',
    ],
    args: [1, 1],
    acts: true,
    run: async ({ cloudlet, args, values }) => {
      const file = path.resolve(args[0]!);
      if (typeof values.service !== 'string' || typeof values.name !== 'string') throw new CliError('USAGE', 'add-app needs --service and --name');
      const size = await stat(file).then(
        (s) => (s.isFile() ? s.size : -1),
        () => -1,
      );
      if (size < 0) throw new CliError('USAGE', `not a readable file: ${file}`);
      // Hashed here first: the cloudlet refuses the upload if what arrives differs.
      const sha256 = createHash('sha256');
      for await (const chunk of createReadStream(file)) sha256.update(chunk as Buffer);
      const query = new URLSearchParams({
        service_id: values.service,
        name: values.name,
        file_name: path.basename(file),
        sha256: sha256.digest('hex'),
        kind: typeof values.kind === 'string' ? values.kind : 'android',
      });
      for (const [option, parameter] of [
        ['package', 'package_name'],
        ['version', 'version'],
        ['min-os', 'min_os_version'],
        ['tags', 'tags'],
        ['description', 'description'],
      ] as const) {
        if (typeof values[option] === 'string') query.set(parameter, values[option]);
      }
      const bar = new ProgressBar(process.stderr, size, path.basename(file));
      const app = await (await cloudlet()).upload<AppJson>(`/v1/apps?${query.toString()}`, file, size, 'application/octet-stream', (sent) => bar.update(sent));
      bar.finish();
      return { json: app, text: shown`added ${app.id} ${app.name} (${formatBytes(app.size)}, sha256 ${app.sha256})` };
    },
  },
  synthesize: {
    summary: 'upload a VM overlay, resuming after a cut connection; prints the endpoint once the synthesized VM is ready',
    usage: 'cloudlet synthesize OVERLAY [--keep-as SERVICE_ID] [--resume UPLOAD_ID] [--reconnect-for MS]',
    options: { 'keep-as': { type: 'string' }, resume: { type: 'string' }, 'reconnect-for': { type: 'string' } },
    optionHelp: [
      '--keep-as ID       once it is ready, also keep the VM as the Cached VM service ID (operator: admin credential)',
      '--resume UPLOAD_ID continue an upload an earlier run started (its id is printed when it starts)',
      '--reconnect-for MS keep trying to reach a cloudlet that went away for this long (default 120000)',
      'A cut connection, or a cloudlet restarting meanwhile, costs only a reconnect: the upload goes on from the last byte it kept.',
    ],
    args: [1, 1],
    acts: true,
    run: async ({ cloudlet, args, values }) => {
      const file = path.resolve(args[0]!);
      const reconnectForMs = typeof values['reconnect-for'] === 'string' ? Number(values['reconnect-for']) : 120_000;
      if (!(reconnectForMs >= 0)) throw new CliError('USAGE', '--reconnect-for must be a number of milliseconds');
      let bar: ProgressBar | undefined;
      const { upload, result, reconnects } = await synthesizeOverlay(await cloudlet(), file, {
        ...(typeof values['keep-as'] === 'string' ? { keepAs: values['keep-as'] } : {}),
        ...(typeof values.resume === 'string' ? { resume: values.resume } : {}),
        reconnectForMs,
        onUpload: (u, reconnected) => {
          bar?.finish();
          process.stderr.write(`${reconnected ? shown`reconnected: the cloudlet has ${formatBytes(u.received)}, continuing` : shown`upload ${u.id}`}\n`);
          bar = new ProgressBar(process.stderr, u.bytes, path.basename(file), u.received);
        },
        onProgress: (sent) => bar?.update(sent),
      });
      bar?.finish();
      return {
        json: { upload_id: upload.id, reconnects, ...result },
        text: [
          shown`synthesized ${result.instance.id} (${result.instance.service_id}, ${result.instance.launch})`,
          shown`endpoint ${result.endpoint.address}:${result.endpoint.port}`,
          ...(result.kept_as ? [shown`kept as the service ${result.kept_as.id}`] : []),
          ...(result.keep_error ? [shown`not kept: ${result.keep_error.message}`] : []),
        ].join('\n'),
      };
    },
  },
  base: {
    summary: 'Base VMs: list them, import one (operator, on the cloudlet), export one to make overlays against',
    usage: 'cloudlet base list | base import DIR|--from-service ID --name NAME | base export BASE OUT_DIR',
    options: { name: { type: 'string' }, 'from-service': { type: 'string' } },
    optionHelp: [
      'list                         the bases: name, digest, memory, files',
      'import DIR --name NAME       import the base in DIR (on the cloudlet: manifest.json and the files it names)',
      'import --from-service ID ... import a service of the catalog (its disk and memory state) as a base',
      'export BASE OUT_DIR          download a base (by name or digest) with its chunk index, resumably, for cloudlet-overlay create',
    ],
    args: [1, 3],
    acts: (args) => args[0] === 'import',
    run: async ({ cloudlet, args, values }) => {
      const [action, ...rest] = args;
      const client = await cloudlet();
      if (action === 'list' && rest.length === 0) {
        const { bases } = await client.call<{ bases: BaseJson[] }>('GET', '/v1/bases');
        return listing('bases', bases, ['BASE', 'DIGEST', 'MEMORY', 'STATE', 'SIZE'], (b) => [
          b.name,
          b.digest.slice(0, 12),
          `${b.memory_mib} MiB`,
          b.state ? 'yes' : 'no',
          formatBytes(b.files.reduce((sum, f) => sum + f.bytes, 0)),
        ]);
      }
      if (action === 'import' && rest.length <= 1 && typeof values.name === 'string' && (rest.length === 1) !== (typeof values['from-service'] === 'string')) {
        const dir =
          rest.length === 1
            ? path.resolve(rest[0]!)
            : (await client.call<{ dir: string }>('GET', `/v1/services/${encodeURIComponent(values['from-service'] as string)}`)).dir;
        const base = await client.call<BaseJson>('POST', '/v1/bases', { path: dir, name: values.name });
        return { json: base, text: shown`imported ${base.name} (${base.digest})` };
      }
      if (action === 'export' && rest.length === 2) {
        const outDir = path.resolve(rest[1]!);
        let bar: ProgressBar | undefined;
        const { base, fetched, resumedFrom } = await exportBase(client, rest[0]!, outDir, (done, total) => {
          bar ??= new ProgressBar(process.stderr, total, rest[0]!, done);
          bar.update(done);
        });
        bar?.finish();
        return {
          json: { base: base.digest, name: base.name, dir: outDir, files: base.files.map((f) => f.name), fetched, resumed_from: resumedFrom },
          text: shown`exported ${base.name} (${base.digest}) to ${outDir}: ${formatBytes(fetched)} fetched, SHA-256 verified`,
        };
      }
      throw new CliError('USAGE', 'usage: cloudlet base list | base import DIR|--from-service ID --name NAME | base export BASE OUT_DIR');
    },
  },
  'remove-app': {
    summary: 'remove an app from the cloudlet (operator, on the cloudlet itself)',
    usage: 'cloudlet remove-app APP_ID',
    args: [1, 1],
    acts: true,
    run: async ({ cloudlet, args }) => {
      await (await cloudlet()).call('DELETE', `/v1/apps/${encodeURIComponent(args[0]!)}`);
      return { json: { removed: args[0] }, text: shown`removed ${args[0]}` };
    },
  },
  pair: {
    summary: 'pairing: `pair open` (operator, on the cloudlet) prints a one-time code; `pair CODE` pairs this machine with it',
    usage: 'cloudlet pair open [--ttl SECONDS] [--expires-in MINUTES] | cloudlet pair CODE --cloudlet HOST[:PORT] [--name NAME] [--device-id ID]',
    options: { ttl: { type: 'string' }, 'expires-in': { type: 'string' }, name: { type: 'string' }, 'device-id': { type: 'string' } },
    optionHelp: [
      'open                the operator opens a pairing window (admin credential, on the cloudlet) and reads the code out',
      '--ttl SECONDS       how long the window stays open (default 300)',
      "--expires-in MIN    the paired device's authorization ends after this many minutes (default: until revoked)",
      "CODE                pair this machine: its token and the cloudlet's pinned certificate are stored in",
      "                    ~/.config/cloudlet/credentials.json; compare the fingerprint printed with the operator's",
      '--name NAME         how the device is listed (default: this host name)',
      '--device-id ID      the id to pair under (default: one the cloudlet picks)',
    ],
    args: [1, 1],
    acts: true,
    run: async ({ cloudlet, args, values }) => {
      const number = (option: string) => (typeof values[option] === 'string' ? Number(values[option]) : undefined);
      if (args[0] === 'open') {
        const window = await (
          await cloudlet()
        ).call<{ code: string; expires_at: string; tls_fingerprint: string; tls_port: number }>('POST', '/v1/pairing', {
          ...(number('ttl') !== undefined ? { ttl_seconds: number('ttl') } : {}),
          ...(number('expires-in') !== undefined ? { expires_in_minutes: number('expires-in') } : {}),
        });
        return {
          json: window,
          text: [shown`pairing code: ${window.code} (until ${window.expires_at})`, shown`certificate SHA-256: ${window.tls_fingerprint}`].join('\n'),
        };
      }
      const named = typeof values.cloudlet === 'string' ? values.cloudlet : process.env.CLOUDLET;
      if (!named) throw new CliError('USAGE', 'pair CODE needs --cloudlet HOST[:PORT] (the cloudlet whose operator gave the code)');
      const { host, port } = parseCloudlet(named);
      const paired = await pairWith(host, port, args[0]!, {
        name: typeof values.name === 'string' ? values.name : os.hostname(),
        ...(typeof values['device-id'] === 'string' ? { id: values['device-id'] } : {}),
      });
      const { token: _token, certificate: _certificate, ...kept } = paired;
      return {
        json: kept,
        text: [
          shown`paired with ${paired.cloudlet} as ${paired.device_id}`,
          shown`certificate SHA-256: ${paired.tls_fingerprint}`,
          'compare it with the one the operator sees; later calls use HTTPS pinned to it',
        ].join('\n'),
      };
    },
  },
  devices: {
    summary: 'paired devices (operator, on the cloudlet): list, `revoke ID` (its instances are released) or `remove ID`',
    usage: 'cloudlet devices [revoke ID | remove ID]',
    args: [0, 2],
    acts: true,
    run: async ({ cloudlet, args }) => {
      const client = await cloudlet();
      const [action, id] = args;
      if (action === undefined) {
        const { devices } = await client.call<{ devices: Array<{ id: string; name: string; paired_at: string; expires_at: string | null; standing: string }> }>(
          'GET',
          '/v1/devices',
        );
        return listing('devices', devices, ['DEVICE', 'NAME', 'STANDING', 'PAIRED', 'EXPIRES'], (d) => [
          d.id,
          d.name,
          d.standing,
          d.paired_at,
          d.expires_at ?? 'never',
        ]);
      }
      if (action === 'revoke' && id) {
        const device = await client.call<{ id: string }>('POST', `/v1/devices/${encodeURIComponent(id)}/revoke`);
        return { json: device, text: shown`revoked ${id}` };
      }
      if (action === 'remove' && id) {
        await client.call('DELETE', `/v1/devices/${encodeURIComponent(id)}`);
        return { json: { removed: id }, text: shown`removed ${id}` };
      }
      throw new CliError('USAGE', 'usage: cloudlet devices [revoke ID | remove ID]');
    },
  },
};

interface AppJson {
  id: string;
  name: string;
  kind: string;
  version: string;
  size: number;
  sha256: string;
  service_id: string;
  file_name: string;
  download: string;
}

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

function rankedJson(r: Ranked<DiscoveredCloudlet>) {
  return {
    name: r.cloudlet.name,
    host: r.cloudlet.host,
    address: r.cloudlet.address,
    port: r.cloudlet.port,
    encryption: r.cloudlet.txt.encryption ?? null,
    rank: r.rank,
    eligible: r.eligible,
    ...(r.error ? { error: r.error } : {}),
  };
}

/** A list verb's result: `{<what>: [...]}` for scripts, a table (or "no <what>") for people. */
function listing<T>(what: string, items: T[], header: string[], row: (item: T) => string[]): { json: unknown; text: string } {
  return { json: { [what]: items }, text: items.length === 0 ? `no ${what}` : table(header, items.map(row)) };
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
