#!/usr/bin/env bash
# One GPU call after stage1.sh: setup, the CUDA kernel tests, the batch profile (stages under CUPTI, encoder-kernel
# A/B by batch size). Then, in the next call: MODES="bf16 bf16-enc16" bash tools/gpu/final.sh (side by side).
# For the per-clip profile and the one-launch decode step A/B: tools/gpu/profile_clip.py.
set -u
bash tools/gpu/setup.sh > $OUT/setup.log 2>&1; tail -1 $OUT/setup.log
. tools/gpu/env.sh
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_encoder.py tests/test_linear_nn.py \
  tests/test_cuda_decode.py 2>&1 | tail -3
cd tools/gpu
timeout 240 python3 profile_batch.py --model /root/ck/full --clips ../../.work/testdata/audio/en/jfk.wav \
  ../../.work/testdata/audio/zh/example_zh.wav --segments 64 --repeats 3 --ab-batches ${AB:-1 8 16 64} 2>&1 \
  | grep -v "torch_complex\|miss key\|^Failed to import\|UserWarn\|warn_once" > $OUT/pbatch.log
head -11 $OUT/pbatch.log | tail -9; grep "^==\|batch " $OUT/pbatch.log
