/** One line per event on stderr: journald (or the test runner) adds the timestamps and keeps them. */
export type Logger = (line: string) => void;

export function createLogger(component: string, sink: (line: string) => void = (l) => process.stderr.write(l + '\n')): Logger {
  return (line) => sink(`${component}: ${line}`);
}

export const silentLogger: Logger = () => {};
