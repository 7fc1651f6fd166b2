import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { CloudletError, isErrno } from '../errors';
import { writeSecretFile } from './secret-file';

/**
 * The devices (phones, laptops) paired with this cloudlet, persisted in `<dataDir>/trust/devices.json` (0600).
 * Each device has its own random bearer token, of which only the SHA-256 is stored, and its own random password for
 * the legacy KD-Cloudlet encrypted face: nothing is derived from a shared secret, so one leaked phone exposes
 * nothing of another (KD-Cloudlet derives every device's key from one master secret).
 */
export interface PairedDevice {
  id: string;
  name: string;
  /**
   * A phone or laptop (`device`), or another cloudlet (`cloudlet`), which may ask only the deliberate list of
   * docs/security.md ("Between cloudlets"). Paired before kinds existed: a device.
   */
  kind: DeviceKind;
  pairedAt: string;
  expiresAt: string | null;
  revokedAt: string | null;
}

export type DeviceKind = 'device' | 'cloudlet';

/** Why a device may not act now (null: it may). */
export type DeviceStanding = 'not-paired' | 'revoked' | 'expired' | null;

/** How a device's authorization ended; its instances are then released. */
export type DeviceEndReason = 'revoked' | 'removed' | 'expired';

interface StoredDevice extends PairedDevice {
  tokenSha256: string;
  legacyPassword: string;
}

interface DevicesFile {
  version: 1;
  devices: StoredDevice[];
}

export const DEVICE_TOKEN_PREFIX = 'cld_';
/** Client-chosen device ids (e.g. the KD-Cloudlet device id the phone already uses). */
const DEVICE_ID = /^[A-Za-z0-9._:-]{1,64}$/;
/** setTimeout's limit; a longer wait is re-armed when it fires. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** Tokens remembered by authenticate (one per paired device in use, in practice); emptied when full. */
const RECENT_TOKENS_MAX = 4096;

export interface DeviceRegistryEvents {
  'device-ended': [device: PairedDevice, reason: DeviceEndReason];
}

export class DeviceRegistry extends EventEmitter<DeviceRegistryEvents> {
  private readonly devices = new Map<string, StoredDevice>();
  private readonly expiryTimers = new Map<string, NodeJS.Timeout>();
  private expiryArmed = false;
  /** Writes of devices.json, one after another. */
  private saving: Promise<void> = Promise.resolve();
  /**
   * Tokens that authenticated lately, to their device's id: a phone presents the same token on every request, and
   * hashing it and comparing it with every stored hash was the largest part of the access check under load. Only
   * tokens that matched are kept (a guess costs the full check every time, and cannot fill this); a device's entries
   * go when it is revoked or removed, and its standing is read afresh on every request, so an end takes effect at
   * once. A lookup by the token itself is as safe as the hash's: V8's string hash is seeded per process, and only a
   * token of equal hash is ever compared with a stored one.
   */
  private readonly recentTokens = new Map<string, string>();

  private constructor(private readonly file: string) {
    super();
  }

  static async open(dataDir: string): Promise<DeviceRegistry> {
    const registry = new DeviceRegistry(path.join(dataDir, 'trust', 'devices.json'));
    try {
      const stored = JSON.parse(await readFile(registry.file, 'utf8')) as DevicesFile;
      for (const device of stored.devices) registry.devices.set(device.id, device);
    } catch (err) {
      if (!isErrno(err, 'ENOENT')) throw err;
    }
    return registry;
  }

  list(): PairedDevice[] {
    return [...this.devices.values()].sort((a, b) => a.pairedAt.localeCompare(b.pairedAt) || a.id.localeCompare(b.id)).map(publicView);
  }

  get(id: string): PairedDevice | undefined {
    const device = this.devices.get(id);
    return device && publicView(device);
  }

