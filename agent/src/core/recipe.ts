/**
 * On-Demand VM Provisioning recipes: which Base VM, the service it becomes (port, readiness, memory), the files to
 * put in it, a provisioning script and optional packages. A recipe is untrusted input from a client, so it is
 * validated strictly here (sizes, absolute normalized paths, required fields) before anything is created for it.
 * It reaches the guest as one cloud-init NoCloud user-data script (userDataScript), which real cloud images run too.
 */
import { createHash } from 'node:crypto';
import { CloudletError } from '../errors';
import { LIMITS, ManifestReader, SERVICE_ID, readiness } from './manifest';
import type { BaseVm } from './bases';
import type { ReadinessProbe, Service } from './types';

export interface RecipeFile {
  /** Absolute path in the guest. */
  path: string;
  content: Buffer;
  /** Permission bits, e.g. 0o644. */
  mode: number;
}

export interface Recipe {
  format: 1;
  /** The service this recipe makes; also the recipe's id and the id of its cached result. */
  service_id: string;
  version: string;
  description: string;
  /** A Base VM's name or digest. */
  base: string;
  port: number;
  /** Absent: the base's. */
  memory_mib: number | null;
  vcpus: number | null;
  shareable: boolean;
  /** Its timeout bounds the whole provisioning: boot, script and service start. */
  readiness: ReadinessProbe;
  files: RecipeFile[];
  /** Runs in the guest after the files are written and the packages installed; must start with `#!`. */
  script: string;
  packages: string[];
  /** `after-first-use`: the first on-demand provisioning also caches the result as a Cached VM service. */
  cache: 'on-request' | 'after-first-use';
}

/** What a recipe may weigh: it travels in one HTTP body and ends up in a config drive. */
export const RECIPE_LIMITS = { bodyBytes: 1 << 20, files: 64, fileBytes: 512 << 10, scriptBytes: 64 << 10, packages: 64, pathChars: 255 };
/** Guest paths: absolute, made of plain segments (no `.`/`..`, no quoting hazards). */
const GUEST_PATH = /^(\/[A-Za-z0-9_+@-][A-Za-z0-9._+@-]*)+$/;
const PACKAGE_NAME = /^[a-z0-9][a-z0-9+.-]{0,99}$/;
/** Free text that ends up inside the generated user-data script: one line, no control characters. */
const ONE_LINE = /^[^\p{Cc}\u2028\u2029]*$/u;
const DEFAULT_TIMEOUT_MS = 120000;

/** Field problems come from the shared manifest reader; they are recipe problems here. */
function asRecipeError(err: unknown): unknown {
  if (!(err instanceof CloudletError) || err.code !== 'INVALID_MANIFEST') return err;
  return new CloudletError('INVALID_RECIPE', err.message.replace(/^manifest\.json/, 'recipe'), { details: err.details });
}

function invalid(field: string, problem: string): CloudletError {
  return new CloudletError('INVALID_RECIPE', `recipe: ${field} ${problem}`, { details: { field } });
}

export function parseRecipe(json: unknown): Recipe {
  try {
    return readRecipe(ManifestReader.of(json));
  } catch (err) {
    throw asRecipeError(err);
  }
}

function readRecipe(r: ManifestReader): Recipe {
  const raw = r.raw;
  if (raw.format !== 1) r.fail('format', 'must be 1');
  const script = r.string('script', raw.script);
  if (Buffer.byteLength(script) > RECIPE_LIMITS.scriptBytes) throw invalid('script', `is larger than ${RECIPE_LIMITS.scriptBytes} bytes`);
  if (!script.startsWith('#!')) throw invalid('script', 'must start with an interpreter line such as #!/bin/sh');
  if (raw.cache !== undefined && raw.cache !== 'on-request' && raw.cache !== 'after-first-use')
    throw invalid('cache', 'must be "on-request" or "after-first-use"');
  return {
    format: 1,
    service_id: r.string('service_id', raw.service_id, SERVICE_ID),
    version: oneLine('version', r.string('version')),
    // A stored recipe (recipeJson) has '' and null for what its author left out: it must read back after a restart.
    description: raw.description === undefined || raw.description === '' ? '' : oneLine('description', r.string('description')),
    base: r.string('base', raw.base, /^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$/),
    port: r.integer('port', 1, 65535),
    memory_mib: raw.memory_mib == null ? null : r.integer('memory_mib', LIMITS.memoryMib.min, LIMITS.memoryMib.max),
    vcpus: raw.vcpus == null ? null : r.integer('vcpus', LIMITS.vcpus.min, LIMITS.vcpus.max),
    shareable: r.flag('shareable'),
    readiness: readiness(r, raw.readiness ?? { type: 'tcp', timeout_ms: DEFAULT_TIMEOUT_MS }),
    files: readFiles(raw.files),
    script,
    packages: readPackages(raw.packages),
    cache: raw.cache === 'after-first-use' ? 'after-first-use' : 'on-request',
  };
}

