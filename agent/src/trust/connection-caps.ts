/**
 * Caps on the agent's long-lived connections (MQTT over TCP and WebSocket, /v1/events), shared by the HTTP server and
 * the MQTT broker: one host cannot hold every socket (and the memory behind them) by opening connections it never
 * logs in on, nor one paired device by logging in many times. The operator (admin) is not capped per device.
 */
import { CloudletError } from '../errors';
import { addressKey } from './access';

export interface ConnectionLimits {
  /** MQTT connections open at once from one address (an IPv6 /64), counted from accept, before any login. */
  mqttPerAddress: number;
  /** Connections (MQTT and /v1/events) one paired device holds at once. */
  perDevice: number;
}

/** Gives back what a connection held; calling it again does nothing. */
export type Release = () => void;

export class ConnectionCaps {
  private readonly open = new Map<string, number>();

  constructor(private readonly limits: ConnectionLimits) {}

  /** Counts an MQTT connection from this address, or throws TOO_MANY_CONNECTIONS. */
  holdForAddress(remoteAddress: string): Release {
    return this.hold(`address ${addressKey(remoteAddress)}`, this.limits.mqttPerAddress);
  }

  /** Counts a connection a paired device logged in on, or throws TOO_MANY_CONNECTIONS. */
  holdForDevice(deviceId: string): Release {
    return this.hold(`device ${deviceId}`, this.limits.perDevice);
  }

  private hold(key: string, limit: number): Release {
    const held = this.open.get(key) ?? 0;
    if (held >= limit) {
      throw new CloudletError('TOO_MANY_CONNECTIONS', `${key} already holds ${limit} connection(s), the most it may; close one first`, { details: { limit } });
    }
    this.open.set(key, held + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (this.open.get(key) ?? 1) - 1;
      if (left > 0) this.open.set(key, left);
      else this.open.delete(key);
    };
  }
}
