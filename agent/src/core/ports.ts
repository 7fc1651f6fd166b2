import net from 'node:net';
import { CloudletError } from '../errors';

/**
 * Host ports for forwarding, taken from a configured range. A port is reserved in memory before anything awaits,
 * so two concurrent starts can never pick the same one; it is also test-bound once to skip ports another program
 * holds. (QEMU binds it a moment later; if something grabs it in between, the launch fails and is retried.)
 */
export class PortAllocator {
  private readonly reserved = new Set<number>();
  private next: number;

  constructor(
    private readonly bindAddress: string,
    private readonly range: { first: number; last: number },
  ) {
    this.next = range.first;
  }

  /** Mark a port as taken by an instance adopted after a restart. */
  claim(port: number): void {
    this.reserved.add(port);
  }

  release(port: number): void {
    this.reserved.delete(port);
  }

  async reserve(): Promise<number> {
    const size = this.range.last - this.range.first + 1;
    for (let tried = 0; tried < size; tried++) {
      const port = this.next;
      this.next = port === this.range.last ? this.range.first : port + 1;
      if (this.reserved.has(port)) continue;
      this.reserved.add(port);
      if (await isBindable(this.bindAddress, port)) return port;
      this.reserved.delete(port);
    }
    throw new CloudletError('NO_FREE_PORT', `no free port in ${this.range.first}-${this.range.last} on ${this.bindAddress}`);
  }
}

function isBindable(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen({ host, port, exclusive: true }, () => server.close(() => resolve(true)));
  });
}
