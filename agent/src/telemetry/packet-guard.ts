/**
 * Bounds on the MQTT packets a client may send, checked on the bytes as the broker reads them: aedes's parser would
 * otherwise buffer a packet of any announced size (up to 256 MiB) until it is whole. The fixed header announces a
 * packet's length in its first 2-5 bytes, so a packet over the bound is refused before its body is read.
 */

/** Bytes a client may send before its login is accepted: one CONNECT (client id, device id, token, a small will). */
export const MAX_BYTES_BEFORE_LOGIN = 4 * 1024;
/** The largest packet from a logged-in client: subscribers send SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT. */
export const MAX_PACKET_BYTES = 16 * 1024;

export class PacketGuard {
  private loggedIn = false;
  /** What is left of MAX_BYTES_BEFORE_LOGIN for the packets announced so far. */
  private budgetBeforeLogin = MAX_BYTES_BEFORE_LOGIN;
  /** Where in the current packet the next byte falls: its type byte, its length (a varint), or its body. */
  private at: 'type' | 'length' | 'body' = 'type';
  private lengthBytes = 0;
  private length = 0;
  private bodyLeft = 0;

  /** From now on packets may be up to MAX_PACKET_BYTES each. */
  loggedInNow(): void {
    this.loggedIn = true;
  }

  /** Follows a chunk of the client's bytes; returns why the connection must be cut, or null. */
  inspect(chunk: Buffer): string | null {
    let i = 0;
    while (i < chunk.length) {
      if (this.at === 'body') {
        const taken = Math.min(this.bodyLeft, chunk.length - i);
        this.bodyLeft -= taken;
        i += taken;
        if (this.bodyLeft === 0) this.at = 'type';
        continue;
      }
      const byte = chunk[i++]!;
      if (this.at === 'type') {
        this.at = 'length';
        this.lengthBytes = 0;
        this.length = 0;
        continue;
      }
      this.length += (byte & 0x7f) * 128 ** this.lengthBytes++;
      if (byte & 0x80) {
        if (this.lengthBytes === 4) return 'malformed packet length';
        continue;
      }
      const refusal = this.admit(1 + this.lengthBytes + this.length);
      if (refusal) return refusal;
      this.bodyLeft = this.length;
      this.at = this.length === 0 ? 'type' : 'body';
    }
    return null;
  }

  private admit(packetBytes: number): string | null {
    if (this.loggedIn) return packetBytes > MAX_PACKET_BYTES ? `a packet of ${packetBytes} bytes (at most ${MAX_PACKET_BYTES} may be sent)` : null;
    if (packetBytes > this.budgetBeforeLogin) return `${packetBytes} bytes before login (at most ${MAX_BYTES_BEFORE_LOGIN} may be sent)`;
    this.budgetBeforeLogin -= packetBytes;
    return null;
  }
}
