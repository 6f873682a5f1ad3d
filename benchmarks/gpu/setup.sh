#!/usr/bin/env bash
# GPU machine, call 2: finish installing MLX CUDA + the official funasr's import-time deps into /root/site,
# and make the full-size random checkpoint (numpy only). The test clips travel with the tree (tests/data).
# carry: .whl/small .whl/scipy (the wheel's parts were parked by stage1.sh)
set -eu
S=/root/site
if [ ! -d $S/mlx/lib ]; then
  for f in .whl/parts/mlxcuda.part* .whl/scipy/*.whl; do if [ -f "$f" ]; then cp "$f" /root/stage/; fi; done
  cat /root/stage/mlxcuda.part* > /root/stage/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target $S \
    /root/stage/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl .whl/small/*.whl $(ls /root/stage/scipy-*.whl 2>/dev/null)
  ln -sfn "$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')" $S/nvidia
fi
export PYTHONPATH=$S
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device()); a = mx.ones((4, 4)); print((a @ a).sum())'
if [ -z "${NO_CHECKPOINT:-}" ] && [ ! -f /root/ck/full/model.pt ]; then
  t0=$(date +%s); python3 -m tools.checkpoint /root/ck/full --size full; echo "checkpoint written in $(( $(date +%s) - t0 )) s"
fi
