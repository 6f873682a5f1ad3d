#!/usr/bin/env bash
# Decode A/B on the GPU (bf16 LLM, full-size random checkpoint): mlx-lm's own step vs our fixed-shape step,
# uncompiled and compiled, and MLX's CUDA-graph size (MLX_MAX_OPS_PER_BUFFER, default 20 nodes per graph);
# then the quantized small-batch case (q4, batch 1/8/32) with both steps. Writes $OUT/ab_*.json and a summary;
# the fastest graph size goes to /root/best_ops for the next call.   Run after tools/gpu/setup.sh.
set -u
. tools/gpu/env.sh
run() {  # run TAG MODE BATCHES DECODE [ENV=VAL ...]
  tag=$1 mode=$2 batches=$3 dec=$4; shift 4
  env "$@" python3 examples/benchmark.py --model /root/ck/full --clips $CLIPS --modes $mode --repeats 3 --warmup 2 \
    --max-new-tokens 32 --batch $batches --decode $dec --json $OUT/ab_$tag.json > $OUT/ab_$tag.log 2>&1 || echo "$tag failed"
}
run stock       bf16 "1 64" stock
run nocompile   bf16 "1 64" fast-nocompile
run fast        bf16 "1 64" fast
run fast_ops100 bf16 "1 64" fast MLX_MAX_OPS_PER_BUFFER=100
run fast_ops250 bf16 "1 64" fast MLX_MAX_OPS_PER_BUFFER=250
run stock_ops250 bf16 "1 64" stock MLX_MAX_OPS_PER_BUFFER=250
run q4_stock    q4 "1 8 32" stock
run q4_fast     q4 "1 8 32" fast
python3 - <<'PY'
import glob, json, os
best = (0, "")
for f in sorted(glob.glob(os.environ["OUT"] + "/ab_*.json")):
    r = json.load(open(f))["results"][0]
    tag = f.split("ab_")[1][:-5]
    c = r["clips"][0]["stages"]
    b = {x["segments"]: x for x in r.get("batch", [])}
    line = " ".join(f"B={n}: {x['decode_steps_s']:.0f} steps/s RTFx {x['rtfx']:.0f}" for n, x in b.items())
    print(f"{tag:13s} jfk decode {c['decode_tok_s']:6.1f} tok/s total {c['total_s']*1e3:6.1f} ms | {line}")
    if tag.startswith("fast") and c["decode_tok_s"] > best[0]:
        best = (c["decode_tok_s"], r.get("env", {}).get("MLX_MAX_OPS_PER_BUFFER", ""))
open("/root/best_ops", "w").write(best[1])
print("best MLX_MAX_OPS_PER_BUFFER:", best[1] or "default")
PY
