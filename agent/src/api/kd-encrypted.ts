/**
 * KD-Cloudlet's encrypted face (`kdApi: 'encrypted'`): as in pycloud, /api then has one route, POST /api/command,
 * whose form field `command` is a plain-face call encrypted with the calling device's own password
 * (trust/kd-cipher.ts): `/<controller>/<action>&k=v&...`. The call is run in-process by the plain face's own
 * handlers and a 200 answer goes back encrypted; errors go back in clear, with KD's `#` texts for 401/403, which
 * client-lib turns into a CredentialsException. Where this differs from pycloud, and why: docs/api.md.
 */
import { readFile, stat } from 'node:fs/promises';
import { CloudletError, asCloudletError } from '../errors';
import { kdDecrypt, kdEncrypt } from '../trust/kd-cipher';
import type { DeviceRegistry } from '../trust/devices';
import { webobError } from './kd-cloudlet';
import { matchPath, textReply, type ApiRequest, type Face, type Reply } from './routing';

/** The commands pycloud's encrypted controller accepts (its API_ACTIONS_MAP), by controller; '' is the bare path. */
const COMMANDS: Record<string, readonly string[]> = {
  services: ['', 'get'],
  servicevm: ['start', 'stop'],
  apps: ['', 'get'],
  system: ['', 'get_messages'],
};

/**
 * An encrypted download is built in memory (its ciphertext depends on a fresh IV, so it cannot be served from disk
 * as is); an app larger than this is refused rather than held whole.
 */
const KD_ENCRYPTED_FILE_MAX_BYTES = 64 * 1024 * 1024;

export type DeviceKeys = Pick<DeviceRegistry, 'standing' | 'legacyPassword' | 'get'>;

export function kdEncryptedFace(plain: Face, devices: DeviceKeys): Face {
  return {
    prefix: plain.prefix,
    routes: [{ method: 'POST', path: '/api/command', access: 'open', formBody: true, handle: (request) => runCommand(plain, devices, request) }],
    headAsGet: false,
    wrongMethod: 'not-found',
    errorReply: plain.errorReply,
  };
}

async function runCommand(plain: Face, devices: DeviceKeys, request: ApiRequest): Promise<Reply> {
  // pycloud fails with a KeyError (500) on a missing header; naming no device is simply not being paired.
  const deviceId = request.header('x-device-id') ?? '';
  // A paired cloudlet is no KD device: its credential is good for its deliberate list of /v1 routes only.
  const refusal = securityRefusal(deviceId, devices.get(deviceId)?.kind === 'cloudlet' ? 'not-paired' : devices.standing(deviceId));
  if (refusal) return refusal;
  const password = devices.legacyPassword(deviceId);
  const encrypted = request.form?.get('command');
  if (!encrypted) return webobError(400, '400 Bad Request - must provide command');
  const plaintext = kdDecrypt(encrypted, password);
  const command = plaintext && parseCommand(plaintext);
  const route =
    command && COMMANDS[command.controller]?.includes(command.action)
      ? plain.routes.find((r) => r.method === 'GET' && matchPath(r.path, command.path) !== null)
      : undefined;
  // Whatever does not decrypt, or decrypts to no known command, gets one and the same answer, which echoes nothing:
  // with no MAC, any difference (bad padding vs. an unknown command) is a padding oracle on the device's commands.
  if (!command || !route) return UNKNOWN_COMMAND();

  const inner: ApiRequest = {
    ...request,
    method: 'GET',
    path: command.path,
    params: {},
    query: command.query,
    body: undefined,
    form: undefined,
    // The device is the one whose key decrypted the command: the instance it starts is its own.
    header: (name) => (name === 'x-device-id' ? deviceId : request.header(name)),
    caller: { kind: 'device', device: devices.get(deviceId)! },
  };
  let reply: Reply;
  try {
    reply = await route.handle(inner);
  } catch (err) {
    reply = plain.errorReply(asCloudletError(err));
  }
  // An authorization that ended while the command ran (a start the core then undid) is refused as KD refuses it.
  const ended = securityRefusal(deviceId, devices.standing(deviceId));
  if (ended) return ended;
  // Errors stay in clear, as pycloud sends them (client-lib reads only a 200 body as ciphertext).
  if (reply.status !== 200) return reply;
  const body = reply.file
    ? await readSmallFile(reply.file.path)
    : Buffer.from(command.controller === 'apps' && command.action === '' ? withoutMd5(reply.body) : reply.body);
  return textReply(200, kdEncrypt(body, password));
}

/** KD's texts and statuses for a device that may not call (null: it may). */
function securityRefusal(deviceId: string, standing: ReturnType<DeviceKeys['standing']>): Reply | null {
  if (standing === 'not-paired') return webobError(401, `#Device with id ${deviceId} is not paired to this cloudlet`);
  if (standing === 'revoked') return webobError(403, `#Authorization has been revoked for device with id ${deviceId}`);
  if (standing === 'expired') return webobError(403, `#Authorization has expired for device with id ${deviceId}`);
  return null;
}

interface Command {
  controller: string;
  action: string;
  path: string;
  query: URLSearchParams;
}

/** The one answer to a command that does not decrypt or is not a known one. */
const UNKNOWN_COMMAND = (): Reply => webobError(404, '#Command not found');

const UTF8 = new TextDecoder('utf-8', { fatal: true });

/**
 * `/<controller>[/<action>]&k=v&...` in UTF-8, values not URL-encoded (split on '&', then on the first '='), as
 * client-lib builds it; null for anything else.
 */
function parseCommand(plaintext: Buffer): Command | null {
  let text: string;
  try {
    text = UTF8.decode(plaintext);
  } catch {
    return null;
  }
  const [target = '', ...pairs] = text.split('&');
  const match = /^\/([a-z_]+)(?:\/([a-z_]*))?$/.exec(target);
  if (!match) return null;
  const controller = match[1]!;
  const action = match[2] ?? '';
  const query = new URLSearchParams();
  for (const pair of pairs) {
    const eq = pair.indexOf('=');
    if (eq > 0) query.append(pair.slice(0, eq), pair.slice(eq + 1));
  }
  return { controller, action, path: action ? `/api/${controller}/${action}` : `/api/${controller}`, query };
}

/**
 * client-lib checks an app's md5sum against the MD5 of the bytes it received, which in encrypted mode are the
 * ciphertext (different on every download): the list says null, which client-lib takes as "do not check".
 */
function withoutMd5(json: string): string {
  const list = JSON.parse(json) as { apps: Record<string, unknown>[] };
  return JSON.stringify({ apps: list.apps.map((app) => ({ ...app, md5sum: null })) });
}

async function readSmallFile(path: string): Promise<Buffer> {
  const { size } = await stat(path);
  if (size > KD_ENCRYPTED_FILE_MAX_BYTES) {
    throw new CloudletError('PAYLOAD_TOO_LARGE', `The file has ${size} bytes; the encrypted API sends at most ${KD_ENCRYPTED_FILE_MAX_BYTES}`, {
      details: { limit: KD_ENCRYPTED_FILE_MAX_BYTES },
    });
  }
  return readFile(path);
}
