/** The verbs of VM Synthesis: uploading an overlay to launch from, and the Base VMs overlays are made against. */
import path from 'node:path';
import { exportBase, type BaseJson } from './base-export';
import { CliError } from './errors';
import { synthesizeOverlay } from './overlay-upload';
import { ProgressBar, formatBytes } from './progress';
import { shown } from './terminal';
import { listing, type Verb } from './verb';

export const synthesizeVerb: Verb = {
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
};

export const baseVerb: Verb = {
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
};
