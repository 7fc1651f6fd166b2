/**
 * The /v1 operations of v1-provisioning.ts and v1-synthesis.ts, as data (see openapi-operations.ts): Base VMs, recipes,
 * consoles, VM Synthesis.
 */
import type { ErrorCode } from '../errors';
import { binary, body, fileAnswers, LAUNCH_ERRORS, list, noContent, str, type Operation, type Schema } from './openapi-operations';
import { ref } from './openapi-schemas';

const SYNTHESIS_ERRORS: ErrorCode[] = [
  'OVERLAY_INVALID',
  'OVERLAY_UNSUPPORTED',
  'OVERLAY_UNTRUSTED',
  'OVERLAY_TOO_LARGE',
  'BASE_NOT_FOUND',
  'SERVICE_EXISTS',
  ...LAUNCH_ERRORS,
];
const PROVISION_ERRORS: ErrorCode[] = ['RECIPE_NOT_FOUND', 'BASE_NOT_FOUND', 'PROVISIONING_FAILED', 'IMAGE_TOOL_FAILED', ...LAUNCH_ERRORS];
const keepAs: Schema = { type: ['string', 'null'], description: 'Also keep the VM as this Cached VM service (admin credential only).' };

export const PROVISIONING_OPERATIONS: Record<string, Operation> = {
  'GET /v1/instances/{id}/console': {
    id: 'getConsole',
    tag: 'instances',
    summary: 'The end of a VM’s serial console',
    access: 'admin',
    query: { bytes: { description: 'How many of the last bytes (default 65536).', schema: { type: 'integer', minimum: 1, maximum: 1048576 } } },
    ok: { 200: { description: 'The console text.', schema: str, mediaType: 'text/plain' } },
    errors: ['INSTANCE_NOT_FOUND', 'INVALID_PARAMETER'],
  },

  'GET /v1/bases': {
    id: 'listBases',
    tag: 'bases',
    summary: 'The Base VMs',
    access: 'device',
    ok: { 200: { description: 'The bases.', schema: list('bases', 'Base') } },
    errors: [],
  },
  'GET /v1/bases/{ref}': {
    id: 'getBase',
    tag: 'bases',
    summary: 'One Base VM, by digest or name',
    access: 'device',
    ok: { 200: { description: 'The base.', schema: ref('Base') } },
    errors: ['BASE_NOT_FOUND'],
  },
  'GET /v1/bases/{ref}/files/{name}': {
    id: 'downloadBaseFile',
    tag: 'bases',
    summary: 'Download one of a base’s files (resumable)',
    access: 'device',
    ok: fileAnswers,
    errors: ['BASE_NOT_FOUND', 'NOT_FOUND'],
  },
  'POST /v1/bases': {
    id: 'importBase',
    tag: 'bases',
    summary: 'Import a Base VM from a directory on the cloudlet',
    access: 'admin',
    body: { kind: 'json', schema: body({ path: str, name: str }, ['path', 'name']) },
    ok: { 201: { description: 'Imported, its chunk index built.', schema: ref('Base') } },
    errors: ['MISSING_PARAMETER', 'INVALID_PARAMETER', 'INVALID_MANIFEST', 'INVALID_IMAGE', 'CONFLICT', 'NO_SPACE'],
  },

  'GET /v1/recipes': {
    id: 'listRecipes',
    tag: 'recipes',
    summary: 'The recipes (On-Demand VM Provisioning)',
    access: 'device',
    ok: { 200: { description: 'The recipes.', schema: list('recipes', 'RecipeSummary') } },
    errors: [],
  },
  'GET /v1/recipes/{id}': {
    id: 'getRecipe',
    tag: 'recipes',
    summary: 'One recipe, whole',
    access: 'device',
    ok: {
      200: {
        description: 'Its summary plus the recipe (file contents as base64).',
        schema: { allOf: [ref('RecipeSummary')], properties: { recipe: ref('Recipe') } },
      },
    },
    errors: ['RECIPE_NOT_FOUND'],
  },
  'POST /v1/recipes': {
    id: 'storeRecipe',
    tag: 'recipes',
    summary: 'Store a recipe (replacing one of the same id)',
    access: 'admin',
    body: { kind: 'json', schema: ref('Recipe'), description: 'At most 1 MiB.' },
    ok: { 201: { description: 'Stored.', schema: ref('RecipeSummary') } },
    errors: ['INVALID_RECIPE', 'BASE_NOT_FOUND'],
  },
  'DELETE /v1/recipes/{id}': {
    id: 'removeRecipe',
    tag: 'recipes',
    summary: 'Remove a recipe',
    access: 'admin',
    ok: noContent,
    errors: ['RECIPE_NOT_FOUND'],
  },
  'POST /v1/recipes/{id}/instances': {
    id: 'provisionRecipe',
    tag: 'recipes',
    summary: 'Start an instance of a recipe: its cached result, else provisioned from the base',
    access: 'device',
    body: { kind: 'json', required: false, schema: body({ join: { type: 'boolean', default: false } }, []) },
    ok: { 201: { description: 'Ready.', schema: ref('StartResult') } },
    errors: PROVISION_ERRORS,
  },
  'POST /v1/recipes/{id}/cache': {
    id: 'cacheRecipe',
    tag: 'recipes',
    summary: 'Provision a recipe on a throwaway VM and keep it as a Cached VM service',
    access: 'admin',
    ok: { 200: { description: 'The service kept.', schema: ref('Service') } },
    errors: [...PROVISION_ERRORS, 'SERVICE_EXISTS', 'SERVICE_IN_USE'],
  },

  'POST /v1/synthesis': {
    id: 'synthesizeFile',
    tag: 'synthesis',
    summary: 'VM Synthesis from an overlay file on the cloudlet',
    access: 'admin',
    body: { kind: 'json', schema: body({ path: str, keep_as: keepAs }, ['path']) },
    ok: { 201: { description: 'The synthesized VM is ready.', schema: ref('SynthesisResult') } },
    errors: ['MISSING_PARAMETER', 'INVALID_PARAMETER', ...SYNTHESIS_ERRORS],
  },
  'POST /v1/synthesis/uploads': {
    id: 'createUpload',
    tag: 'synthesis',
    summary: 'Announce an overlay upload (resumable)',
    access: 'device',
    body: { kind: 'json', schema: body({ bytes: { type: 'integer', minimum: 0 }, keep_as: keepAs }, ['bytes']) },
    ok: { 201: { description: 'The upload.', schema: ref('Upload') } },
    errors: ['INVALID_PARAMETER', 'SERVICE_EXISTS', 'ADMIN_ONLY', 'TOO_MANY_UPLOADS', 'OVERLAY_TOO_LARGE', 'NO_SPACE'],
  },
  'GET /v1/synthesis/uploads/{id}': {
    id: 'getUpload',
    tag: 'synthesis',
    summary: 'Where an upload stands (and its outcome)',
    access: 'device',
    ok: { 200: { description: 'The upload.', schema: ref('Upload') } },
    errors: ['NOT_FOUND'],
  },
  'POST /v1/synthesis/uploads/{id}': {
    id: 'appendUpload',
    tag: 'synthesis',
    summary: 'Send an overlay’s bytes from `offset`',
    access: 'device',
    query: { offset: { description: 'Where these bytes start: the upload’s `received`.', required: true, schema: { type: 'integer', minimum: 0 } } },
    body: { kind: 'stream', schema: binary, mediaType: 'application/octet-stream' },
    ok: {
      201: { description: 'These bytes completed the upload; the synthesized VM is ready.', schema: ref('SynthesisResult') },
      202: { description: 'Not complete yet: send the rest from `received`.', schema: ref('Upload') },
    },
    errors: ['CONFLICT', 'NOT_FOUND', 'INVALID_PARAMETER', ...SYNTHESIS_ERRORS],
  },
};
