"""Which MLX backend runs the model, and a check for a known packaging clash on Linux.

On Linux, `mlx[cpu]` (our default dependency) and `mlx[cuda13]` (the `cuda13` extra) both ship
`mlx/lib/libmlx.so`; whichever pip installs last wins. If the CUDA package is installed but MLX reports no CUDA,
the CPU build overwrote it: say so, with the fix.
"""

from __future__ import annotations

import logging
from importlib import metadata

import mlx.core as mx

from . import _blas

log = logging.getLogger(__name__)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def info() -> dict:
    """A small description of the compute backend (for logs, `server_status` and benchmarks)."""
    metal = bool(getattr(mx, "metal", None) and mx.metal.is_available())
    cuda = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
    return {
        "mlx": _version("mlx"),
        "device": str(mx.default_device()),
        "backend": "metal" if metal else "cuda" if cuda else "cpu",
        "cpu_blas": _blas.loaded or "bundled reference BLAS",
    }


def check() -> list[str]:
    """Warnings about the installed backend (logged once by load_model)."""
    warnings = []
    cuda_pkg = _version("mlx-cuda-13") or _version("mlx-cuda-12")
    cuda = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
    if cuda_pkg and not cuda and _version("mlx-cpu"):
        dist = "mlx-cuda-13" if _version("mlx-cuda-13") else "mlx-cuda-12"
        warnings.append(
            f"{dist} is installed but MLX runs on the CPU: mlx-cpu's libmlx was installed over it. Fix: "
            f"pip install --force-reinstall --no-deps '{dist}=={cuda_pkg}'"
        )
    if info()["backend"] == "cpu" and _blas.loaded is None and mx.default_device() == mx.cpu:
        warnings.append("MLX runs on the CPU with its slow bundled BLAS; install OpenBLAS (Debian/Ubuntu: "
                        "apt-get install libopenblas0-pthread) for ~30x faster matrix products")
    return warnings