/** A newline in `version` would end the script's comment line and run the rest as a command in the guest. */
function oneLine(field: string, value: string): string {
  if (!ONE_LINE.test(value)) throw invalid(field, 'must be one line of text, without newlines or other control characters');
  return value;
}

function readFiles(value: unknown): RecipeFile[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) throw invalid('files', 'must be a list of {path, content, encoding?, mode?}');
  if (value.length > RECIPE_LIMITS.files) throw invalid('files', `has more than ${RECIPE_LIMITS.files} entries`);
  const seen = new Set<string>();
  let total = 0;
  const files = value.map((entry: unknown, i): RecipeFile => {
    const field = `files[${i}]`;
    if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) throw invalid(field, 'must be an object {path, content, encoding?, mode?}');
    const { path, content, encoding, mode } = entry as Record<string, unknown>;
    if (typeof path !== 'string' || path.length > RECIPE_LIMITS.pathChars || !GUEST_PATH.test(path) || path.split('/').some((s) => s === '.' || s === '..')) {
      throw invalid(`${field}.path`, `must be an absolute path of plain segments (no "..", at most ${RECIPE_LIMITS.pathChars} characters)`);
    }
    if (seen.has(path)) throw invalid(`${field}.path`, `names ${path} twice`);
    seen.add(path);
    if (typeof content !== 'string') throw invalid(`${field}.content`, 'must be a string');
    if (encoding !== undefined && encoding !== 'utf8' && encoding !== 'base64') throw invalid(`${field}.encoding`, 'must be "utf8" or "base64"');
    if (encoding === 'base64' && !/^[A-Za-z0-9+/]*={0,2}$/.test(content)) throw invalid(`${field}.content`, 'is not valid base64');
    if (mode !== undefined && (typeof mode !== 'string' || !/^0?[0-7]{3}$/.test(mode)))
      throw invalid(`${field}.mode`, 'must be an octal string such as "0644"');
    const bytes = Buffer.from(content, encoding === 'base64' ? 'base64' : 'utf8');
    total += bytes.length;
    return { path, content: bytes, mode: mode === undefined ? 0o644 : parseInt(mode, 8) };
  });
  if (total > RECIPE_LIMITS.fileBytes) throw invalid('files', `hold more than ${RECIPE_LIMITS.fileBytes} bytes in all`);
  return files;
}

function readPackages(value: unknown): string[] {
  if (value === undefined) return [];
  if (!Array.isArray(value) || value.length > RECIPE_LIMITS.packages || !value.every((p) => typeof p === 'string' && PACKAGE_NAME.test(p))) {
    throw invalid('packages', `must be a list of at most ${RECIPE_LIMITS.packages} package names`);
  }
  return value as string[];
}

/** The recipe as stored and shown: file contents as base64, so the JSON reads back into the same recipe. */
export function recipeJson(recipe: Recipe) {
  return {
    ...recipe,
    files: recipe.files.map((f) => ({ path: f.path, content: f.content.toString('base64'), encoding: 'base64', mode: `0${f.mode.toString(8)}` })),
  };
}

/** Identifies exactly this recipe: a cached result made from another version of it is not used. */
export function recipeDigest(recipe: Recipe): string {
  return createHash('sha256')
    .update(JSON.stringify(recipeJson(recipe)))
    .digest('hex');
}

