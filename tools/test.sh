#!/usr/bin/env bash
# Install everything and run the test suite (the README's test command; .ci/run calls it).
#
#   bash tools/test.sh [pytest args...]
#
# 1. .venv: the package with its dev extras (MLX CPU backend on Linux, Metal on macOS).
# 2. On Debian/Ubuntu as root: libopenblas0-pthread, which asr/_blas.py loads for MLX's CPU matmuls.
# 3. .venv-ref: the OFFICIAL funasr 1.4.16 + torch 2.13.0 CPU (tools/setup_reference_env.sh), then golden outputs
#    of the official code on a tiny random checkpoint (tools/make_goldens.sh) for the parity tests.
#    Where that is impossible (no local torch wheel) the parity tests fall back to the committed token fixture,
#    unless FUNASR_REQUIRE_GOLDENS=1 (CI), which makes it an error.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
say() { printf '[test.sh] %s\n' "$*"; }

if [[ "$(uname -s)" == Linux && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null \
   && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
  say "installing libopenblas0-pthread (fast BLAS for MLX on CPU)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread; } >/dev/null \
    || say "could not install OpenBLAS; MLX keeps its slow bundled BLAS"
fi

[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip 2>/dev/null || true
say "installing funasr-nano-mlx[dev] into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"

if bash tools/setup_reference_env.sh && bash tools/make_goldens.sh; then
  export FUNASR_GOLDENS="$ROOT/.cache/goldens/tiny"
elif [[ "${FUNASR_REQUIRE_GOLDENS:-0}" == 1 ]]; then
  say "ERROR: golden outputs of the official code could not be made"; exit 1
else
  say "WARNING: no reference venv; parity tests use only the committed token fixture"
fi

say "running pytest"
exec .venv/bin/python -m pytest -q "$@"
