/**
 * `cloudlet synthesize`: send a VM overlay to a cloudlet's resumable upload (docs/api.md, VM Synthesis) and wait for
 * the synthesized VM. A cut connection, or a cloudlet that restarts meanwhile, costs only a reconnect: the CLI asks
 * where the upload stands and sends the rest from the last byte the cloudlet kept.
 */
import { stat } from 'node:fs/promises';
import type { CloudletClient } from './client';
import { CliError } from './errors';

export interface UploadJson {
  id: string;
  bytes: number;
  received: number;
  state: 'receiving' | 'synthesizing' | 'done' | 'failed';
  result?: SynthesisJson;
  error?: { code: string; message: string };
}

export interface SynthesisJson {
  instance: { id: string; service_id: string; mechanism: string; launch: string };
  endpoint: { address: string; port: number };
  kept_as?: { id: string };
  keep_error?: { code: string; message: string };
}

export interface OverlayUploadOptions {
  keepAs?: string;
  /** Continue this upload (one an earlier run started) instead of starting one. */
  resume?: string;
  /** Give up when the cloudlet stays unreachable this long in a row. */
  reconnectForMs: number;
  /** Bytes of the overlay sent so far (counting what the cloudlet already had), of `total`. */
  onProgress(sent: number, total: number): void;
  /** The upload exists (its id lets a later run resume it), or continues after a reconnect. */
  onUpload(upload: UploadJson, reconnected: boolean): void;
}

/** How long the cloudlet may take to answer the last bytes: it applies the overlay and waits until the VM is ready. */
const SYNTHESIS_TIMEOUT_MS = 15 * 60_000;
const RECONNECT_DELAY_MS = 500;
/** A cloudlet that keeps refusing to continue (CONFLICT: it still sees the cut request sending) is given up on. */
const MAX_RECONNECTS = 100;

export async function synthesizeOverlay(
  client: CloudletClient,
  file: string,
  options: OverlayUploadOptions,
): Promise<{ upload: UploadJson; result: SynthesisJson; reconnects: number }> {
  const size = await stat(file).then(
    (s) => (s.isFile() ? s.size : -1),
    () => -1,
  );
  if (size <= 0) throw new CliError('USAGE', `not a readable, non-empty file: ${file}`);
  let upload = options.resume
    ? await client.call<UploadJson>('GET', `/v1/synthesis/uploads/${encodeURIComponent(options.resume)}`)
    : await client.call<UploadJson>('POST', '/v1/synthesis/uploads', { bytes: size, ...(options.keepAs ? { keep_as: options.keepAs } : {}) });
  if (upload.bytes !== size) throw new CliError('USAGE', `upload ${upload.id} is of ${upload.bytes} bytes, but ${file} has ${size}`);
  options.onUpload(upload, false);
  let reconnects = 0;
  for (;;) {
    if (upload.state === 'done' && upload.result) return { upload, result: upload.result, reconnects };
    if (upload.state === 'failed') throw new CliError(upload.error?.code ?? 'FAILED', upload.error?.message ?? `upload ${upload.id} failed`);
    try {
      if (upload.state === 'receiving') {
        const answer = await client.upload<UploadJson | SynthesisJson>(
          `/v1/synthesis/uploads/${encodeURIComponent(upload.id)}?offset=${upload.received}`,
          file,
          size,
          'application/octet-stream',
          (sent) => options.onProgress(sent, size),
          { from: upload.received, timeoutMs: SYNTHESIS_TIMEOUT_MS },
        );
        if ('instance' in answer) return { upload: { ...upload, received: size, state: 'done', result: answer }, result: answer, reconnects };
        upload = answer;
        continue;
      }
      // Every byte is in and the VM is being made (this run reconnected meanwhile): wait for the outcome.
      await new Promise((resolve) => setTimeout(resolve, RECONNECT_DELAY_MS));
      upload = await client.call<UploadJson>('GET', `/v1/synthesis/uploads/${encodeURIComponent(upload.id)}`);
    } catch (err) {
      if (!(err instanceof CliError) || !['CONNECTION_CUT', 'UNREACHABLE', 'CONFLICT'].includes(err.code) || reconnects >= MAX_RECONNECTS) throw err;
      upload = await reconnect(client, upload.id, options.reconnectForMs);
      reconnects++;
      options.onUpload(upload, true);
    }
  }
}

/** Where the upload stands, asked again and again until the cloudlet answers (it may be restarting). */
async function reconnect(client: CloudletClient, id: string, forMs: number): Promise<UploadJson> {
  const deadline = Date.now() + forMs;
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, RECONNECT_DELAY_MS));
    try {
      return await client.call<UploadJson>('GET', `/v1/synthesis/uploads/${encodeURIComponent(id)}`);
    } catch (err) {
      if (!(err instanceof CliError) || err.code !== 'UNREACHABLE' || Date.now() >= deadline) throw err;
    }
  }
}
