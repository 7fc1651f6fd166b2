// The checks every /v1 route applies to a JSON request body: a stable code and a message naming the field.
import { CloudletError } from '../errors';

export function jsonObject(body: unknown): Record<string, unknown> {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw new CloudletError('BAD_REQUEST', 'The request body must be a JSON object');
  }
  return body as Record<string, unknown>;
}

export function requiredString(body: Record<string, unknown>, field: string): string {
  const value = body[field];
  if (value === undefined || value === null) {
    throw new CloudletError('MISSING_PARAMETER', `Missing required field "${field}"`, { details: { parameter: field } });
  }
  if (typeof value !== 'string' || value === '') {
    throw new CloudletError('INVALID_PARAMETER', `Field "${field}" must be a non-empty string`, { details: { parameter: field } });
  }
  return value;
}

export function optionalBoolean(body: Record<string, unknown>, field: string): boolean | undefined {
  const value = body[field];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'boolean') {
    throw new CloudletError('INVALID_PARAMETER', `Field "${field}" must be true or false`, { details: { parameter: field } });
  }
  return value;
}
