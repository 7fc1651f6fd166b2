/**
 * WebSocket endpoints that carry a byte stream (MQTT over WebSocket): each connection is handed to its consumer as a
 * Duplex whose writes are binary messages, with backpressure both ways. The credentials come later, inside the stream:
 * the upgrade draws on its address's request bucket and connection cap.
 */
import { Duplex } from 'node:stream';
import type { Transport } from '../trust/access';
import type { Release } from '../trust/connection-caps';
import type { RateLimiter } from '../trust/rate-limit';
import type { SocketEndpoint, SocketPeer, SocketSession, UpgradeRequest } from './socket-endpoint';

export interface StreamEndpoint {
  path: string;
  /** The WebSocket subprotocol to agree to when the client offers it (MQTT clients offer `mqtt`). */
  protocol: string;
  /**
   * Counts a connection at its upgrade until it is released, or throws (the upgrade is then refused with the error);
   * `request`: the upgrade's headers and query (for a stream whose credential comes with the upgrade).
   */
  admit?(transport: Transport, request: UpgradeRequest): Release;
  /** `transport`: who connected and whether over TLS (the stream's own protocol may carry credentials). */
  accept(stream: Duplex, transport: Transport, request: UpgradeRequest): void;
}

/** Largest WebSocket message accepted from a client (MQTT packets from subscribers are tiny). */
const MAX_WS_MESSAGE_BYTES = 256 * 1024;

export function streamSocket(endpoint: StreamEndpoint, limiter: RateLimiter | null, log: (line: string) => void): SocketEndpoint {
  return {
    path: endpoint.path,
    limits: { maxPayloadLength: MAX_WS_MESSAGE_BYTES, idleTimeoutSeconds: 0, maxBackpressure: 4 * MAX_WS_MESSAGE_BYTES },
    upgrade: (request) => {
      limiter?.takeForAddress(request.transport.remoteAddress);
      const release = endpoint.admit?.(request.transport, request);
      return new StreamSession(endpoint, request, release, log);
    },
  };
}

class StreamSession implements SocketSession {
  readonly protocol: string;
  private stream: Duplex | undefined;
  private closed = false;
  /** The write waiting for the transport to drain. */
  private drained: (() => void) | undefined;

  constructor(
    private readonly endpoint: StreamEndpoint,
    private readonly request: UpgradeRequest,
    private readonly release: Release | undefined,
    private readonly log: (line: string) => void,
  ) {
    this.protocol = endpoint.protocol;
  }

  open(peer: SocketPeer): void {
    const stream = new Duplex({
      read() {},
      write: (chunk: Buffer, _encoding, callback) => {
        if (this.closed) return callback(new Error('WebSocket closed'));
        // Queued beyond the transport's buffer: wait for drain before taking more (Node's stream backpressure).
        if (!peer.send(chunk, true)) this.drained = () => callback();
        else callback();
      },
      destroy: (err, callback) => {
        if (!this.closed) {
          this.closed = true;
          peer.end(1000);
        }
        callback(err);
      },
    });
    this.stream = stream;
    stream.on('error', (err) => this.log(`${this.endpoint.path} stream: ${err.message}`));
    this.endpoint.accept(stream, this.request.transport, this.request);
  }

  message(data: Buffer): void {
    this.stream?.push(data);
  }

  drain(): void {
    const drained = this.drained;
    this.drained = undefined;
    drained?.();
  }

  close(): void {
    this.closed = true;
    this.release?.();
    this.drained?.();
    this.stream?.push(null);
    this.stream?.destroy();
  }
}
