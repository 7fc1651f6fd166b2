/**
 * What a WebSocket endpoint is made of, independent of the server library (as routing.ts is for routes): it admits or
 * refuses an upgrade, then follows its connection through a session. uws-transport.ts runs endpoints.
 */
import type { Transport } from '../trust/access';

export interface SocketEndpoint {
  path: string;
  /** The transport's own bounds on the connection; absent ones keep the transport's defaults. */
  limits: {
    /** Largest message accepted from the client. */
    maxPayloadLength: number;
    /** Seconds without traffic before the connection is closed; 0: never (the protocol inside has its own keep-alive). */
    idleTimeoutSeconds: number;
    /** Bytes queued for a slow client before the transport drops what is sent to it. */
    maxBackpressure: number;
    sendPingsAutomatically?: boolean;
  };
  /** Admits an upgrade and returns its connection's session, or throws: the upgrade is refused with the error. */
  upgrade(request: UpgradeRequest): SocketSession;
}

/** What an upgrade request says, copied out of the transport's request. */
export interface UpgradeRequest {
  /** A request header by lower-case name; undefined when absent or empty. */
  header(name: string): string | undefined;
  query: URLSearchParams;
  /** The subprotocols the client offered (Sec-WebSocket-Protocol), in its order. */
  offeredProtocols: string[];
  transport: Transport;
}

/** One connection after its upgrade. */
export interface SocketSession {
  /** The subprotocol to agree to ('' for none); the transport agrees to it only when the client offered it. */
  protocol: string;
  open(peer: SocketPeer): void;
  /** A message from the client (a copy the session may keep). */
  message?(data: Buffer): void;
  /** The transport took what was queued: sending may go on. */
  drain?(): void;
  /** The connection is gone, whoever closed it; the peer must not be used any more. */
  close(): void;
}

/** The session's side of the connection. */
export interface SocketPeer {
  /** Sends one message; false when it had to be queued beyond the transport's buffer (wait for drain). */
  send(data: string | Buffer, binary: boolean): boolean;
  /** Bytes sent but not yet taken by the client's connection. */
  bufferedAmount(): number;
  /** Closes the connection with a close code and reason. */
  end(code: number, reason?: string): void;
}
