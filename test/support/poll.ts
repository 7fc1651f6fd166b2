/** Reads `read()` every 100 ms until `ok` holds or `timeoutMs` passed; returns the last value read either way. */
export async function until<T>(read: () => Promise<T>, ok: (value: T) => boolean, timeoutMs = 15000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let value = await read();
  while (!ok(value) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 100));
    value = await read();
  }
  return value;
}
