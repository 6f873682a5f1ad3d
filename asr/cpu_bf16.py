"""bf16 x bf16 -> fp32 matrix products on x86-64 CPUs through Intel MKL (AMX / AVX512-BF16): the bf16 LLM in
asr.cpu_llm and, with encoder_dtype="bfloat16", the encoder's linear layers (Linear below).

A bf16 LLM on the CPU: MLX 0.32's CPU backend has no fast bf16 products, and NumPy has no bf16 type. MKL's
`cblas_gemm_bf16bf16f32` runs on the AMX tiles or AVX512-BF16 units of recent Intel Xeons, reading half the bytes
of fp32 weights: on the project's Intel VM a 46-row product is 4x faster than fp32 sgemm, and one decode token's
28 layers stream in 57 ms instead of 80 ms (docs/performance.md). On an AMD Zen 4 (AVX512-BF16 too) the same MKL
function measured slower than fp32 (still far faster than MLX's bf16 on the CPU), so there `dtype="auto"` stays
fp32 (`preferred`), and asr._blas loads the system OpenBLAS ahead of MKL (FUNASR_NANO_BLAS=mkl for these products).

The numbers are those of a bf16 model: weights bf16 (the stored bits, zero-copy from MLX), each product's input
rounded to bf16 (round to nearest even), fp32 accumulation and output; everything else in asr.cpu_llm stays fp32.

Used only when MKL is loaded in this process (`pip install funasr-nano-mlx[mkl]`; asr._blas loads it) and the CPU
reports `avx512_bf16` or `amx_bf16`; otherwise a bf16 LLM on the CPU runs on MLX (slow) and `dtype="auto"` is fp32.
`FUNASR_NANO_CPU_BF16=0` turns this path off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import _blas, linear_nn

_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_has_bf16(cpu: _blas.Cpu | None = None) -> bool:
    """Whether the CPU (asr._blas.read_cpuinfo's vendor and flags; default this machine) has AMX or AVX512-BF16."""
    return any(flag in (cpu or _blas.this_cpu())[1] for flag in _CPU_FLAGS)


def _faster_than_fp32(cpu: _blas.Cpu | None = None) -> bool:
    """Where MKL's bf16 products beat fp32 ones: Intel CPUs with AMX or AVX512-BF16 (measured on a Sapphire
    Rapids-class VM). On an AMD Zen 4 (AVX512-BF16) MKL's one-row bf16 product streamed 5-7 GB/s against 18-20 GB/s
    for fp32 `sgemv`, and a clip's decode took 4.9 s in bf16 against 4.1 s in fp32 (docs/performance.md)."""
    cpu = cpu or _blas.this_cpu()
    return cpu[0] == _blas.INTEL and _cpu_has_bf16(cpu)


@functools.cache
def _gemm():
    """MKL's cblas_gemm_bf16bf16f32, or None where this path does not apply."""
    if os.environ.get("FUNASR_NANO_CPU_BF16", "1").strip() == "0" or not sys.platform.startswith("linux"):
        return None
    if not _blas.is_mkl() or not _cpu_has_bf16():
        return None
    fn = getattr(ctypes.CDLL(_blas.loaded), "cblas_gemm_bf16bf16f32", None)
    if fn is None:
        return None
    i, p = ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [i, i, i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
    fn.restype = None
    return fn


def available() -> bool:
    """True where bf16 products run through MKL's bf16 kernels (a bf16 model's products on the CPU go there)."""
    return _gemm() is not None


def preferred() -> bool:
    """True where those products are also faster than fp32 ones, so that `dtype="auto"` picks bf16 on the CPU."""
    return available() and _faster_than_fp32()


def to_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), rounded to nearest even like MLX's and PyTorch's casts (no NaNs here)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    t = u >> np.uint32(16)  # in place from here: one temporary (a 183x2048 input: 0.6 ms, 2.2 ms with five)
    t &= np.uint32(1)
    t += np.uint32(0x7FFF)
    t += u
    t >>= np.uint32(16)
    return t.astype(np.uint16)


def from_bits(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> fp32 values (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [M, K] fp32 @ w[N, K].T, w bf16 bits: x rounded to bf16, fp32 accumulate, fp32 [M, N]."""
    return matmul_bits(to_bits(x), w)


def matmul_bits(xb: np.ndarray, w: np.ndarray) -> np.ndarray:
    """xb [M, K] @ w[N, K].T, both bf16 bits (uint16): fp32 accumulate, fp32 [M, N]."""
    m, k = xb.shape
    n = w.shape[0]
    if w.shape[1] != k or w.dtype != np.uint16 or xb.dtype != np.uint16 or not w.flags.c_contiguous:
        raise ValueError(f"bf16 product: weight {w.shape} {w.dtype} does not match input {xb.shape} {xb.dtype}")
    from .cpu_blas import gemm  # (cpu_blas imports this module)

    return gemm(np.ascontiguousarray(xb), w, np.empty((m, n), np.float32))


def applies() -> bool:
    """Whether a model loaded now runs its bf16 products here: MLX computes on the CPU and MKL's bf16 is available."""
    return mx.default_device() == mx.cpu and available()


class Linear(nn.Module):
    """nn.Linear with a bf16 weight whose product runs through MKL (fp32 input and output, fp32 bias).

    For the audio encoder on the CPU (`encoder_dtype="bfloat16"`): the layer evaluates its input, so each product is
    a host step (the CPU encoder already evaluates layer by layer); the rest of the encoder stays fp32 in MLX.
    """

    def __init__(self, weight: mx.array, bias: mx.array | None):
        super().__init__()
        self.weight = weight.astype(mx.bfloat16)
        if bias is not None:
            self.bias = bias.astype(mx.float32)
        bits = self.weight.view(mx.uint16)
        mx.eval(bits)
        self._bits = np.asarray(bits)  # the weight's bits as NumPy, zero-copy (a plain attribute, not a parameter)

    def __call__(self, x: mx.array) -> mx.array:
        bits = x.astype(mx.bfloat16).view(mx.uint16)  # MLX rounds the input (one pass; NumPy's to_bits takes five)
        mx.eval(bits)
        flat = np.asarray(bits).reshape(-1, x.shape[-1])
        out = mx.array(matmul_bits(flat, self._bits)).reshape(*x.shape[:-1], self._bits.shape[0])
        return out + self["bias"] if "bias" in self else out


def use_bf16_products(module: nn.Module) -> int:
    """Give every unquantized nn.Linear of an fp32 `module` a bf16 weight whose product runs through MKL (Linear);
    the rest of the module stays fp32. Returns how many layers were replaced."""
    return linear_nn.replace_linears(module, lambda m: Linear(m.weight, m.get("bias")))
