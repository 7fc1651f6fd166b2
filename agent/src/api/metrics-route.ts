/**
 * GET /metrics: the Prometheus exposition, for the operator (the admin token, from loopback) or a scraper holding the
 * metrics credential (a bearer token from the config; like every secret, accepted in clear from loopback only, so a
 * scraper elsewhere uses the HTTPS port). Outside /v1: it is Prometheus's format and path, not our JSON API, but its
 * errors are /v1's JSON errors.
 */
import { CloudletError } from '../errors';
import { bearerToken } from '../trust/access';
import type { Route } from './routing';

/** What the route serves (telemetry/metrics.ts), and the credential a scraper may hold (null: the operator alone). */
export interface MetricsSource {
  exposition(): Promise<{ contentType: string; text: string }>;
  credential: { matches(token: string | undefined): boolean } | null;
}

export function metricsRoute(source: MetricsSource): Route {
  return {
    method: 'GET',
    path: '/metrics',
    // Checked here: the gate knows the operator and the devices, not the metrics credential.
    access: 'open',
    handle: async ({ caller, ...request }) => {
      if (caller.kind !== 'admin' && !source.credential?.matches(bearerToken(request.header('authorization')))) {
        if (caller.kind === 'device')
          throw new CloudletError('FORBIDDEN', 'metrics are for the operator or the holder of the metrics credential, not a device');
        throw new CloudletError('UNAUTHENTICATED', 'metrics need a credential: Authorization: Bearer <the admin token or the metrics token>');
      }
      const { contentType, text } = await source.exposition();
      return { status: 200, headers: { 'Content-Type': contentType, 'Cache-Control': 'no-store' }, body: text };
    },
  };
}
