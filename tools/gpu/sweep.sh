#!/usr/bin/env bash
# Decode-step probe across MLX's CUDA graph sizes (MLX_MAX_OPS_PER_BUFFER). Run after tools/gpu/setup.sh.
set -u
. tools/gpu/env.sh
for ops in "" 50 100 200 400 1000; do
  echo "== MLX_MAX_OPS_PER_BUFFER=${ops:-default}"
  MLX_MAX_OPS_PER_BUFFER=$ops python3 tools/gpu/probe_step.py --steps 96 --batch 1 64 --variants ${VARIANTS:-2} 2>&1 \
    | grep -v "building the step"
done
