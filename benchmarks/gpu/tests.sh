#!/usr/bin/env bash
# GPU machine, after setup.sh: the CUDA kernel tests, then the parity suite (tests/test_parity.py: the reference MLX
# backend and the cuda backend, fp32) against goldens of the official code made here on the machine's CPU, on the
# tiny and on the full-size random checkpoint.
set -uo pipefail
. benchmarks/gpu/env.sh
if [ "${CUDA_TESTS:-1}" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda_layout.py tests/test_cuda_encoder.py \
    tests/test_cuda_decode.py 2>&1 | tail -5
fi
for size in ${SIZES:-tiny full}; do
  G=/root/goldens/$size
  if [ ! -f $G/manifest.json ]; then
    t0=$(date +%s)
    mkdir -p $G
    if [ $size = full ] && [ -f /root/ck/full/model.pt ]; then ln -sfn /root/ck/full $G/model  # setup.sh's, seed 0
    else python3 -m tools.checkpoint $G/model --size $size --seed 0 >/dev/null; fi &&
      python3 tools/reference.py --model $G/model --out $G --threads "$(nproc)" 2> $G/reference.log | tail -2 ||
      { tail -20 $G/reference.log; continue; }
    echo "goldens ($size) made in $(( $(date +%s) - t0 )) s"
  fi
  # IEEE fp32 products (MLX's CUDA backend computes fp32 products in TF32 unless told otherwise)
  MLX_ENABLE_TF32=0 FUNASR_GOLDENS=$G python3 -m pytest -q -p no:cacheprovider -rs tests/test_parity.py 2>&1 | tail -30
done
