/**
 * The verbs of Application Virtualization: the app packages a cloudlet keeps (made with `cloudlet-package`), and
 * starting one in its sandbox. A package's app id acts as a service id, so `start` is the usual start.
 */
import { stat } from 'node:fs/promises';
import path from 'node:path';
import { CliError } from './errors';
import { ProgressBar, formatBytes } from './progress';
import { shown } from './terminal';
import { listing, type Verb } from './verb';
import { startedText, type StartResultJson } from './verbs-instances';

/** Unpacking and checking a large tarball takes a while after its last byte. */
const IMPORT_TIMEOUT_MS = 5 * 60_000;

interface PackageJson {
  id: string;
  sha256: string;
  imported_at: string;
  manifest: { app_id: string; version: string; description: string; port: number; memory_mib: number; cpus: number; shareable: boolean; command: string[] };
}

const USAGE = 'cloudlet package list | package show ID | package upload FILE | package remove ID | package start ID [--no-join]';

export const packageVerb: Verb = {
  summary: 'app packages (Application Virtualization): list, show, upload and remove them; start one in its sandbox',
  usage: USAGE,
  options: { 'no-join': { type: 'boolean' } },
  optionHelp: [
    'list                 the packages: app id, version, port, limits',
    'show ID              one package and its manifest',
    'upload FILE          upload a package tarball (from cloudlet-package) with a progress bar (operator)',
    'remove ID            remove a package (operator)',
    'start ID             start the app in a sandbox; prints the endpoint once it serves',
    '  --no-join          always a new instance, even of a shareable app that runs',
  ],
  args: [1, 2],
  acts: (args) => args[0] !== 'list' && args[0] !== 'show',
  run: async ({ cloudlet, args, values }) => {
    const [action, id] = args;
    if (action === 'list' && id === undefined) {
      const { packages } = await (await cloudlet()).call<{ packages: PackageJson[] }>('GET', '/v1/packages');
      return listing('packages', packages, ['PACKAGE', 'VERSION', 'PORT', 'MEMORY', 'CPUS', 'SHAREABLE', 'DESCRIPTION'], (p) => [
        p.id,
        p.manifest.version,
        String(p.manifest.port),
        `${p.manifest.memory_mib} MiB`,
        String(p.manifest.cpus),
        p.manifest.shareable ? 'yes' : 'no',
        p.manifest.description,
      ]);
    }
    if (id === undefined) throw new CliError('USAGE', `usage: ${USAGE}`);
    if (action === 'show') {
      const found = await (await cloudlet()).call<PackageJson>('GET', `/v1/packages/${encodeURIComponent(id)}`);
      const m = found.manifest;
      const lines = [
        shown`${found.id} ${m.version}: ${m.description}`,
        shown`port ${m.port}, ${m.memory_mib} MiB, ${m.cpus} CPU(s), ${m.shareable ? 'shareable' : 'not shareable'}`,
        shown`command: ${m.command.join(' ')}`,
        shown`sha256 ${found.sha256}, imported ${found.imported_at}`,
      ];
      return { json: found, text: lines.join('\n') };
    }
    if (action === 'upload') {
      const file = path.resolve(id);
      const { size } = await stat(file);
      const bar = new ProgressBar(process.stderr, size, path.basename(file));
      const uploaded = await (
        await cloudlet()
      ).upload<PackageJson>('/v1/packages', file, size, 'application/octet-stream', (sent) => bar.update(sent), {
        timeoutMs: IMPORT_TIMEOUT_MS,
      });
      bar.finish();
      return { json: uploaded, text: shown`uploaded ${uploaded.id} ${uploaded.manifest.version} (${formatBytes(size)}, sha256 ${uploaded.sha256})` };
    }
    if (action === 'remove') {
      await (await cloudlet()).call('DELETE', `/v1/packages/${encodeURIComponent(id)}`);
      return { json: { removed: id }, text: shown`removed the package ${id}` };
    }
    if (action === 'start') {
      const result = await (await cloudlet()).call<StartResultJson>('POST', '/v1/instances', { service_id: id, join: !values['no-join'] });
      return { json: result, text: startedText(result) };
    }
    throw new CliError('USAGE', `usage: ${USAGE}`);
  },
};
