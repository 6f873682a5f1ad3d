// Builds server/viewer/transcript.html: src/viewer.ts bundled (with @modelcontextprotocol/ext-apps and what it
// needs) by esbuild, minified, and inlined with the CSS of src/index.html into one file that needs no network.
// Run through tools/build_viewer.sh, which installs the pinned packages and sets VIEWER_NODE_MODULES.
import { createHash } from "node:crypto";
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const src = dirname(fileURLToPath(import.meta.url));
const here = join(src, ".."); // server/viewer
const root = join(here, "..", "..");
const modules = process.env.VIEWER_NODE_MODULES;
if (!modules) throw new Error("set VIEWER_NODE_MODULES to the node_modules folder of server/viewer/package.json");
const require = createRequire(join(modules, "noop.js"));
const esbuild = require("esbuild");
const pkg = (name) => JSON.parse(readFileSync(join(modules, name, "package.json"), "utf8"));

// The MCP SDK's modules declare no `sideEffects`, and zod's `z` namespace (which ext-apps imports) drags in
// every locale: mark the SDK's modules side-effect free and keep zod's English messages only.
// This roughly halves the bundle; the browser test exercises the result.
const slim = {
  name: "slim",
  setup(build) {
    build.onResolve({ filter: /locales\/index\.js$/ }, (args) =>
      /[\\/]zod[\\/]/.test(args.importer) ? { path: "zod-locales-en", namespace: "slim" } : undefined,
    );
    build.onLoad({ filter: /.*/, namespace: "slim" }, () => ({
      contents: 'export { default as en } from "zod/v4/locales/en.js";',
      resolveDir: modules,
    }));
    const sdk = /@modelcontextprotocol[\\/](client|core)\b/;
    build.onResolve({ filter: /.*/ }, async (args) => {
      if (args.pluginData === "slim") return undefined;
      if (!(sdk.test(args.path) || (args.path.startsWith(".") && sdk.test(args.importer)))) return undefined;
      const resolved = await build.resolve(args.path, {
        kind: args.kind, importer: args.importer, resolveDir: args.resolveDir, pluginData: "slim",
      });
      return resolved.errors.length ? undefined : { ...resolved, sideEffects: false };
    });
  },
};

const result = await esbuild.build({
  entryPoints: [join(src, "viewer.ts")],
  nodePaths: [modules],
  bundle: true,
  minify: true,
  format: "iife",
  platform: "browser",
  target: ["es2022", "chrome110", "firefox110", "safari16"],
  legalComments: "none", // the licences are appended in full below
  charset: "utf8",
  write: false,
  logLevel: "warning",
  plugins: [slim],
});
let js = new TextDecoder().decode(result.outputFiles[0].contents).trim();
if (/<\/script/i.test(js) || js.includes("<!--")) throw new Error("the bundle holds </script or <!--: cannot inline it");

// What the page is built from, hashed: tests/test_viewer.py recomputes it to catch a source edited without a rebuild.
const inputs = ["package-lock.json", ...readdirSync(src).map((f) => `src/${f}`)].sort();
const digest = createHash("sha256");
for (const f of inputs) digest.update(`${f}\0`).update(readFileSync(join(here, f))).update("\0");

const ext = pkg("@modelcontextprotocol/ext-apps");
const client = pkg("@modelcontextprotocol/client");
const core = pkg("@modelcontextprotocol/core");
const zod = pkg("zod");
const banner = `<!--
  funasr-nano transcript viewer: an MCP App (io.modelcontextprotocol/ui) for transcribe_file, transcribe_url and
  get_transcript results. GENERATED FILE, do not edit: the source is server/viewer/src/ (viewer.ts, formats.ts,
  index.html, build.mjs), built by \`bash tools/build_viewer.sh\` (esbuild ${pkg("esbuild").version}, pinned in
  server/viewer/package-lock.json).
  sources-sha256: ${digest.digest("hex")}
  Bundled third-party code (licence texts in full at the end of this file):
    ${ext.name} ${ext.version} - licence ${ext.license} (its LICENSE: MIT, moving to Apache-2.0)
    ${client.name} ${client.version} and ${core.name} ${core.version} - licence ${client.license}
    ${zod.name} ${zod.version} - licence ${zod.license}
-->`;
const licence = (name) => readFileSync(join(modules, name, "LICENSE"), "utf8").trim();
const mcpLicence = licence("@modelcontextprotocol/ext-apps");
for (const other of ["@modelcontextprotocol/client", "@modelcontextprotocol/core"]) {
  if (licence(other) !== mcpLicence) throw new Error(`${other} has another LICENSE than ext-apps: append it too`);
}
const licences = `<!--
  LICENCE of ${ext.name}, ${client.name} and ${core.name}:

${mcpLicence}

  ==========================================================================================================
  LICENCE of ${zod.name}:

${licence("zod")}
-->`;
for (const comment of [banner, licences]) {
  const inner = comment.slice(4, -3);
  if (inner.includes("-->") || inner.includes("--!>")) throw new Error("a licence text would end its HTML comment");
}

const template = readFileSync(join(src, "index.html"), "utf8");
const html = template
  .replace("<!--BANNER-->", () => banner)
  .replace("<script>/*VIEWER_JS*/</script>", () => `<script>${js}</script>`)
  .replace(/<\/html>\s*$/, () => `</html>\n${licences}\n`);
const out = join(here, "transcript.html");
writeFileSync(out, html);
console.log(`wrote ${relative(root, out)} (${(Buffer.byteLength(html) / 1024).toFixed(0)} KiB)`);
