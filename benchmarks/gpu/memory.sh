#!/usr/bin/env bash
# GPU machine, after setup.sh: the batch-1 peak memory with and without a cap on the layers queued at once
# (asr.RuntimeOptions.inflight_layers), and the timings of both side by side (bf16, batch 1 and 64).
set -u
. benchmarks/gpu/env.sh
python3 -m benchmarks.peak_memory --model /root/ck/full --repeats 3 --inflight-layers ${LAYERS:-0 8 16} \
  > $OUT/peak.json 2> $OUT/peak.err || tail -20 $OUT/peak.err
python3 - <<'PY'
import json, os
for r in json.load(open(os.environ["OUT"] + "/peak.json")):
    for c in r["clips"]:
        print("inflight_layers", r["inflight_layers"], c["clip"], "weights", r["weights_mb"], "transcribe peak",
              [x["transcribe_peak_mb"] for x in c["runs"]], "front above", [x["front_above_mb"] for x in c["runs"]])
PY
for layers in ${TIMED:-0 16}; do
  python3 benchmarks/benchmark.py --model /root/ck/full --clips $CLIPS --modes bf16 --max-new-tokens 32 \
    --repeats 5 --warmup 2 --batch 1 64 --inflight-layers $layers --json $OUT/bench-$layers.json \
    2>&1 | grep -v "torch_complex\|miss key\|^Failed to import" > $OUT/bench-$layers.log
  echo "== inflight_layers $layers"; grep -i "whole clip\|tok/s\|RTFx\|peak\|segments" $OUT/bench-$layers.log | head -20
done
