// The part of autocannon (an HTTP load generator; it ships no types) that the benchmarks use.
declare module 'autocannon' {
  interface Percentiles {
    average: number;
    p50: number;
    p99: number;
    max: number;
  }
  interface Options {
    url: string;
    connections?: number;
    duration?: number;
    headers?: Record<string, string>;
  }
  interface Result {
    requests: Percentiles & { total: number };
    latency: Percentiles;
    duration: number;
    errors: number;
    timeouts: number;
    non2xx: number;
  }
  function autocannon(options: Options): Promise<Result>;
  export = autocannon;
}
