// A throwaway certificate of the kind the agent makes for itself (trust/tls.ts): what a rogue cloudlet or some other
// certificate authority presents in the tests.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** A self-signed P-256 certificate for `cn`, valid a day: its key goes to `keyFile`, the certificate to `certFile` or, without one, is returned as PEM. */
export async function selfSignedCertificate(cn: string, keyFile: string, certFile?: string): Promise<string> {
  const out = certFile ? ['-out', certFile] : [];
  const { stdout } = await run('openssl', [
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-nodes',
    '-keyout',
    keyFile,
    ...out,
    '-subj',
    `/CN=${cn}`,
    '-days',
    '1',
  ]);
  return stdout;
}
