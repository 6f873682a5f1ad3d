"""Which backend computes a loaded model, decided once at load from RuntimeOptions, and the runners it provides.

On Linux, `mlx[cpu]` (our default dependency) and `mlx[cuda13]` (the `cuda13` extra) both ship `mlx/lib/libmlx.so`;
whichever pip installs last wins. `check()` says so when the CUDA package is installed but MLX runs on the CPU.
"""

from __future__ import annotations

from importlib import metadata

import mlx.core as mx

from ..decode.runner import Runtime
from ..errors import InvalidOptionError
from ..model.network import FunASRNanoNet
from ..options import RuntimeOptions
from ..types import RuntimeInfo
from .cpu import blas_load
from .cpu import runners as cpu_runners
from .cuda.env import fp32_products
from .cuda.runners import CUDALLM, CUDAAudio
from .mlx.runners import MLXLLM, MLXAudio


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def device() -> str:
    """MLX's default device and build: 'gpu (metal)', 'gpu (cuda)' or 'cpu'."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if getattr(mx, "metal", None) and mx.metal.is_available():
        return "gpu (metal)"
    if getattr(mx, "cuda", None) and mx.cuda.is_available():
        return "gpu (cuda)"
    return "gpu"


def choose(options: RuntimeOptions) -> str:
    """The backend for these options here: an explicit one where it can run (else InvalidOptionError), or for
    "auto": cuda on MLX's CUDA backend, cpu where MLX computes on the CPU, else mlx (Metal)."""
    here = device()
    if options.backend == "auto":
        return "cuda" if here == "gpu (cuda)" else "cpu" if here == "cpu" else "mlx"
    if options.backend == "cuda" and here != "gpu (cuda)":
        raise InvalidOptionError(f"backend 'cuda' needs MLX's CUDA build on an NVIDIA GPU; MLX computes on {here} "
                                 "here (pip install 'funasr-nano-mlx[cuda13]'), or use backend 'auto'")
    if options.backend == "cpu" and here != "cpu":
        raise InvalidOptionError(f"backend 'cpu' runs where MLX computes on the CPU; here it computes on {here}. "
                                 "Use backend 'auto' or 'mlx'")
    return options.backend


def auto_dtype(backend: str, part: str, options: RuntimeOptions) -> str:
    """`dtype="auto"` for `part` ("llm", "quantized-llm" or "encoder") on `backend`: bfloat16 on a GPU (half the
    memory, fast there); on the CPU whatever computes faster there (asr.backends.cpu.runners.auto_dtype), and float32
    for MLX's own CPU kernels (no fast bf16)."""
    if backend == "cpu":
        return cpu_runners.auto_dtype(part, options)
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def build(backend: str, net: FunASRNanoNet, options: RuntimeOptions) -> Runtime:
    """The runners of `backend` for `net`, prepared now (weights fused, kernels chosen) and described."""
    if backend == "cuda":
        audio, llm = CUDAAudio(net, options), CUDALLM(net.llm, options)
    elif backend == "cpu":
        audio, llm = cpu_runners.audio_runner(net, options), cpu_runners.llm_runner(net, options)
    else:
        audio, llm = MLXAudio(net, options), MLXLLM(net.llm, options)
    where = device()
    info = RuntimeInfo(backend=backend, device=where, audio=audio.description, llm=llm.description,
                       cpu_blas=blas_load.loaded, fp32_products=fp32_products(where == "gpu (cuda)"))
    return Runtime(audio=audio, llm=llm, info=info)


def check() -> list[str]:
    """Warnings about the installed MLX (logged once by load_model)."""
    warnings = []
    cuda_pkg = _version("mlx-cuda-13") or _version("mlx-cuda-12")
    cuda = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
    if cuda_pkg and not cuda and _version("mlx-cpu"):
        dist = "mlx-cuda-13" if _version("mlx-cuda-13") else "mlx-cuda-12"
        warnings.append(
            f"{dist} is installed but MLX runs on the CPU: mlx-cpu's libmlx was installed over it. Fix: "
            f"pip install --force-reinstall --no-deps '{dist}=={cuda_pkg}'"
        )
    if device() == "cpu" and blas_load.loaded is None:
        warnings.append("MLX runs on the CPU with its slow bundled BLAS; install OpenBLAS (Debian/Ubuntu: "
                        "apt-get install libopenblas0-pthread) for ~30x faster matrix products")
    return warnings
