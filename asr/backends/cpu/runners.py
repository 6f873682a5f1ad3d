"""The CPU backend's runners, chosen once at load: the NumPy encoder, adaptor and LLM where they take the model's
weights, the reference MLX runners where they do not (a quantized LLM; a bf16 encoder or LLM without a bf16 product
path), so that every model loads and the choice is reported.

Why NumPy on a CPU: MLX 0.32's CPU backend hands every product to sgemm (a one-row product packs the whole weight)
and evaluates element-wise operations one at a time; the NumPy runners make each product one call into an
optimised BLAS. On the project's 2-core VM the whole CPU default measured 2.9x / 3.5x the official PyTorch code per
clip, against MLX's own operations far below it (docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ...errors import InvalidOptionError
from ...model.network import FunASRNanoNet
from ...options import RuntimeOptions
from ..mlx.runners import MLXLLM, MLXAudio
from . import blas, blas_load, gemv
from .adaptor import NumpyAdaptor
from .encoder import NumpyEncoder
from .llm import NumpyQwen3


@dataclass(frozen=True)
class Facts:
    """What this CPU offers a bf16 model: Numba's gemv kernels, MKL's bf16 products, and whether those beat fp32."""

    gemv: bool
    mkl_bf16: bool
    mkl_preferred: bool

    @classmethod
    def here(cls) -> Facts:
        return cls(gemv.available(), blas.bf16_available(), blas.bf16_preferred())


def bf16_products(choice: str, facts: Facts) -> str | None:
    """How a bf16 LLM's products run for RuntimeOptions.cpu_bf16 `choice`: "mkl", "gemv", or None (no path: MLX's
    own, slow). "auto": MKL where it beats fp32, else the gemv kernels, else MKL. An explicit choice the machine
    cannot run is an error."""
    if choice == "auto":
        if facts.mkl_preferred:
            return "mkl"
        if facts.gemv:
            return "gemv"
        return "mkl" if facts.mkl_bf16 else None
    if choice == "gemv" and not facts.gemv:
        raise InvalidOptionError("cpu_bf16='gemv' needs Numba with a thread-safe threading layer "
                                 "(pip install numba); or use cpu_bf16='auto'")
    if choice == "mkl" and not facts.mkl_bf16:
        raise InvalidOptionError("cpu_bf16='mkl' needs Intel MKL loaded (pip install 'funasr-nano-mlx[mkl]') and a CPU "
                                 "with AVX512-BF16 or AMX; or use cpu_bf16='auto'")
    return choice


def auto_dtype(part: str, options: RuntimeOptions, facts: Facts | None = None) -> str:
    """`dtype="auto"` for `part` ("llm", "quantized-llm", "encoder") here: bfloat16 where it computes faster than
    float32 (an LLM through the gemv kernels, which read half the bytes a step, or through MKL's bf16 products where
    those beat fp32; an encoder only through MKL's), else float32. MLX's own CPU kernels have no fast bf16."""
    facts = facts or Facts.here()
    if part == "llm":
        path = bf16_products(options.cpu_bf16, facts)
        return "bfloat16" if path == "gemv" or (path == "mkl" and facts.mkl_preferred) else "float32"
    if part == "encoder":
        return "bfloat16" if facts.mkl_preferred else "float32"
    return "float32"


def _linears(module: nn.Module) -> list[nn.Module]:
    return [m for _, m in module.named_modules() if isinstance(m, nn.Linear | nn.QuantizedLinear | nn.Embedding)]


def _plain(module: nn.Module, dtypes: set) -> bool:
    """Whether every product of `module` is an unquantized layer with weights of one of `dtypes`."""
    layers = _linears(module)
    return all(type(m) in (nn.Linear, nn.Embedding) for m in layers) and {m.weight.dtype for m in layers} <= dtypes


class CPUAudio:
    """The encoder in NumPy (fp32, or bf16 products through MKL), the adaptor and the CTC decoder in NumPy."""

    def __init__(self, net: FunASRNanoNet):
        self.encoder = NumpyEncoder(net.encoder)
        self.adaptor = NumpyAdaptor(net.adaptor)
        self.ctc = NumpyAdaptor(net.ctc_decoder) if "ctc_decoder" in net else None
        bf16 = net.encoder.tp_norm.weight.dtype == mx.bfloat16
        self.description = f"NumPy + {blas_name()}" + (" (encoder: MKL bf16 products)" if bf16 else "")

    def encode(self, feats: mx.array, lengths: mx.array | None) -> mx.array:
        return self.encoder(feats, lengths)

    def adapt(self, enc: mx.array, lengths: mx.array | None) -> mx.array:
        return self.adaptor(enc, lengths)

    def ctc_decode(self, enc: mx.array, lengths: mx.array | None) -> mx.array:
        return self.ctc(enc, lengths)


def blas_name() -> str:
    return blas_load.loaded or "NumPy's BLAS"


def audio_runner(net: FunASRNanoNet, options: RuntimeOptions, facts: Facts | None = None) -> CPUAudio | MLXAudio:
    facts = facts or Facts.here()
    encoder_ok = _plain(net.encoder, {mx.float32}) or (_plain(net.encoder, {mx.bfloat16}) and facts.mkl_bf16)
    if encoder_ok and _plain(net.adaptor, {mx.float32}):
        return CPUAudio(net)
    return MLXAudio(net, options)


def llm_runner(net: FunASRNanoNet, options: RuntimeOptions, facts: Facts | None = None) -> NumpyQwen3 | MLXLLM:
    llm = net.llm
    if _plain(llm, {mx.float32}):
        return NumpyQwen3(llm, "fp32")
    if _plain(llm, {mx.bfloat16}):
        path = bf16_products(options.cpu_bf16, facts or Facts.here())
        if path is not None:
            return NumpyQwen3(llm, path)
    return MLXLLM(llm, options)  # quantized, float16, or bf16 without a product path
