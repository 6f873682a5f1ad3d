"""MLX settings that must be in the environment before MLX loads (the user's own values always win).

MLX's CUDA backend records kernels into CUDA graphs and launches a graph every MLX_MAX_OPS_PER_BUFFER
operations. Decoding runs ~450 small kernels a token, so this size decides how much host time a token costs.
Measured on lent H100s (docs/performance-history.md): MLX's default
cost 31 ms a decode step on one machine and 100 cost 3.8-6.5 ms; on another, 100 beat both the default and 250.
Only set when MLX's CUDA build is installed; Metal and the CPU are left alone.

MLX's CUDA backend also computes float32 matrix products in TF32 (10-bit mantissa inputs) unless MLX_ENABLE_TF32=0
is set before MLX loads: faster on tensor cores, but not the official code's fp32 numbers (PyTorch keeps fp32
products in IEEE fp32 by default). It is reported in every result (RuntimeInfo.fp32_products), not changed here:
the parity suite on a GPU sets MLX_ENABLE_TF32=0 (benchmarks/gpu/tests.sh).
"""

from __future__ import annotations

import os
from importlib import metadata

CUDA_OPS_PER_BUFFER = "100"


def apply_defaults() -> None:
    if "MLX_MAX_OPS_PER_BUFFER" in os.environ:
        return
    for dist in ("mlx-cuda-13", "mlx-cuda-12"):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        os.environ["MLX_MAX_OPS_PER_BUFFER"] = CUDA_OPS_PER_BUFFER
        return


def fp32_products(on_cuda: bool) -> str:
    """How MLX computes float32 matrix products in this process: "tf32" on CUDA unless MLX_ENABLE_TF32=0 (MLX
    reads it once, when it loads), else "ieee"."""
    if on_cuda and os.environ.get("MLX_ENABLE_TF32", "1").strip() not in ("0", ""):
        return "tf32"
    return "ieee"
