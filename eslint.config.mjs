// ESLint, run by `./build.sh lint`: typescript-eslint's type-checked recommended rules, tuned to the house's style.
// Formatting is prettier's (.prettierrc), import rules are dependency-cruiser's (.dependency-cruiser.cjs).
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['dist/', 'node_modules/', '.build/', 'tmp/', 'rootfs/', 'agent/web/'] },
  js.configs.recommended,
  ...tseslint.configs.recommendedTypeChecked,
  {
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    rules: {
      // `_name` drops a field on purpose (`const { dir: _dir, ...view } = record`); tsc's noUnused* check the rest.
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrorsIgnorePattern: '^_', ignoreRestSiblings: true },
      ],
      // An async function without await is how a function that must return a promise turns its throws into rejections.
      '@typescript-eslint/require-await': 'off',
      // Optional or rarely needed modules are loaded when first used, typed as `require('x') as typeof import('x')`.
      '@typescript-eslint/no-require-imports': [
        'error',
        { allow: ['^mqtt$', '^tar$', '^multicast-dns$', '^dbus-next$', '^@xmldom/xmldom$', 'package\\.json$', '^\\./openapi$'] },
      ],
      // A `let` that callbacks read before its one assignment (a server whose handlers use the object made from it).
      'prefer-const': ['error', { ignoreReadBeforeAssign: true }],
    },
  },
  {
    // What a cloudlet answers is escaped before it reaches a terminal: these match control characters on purpose.
    files: ['agent/src/cli/answers.ts', 'agent/src/cli/terminal.ts', 'test/cli-*.test.ts'],
    rules: { 'no-control-regex': 'off' },
  },
  {
    // Tests and benchmarks read JSON answers as `any` on purpose: an assertion is the check, not a type.
    // tap runs the subtests it is handed (`t.test(...)`), so they are not floating promises.
    files: ['test/**/*.ts', 'bench/**/*.ts'],
    rules: {
      '@typescript-eslint/no-explicit-any': 'off',
      '@typescript-eslint/no-unsafe-argument': 'off',
      '@typescript-eslint/no-unsafe-assignment': 'off',
      '@typescript-eslint/no-unsafe-call': 'off',
      '@typescript-eslint/no-unsafe-member-access': 'off',
      '@typescript-eslint/no-unsafe-return': 'off',
      '@typescript-eslint/no-floating-promises': ['error', { allowForKnownSafeCalls: ['test', 'skip', 'todo', 'only'] }],
    },
  },
);
