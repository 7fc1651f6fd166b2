import { randomInt, timingSafeEqual } from 'node:crypto';
import { CloudletError } from '../errors';
import { addressKey } from './access';
import { checkDeviceId, type DeviceKind, type DeviceRegistry, type PairedDevice } from './devices';

/**
 * Pairing windows: the operator on the box opens a short window and reads a one-time code to the phone's user; the
 * phone presents it once and gets its own credential. One window at a time (a new one replaces the last); a window
 * closes when its code is used or when it times out, never because of wrong codes: closing it would let a stranger on
 * the LAN shut pairing for everyone. Instead one address (an IPv6 /64) gets MAX_WRONG_CODES_PER_ADDRESS tries per
 * window, and past FREE_WRONG_CODES wrong codes in all the window slows down: each further wrong code pauses it
 * (1 s, 2 s, 4 s ... up to MAX_PAUSE_SECONDS), and a claim during a pause is refused unread (RATE_LIMITED with the
 * wait), costing its address no try. Guessing 31^8 codes is then bounded by the tries of the addresses an attacker
 * holds and by time (at most one guess per pause), while the phone being paired gets in at the next opening.
 */
export const CODE_ALPHABET = '23456789ABCDEFGHJKMNPQRSTUVWXYZ'; // no 0/O, 1/I/L
export const CODE_LENGTH = 8;
export const FREE_WRONG_CODES = 20;
export const MAX_PAUSE_SECONDS = 30;
export const MAX_WRONG_CODES_PER_ADDRESS = 3;
export const MAX_WINDOW_SECONDS = 3600;

export interface PairingWindow {
  code: string;
  expiresAt: string;
  /** How long the authorization of a device paired through this window lasts; null: until revoked. */
  deviceExpiresInMinutes: number | null;
  /** What the operator opened the window for: a phone (or laptop), or another cloudlet. */
  kind: DeviceKind;
}

interface OpenWindow extends PairingWindow {
  wrongCodes: number;
  /** Wrong codes per addressKey(); one entry per address that sent one (each costs a claim, under the rate limit). */
  wrongCodesFrom: Map<string, number>;
  /** No code is checked before this time (ms since the epoch): the pause after a wrong code past FREE_WRONG_CODES. */
  pausedUntil: number;
}

export class Pairing {
  private window: OpenWindow | null = null;

  constructor(
    private readonly devices: DeviceRegistry,
    private readonly now: () => number = Date.now,
  ) {}

  open(options: { ttlSeconds: number; expiresInMinutes?: number; kind?: DeviceKind }): PairingWindow {
    let code = '';
    for (let i = 0; i < CODE_LENGTH; i++) code += CODE_ALPHABET[randomInt(CODE_ALPHABET.length)];
    this.window = {
      code,
      expiresAt: new Date(this.now() + options.ttlSeconds * 1000).toISOString(),
      deviceExpiresInMinutes: options.expiresInMinutes ?? null,
      kind: options.kind ?? 'device',
      wrongCodes: 0,
      wrongCodesFrom: new Map(),
      pausedUntil: 0,
    };
    const { wrongCodes: _wrongCodes, wrongCodesFrom: _wrongCodesFrom, pausedUntil: _pausedUntil, ...view } = this.window;
    return view;
  }

  /** Close the open window, if any (the operator changed their mind). */
  close(): void {
    this.window = null;
  }

  /** Pair a device with the window's code; the token in the answer exists nowhere else. */
  async claim(
    code: string,
    request: { deviceId?: string; name: string; remoteAddress: string; kind?: DeviceKind },
  ): Promise<{ device: PairedDevice; token: string }> {
    const window = this.window;
    if (!window || Date.parse(window.expiresAt) <= this.now()) {
      this.window = null;
      throw new CloudletError('PAIRING_CLOSED', 'no pairing window is open; ask the operator to open one on the cloudlet');
    }
    const from = addressKey(request.remoteAddress);
    const wrongFrom = window.wrongCodesFrom.get(from) ?? 0;
    if (wrongFrom >= MAX_WRONG_CODES_PER_ADDRESS) {
      throw new CloudletError('PAIRING_CLOSED', 'too many wrong codes from this address; ask the operator to open a new pairing window');
    }
    const pausedFor = window.pausedUntil - this.now();
    if (pausedFor > 0) {
      const retryAfter = Math.ceil(pausedFor / 1000);
      throw new CloudletError('RATE_LIMITED', `the pairing window is slowed down after ${window.wrongCodes} wrong codes; try again in ${retryAfter} s`, {
        details: { retry_after_s: retryAfter },
      });
    }
    if (!sameCode(code, window.code)) {
      window.wrongCodes += 1;
      window.wrongCodesFrom.set(from, wrongFrom + 1);
      const beyondFree = window.wrongCodes - FREE_WRONG_CODES;
      if (beyondFree > 0) window.pausedUntil = this.now() + Math.min(2 ** (beyondFree - 1), MAX_PAUSE_SECONDS) * 1000;
      const left = MAX_WRONG_CODES_PER_ADDRESS - wrongFrom - 1;
      const message = left === 0 ? 'wrong pairing code; no more tries from this address in this window' : 'wrong pairing code';
      throw new CloudletError('PAIRING_CODE_INVALID', message, { details: { attempts_left: left } });
    }
    // A cloudlet that asks to pair as one is not paired as a phone (with a phone's rights) by a window opened for
    // phones, nor a phone as a cloudlet; the code is not used up.
    if (request.kind !== undefined && request.kind !== window.kind) {
      throw new CloudletError('CONFLICT', `this pairing window is for a ${window.kind}, not a ${request.kind}`, { details: { kind: window.kind } });
    }
    // A request the registry would refuse (a bad or taken device id) does not use the code up.
    if (request.deviceId !== undefined) checkDeviceId(request.deviceId);
    if (request.deviceId !== undefined && this.devices.get(request.deviceId)) {
      throw new CloudletError('CONFLICT', `device ${request.deviceId} is already paired; remove it first to pair it again`, {
        details: { device_id: request.deviceId },
      });
    }
    // Used up before the first await: two claims racing with the same code cannot both pair.
    this.window = null;
    return this.devices.add({
      name: request.name,
      kind: window.kind,
      ...(request.deviceId !== undefined ? { id: request.deviceId } : {}),
      ...(window.deviceExpiresInMinutes !== null ? { expiresInMinutes: window.deviceExpiresInMinutes } : {}),
    });
  }
}

/** Codes compare without case, spaces or dashes (read aloud as "ABCD-EFGH"), in constant time. */
function sameCode(presented: string, expected: string): boolean {
  const a = Buffer.from(presented.toUpperCase().replace(/[\s-]/g, ''));
  const b = Buffer.from(expected);
  return a.length === b.length && timingSafeEqual(a, b);
}
