"""How a loaded model runs: one frozen options object, read once when the model loads (asr.load_model), recorded
in every result (TranscriptionResult.runtime) and reported by the server.

Precision (dtype, encoder_dtype, quantize) is an argument of `load_model`: it changes the numbers. These options
choose what computes the same numbers; benchmarks and tests compare runners by passing different options.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

from .errors import InvalidOptionError

Backend = Literal["auto", "mlx", "cpu", "cuda"]
BACKENDS = ("auto", "mlx", "cpu", "cuda")
CPU_BF16 = ("auto", "gemv", "mkl")


@dataclass(frozen=True)
class RuntimeOptions:
    """backend: "mlx" runs MLX's own operations everywhere (the reference, and what Apple Silicon runs on Metal);
    "cpu" runs the encoder, adaptor and LLM in NumPy on an optimised BLAS while MLX computes on the CPU (Linux);
    "cuda" runs custom CUDA kernels for the encoder and the decode steps on MLX's CUDA backend; "auto" picks
    cuda on MLX's CUDA backend, cpu where MLX computes on the CPU, else mlx.

    cpu_bf16: how the cpu backend multiplies a bfloat16 LLM: "gemv" (fp32 inputs on the bf16 weights, Numba
    kernels: the fp32 model's numbers at half the bytes a step), "mkl" (MKL's bf16 products, inputs rounded to bf16:
    faster on Intel CPUs with AMX / AVX512-BF16), "auto" (mkl where it beats fp32, else gemv, else mkl).
    cuda_one_launch: the cuda backend's whole decode step in one kernel launch where the device can run it (False:
    the multi-kernel steps only, for comparisons and for devices shared through MPS).
    cuda_encoder_kernels: the cuda backend's attention and FSMN kernels in the encoder (False: MLX's operations).
    inflight_mb: on a GPU, how many MB of a deep graph's intermediates (encoder layers, prefill layers) may be queued
    at once; 0 for no byte bound (inflight_layers still applies).
    inflight_layers: at most this many layers queued at once whatever their size, 0 for no cap. Below the byte
    budget a small batch's whole graph would be queued, and each layer's products keep their workspaces and
    temporaries until the device has run them: on an H100 (bf16) 16 took the benchmark's batch-1 peak from 2,216 to
    2,179 MB and a clip from 73-76 to 66-69 ms (docs/performance.md); 8 and 4 lowered the peak further but were
    slower. Values never change, only when the device runs them.
    """

    backend: Backend = "auto"
    cpu_bf16: Literal["auto", "gemv", "mkl"] = "auto"
    cuda_one_launch: bool = True
    cuda_encoder_kernels: bool = True
    inflight_mb: int = 1024
    inflight_layers: int = 16

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InvalidOptionError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.cpu_bf16 not in CPU_BF16:
            raise InvalidOptionError(f"cpu_bf16 {self.cpu_bf16!r} is not one of {', '.join(CPU_BF16)}")
        for name, unit in (("inflight_mb", " of MB"), ("inflight_layers", "")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidOptionError(f"{name} must be a whole number{unit} >= 0; got {value!r}")
        for name in ("cuda_one_launch", "cuda_encoder_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidOptionError(f"{name} must be True or False; got {getattr(self, name)!r}")

    @property
    def inflight_bytes(self) -> int:
        return self.inflight_mb << 20

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RuntimeOptions:
        """The options users set through the environment: FUNASR_NANO_BACKEND (auto, mlx, cpu, cuda),
        FUNASR_NANO_INFLIGHT_MB and FUNASR_NANO_INFLIGHT_LAYERS; the rest keep their defaults."""
        env = os.environ if environ is None else environ
        kwargs: dict = {}
        if env.get("FUNASR_NANO_BACKEND", "").strip():
            kwargs["backend"] = env["FUNASR_NANO_BACKEND"].strip().lower()
        for var, name, unit in (("FUNASR_NANO_INFLIGHT_MB", "inflight_mb", "of MB"),
                                ("FUNASR_NANO_INFLIGHT_LAYERS", "inflight_layers", "of layers")):
            if env.get(var, "").strip():
                try:
                    kwargs[name] = int(env[var])
                except ValueError:
                    raise InvalidOptionError(f"{var}={env[var]!r} is not a whole number {unit}") from None
        return cls(**kwargs)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity on Linux, else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


MAX_SPEAKERS = 15  # speakers= takes 1..15: the official ClusterBackend's max_num_spks


def parse_speakers(value) -> int | str | None:
    """speakers= as every front end takes it (library, CLI, MCP, HTTP): None, "auto", or a number of speakers from 1
    to MAX_SPEAKERS, given as an int or as digits (a form field, a command-line word). InvalidOptionError
    otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        word = value.strip().lower()
        if word == "auto":
            return "auto"
        if word.isdigit():
            value = int(word)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SPEAKERS:
        return value
    raise InvalidOptionError(f"speakers must be 'auto' or a number of speakers from 1 to {MAX_SPEAKERS}; got "
                             f"{value!r}")

