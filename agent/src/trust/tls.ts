/**
 * The cloudlet's TLS identity: a self-signed EC P-256 certificate made at first start with the `openssl` CLI (the
 * only module that runs it) into `<dataDir>/trust/tls/{key,cert}.pem`. No CA vouches for a box on a LAN, so phones
 * pin the certificate's SHA-256 fingerprint (of its DER) when they pair (docs/security.md).
 */
import { execFile } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { chmod, mkdtemp, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { CloudletError, isErrno } from '../errors';
import { ensureSecretDir } from './secret-file';

export interface TlsIdentity {
  keyFile: string;
  certFile: string;
  /** SHA-256 of the certificate's DER as colon-separated upper-case hex (Node's `fingerprint256`). */
  fingerprint: string;
}

const VALID_DAYS = 3650;

/** The data directory's certificate, made now if there is none. */
export async function ensureTlsIdentity(dataDir: string, hostname: string): Promise<TlsIdentity> {
  const dir = path.join(dataDir, 'trust', 'tls');
  const keyFile = path.join(dir, 'key.pem');
  const certFile = path.join(dir, 'cert.pem');
  await ensureSecretDir(dir);
  let pem = await readFile(certFile, 'utf8').catch((err: unknown) => {
    if (isErrno(err, 'ENOENT')) return null;
    throw err;
  });
  if (pem === null) {
    await generate(dir, hostname, keyFile, certFile);
    pem = await readFile(certFile, 'utf8');
  }
  return { keyFile, certFile, fingerprint: new X509Certificate(pem).fingerprint256 };
}

/** Key and certificate are made aside and renamed in key first, so a crash never leaves a certificate without its key. */
async function generate(dir: string, hostname: string, keyFile: string, certFile: string): Promise<void> {
  const work = await mkdtemp(path.join(dir, '.new-'));
  try {
    const key = path.join(work, 'key.pem');
    const cert = path.join(work, 'cert.pem');
    const cn = hostname.replace(/[^A-Za-z0-9.-]/g, '-') || 'cloudlet';
    await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-sha256',
      '-days', String(VALID_DAYS), '-keyout', key, '-out', cert, '-subj', `/CN=${cn}`,
      '-addext', `subjectAltName=DNS:${cn},DNS:${cn}.local,DNS:localhost,IP:127.0.0.1`]);
    await chmod(key, 0o600);
    await rename(key, keyFile);
    await rename(cert, certFile);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

function run(command: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { timeout: 30_000 }, (err, _stdout, stderr) => {
      if (err) reject(new CloudletError('INTERNAL', `${command} could not make the TLS certificate: ${stderr.trim() || err.message}`, { cause: err }));
      else resolve();
    });
  });
}
