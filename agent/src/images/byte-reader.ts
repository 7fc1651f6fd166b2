import type { CloudletError } from '../errors';

/** Exact reads from a byte stream, as its chunks come; `short` is the error for a stream that ends too early. */
export class ByteReader {
  private readonly iterator: AsyncIterator<Buffer>;
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;
  /** Bytes handed out so far. */
  position = 0;

  constructor(
    stream: AsyncIterable<Buffer>,
    private readonly short: (endsAt: number) => CloudletError,
  ) {
    this.iterator = stream[Symbol.asyncIterator]();
  }

  async read(n: number): Promise<Buffer> {
    while (this.bufferedBytes < n) {
      const next = await this.iterator.next();
      if (next.done) throw this.short(this.position + this.bufferedBytes);
      this.buffered.push(next.value);
      this.bufferedBytes += next.value.length;
    }
    const all = this.buffered.length === 1 ? this.buffered[0]! : Buffer.concat(this.buffered, this.bufferedBytes);
    this.buffered = all.length > n ? [all.subarray(n)] : [];
    this.bufferedBytes = all.length - n;
    this.position += n;
    return all.subarray(0, n);
  }

  /** Everything after what was read, as it comes. */
  async *rest(): AsyncGenerator<Buffer> {
    const buffered = this.buffered;
    this.buffered = [];
    this.bufferedBytes = 0;
    yield* buffered;
    for (;;) {
      const next = await this.iterator.next();
      if (next.done) return;
      yield next.value;
    }
  }

  /** Whether the stream ends here (reads one more chunk to tell). */
  async atEnd(): Promise<boolean> {
    return this.bufferedBytes === 0 && (await this.iterator.next()).done === true;
  }

  /** Stops reading (the source is released). */
  async close(): Promise<void> {
    await this.iterator.return?.();
  }
}
