/**
 * The CLI's credentials. To its own agent (a loopback address on the port the agent's configuration names, and only
 * when the cloudlet was named, never when discovered) it is the operator and uses the admin token from the agent's
 * data directory. Elsewhere it is a paired device: `cloudlet pair CODE` stores the device token and the cloudlet's
 * certificate, pinned by its SHA-256 fingerprint, in $XDG_CONFIG_HOME/cloudlet/credentials.json (0600; default
 * ~/.config), and later calls go over HTTPS to that certificate only.
 */
import { readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { loadConfig } from '../config';
import { isErrno } from '../errors';
import { isLoopback } from '../trust/access';
import { readAdminToken } from '../trust/admin-token';
import { writeSecretFile } from '../trust/secret-file';
import { CloudletClient, type ClientAuth } from './client';
import { CliError } from './errors';

/** What pairing left for one cloudlet, by its `host:port`. */
export interface StoredCredential {
  device_id: string;
  token: string;
  tls_port: number;
  tls_fingerprint: string;
  certificate: string;
  paired_at: string;
}

type CredentialsFile = Record<string, StoredCredential>;

export function credentialsFile(env: NodeJS.ProcessEnv = process.env): string {
  return path.join(env.XDG_CONFIG_HOME || path.join(os.homedir(), '.config'), 'cloudlet', 'credentials.json');
}

const keyOf = (host: string, port: number) => `${host.includes(':') ? `[${host}]` : host}:${port}`;

async function readCredentials(): Promise<CredentialsFile> {
  try {
    return JSON.parse(await readFile(credentialsFile(), 'utf8')) as CredentialsFile;
  } catch (err) {
    if (isErrno(err, 'ENOENT')) return {};
    throw new CliError('FAILED', `cannot read ${credentialsFile()}: ${(err as Error).message}`);
  }
}

/** A cloudlet as the CLI found it: `named` on the command line (or $CLOUDLET), or discovered (then `names` has its mDNS host). */
export interface Target {
  host: string;
  port: number;
  named: boolean;
  /** Other names the same cloudlet goes by, under which pairing may have stored its credential. */
  names?: string[];
}

/**
 * How to talk to a cloudlet: as the operator on the box, as a paired device, or (undefined) without a credential.
 * The admin token goes only where the agent's own configuration (file and CLOUDLET_* environment, as the agent reads
 * them) says the agent listens, on loopback, to a cloudlet named explicitly: any loopback port may be a forwarded
 * instance or another local user's listener, and a discovered address is whatever mDNS said. A device token goes
 * to any cloudlet pairing stored it for, safely: only over HTTPS, to the pinned certificate.
 */
export async function authFor(target: Target): Promise<ClientAuth | undefined> {
  if (target.named && (target.host === 'localhost' || isLoopback(target.host))) {
    const config = await loadConfig().catch((err: Error) => {
      throw new CliError(
        'FAILED',
        `cannot read the agent's configuration to tell whether ${keyOf(target.host, target.port)} is this box's agent: ${err.message}`,
      );
    });
    const token = config.api.port === target.port ? await readAdminToken(config.dataDir) : null;
    if (token) return { token };
  }
  const stored = await readCredentials();
  const entry = [target.host, ...(target.names ?? [])].map((host) => stored[keyOf(host, target.port)]).find((c) => c !== undefined);
  return entry && { token: entry.token, tls: { port: entry.tls_port, ca: entry.certificate, fingerprint: entry.tls_fingerprint } };
}

/**
 * Pair with the cloudlet at host:port using the code its operator read out: learn its certificate (trust on first
 * use: the fingerprint is printed for the operator to compare with theirs), claim over HTTPS pinned to it, store the
 * token. The code never travels in clear.
 */
export async function pairWith(
  host: string,
  port: number,
  code: string,
  device: { name: string; id?: string },
): Promise<StoredCredential & { cloudlet: string }> {
  const system = await new CloudletClient(host, port).call<{ tls_port: number | null; tls_fingerprint?: string }>('GET', '/v1/system');
  if (!system.tls_port || !system.tls_fingerprint) throw new CliError('FAILED', `${keyOf(host, port)} offers no HTTPS listener to pair over`);
  const certificate = await peerCertificate(host, system.tls_port);
  if (certificate.fingerprint !== system.tls_fingerprint) {
    throw new CliError(
      'TLS_MISMATCH',
      `the HTTPS certificate (${certificate.fingerprint}) is not the one the cloudlet names (${system.tls_fingerprint}): not pairing`,
    );
  }
  const pinned = new CloudletClient(host, port, undefined, { tls: { port: system.tls_port, ca: certificate.pem, fingerprint: certificate.fingerprint } });
  const claim = await pinned.call<{ device_id: string; token: string; tls_fingerprint: string; paired_at: string }>('POST', '/v1/pairing/claim', {
    code,
    name: device.name,
    ...(device.id ? { device_id: device.id } : {}),
  });
  const stored: StoredCredential = {
    device_id: claim.device_id,
    token: claim.token,
    tls_port: system.tls_port,
    tls_fingerprint: certificate.fingerprint,
    certificate: certificate.pem,
    paired_at: claim.paired_at,
  };
  const all = await readCredentials();
  all[keyOf(host, port)] = stored;
  await writeSecretFile(credentialsFile(), JSON.stringify(all, null, 2) + '\n');
  return { cloudlet: keyOf(host, port), ...stored };
}

/** The certificate a TLS server presents, unverified (what trust on first use starts from). */
function peerCertificate(host: string, port: number): Promise<{ pem: string; fingerprint: string }> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect(
      { host, port, rejectUnauthorized: false, ...(isLoopback(host) || host.includes(':') || /^[\d.]+$/.test(host) ? {} : { servername: host }) },
      () => {
        const cert = socket.getPeerCertificate();
        socket.end();
        const base64 = cert.raw.toString('base64').replace(/.{64}/g, '$&\n').replace(/\n$/, '');
        resolve({ pem: `-----BEGIN CERTIFICATE-----\n${base64}\n-----END CERTIFICATE-----\n`, fingerprint: cert.fingerprint256 });
      },
    );
    socket.setTimeout(15_000, () => socket.destroy(new Error('no TLS handshake within 15 s')));
    socket.on('error', (err: Error) =>
      reject(new CliError('UNREACHABLE', `cannot reach ${keyOf(host, port)} over TLS: ${(err as NodeJS.ErrnoException).code ?? err.message}`)),
    );
  });
}
