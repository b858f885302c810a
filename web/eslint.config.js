// eslint's flat config for the explorer's front end: browser ES modules in src/, node scripts and
// tests beside them. The recommended rules plus those that catch real bugs in untyped code.
import js from "@eslint/js";
import globals from "globals";

const bugs = {
  eqeqeq: ["error", "always"],
  "no-unused-vars": ["error", { args: "after-used", caughtErrors: "all", ignoreRestSiblings: true }],
  "no-undef": "error",
  "no-shadow": "error",
  "no-use-before-define": ["error", { functions: false, classes: true, variables: true }],
  "no-implicit-globals": "error",
  "no-self-compare": "error",
  "no-template-curly-in-string": "error",
  "no-unmodified-loop-condition": "error",
  "no-unreachable-loop": "error",
  "no-constructor-return": "error",
  "no-promise-executor-return": "error",
  "no-new-wrappers": "error",
  "no-throw-literal": "error",
  "no-var": "error",
  "prefer-const": "error",
  "array-callback-return": "error",
  "default-case-last": "error",
  radix: "error",
  "no-unused-expressions": "error",
};

export default [
  { ignores: ["node_modules/"] },
  js.configs.recommended,
  {
    files: ["src/**/*.js"],
    languageOptions: { ecmaVersion: 2023, sourceType: "module", globals: globals.browser },
    rules: bugs,
  },
  {
    files: ["*.js", "*.mjs", "test/**/*.js"],
    languageOptions: { ecmaVersion: 2023, sourceType: "module", globals: globals.node },
    rules: bugs,
  },
];
