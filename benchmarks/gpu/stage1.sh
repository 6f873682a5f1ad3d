#!/usr/bin/env bash
# GPU machine, first calls: park what the later calls install (a call carries at most 64 MiB with the tree): the
# parts of the mlx-cuda-13 wheel, one a call, and SciPy's wheel.
# carry: .whl/parts/mlxcuda.part00, then .whl/parts/mlxcuda.part01    (docs/performance.md, "Reproducing")
set -eu
mkdir -p /root/stage
for f in .whl/parts/mlxcuda.part* .whl/scipy/*.whl; do if [ -f "$f" ]; then cp "$f" /root/stage/; echo "parked $f"; fi; done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 --version
python3 -c 'import nvidia, torch, transformers, tokenizers, numpy; print(list(nvidia.__path__)[0], "torch", torch.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__, "numpy", numpy.__version__)'
nproc; free -g | head -2; df -h /root | tail -1
