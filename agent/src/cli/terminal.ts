/**
 * What the CLI prints that came from outside (a cloudlet's answers, mDNS records): every such string goes through
 * `escaped`, so a rogue server cannot reach the terminal with control sequences (OSC 52 clipboard writes, CSI cursor
 * moves, window titles) or forge lines of output with a newline.
 */

/** C0 controls (newline and tab too), DEL, C1 controls, and the bidirectional overrides and isolates. */
const UNPRINTABLE = /[\u0000-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/g;

const escape = (c: string): string => {
  const code = c.charCodeAt(0);
  return code < 0x100 ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16)}`;
};

/** `text` with every control character shown as an escape (`\x1b`, `\x07`, `\u202e`) instead of acting on the terminal. */
export function escaped(text: unknown): string {
  return String(text).replace(UNPRINTABLE, escape);
}

/** A template literal whose interpolated values are `escaped`: shown`saved ${name}` */
export function shown(strings: TemplateStringsArray, ...values: unknown[]): string {
  return strings.reduce((text, part, i) => text + part + (i < values.length ? escaped(values[i]) : ''), '');
}

/**
 * JSON for stdout. JSON.stringify already writes C0 controls as \u00XX; DEL, C1 and the bidi controls it leaves raw
 * are written as \u escapes too, which any JSON reader decodes to the same string.
 */
export function jsonLine(value: unknown): string {
  return JSON.stringify(value).replace(/[\u007f-\u009f\u202a-\u202e\u2066-\u2069]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

/** Columns padded to their widest cell; every cell escaped. */
export function table(header: string[], rows: unknown[][]): string {
  const cells = rows.map((r) => r.map(escaped));
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((r) => (r[i] ?? '').length)));
  return [header, ...cells].map((r) => r.map((cell, i) => (i === r.length - 1 ? cell : cell.padEnd(widths[i]!))).join('  ')).join('\n');
}
