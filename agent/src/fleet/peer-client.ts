/**
 * HTTP(S) from this cloudlet to another one: the only module that makes such calls. Nothing secret ever goes in
 * clear: the plain HTTP port is asked only for the open `/v1/system` (where the other cloudlet names its HTTPS port),
 * and every call that carries a pairing code or a credential goes over HTTPS to the certificate the operator read out
 * (pinned by its SHA-256, not by any CA). Every answer is hostile until checked: bounded in size and time.
 */
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import tls from 'node:tls';
import WebSocket, { createWebSocketStream } from 'ws';
import { CloudletError } from '../errors';

/** The most an answer from another cloudlet may be (a placement of a thousand services fits easily). */
export const MAX_PEER_REPLY_BYTES = 256 * 1024;
/** How long another cloudlet may take to answer one call, whole: a peer that drips its answer is cut at this deadline. */
export const PEER_TIMEOUT_MS = 10_000;

/** Where another cloudlet is and the certificate it must present. */
export interface PeerEndpoint {
  address: string;
  /** Its HTTP API port (what mDNS advertises). */
  port: number;
  tlsPort: number;
  /** SHA-256 of its certificate's DER, as Node's `fingerprint256` (colon-separated upper-case hex). */
  fingerprint: string;
  /** The certificate itself (PEM), trusted as its own authority. */
  certificate: string;
}

export interface PeerReply {
  status: number;
  json: unknown;
}

/** `AA:BB:...` however the operator typed it (case, with or without colons). */
export function normalizeFingerprint(text: string): string | null {
  const hex = text.replace(/[:\s]/g, '').toUpperCase();
  return /^[0-9A-F]{64}$/.test(hex) ? hex.match(/../g)!.join(':') : null;
}

/** The other cloudlet's open `/v1/system` over plain HTTP: its name, HTTPS port and the fingerprint it claims. */
export async function peerSystem(address: string, port: number): Promise<{ hostname: string; tlsPort: number; fingerprint: string }> {
  const reply = await exchange(http.request({ host: address, port, method: 'GET', path: '/v1/system', timeout: PEER_TIMEOUT_MS }), address, port);
  const body = reply.json as { hostname?: unknown; tls_port?: unknown; tls_fingerprint?: unknown } | null;
  const tlsPort = body?.tls_port;
  const fingerprint = typeof body?.tls_fingerprint === 'string' ? normalizeFingerprint(body.tls_fingerprint) : null;
  if (reply.status !== 200 || typeof tlsPort !== 'number' || !Number.isInteger(tlsPort) || tlsPort < 1 || tlsPort > 65535 || !fingerprint) {
    throw new CloudletError('PEER_REFUSED', `${address}:${port} is no cloudlet offering HTTPS (its /v1/system answered ${reply.status})`);
  }
  const hostname = typeof body?.hostname === 'string' && /^[A-Za-z0-9._ #-]{1,100}$/.test(body.hostname) ? body.hostname : address;
  return { hostname, tlsPort, fingerprint };
}

/** The certificate presented on `address:tlsPort` (unverified: the caller compares its fingerprint). */
export function presentedCertificate(address: string, tlsPort: number): Promise<{ pem: string; fingerprint: string }> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: address, port: tlsPort, rejectUnauthorized: false }, () => {
      const cert = socket.getPeerCertificate();
      socket.end();
      const base64 = cert.raw.toString('base64').replace(/.{64}/g, '$&\n').replace(/\n$/, '');
      resolve({ pem: `-----BEGIN CERTIFICATE-----\n${base64}\n-----END CERTIFICATE-----\n`, fingerprint: cert.fingerprint256 });
    });
    const deadline = setTimeout(() => socket.destroy(new Error(`no TLS handshake within ${PEER_TIMEOUT_MS} ms`)), PEER_TIMEOUT_MS);
    socket.on('close', () => clearTimeout(deadline));
    socket.on('error', (err: Error) => reject(unreachable(address, tlsPort, err)));
  });
}

/** A call over HTTPS pinned to the peer's certificate, with a bearer token when given. */
export function pinnedCall(peer: PeerEndpoint, method: string, path: string, options: { token?: string; body?: unknown } = {}): Promise<PeerReply> {
  const payload = options.body === undefined ? undefined : JSON.stringify(options.body);
  const req = https.request({
    host: peer.address,
    port: peer.tlsPort,
    method,
    path,
    timeout: PEER_TIMEOUT_MS,
    agent: false,
    ca: peer.certificate,
    // The pin is the identity: a box on a LAN has no name a CA could vouch for.
    checkServerIdentity: (_host, cert) =>
      cert.fingerprint256 === peer.fingerprint ? undefined : new Error(`the certificate ${cert.fingerprint256} is not the pinned ${peer.fingerprint}`),
    headers: {
      ...(options.token ? { authorization: `Bearer ${options.token}` } : {}),
      ...(payload !== undefined ? { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(payload)) } : {}),
    },
  });
  return exchange(req, peer.address, peer.tlsPort, payload);
}