  /** The device a bearer token belongs to; throws UNAUTHENTICATED / DEVICE_REVOKED / DEVICE_EXPIRED. */
  authenticate(token: string): PairedDevice {
    const found = this.recentDevice(token) ?? this.deviceByHash(token);
    if (!found) throw new CloudletError('UNAUTHENTICATED', 'the credential is not valid for this cloudlet');
    const standing = this.standingOf(found);
    if (standing === 'revoked') throw new CloudletError('DEVICE_REVOKED', `device ${found.id} was revoked`, { details: { device_id: found.id } });
    if (standing === 'expired')
      throw new CloudletError('DEVICE_EXPIRED', `the authorization of device ${found.id} expired`, { details: { device_id: found.id } });
    return publicView(found);
  }

  /** Whether `token` authenticated a device lately (the admin token never does): its holder is a device. */
  recognizes(token: string): boolean {
    return this.recentDevice(token) !== undefined;
  }

  private recentDevice(token: string): StoredDevice | undefined {
    const id = this.recentTokens.get(token);
    return id === undefined ? undefined : this.devices.get(id);
  }

  /** The device whose stored hash is the token's, remembered for next time. */
  private deviceByHash(token: string): StoredDevice | undefined {
    const presented = sha256(token);
    let found: StoredDevice | undefined;
    // Every stored hash is compared, in constant time, so timing says nothing about which one matched.
    for (const device of this.devices.values()) {
      if (timingSafeEqual(presented, Buffer.from(device.tokenSha256, 'hex'))) found = device;
    }
    if (found) {
      if (this.recentTokens.size >= RECENT_TOKENS_MAX) this.recentTokens.clear();
      this.recentTokens.set(token, found.id);
    }
    return found;
  }

  /** Forgets the tokens of device `id` (its entry changed or went: a later device of that id has another token). */
  private forgetTokensOf(id: string): void {
    for (const [token, holder] of this.recentTokens) if (holder === id) this.recentTokens.delete(token);
  }

  /** The device's own legacy KD-Cloudlet encryption password (for /api/command); throws DEVICE_NOT_FOUND. */
  legacyPassword(id: string): string {
    return this.stored(id).legacyPassword;
  }

  standing(id: string): DeviceStanding {
    const device = this.devices.get(id);
    return device ? this.standingOf(device) : 'not-paired';
  }

  /**
   * Pair a new device: it gets a fresh random token, returned here once and never stored in clear. A client-chosen
   * id must not be in use (re-pairing a phone means removing its old entry first, so a pairing code never takes
   * over another device's instances).
   */
  async add(options: { id?: string; name: string; kind?: DeviceKind; expiresInMinutes?: number }): Promise<{ device: PairedDevice; token: string }> {
    const id = options.id ?? `dev-${randomBytes(8).toString('hex')}`;
    checkDeviceId(id);
    if (this.devices.has(id))
      throw new CloudletError('CONFLICT', `device ${id} is already paired; remove it first to pair it again`, { details: { device_id: id } });
    const now = Date.now();
    const token = DEVICE_TOKEN_PREFIX + randomBytes(32).toString('base64url');
    const device: StoredDevice = {
      id,
      name: options.name,
      kind: options.kind ?? 'device',
      pairedAt: new Date(now).toISOString(),
      expiresAt: options.expiresInMinutes === undefined ? null : new Date(now + options.expiresInMinutes * 60_000).toISOString(),
      revokedAt: null,
      tokenSha256: sha256(token).toString('hex'),
      legacyPassword: randomBytes(32).toString('hex'),
    };
    this.devices.set(id, device);
    try {
      await this.save();
    } catch (err) {
      this.devices.delete(id);
      throw err;
    }
    if (this.expiryArmed) this.armExpiry(device);
    return { device: publicView(device), token };
  }

  /** Revoke a device: its token is refused from now on and its instances are released. Revoking again is a no-op. */
  async revoke(id: string): Promise<void> {
    this.stored(id);
    const revokedAt = new Date().toISOString();
    const before = await this.update(id, (device) => (device.revokedAt === null ? { ...device, revokedAt } : undefined));
    if (!before) return;
    this.disarmExpiry(id);
    this.emit('device-ended', publicView({ ...before, revokedAt }), 'revoked');
  }

  /** Forget a device altogether (its id may then be paired again); its instances are released. */
  async remove(id: string): Promise<void> {
    this.stored(id);
    const device = await this.update(id, () => null);
    if (!device) return;
    this.disarmExpiry(id);
    if (this.standingOf(device) === null) this.emit('device-ended', publicView(device), 'removed');
  }

