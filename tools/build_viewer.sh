#!/usr/bin/env bash
# Build server/viewer/transcript.html, the transcript viewer (an MCP App), from server/viewer/src/.
#
#   bash tools/build_viewer.sh
#
# Needs Node.js >= 20 and npm (the npm registry). The exact packages of server/viewer/package-lock.json are
# installed with `npm ci` into .cache/viewer-build/ (git-ignored; VIEWER_BUILD_DIR to choose another folder),
# and server/viewer/src/build.mjs bundles the app with esbuild into one self-contained HTML file. The built file is
# committed: the Python package ships it, and nothing here runs when the server does.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${VIEWER_BUILD_DIR:-$ROOT/.cache/viewer-build}"
say() { printf '[build_viewer] %s\n' "$*"; }

command -v node >/dev/null && command -v npm >/dev/null || { say "needs node (>= 20) and npm"; exit 1; }
mkdir -p "$BUILD_DIR"
if ! cmp -s "$ROOT/server/viewer/package-lock.json" "$BUILD_DIR/package-lock.json" \
   || [[ ! -d "$BUILD_DIR/node_modules" ]]; then
  say "installing the pinned packages into $BUILD_DIR"
  cp "$ROOT/server/viewer/package.json" "$ROOT/server/viewer/package-lock.json" "$BUILD_DIR/"
  (cd "$BUILD_DIR" && npm ci --no-audit --no-fund --loglevel=error)
fi
VIEWER_NODE_MODULES="$BUILD_DIR/node_modules" node "$ROOT/server/viewer/src/build.mjs"
