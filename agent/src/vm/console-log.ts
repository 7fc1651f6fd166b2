import { open } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { isErrno } from '../errors';

/** The last `maxBytes` of a guest's serial console log ('' while QEMU has not created it yet). */
export async function readConsoleTail(file: string, maxBytes: number): Promise<string> {
  let handle;
  try {
    handle = await open(file, 'r');
  } catch (err) {
    if (isErrno(err, 'ENOENT')) return '';
    throw err;
  }
  try {
    const { size } = await handle.stat();
    const length = Math.min(size, maxBytes);
    const { buffer, bytesRead } = await handle.read(Buffer.alloc(length), 0, length, size - length);
    return buffer.subarray(0, bytesRead).toString('utf8');
  } finally {
    await handle.close();
  }
}

/**
 * Wait until a line of the console log contains one of `markers`; resolves with that marker, or null at the
 * deadline or when `stillAlive` says the VM is gone. The log is small and only its tail is read, every 100 ms.
 */
export async function waitForConsoleMarker(file: string, markers: string[], deadline: number, stillAlive: () => Promise<boolean>): Promise<string | null> {
  for (let attempt = 1; Date.now() < deadline; attempt++) {
    const lines = (await readConsoleTail(file, 64 << 10)).split('\n');
    const found = markers.find((marker) => lines.some((line) => line.includes(marker)));
    if (found) return found;
    if (attempt % 10 === 0 && !(await stillAlive())) return null;
    await sleep(100);
  }
  return null;
}
