#!/usr/bin/env bash
# A/B of MLX's CUDA graphs (MLX_USE_CUDA_GRAPHS=1, MLX's default, against 0: every kernel launched directly) on our
# side only: bf16, the two clips at batch 1 and 64 segments. Writes $OUT/ab_g{1,0}.{json,md,log} and prints the
# per-clip totals and the batch-64 RTFx of each; $OUT/winner holds the value with the lower summed per-clip total.
# Run after setup.sh.
set -u
. tools/gpu/env.sh
for g in 1 0; do
  MLX_USE_CUDA_GRAPHS=$g python3 examples/benchmark.py --model /root/ck/full --clips $CLIPS --modes bf16 \
    --max-new-tokens 32 --repeats 5 --warmup 2 --batch 1 64 --json $OUT/ab_g$g.json --markdown $OUT/ab_g$g.md \
    > $OUT/ab_g$g.log 2>&1
done
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
best = None
for g in ("1", "0"):
    r = json.load(open(f"{out}/ab_g{g}.json"))["results"][0]
    totals = {c["clip"]: c["stages"]["total_s"] * 1e3 for c in r["clips"]}
    stages = {c["clip"]: {k: round(v * 1e3, 1) for k, v in c["stages"].items() if k.endswith("_s")} for c in r["clips"]}
    rtfx = {b["segments"]: round(b["rtfx"]) for b in r["batch"]}
    print(f"MLX_USE_CUDA_GRAPHS={g}: totals {totals} RTFx {rtfx}\n  stages {stages}")
    if best is None or sum(totals.values()) < best[1]:
        best = (g, sum(totals.values()))
open(f"{out}/winner", "w").write(best[0])
print("winner", best[0])
PY
