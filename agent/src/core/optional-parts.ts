/**
 * The optional parts of the agent and whether each runs: discovery (Avahi over D-Bus), HTTPS, MQTT over TCP, the
 * external MQTT broker. The agent serves without any of them, so one that cannot run must say so where an operator
 * looks: one log line when it goes off (what is wrong, and how to fix it), `/v1/health`'s `parts`, and the phone page's
 * footer. The part names are stable (docs/api.md); main.ts and the parts themselves report here.
 */
import type { Logger } from '../log';

export const OPTIONAL_PARTS = ['discovery', 'https', 'mqtt-tcp', 'mqtt-external'] as const;
export type OptionalPartName = (typeof OPTIONAL_PARTS)[number];

/** `starting`: not settled yet (discovery while it reaches D-Bus); `disabled`: turned off in the configuration. */
export type OptionalPartState = 'on' | 'starting' | 'off' | 'disabled';

export interface OptionalPart {
  part: OptionalPartName;
  state: OptionalPartState;
  /** Why it is off or disabled; null otherwise. */
  reason: string | null;
  /** What the operator can do about it; null when there is nothing to do. */
  fix: string | null;
}

/** How a part says where it stands. */
export interface PartsReporter {
  on(part: OptionalPartName): void;
  /** Logged once per new reason, as one line with the fix. */
  off(part: OptionalPartName, reason: string, fix: string): void;
}

export class OptionalParts implements PartsReporter {
  private readonly parts = new Map<OptionalPartName, OptionalPart>();

  constructor(private readonly log: Logger) {
    for (const part of OPTIONAL_PARTS) this.parts.set(part, { part, state: 'starting', reason: null, fix: null });
  }

  on(part: OptionalPartName): void {
    this.parts.set(part, { part, state: 'on', reason: null, fix: null });
  }

  off(part: OptionalPartName, reason: string, fix: string): void {
    const was = this.parts.get(part);
    if (was?.state === 'off' && was.reason === reason) return;
    this.parts.set(part, { part, state: 'off', reason, fix });
    this.log(`${part} is off: ${reason}; to fix: ${fix}`);
  }

  /** Turned off by the operator: nothing to fix, nothing logged. */
  disabled(part: OptionalPartName, reason: string): void {
    this.parts.set(part, { part, state: 'disabled', reason, fix: null });
  }

  list(): OptionalPart[] {
    return OPTIONAL_PARTS.map((part) => ({ ...this.parts.get(part)! }));
  }
}
