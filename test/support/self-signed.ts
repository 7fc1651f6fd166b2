// A throwaway certificate of the kind the agent makes for itself (trust/tls.ts): what a rogue cloudlet or some other
// certificate authority presents in the tests.
import { execFile } from 'node:child_process';
import { rm, writeFile } from 'node:fs/promises';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** `openssl req` arguments for a new P-256 key, unencrypted, written to `keyFile`. */
const newKey = (keyFile: string) => ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', keyFile];

/** A self-signed P-256 certificate for `cn`, valid a day: its key goes to `keyFile`, the certificate to `certFile` or, without one, is returned as PEM. */
export async function selfSignedCertificate(cn: string, keyFile: string, certFile?: string): Promise<string> {
  const out = certFile ? ['-out', certFile] : [];
  const { stdout } = await run('openssl', ['req', '-x509', ...newKey(keyFile), ...out, '-subj', `/CN=${cn}`, '-days', '1']);
  return stdout;
}

/**
 * A P-256 key (to `keyFile`) and a certificate for `cn` signed by the authority `ca` made above, valid a day, with
 * `subjectAltName` (e.g. `IP:127.0.0.1`) for a server: what an operator's own certificate authority issues.
 */
export async function certificateSignedBy(
  ca: { keyFile: string; certFile: string },
  cn: string,
  files: { keyFile: string; certFile: string },
  subjectAltName?: string,
): Promise<void> {
  const request = `${files.certFile}.csr`;
  await run('openssl', ['req', '-new', ...newKey(files.keyFile), '-out', request, '-subj', `/CN=${cn}`]);
  const extensions = `${files.certFile}.ext`;
  await writeFile(extensions, subjectAltName ? `subjectAltName=${subjectAltName}\n` : 'basicConstraints=CA:FALSE\n');
  try {
    await run('openssl', [
      'x509',
      '-req',
      '-in',
      request,
      '-CA',
      ca.certFile,
      '-CAkey',
      ca.keyFile,
      '-CAcreateserial',
      '-days',
      '1',
      '-extfile',
      extensions,
      '-out',
      files.certFile,
    ]);
  } finally {
    await Promise.all([rm(request, { force: true }), rm(extensions, { force: true })]);
  }
}
