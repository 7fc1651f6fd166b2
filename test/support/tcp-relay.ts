// A TCP relay on loopback between a client and a server: the test's hand on a network link. sever() cuts it (open
// connections are closed at once and new ones refused, as when a box's uplink goes down and its ends notice), freeze()
// makes it silent (connections stay open but nothing passes: a link lost without either end being told), restore()
// brings it back.
import net from 'node:net';

export class TcpRelay {
  private readonly pairs = new Set<{ inbound: net.Socket; outbound: net.Socket }>();
  private state: 'up' | 'severed' | 'frozen' = 'up';

  private constructor(
    private readonly server: net.Server,
    readonly port: number,
  ) {}

  /** Listens on 127.0.0.1 (any free port) and forwards each connection to `target`. */
  static async start(target: { host: string; port: number }): Promise<TcpRelay> {
    let relay!: TcpRelay;
    const server = net.createServer((inbound) => relay.accept(inbound, target));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    relay = new TcpRelay(server, (server.address() as net.AddressInfo).port);
    return relay;
  }

  sever(): void {
    this.state = 'severed';
    for (const { inbound, outbound } of this.pairs) {
      inbound.destroy();
      outbound.destroy();
    }
    this.pairs.clear();
  }

  freeze(): void {
    this.state = 'frozen';
    for (const { inbound, outbound } of this.pairs) {
      inbound.unpipe(outbound);
      outbound.unpipe(inbound);
      inbound.pause();
      outbound.pause();
    }
  }

  /** The link is back; connections frozen meanwhile are closed (their ends would have given up on them). */
  restore(): void {
    if (this.state === 'frozen') this.sever();
    this.state = 'up';
  }

  async close(): Promise<void> {
    this.sever();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(inbound: net.Socket, target: { host: string; port: number }): void {
    if (this.state === 'severed') return void inbound.destroy();
    if (this.state === 'frozen') {
      inbound.pause();
      inbound.on('error', () => {});
      return void this.pairs.add({ inbound, outbound: new net.Socket() });
    }
    const outbound = net.connect(target.port, target.host);
    const pair = { inbound, outbound };
    this.pairs.add(pair);
    const end = () => {
      inbound.destroy();
      outbound.destroy();
      this.pairs.delete(pair);
    };
    for (const socket of [inbound, outbound]) socket.on('error', end).on('close', end);
    inbound.pipe(outbound);
    outbound.pipe(inbound);
  }
}
