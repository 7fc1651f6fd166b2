/**
 * The /v1 routes of VM Synthesis (docs/api.md): an overlay from a file on this cloudlet (operator only), or uploaded
 * in a resumable upload: announce its size, send its bytes from wherever the cloudlet stands, get the synthesized
 * instance when the last byte is in. Either can keep the VM as a Cached VM service (`keep_as`, admin only). Same
 * conventions as v1.ts.
 */
import { deviceIdOf } from '../trust/access';
import type { ProvisioningApi, SynthesisOptions, SynthesisResult, UploadView } from '../core/types';
import { CloudletError } from '../errors';
import { hostOf, jsonReply, type ApiRequest, type Route } from './routing';
import { jsonObject, requiredString } from './json-fields';
import { serviceJson, startResultJson } from './wire-shapes';

export function synthesisRoutes(api: ProvisioningApi): Route[] {
  return [
    {
      method: 'POST',
      path: '/v1/synthesis',
      access: 'admin',
      jsonBody: true,
      handle: async (request) => {
        const body = jsonObject(request.body);
        const result = await api.synthesizeFile(requiredString(body, 'path'), synthesisOptions(request, body));
        return jsonReply(201, synthesisResultJson(result));
      },
    },
    {
      method: 'POST',
      path: '/v1/synthesis/uploads',
      access: 'device',
      jsonBody: true,
      handle: async (request) => {
        const body = jsonObject(request.body);
        return jsonReply(201, uploadJson(await api.createOverlayUpload(requiredCount(body.bytes, 'bytes'), synthesisOptions(request, body))));
      },
    },
    {
      method: 'GET',
      path: '/v1/synthesis/uploads/:id',
      access: 'device',
      handle: (request) => jsonReply(200, uploadJson(api.overlayUpload(request.params.id!, deviceIdOf(request.caller)))),
    },
    { method: 'POST', path: '/v1/synthesis/uploads/:id', access: 'device', streamBody: true, handle: (request) => appendUpload(api, request) },
  ];
}

/** 201 with the instance once the upload is complete and the VM ready; 202 with where the upload stands if not. */
async function appendUpload(api: ProvisioningApi, request: ApiRequest) {
  const offset = requiredCount(Number(request.query.get('offset') ?? NaN), 'offset');
  const outcome = await api.appendOverlayUpload(request.params.id!, offset, request.bodyStream!.stream, deviceIdOf(request.caller));
  return outcome.complete ? jsonReply(201, synthesisResultJson(outcome.result)) : jsonReply(202, uploadJson(outcome.upload));
}

function synthesisOptions(request: ApiRequest, body: Record<string, unknown>): SynthesisOptions {
  const keepAs = body.keep_as;
  if (keepAs !== undefined && keepAs !== null && typeof keepAs !== 'string') {
    throw new CloudletError('INVALID_PARAMETER', 'keep_as must be a service id', { details: { parameter: 'keep_as' } });
  }
  // Keeping adds a service to the catalog: the operator's to decide, like importing one.
  if (keepAs !== undefined && keepAs !== null && request.caller.kind !== 'admin') {
    throw new CloudletError('ADMIN_ONLY', 'keep_as adds a service to the catalog: it needs the admin credential', { details: { parameter: 'keep_as' } });
  }
  const clientHost = hostOf(request.header('host'));
  const deviceId = deviceIdOf(request.caller);
  return { ...(clientHost ? { clientHost } : {}), ...(deviceId ? { deviceId } : {}), ...(typeof keepAs === 'string' ? { keepAs } : {}) };
}

function requiredCount(value: unknown, name: string): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new CloudletError('INVALID_PARAMETER', `${name} must be a non-negative integer`, { details: { parameter: name } });
  }
  return value;
}

/** A start result, plus the service the VM was kept as (`kept_as`) or why keeping it failed (`keep_error`). */
function synthesisResultJson(result: SynthesisResult) {
  return {
    ...startResultJson(result),
    // Only the operator keeps a synthesis (keep_as is admin-only): the kept service's answer is the operator's.
    ...(result.keptAs ? { kept_as: serviceJson(result.keptAs, { kind: 'admin' }) } : {}),
    ...(result.keepError ? { keep_error: { code: result.keepError.code, message: result.keepError.message } } : {}),
  };
}

function uploadJson(upload: UploadView<SynthesisResult>) {
  return {
    id: upload.id,
    bytes: upload.bytes,
    received: upload.received,
    state: upload.state,
    upload: `/v1/synthesis/uploads/${upload.id}`,
    ...(upload.result ? { result: synthesisResultJson(upload.result) } : {}),
    ...(upload.error ? { error: { code: upload.error.code, message: upload.error.message } } : {}),
  };
}
