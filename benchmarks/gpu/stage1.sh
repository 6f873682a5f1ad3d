#!/usr/bin/env bash
# GPU machine, call 1 of 2: park the first half of the mlx-cuda-13 wheel outside the repo and report the machine.
# carry: .whl/parts/mlxcuda.part00     (see docs/performance.md, "Reproducing the GPU numbers")
set -eu
mkdir -p /root/stage
cp .whl/parts/mlxcuda.part00 /root/stage/
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 --version
python3 -c 'import nvidia, torch, transformers, tokenizers, numpy; print(list(nvidia.__path__)[0], "torch", torch.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__, "numpy", numpy.__version__)'
nproc; free -g | head -2; df -h /root | tail -1
