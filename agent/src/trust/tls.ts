/**
 * The cloudlet's TLS identity: a self-signed EC P-256 certificate made at first start with the `openssl` CLI (the
 * only module that runs it) into `<dataDir>/trust/tls/{key,cert}.pem`. No CA vouches for a box on a LAN, so phones
 * pin the certificate's SHA-256 fingerprint (of its DER) when they pair (docs/security.md).
 */
import { execFile } from 'node:child_process';
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { replaceFile } from '../system/atomic-file';
import { CloudletError, isErrno } from '../errors';
import type { Logger } from '../log';
import { ensureSecretDir } from './secret-file';

export interface TlsIdentity {
  keyFile: string;
  certFile: string;
  /** SHA-256 of the certificate's DER as colon-separated upper-case hex (Node's `fingerprint256`). */
  fingerprint: string;
}

const VALID_DAYS = 3650;

/**
 * The data directory's certificate, made now if there is none. One that is unusable (a torn or empty file, a key that
 * is not the certificate's) never stops the agent: it is made anew and the log says so, since phones that pinned the
 * old one must pair again.
 */
export async function ensureTlsIdentity(dataDir: string, hostname: string, log: Logger): Promise<TlsIdentity> {
  const dir = path.join(dataDir, 'trust', 'tls');
  const keyFile = path.join(dir, 'key.pem');
  const certFile = path.join(dir, 'cert.pem');
  await ensureSecretDir(dir);
  let found = await readIdentity(keyFile, certFile);
  if (typeof found === 'string') {
    if (found !== 'absent') log(`the TLS certificate in ${dir} is unusable (${found}); making a new one: paired phones must pair again`);
    await generate(dir, hostname, keyFile, certFile);
    found = await readIdentity(keyFile, certFile);
    if (typeof found === 'string') throw new CloudletError('INTERNAL', `the TLS certificate just made in ${dir} is unusable: ${found}`);
  }
  return { keyFile, certFile, fingerprint: found.fingerprint256 };
}

/** The certificate, if it and its key are whole and belong together; else 'absent' (neither exists) or what is wrong. */
async function readIdentity(keyFile: string, certFile: string): Promise<X509Certificate | string> {
  const [key, cert] = await Promise.all(
    [keyFile, certFile].map((file) =>
      readFile(file, 'utf8').catch((err: unknown) => {
        if (isErrno(err, 'ENOENT')) return null;
        throw err;
      }),
    ),
  );
  if (key == null && cert == null) return 'absent';
  if (key == null || cert == null) return key == null ? 'its key is missing' : 'the certificate is missing';
  let certificate: X509Certificate;
  try {
    certificate = new X509Certificate(cert);
  } catch {
    return 'the certificate is not a PEM certificate';
  }
  try {
    if (!certificate.checkPrivateKey(createPrivateKey(key))) return "the key is not the certificate's";
  } catch {
    return 'the key is not a PEM private key';
  }
  return certificate;
}

/**
 * Made aside, then each file replaced durably (fsynced, renamed in, directory fsynced), key first: a crash in between
 * leaves a key that is not the certificate's, which the next start finds and replaces.
 */
async function generate(dir: string, hostname: string, keyFile: string, certFile: string): Promise<void> {
  const work = await mkdtemp(path.join(dir, '.new-'));
  try {
    const key = path.join(work, 'key.pem');
    const cert = path.join(work, 'cert.pem');
    const cn = hostname.replace(/[^A-Za-z0-9.-]/g, '-') || 'cloudlet';
    await run('openssl', [
      'req',
      '-x509',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:P-256',
      '-nodes',
      '-sha256',
      '-days',
      String(VALID_DAYS),
      '-keyout',
      key,
      '-out',
      cert,
      '-subj',
      `/CN=${cn}`,
      '-addext',
      `subjectAltName=DNS:${cn},DNS:${cn}.local,DNS:localhost,IP:127.0.0.1`,
    ]);
    await replaceFile(keyFile, await readFile(key, 'utf8'), 0o600);
    await replaceFile(certFile, await readFile(cert, 'utf8'), 0o644);
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