/** The tag a cached result carries in its service manifest, naming the recipe it was made from. */
export function recipeTag(recipe: Recipe): string {
  return `${RECIPE_TAG_PREFIX}${recipeDigest(recipe).slice(0, 40)}`;
}
export const RECIPE_TAG_PREFIX = 'recipe-sha256:';

/** Console markers of the end of a provisioning (the test guest's /init prints the same ones). */
export const PROVISIONED = 'CLOUDLET-PROVISIONED';
export const PROVISIONING_FAILED = 'CLOUDLET-PROVISIONING-FAILED';

const quote = (s: string) => `'${s}'`; // paths and package names are validated: they never contain a quote
const base64Lines = (b: Buffer) => (b.toString('base64').match(/.{1,76}/g) ?? []).join('\n');

/**
 * The NoCloud user-data: one POSIX shell script that writes the files, installs the packages and runs the recipe's
 * script, stopping at the first failure. Each payload is a base64 here-document, so no content can end one early.
 */
export function userDataScript(recipe: Recipe): string {
  const lines = [
    '#!/bin/sh',
    `# cloudlet recipe ${recipe.service_id} ${recipe.version}: written by the cloudlet agent`,
    'set -e',
    // The agent follows the provisioning on the serial console: these two lines end it, on any guest.
    `trap 'status=$?; [ $status -eq 0 ] || echo "${PROVISIONING_FAILED} exit status $status" > /dev/console' EXIT`,
    `echo "recipe ${recipe.service_id}: writing ${recipe.files.length} file(s)"`,
  ];
  for (const file of recipe.files) {
    const dir = file.path.slice(0, file.path.lastIndexOf('/')) || '/';
    lines.push(
      `mkdir -p ${quote(dir)}`,
      `base64 -d > ${quote(file.path)} <<'CLOUDLET_EOF'`,
      base64Lines(file.content),
      'CLOUDLET_EOF',
      `chmod ${file.mode.toString(8)} ${quote(file.path)}`,
    );
  }
  if (recipe.packages.length > 0) {
    const names = recipe.packages.map(quote).join(' ');
    lines.push(
      `echo "recipe ${recipe.service_id}: installing ${recipe.packages.join(' ')}"`,
      `if command -v apt-get >/dev/null 2>&1; then DEBIAN_FRONTEND=noninteractive apt-get install -y ${names}`,
      `elif command -v apk >/dev/null 2>&1; then apk add ${names}`,
      `else echo "recipe ${recipe.service_id}: this base has no package manager for ${recipe.packages.join(' ')}" >&2; exit 1; fi`,
    );
  }
  lines.push(
    'script=$(mktemp)',
    `base64 -d > "$script" <<'CLOUDLET_EOF'`,
    base64Lines(Buffer.from(recipe.script)),
    'CLOUDLET_EOF',
    'chmod 700 "$script"',
    `echo "recipe ${recipe.service_id}: running the provisioning script"`,
    '"$script"',
    'rm -f "$script"',
    `echo "${PROVISIONED} recipe ${recipe.service_id}" > /dev/console`,
    '',
  );
  return lines.join('\n');
}

/** The service a recipe makes, still on its base: what an on-demand launch is planned with. */
export interface RecipeService extends Service {
  recipe: Recipe;
  base: BaseVm;
}

/**
 * The service a recipe describes, running on its base's files. The base boots cold even if it has a memory state:
 * cloud-init-style provisioning happens at boot. `ds=nocloud` tells the guest a config drive is attached.
 */
export function recipeService(recipe: Recipe, base: BaseVm): RecipeService {
  const b = base.manifest;
  return {
    id: recipe.service_id,
    dir: base.dir,
    importedAt: new Date().toISOString(),
    recipe,
    base,
    manifest: {
      format: 1,
      service_id: recipe.service_id,
      version: recipe.version,
      description: recipe.description || `${recipe.service_id} provisioned from base ${base.name}`,
      tags: [recipeTag(recipe)],
      port: recipe.port,
      memory_mib: recipe.memory_mib ?? b.memory_mib,
      vcpus: recipe.vcpus ?? b.vcpus,
      shareable: recipe.shareable,
      readiness: recipe.readiness,
      disk: b.disk,
      state: null,
      boot: b.boot && { ...b.boot, cmdline: `${b.boot.cmdline} ds=nocloud`.trim() },
    },
  };
}
