#!/usr/bin/env bash
# Golden outputs of the official funasr code on the random-weight tiny checkpoint.
#
#   bash tools/make_goldens.sh [OUT]            # default OUT = .cache/goldens/tiny
#   SIZE=full SEED=0 bash tools/make_goldens.sh .cache/goldens/full
#
# 1. the checkpoint is written by tools/checkpoint.py in the MAIN venv (no torch) into OUT/model/
# 2. tools/reference.py runs the official code on it in the REFERENCE venv (tools/setup_reference_env.sh)
#    and writes OUT/*.npz + OUT/manifest.json
# Extra arguments for tools/reference.py can be passed in REF_ARGS (e.g. REF_ARGS="--max-new-tokens 16").
# For the default tiny/seed-0 run, OUT/golden_tokens.json is compared with the committed fixture
# tests/fixtures/golden_tiny_tokens.json; UPDATE_FIXTURE=1 replaces the fixture with it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SIZE="${SIZE:-tiny}"
SEED="${SEED:-0}"
OUT="${1:-$ROOT/.cache/goldens/$SIZE}"
MAIN_PY="${MAIN_PY:-$ROOT/.venv/bin/python}"
REF_PY="${REF_PY:-$ROOT/.venv-ref/bin/python}"

[[ -x "$MAIN_PY" ]] || { echo "main venv python not found: $MAIN_PY" >&2; exit 1; }
[[ -x "$REF_PY" ]] || { echo "reference venv not found: $REF_PY (run tools/setup_reference_env.sh)" >&2; exit 1; }

mkdir -p "$OUT"
cd "$ROOT"
t0=$SECONDS
"$MAIN_PY" -m tools.checkpoint "$OUT/model" --size "$SIZE" --seed "$SEED"
t1=$SECONDS
# shellcheck disable=SC2086
"$REF_PY" tools/reference.py --model "$OUT/model" --out "$OUT" ${REF_ARGS:-} 2> "$OUT/reference.log" \
  || { tail -n 30 "$OUT/reference.log" >&2; exit 1; }
t2=$SECONDS
echo "checkpoint: $((t1 - t0)) s, reference: $((t2 - t1)) s -> $OUT"

FIXTURE="$ROOT/tests/fixtures/golden_tiny_tokens.json"
if [[ "$SIZE" == tiny && "$SEED" == 0 && -z "${REF_ARGS:-}" ]]; then
  if [[ "${UPDATE_FIXTURE:-0}" == 1 ]]; then
    mkdir -p "$(dirname "$FIXTURE")"
    cp "$OUT/golden_tokens.json" "$FIXTURE"
    echo "updated $FIXTURE"
  elif [[ -f "$FIXTURE" ]] && ! "$MAIN_PY" - "$OUT/golden_tokens.json" "$FIXTURE" <<'PY'
# the ids and text must match; the teacher-forced margins (floats) only to 1e-3: the official code's fp32 sums
# round differently on another CPU (seen: the 5th decimal)
import json, sys
a, b = (json.load(open(p))["entries"] for p in sys.argv[1:3])
same = len(a) == len(b) and all(
    {k: v for k, v in x.items() if k != "tf_margin"} == {k: v for k, v in y.items() if k != "tf_margin"}
    and len(x["tf_margin"]) == len(y["tf_margin"])
    and all(abs(p - q) <= 1e-3 for p, q in zip(x["tf_margin"], y["tf_margin"]))
    for x, y in zip(a, b))
sys.exit(0 if same else 1)
PY
  then
    echo "WARNING: $OUT/golden_tokens.json differs from $FIXTURE (ids, text or margins; UPDATE_FIXTURE=1 to replace it)" >&2
  fi
fi
