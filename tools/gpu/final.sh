#!/usr/bin/env bash
# The side-by-side run for docs/performance.md: official funasr (PyTorch, CUDA, fp32 and bf16) and ours (all modes)
# on the full-size random checkpoint, batch 1 per clip plus batched throughput. Run after setup.sh (and ab.sh,
# whose best MLX_MAX_OPS_PER_BUFFER it reuses when present).
set -u
. tools/gpu/env.sh
ops=$(cat /root/best_ops 2>/dev/null || true)
[ -n "$ops" ] && export MLX_MAX_OPS_PER_BUFFER=$ops
echo "MLX_MAX_OPS_PER_BUFFER=${MLX_MAX_OPS_PER_BUFFER:-default}"
python3 examples/benchmark.py --model /root/ck/full --clips $CLIPS --modes fp32 bf16 bf16-enc16 q8 q4 \
  --max-new-tokens 32 --repeats 5 --warmup 2 --batch 1 8 64 --load-twice \
  --official --official-first --official-python python3 --official-device cuda --official-dtypes fp32 bf16 \
  --json $OUT/gpu.json --markdown $OUT/gpu.md 2>&1 | grep -v "torch_complex\|miss key\|^Failed to import" > $OUT/final.log
tail -80 $OUT/final.log
