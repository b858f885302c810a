// The scripts that circuit-tracer's graph front end loads from CDNs, made from this folder's npm
// packages instead (for tests/test_interop_circuit_tracer.py): `d3.js`, d3 v7 with d3-jetpack as one
// global `d3` (what the page's d3.js and jetpack scripts give it), `dagre.min.js` and `pako.min.js`.
//
// d3-jetpack's own prebuilt d3 v7 file bundles two copies of d3-selection (its peer dependency is
// v1) and patches the one it does not export; bundling its entry here with the d3-selection and
// d3-transition imports taken from d3 v7 gives the page one selection class, extended by jetpack.
//
// Usage: node vendor.mjs OUT_DIR
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join, sep } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const modules = join(here, "node_modules");
const out = process.argv[2];
if (!out) {
  console.error("usage: node vendor.mjs OUT_DIR");
  process.exit(2);
}
mkdirSync(out, { recursive: true });

const d3Dir = join(modules, "d3");
const oneD3 = {
  name: "one-d3",
  setup(b) {
    // resolved from d3's own folder: the versions d3 v7 itself uses. jetpack's attachTooltip still
    // imports d3 v4's `event`, which d3 v7 dropped: it keeps the v1 package, as jetpack's own build does.
    b.onResolve({ filter: /^d3-(selection|transition)$/ }, (args) =>
      args.resolveDir === d3Dir || args.resolveDir.startsWith(d3Dir + sep) || args.importer.endsWith("attachTooltip.js")
        ? undefined
        : b.resolve(args.path, { kind: args.kind, resolveDir: d3Dir }),
    );
  },
};

// d3 with jetpack (the package's own d3 v7 entry), and one method the page's build of jetpack has:
// conventions() objects draw their axes with c.drawAxis(svg) (npm's jetpack has d3.drawAxis(c)).
const entry = `
import { conventions as jetpackConventions, drawAxis } from ${JSON.stringify(join(modules, "d3-jetpack", "d3-index.js"))};
export * from ${JSON.stringify(join(modules, "d3-jetpack", "d3-index.js"))};
export function conventions(options) {
  const c = jetpackConventions(options);
  c.drawAxis = (svg) => drawAxis({ ...c, svg: svg || c.svg });
  return c;
}
`;

await build({
  stdin: { contents: entry, resolveDir: here, sourcefile: "d3-for-circuit-tracer.js" },
  bundle: true,
  minify: true,
  format: "iife",
  globalName: "d3",
  plugins: [oneD3],
  outfile: join(out, "d3.js"),
  logLevel: "warning",
});
copyFileSync(join(modules, "dagre", "dist", "dagre.min.js"), join(out, "dagre.min.js"));
copyFileSync(join(modules, "pako", "dist", "pako.min.js"), join(out, "pako.min.js"));
console.log(`wrote d3.js, dagre.min.js and pako.min.js into ${out}`);
