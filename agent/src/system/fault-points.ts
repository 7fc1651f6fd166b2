/**
 * Named fault points for the crash-recovery tests (docs/reliability.md lists them all). `faultPoint(name)` does
 * nothing unless the environment variable CLOUDLET_FAULT_POINT names that point; then the agent SIGKILLs itself right
 * there, synchronously, as a power cut or an OOM kill would stop it. Read once at start: a fault point cannot be armed
 * from the API.
 */
const armed = process.env.CLOUDLET_FAULT_POINT || null;

export function faultPoint(name: string): void {
  if (name === armed) process.kill(process.pid, 'SIGKILL');
}
