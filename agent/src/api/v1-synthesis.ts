/**
 * The /v1 routes of VM Synthesis (docs/api.md): an overlay from a file on this cloudlet (operator only), or uploaded
 * in a resumable upload: announce its size, send its bytes from wherever the cloudlet stands, get the synthesized
 * instance when the last byte is in. Same conventions as v1.ts.
 */
import type { ProvisioningApi } from '../core/types';
import { CloudletError } from '../errors';
import type { UploadView } from '../synthesis/uploads';
import { hostOf, jsonReply, type ApiRequest, type Route } from './routing';
import { jsonObject, requiredString, startResultJson } from './v1';
import { requireLocalClient } from './v1-apps';

export function synthesisRoutes(api: ProvisioningApi): Route[] {
  return [
    {
      method: 'POST',
      path: '/v1/synthesis',
      jsonBody: true,
      handle: async (request) => {
        requireLocalClient(request);
        const result = await api.synthesizeFile(requiredString(jsonObject(request.body), 'path'), hostOf(request.header('host')));
        return jsonReply(201, startResultJson(result));
      },
    },
    {
      method: 'POST',
      path: '/v1/synthesis/uploads',
      jsonBody: true,
      handle: (request) => jsonReply(201, uploadJson(api.createOverlayUpload(requiredCount(jsonObject(request.body).bytes, 'bytes'), hostOf(request.header('host'))))),
    },
    { method: 'GET', path: '/v1/synthesis/uploads/:id', handle: ({ params }) => jsonReply(200, uploadJson(api.overlayUpload(params.id!))) },
    { method: 'POST', path: '/v1/synthesis/uploads/:id', streamBody: true, handle: (request) => appendUpload(api, request) },
  ];
}

/** 201 with the instance once the upload is complete and the VM ready; 202 with where the upload stands if not. */
async function appendUpload(api: ProvisioningApi, request: ApiRequest) {
  const offset = requiredCount(Number(request.query.get('offset') ?? NaN), 'offset');
  const outcome = await api.appendOverlayUpload(request.params.id!, offset, request.bodyStream!.stream);
  return outcome.complete ? jsonReply(201, startResultJson(outcome.result)) : jsonReply(202, uploadJson(outcome.upload));
}

function requiredCount(value: unknown, name: string): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new CloudletError('INVALID_PARAMETER', `${name} must be a non-negative integer`, { details: { parameter: name } });
  }
  return value;
}

function uploadJson(upload: UploadView) {
  return { id: upload.id, bytes: upload.bytes, received: upload.received, state: upload.state, upload: `/v1/synthesis/uploads/${upload.id}` };
}