/** The largest WebSocket message a peer may send on a byte-stream channel (a handoff's). */
const MAX_PEER_MESSAGE_BYTES = 1024 * 1024;

/**
 * A byte stream to the peer: a WebSocket to `path` on its HTTPS port, pinned to its certificate as pinnedCall, with
 * the credential; each write is one binary message. Rejects when the peer refuses the upgrade (its status said).
 */
export function pinnedStream(peer: PeerEndpoint, path: string, token: string): Promise<Duplex> {
  const host = net.isIPv6(peer.address) ? `[${peer.address}]` : peer.address;
  // ws hands these on to tls.connect, whose checkServerIdentity (unlike ws's own typing of it) returns an Error.
  const pinned: tls.ConnectionOptions = {
    ca: peer.certificate,
    checkServerIdentity: (_host, cert) =>
      cert.fingerprint256 === peer.fingerprint ? undefined : new Error(`the certificate ${cert.fingerprint256} is not the pinned ${peer.fingerprint}`),
  };
  const socket = new WebSocket(`wss://${host}:${peer.tlsPort}${path}`, {
    ...(pinned as WebSocket.ClientOptions),
    headers: { authorization: `Bearer ${token}` },
    handshakeTimeout: PEER_TIMEOUT_MS,
    maxPayload: MAX_PEER_MESSAGE_BYTES,
    perMessageDeflate: false,
  });
  return new Promise((resolve, reject) => {
    socket.once('open', () => resolve(createWebSocketStream(socket)));
    socket.once('unexpected-response', (_req, res) => {
      socket.terminate();
      reject(new CloudletError('PEER_REFUSED', `the cloudlet at ${peer.address} refused the channel ${path.split('?')[0]}: ${res.statusCode}`));
    });
    socket.once('error', (err) => reject(unreachable(peer.address, peer.tlsPort, err)));
  });
}

/** Sends the request and reads a bounded JSON answer (json: null when it is not JSON). */
function exchange(req: http.ClientRequest, address: string, port: number, payload?: string): Promise<PeerReply> {
  return new Promise<PeerReply>((resolve, reject) => {
    // The request's own `timeout` only counts idle time; this bounds the whole exchange.
    const deadline = setTimeout(() => req.destroy(new Error(`no whole answer within ${PEER_TIMEOUT_MS} ms`)), PEER_TIMEOUT_MS);
    req.on('close', () => clearTimeout(deadline));
    req.on('timeout', () => req.destroy(new Error(`no answer within ${PEER_TIMEOUT_MS} ms`)));
    req.on('error', (err) => reject(unreachable(address, port, err)));
    req.on('response', (res) => {
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (chunk: Buffer) => {
        size += chunk.length;
        if (size > MAX_PEER_REPLY_BYTES) req.destroy(new Error(`its answer exceeds ${MAX_PEER_REPLY_BYTES} bytes`));
        else chunks.push(chunk);
      });
      res.on('end', () => {
        let json: unknown = null;
        try {
          json = JSON.parse(Buffer.concat(chunks).toString('utf8'));
        } catch {
          /* not JSON: the caller judges the status */
        }
        resolve({ status: res.statusCode ?? 0, json });
      });
      res.on('error', (err) => reject(unreachable(address, port, err)));
    });
    req.end(payload);
  });
}

function unreachable(address: string, port: number, err: Error): CloudletError {
  return new CloudletError('PEER_UNREACHABLE', `cannot reach the cloudlet at ${address}:${port}: ${(err as NodeJS.ErrnoException).code ?? err.message}`);
}

/** A peer's error answer as our error: its code and message, bounded, as details. */
export function peerRefusal(what: string, reply: PeerReply): CloudletError {
  const body = reply.json as { code?: unknown; message?: unknown } | null;
  const code = typeof body?.code === 'string' ? body.code.slice(0, 64) : null;
  const message = typeof body?.message === 'string' ? body.message.slice(0, 300) : null;
  return new CloudletError('PEER_REFUSED', `${what}: the other cloudlet answered ${reply.status}${code ? ` ${code}` : ''}${message ? `: ${message}` : ''}`, {
    details: { status: reply.status, ...(code ? { peer_code: code } : {}) },
  });
}
