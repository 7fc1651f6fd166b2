// Pairing a device with a running agent, and the credentials and error checks the trust tests share
// (test/trust-pairing.e2e.test.ts, test/trust-access.e2e.test.ts).
import type { Test } from 'tap';
import { request, type AgentProcess, type HttpResult } from './agent';

/** Headers that send no credential at all (the agent's default client would send the admin token). */
export const NONE = { authorization: '' };

/** Headers carrying a device's (or any) bearer token. */
export const as = (token: string) => ({ authorization: `Bearer ${token}` });

export interface PairedDevice {
  id: string;
  token: string;
  /** The claim's whole answer (legacy_password, tls_fingerprint, expires_at). */
  json: any;
}

/** The operator opens a pairing window and a client without credentials claims its code, as a phone does. */
export async function pairDevice(agent: AgentProcess, name: string, options: { expiresInMinutes?: number } = {}): Promise<PairedDevice> {
  const window = await agent.post('/v1/pairing', options.expiresInMinutes ? { expires_in_minutes: options.expiresInMinutes } : {});
  if (window.status !== 201) throw new Error(`opening a pairing window: ${window.body}`);
  const claim = await request(agent.apiPort, 'POST', '/v1/pairing/claim', { code: window.json.code, name }, NONE);
  if (claim.status !== 201) throw new Error(`claiming: ${claim.body}`);
  return { id: claim.json.device_id, token: claim.json.token, json: claim.json };
}

/** An error answer: its status and its stable code, each its own assertion. */
export function expectError(tt: Test, r: HttpResult, status: number, code: string, what: string) {
  tt.equal(r.status, status, `${what}: ${status}`);
  tt.equal(r.json?.code, code, `${what}: ${code}`);
}
