// The part of multicast-dns (pure-JS mDNS; it ships no types) that discovery.ts and the tests' responder use.
declare module 'multicast-dns' {
  interface MdnsRecord {
    name: string;
    type: string;
    data: unknown;
    ttl?: number;
  }
  interface MdnsPacket {
    questions?: Array<{ name: string; type: string }>;
    answers?: MdnsRecord[];
    additionals?: MdnsRecord[];
  }
  interface MdnsOptions {
    /** The address of the interface to send and join the group on (all interfaces when absent). */
    interface?: string;
    bind?: string | false;
    port?: number;
    loopback?: boolean;
    reuseAddr?: boolean;
  }
  interface Mdns {
    on(event: 'response' | 'query', listener: (packet: MdnsPacket) => void): this;
    on(event: 'error' | 'warning', listener: (err: Error) => void): this;
    on(event: 'ready', listener: () => void): this;
    query(query: { questions: Array<{ name: string; type: string }> }): void;
    respond(response: MdnsPacket): void;
    destroy(callback?: () => void): void;
  }
  function multicastDns(options?: MdnsOptions): Mdns;
  export = multicastDns;
}
