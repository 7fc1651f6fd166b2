/** The verbs of Cloudlet Push: listing and downloading the apps a cloudlet offers, and (operator) adding or removing one. */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import path from 'node:path';
import { bareFileName, checkedDigest, serverPath } from './answers';
import { CliError } from './errors';
import { ProgressBar, formatBytes } from './progress';
import { shown } from './terminal';
import { listing, type Verb } from './verb';

export const appsVerb: Verb = {
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
};

export const downloadVerb: Verb = {
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
};

export const addAppVerb: Verb = {
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
};

export const removeAppVerb: Verb = {
  summary: 'remove an app from the cloudlet (operator, on the cloudlet itself)',
  usage: 'cloudlet remove-app APP_ID',
  args: [1, 1],
  acts: true,
  run: async ({ cloudlet, args }) => {
    await (await cloudlet()).call('DELETE', `/v1/apps/${encodeURIComponent(args[0]!)}`);
    return { json: { removed: args[0] }, text: shown`removed ${args[0]}` };
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
