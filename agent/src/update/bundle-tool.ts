#!/usr/bin/env node
/**
 * The build side of field updates (used by ./build.sh bundle and image):
 *
 *   bundle-tool keygen DIR NAME            write DIR/NAME.key (ed25519 private, 0600) and DIR/NAME.pub.pem
 *   bundle-tool create RELEASE_DIR KEY OUT pack a release directory into a bundle signed with KEY
 */
import { createPrivateKey, generateKeyPairSync } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { asCloudletError } from '../errors';
import { createBundle } from './bundle';
import { releaseVersion } from './releases';

async function main(argv: string[]): Promise<void> {
  const [command, ...args] = argv;
  if (command === 'keygen' && args.length === 2) {
    const [dir, name] = args as [string, string];
    const { privateKey, publicKey } = generateKeyPairSync('ed25519');
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, `${name}.key`), privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600, flag: 'wx' });
    await writeFile(path.join(dir, `${name}.pub.pem`), publicKey.export({ type: 'spki', format: 'pem' }));
    return;
  }
  if (command === 'create' && args.length === 3) {
    const [releaseDir, keyFile, out] = args as [string, string, string];
    const header = await createBundle(releaseDir, await releaseVersion(releaseDir), createPrivateKey(await readFile(keyFile)), out);
    process.stdout.write(`${out}: version ${header.version}, ${header.size} bytes, sha256 ${header.sha256}\n`);
    return;
  }
  throw Object.assign(new Error('usage: bundle-tool keygen DIR NAME | create RELEASE_DIR KEY OUT'), { usage: true });
}

main(process.argv.slice(2)).catch((err: Error & { usage?: boolean }) => {
  process.stderr.write(err.usage ? `${err.message}\n` : `bundle-tool: ${asCloudletError(err).code}: ${err.message}\n`);
  process.exit(err.usage ? 2 : 1);
});
