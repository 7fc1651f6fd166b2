/**
 * The verbs of On-Demand VM Provisioning: the recipes a cloudlet keeps, and starting a Service VM from one (its cached
 * result when there is one, else provisioned from its base while the CLI waits).
 */
import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { CliError } from './errors';
import { shown } from './terminal';
import { listing, type Verb } from './verb';
import { startedText, type StartResultJson } from './verbs-instances';

/** The cloudlet takes a recipe of at most 1 MiB (RECIPE_LIMITS.bodyBytes); a larger file is refused here, unread. */
const MAX_RECIPE_BYTES = 1 << 20;
/** Provisioning boots a base and runs the recipe's script: the answer comes once the service is ready. */
const PROVISION_TIMEOUT_MS = 15 * 60_000;

interface RecipeSummary {
  id: string;
  version: string;
  description: string;
  base: string;
  digest: string;
  port: number;
  files: number;
  packages: string[];
  cache: string;
}

const USAGE = 'cloudlet recipe list | recipe show ID | recipe add FILE | recipe remove ID | recipe start ID [--no-join] | recipe cache ID';

export const recipeVerb: Verb = {
  summary: 'On-Demand VM Provisioning: list, show, add and remove recipes; start an instance from one, or cache its result',
  usage: USAGE,
  options: { 'no-join': { type: 'boolean' } },
  optionHelp: [
    'list                 the recipes: id, version, base, port, how their result is cached',
    'show ID              one recipe, whole (JSON: its files as base64)',
    'add FILE             store the recipe in FILE (JSON, at most 1 MiB), replacing one with the same id (operator)',
    'remove ID            remove a recipe (operator)',
    'start ID             start an instance of the recipe: its cached result, else provisioned from its base (can take minutes)',
    '  --no-join          always a new instance, even of a shareable service that runs',
    'cache ID             provision the recipe once and keep the result as the Cached VM service ID (operator)',
  ],
  args: [1, 2],
  acts: (args) => args[0] !== 'list' && args[0] !== 'show',
  run: async ({ cloudlet, args, values }) => {
    const [action, id] = args;
    const at = (suffix = '') => `/v1/recipes/${encodeURIComponent(id!)}${suffix}`;
    if (action === 'list' && id === undefined) {
      const { recipes } = await (await cloudlet()).call<{ recipes: RecipeSummary[] }>('GET', '/v1/recipes');
      return listing('recipes', recipes, ['RECIPE', 'VERSION', 'BASE', 'PORT', 'CACHE', 'DESCRIPTION'], (r) => [
        r.id,
        r.version,
        r.base,
        String(r.port),
        r.cache,
        r.description,
      ]);
    }
    if (id === undefined) throw new CliError('USAGE', `usage: ${USAGE}`);
    if (action === 'show') {
      const recipe = await (await cloudlet()).call<RecipeSummary & { recipe: { packages: string[]; files: Array<{ path: string }> } }>('GET', at());
      const lines = [
        shown`${recipe.id} ${recipe.version}: ${recipe.description}`,
        shown`base ${recipe.base}, port ${recipe.port}, cache ${recipe.cache}, digest ${recipe.digest}`,
        shown`packages: ${recipe.packages.join(' ') || '-'}`,
        shown`files: ${recipe.recipe.files.map((f) => f.path).join(' ') || '-'}`,
      ];
      return { json: recipe, text: lines.join('\n') };
    }
    if (action === 'add') {
      const file = path.resolve(id);
      if ((await stat(file)).size > MAX_RECIPE_BYTES) throw new CliError('PAYLOAD_TOO_LARGE', `${file} is larger than a recipe may be (1 MiB)`);
      let recipe: unknown;
      try {
        recipe = JSON.parse(await readFile(file, 'utf8'));
      } catch (err) {
        throw new CliError('INVALID_RECIPE', `${file} is not JSON: ${(err as Error).message}`);
      }
      const stored = await (await cloudlet()).call<RecipeSummary>('POST', '/v1/recipes', recipe);
      return { json: stored, text: shown`stored the recipe ${stored.id} ${stored.version} (on ${stored.base})` };
    }
    if (action === 'remove') {
      await (await cloudlet()).call('DELETE', at());
      return { json: { removed: id }, text: shown`removed the recipe ${id}` };
    }
    if (action === 'start') {
      process.stderr.write(shown`provisioning ${id}; the answer comes once its service is ready (follow it with cloudlet top)\n`);
      const client = await cloudlet();
      const result = await client.call<StartResultJson>('POST', at('/instances'), { join: !values['no-join'] }, PROVISION_TIMEOUT_MS);
      return { json: result, text: startedText(result) };
    }
    if (action === 'cache') {
      const service = await (await cloudlet()).call<{ id: string }>('POST', at('/cache'), undefined, PROVISION_TIMEOUT_MS);
      return { json: service, text: shown`cached the recipe ${id} as the service ${service.id}` };
    }
    throw new CliError('USAGE', `usage: ${USAGE}`);
  },
};
