// The agent's TLS identity survives power loss: its key and certificate are written durably, and one found torn,
// empty or mismatched (a disk that lost it) never stops the agent from starting. It makes a new certificate, says so
// in one log line (phones that pinned the old one must pair again), and serves HTTPS with it.
import { createPrivateKey, generateKeyPairSync, X509Certificate } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import t from 'tap';
import { AgentProcess } from './support/agent';

/** The fingerprint of the certificate the agent's HTTPS port serves. */
function servedFingerprint(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false }, () => {
      resolve(socket.getPeerCertificate().fingerprint256);
      socket.end();
    });
    socket.on('error', reject);
  });
}

t.test('a torn, empty or mismatched TLS key or certificate never stops the agent from starting', async (t) => {
  const dataDir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-tls-'));
  const tlsDir = path.join(dataDir, 'trust', 'tls');
  const keyFile = path.join(tlsDir, 'key.pem');
  const certFile = path.join(tlsDir, 'cert.pem');
  await mkdir(tlsDir, { recursive: true, mode: 0o700 });
  await writeFile(keyFile, '');
  await writeFile(certFile, '');
  let agent: AgentProcess | undefined;
  t.teardown(async () => {
    await (agent?.dispose() ?? rm(dataDir, { recursive: true, force: true }));
  });

  /** Start (or restart) the agent; its log lines about the certificate, and what it serves, must agree with the files. */
  const startAndCheck = async (what: string, problem: RegExp) => {
    const logBefore = agent?.log.length ?? 0;
    if (agent) {
      await agent.stop();
      await agent.launch();
    } else {
      agent = await AgentProcess.start({ portRange: '22990-22999', dataDir });
    }
    const said = agent.log
      .slice(logBefore)
      .split('\n')
      .filter((line) => line.startsWith('tls: '));
    t.equal(said.length, 1, `${what}: one log line says so`);
    t.match(said[0], problem, `${what}: it names the problem`);
    t.match(said[0], /making a new one: paired phones must pair again/);
    const system = (await agent.get('/v1/system')).json;
    const onDisk = new X509Certificate(await readFile(certFile));
    t.ok(onDisk.checkPrivateKey(createPrivateKey(await readFile(keyFile))), `${what}: the new key is the new certificate's`);
    t.equal(system.tls_fingerprint, onDisk.fingerprint256, `${what}: pairing hands out the new certificate's fingerprint`);
    t.equal(await servedFingerprint(system.tls_port), onDisk.fingerprint256, `${what}: HTTPS serves it`);
    t.equal((await stat(keyFile)).mode & 0o777, 0o600, `${what}: the key is readable by the agent alone`);
    return onDisk.fingerprint256;
  };

  const first = await startAndCheck('empty key and certificate', /the certificate is not a PEM certificate/);
  const pem = await readFile(certFile, 'utf8');
  await writeFile(certFile, pem.slice(0, pem.length / 2));
  const second = await startAndCheck('a certificate cut in half', /the certificate is not a PEM certificate/);
  t.not(second, first);
  await writeFile(keyFile, generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ type: 'pkcs8', format: 'pem' }));
  await startAndCheck("a key that is not the certificate's", /the key is not the certificate's/);
  await rm(certFile);
  await startAndCheck('a key without its certificate', /the certificate is missing/);

  const logBefore = agent!.log.length;
  const kept = (await agent!.get('/v1/system')).json.tls_fingerprint;
  await agent!.stop();
  await agent!.launch();
  t.notMatch(agent!.log.slice(logBefore), /^tls: /m, 'a whole identity is used as it is, without a word');
  t.equal((await agent!.get('/v1/system')).json.tls_fingerprint, kept);
});