  /**
   * Start watching expiry dates: call once the 'device-ended' listeners are in place (after the instances were
   * adopted at start), so an authorization that expired while the agent was down ends at once, and every later
   * one when it is due — timers survive a restart because they are re-armed from the stored dates.
   */
  startExpiryTimers(): void {
    this.expiryArmed = true;
    for (const device of this.devices.values()) this.armExpiry(device);
  }

  /** Stop every expiry timer (agent shutdown). */
  close(): void {
    this.expiryArmed = false;
    for (const id of [...this.expiryTimers.keys()]) this.disarmExpiry(id);
  }

  private armExpiry(device: StoredDevice): void {
    if (device.expiresAt === null || device.revokedAt !== null) return;
    this.disarmExpiry(device.id);
    const due = Date.parse(device.expiresAt) - Date.now();
    const timer = setTimeout(
      () => {
        this.expiryTimers.delete(device.id);
        if (this.devices.get(device.id) !== device || device.revokedAt !== null) return;
        if (Date.parse(device.expiresAt!) > Date.now()) return this.armExpiry(device);
        this.emit('device-ended', publicView(device), 'expired');
      },
      Math.min(Math.max(due, 0), MAX_TIMER_MS),
    );
    timer.unref();
    this.expiryTimers.set(device.id, timer);
  }

  private disarmExpiry(id: string): void {
    clearTimeout(this.expiryTimers.get(id));
    this.expiryTimers.delete(id);
  }

  private standingOf(device: StoredDevice): DeviceStanding {
    if (device.revokedAt !== null) return 'revoked';
    if (device.expiresAt !== null && Date.parse(device.expiresAt) <= Date.now()) return 'expired';
    return null;
  }

  private stored(id: string): StoredDevice {
    const device = this.devices.get(id);
    if (!device) throw new CloudletError('DEVICE_NOT_FOUND', `no paired device ${id}`, { details: { device_id: id } });
    return device;
  }

  private save(): Promise<void> {
    const text = devicesFileText(this.devices.values());
    this.saving = this.saving.catch(() => {}).then(() => writeSecretFile(this.file, text));
    return this.saving;
  }

  /**
   * Replaces device `id` with what `change` makes of it (null: deletes it; undefined: nothing to do) on disk first,
   * then in memory, so a failed write changes nothing and its error reaches the caller. Runs after the writes before
   * it, on the devices as they left them. Resolves to the device as it was, or undefined when nothing changed.
   */
  private update(id: string, change: (device: StoredDevice) => StoredDevice | null | undefined): Promise<StoredDevice | undefined> {
    const updated = this.saving
      .catch(() => {})
      .then(async () => {
        const device = this.devices.get(id);
        const next = device && change(device);
        if (!device || next === undefined) return undefined;
        const devices = new Map(this.devices);
        if (next === null) devices.delete(id);
        else devices.set(id, next);
        await writeSecretFile(this.file, devicesFileText(devices.values()));
        this.forgetTokensOf(id);
        if (next === null) this.devices.delete(id);
        else this.devices.set(id, next);
        return device;
      });
    this.saving = updated.then(
      () => {},
      () => {},
    );
    return updated;
  }
}

function devicesFileText(devices: Iterable<StoredDevice>): string {
  const content: DevicesFile = { version: 1, devices: [...devices] };
  return JSON.stringify(content, null, 2) + '\n';
}

/** Throws INVALID_PARAMETER unless `id` can name a device. */
export function checkDeviceId(id: string): void {
  if (!DEVICE_ID.test(id)) {
    throw new CloudletError('INVALID_PARAMETER', 'device_id must be 1-64 characters of A-Z a-z 0-9 . _ : -', { details: { parameter: 'device_id' } });
  }
}

function publicView(device: StoredDevice): PairedDevice {
  return {
    id: device.id,
    name: device.name,
    kind: device.kind ?? 'device',
    pairedAt: device.pairedAt,
    expiresAt: device.expiresAt,
    revokedAt: device.revokedAt,
  };
}

export function sha256(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}
