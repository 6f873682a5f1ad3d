#!/usr/bin/env bash
# The side-by-side run for docs/performance.md: official funasr (PyTorch, CUDA, fp32) and ours (fp32, bf16, q4)
# on the full-size random checkpoint, batch 1 per clip plus batched throughput. Run after setup.sh.
set -u
. benchmarks/gpu/env.sh
python3 benchmarks/benchmark.py --model /root/ck/full --clips $CLIPS --modes ${MODES:-fp32 bf16 q4} \
  --max-new-tokens 32 --repeats 5 --warmup 2 --batch 1 8 64 \
  --official --official-first --official-python python3 --official-device cuda --official-dtypes ${OFFICIAL:-fp32} \
  --json $OUT/gpu.json --markdown $OUT/gpu.md 2>&1 | grep -v "torch_complex\|miss key\|^Failed to import" > $OUT/final.log
tail -80 $OUT/final.log
