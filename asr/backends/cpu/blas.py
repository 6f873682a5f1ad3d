"""Matrix products on NumPy arrays through the one BLAS of this process, for the CPU runners (encoder, adaptor, LLM):
fp32 products, and bf16 ones through Intel MKL.

blas_load loads an optimised BLAS (MKL, else the system OpenBLAS) for MLX; the runners call its `cblas_sgemm` and
`cblas_sgemv` directly (ctypes; the GIL is released during the call) on strided views, and MKL's
`cblas_gemm_bf16bf16f32` for bf16 weights (section "bf16" below). One BLAS runtime for all heavy products matters on a small machine: a BLAS's
worker threads spin-wait after each call (MKL's OpenMP ~200 ms, OpenBLAS's too), so two runtimes taking turns
(NumPy's bundled OpenBLAS for the LLM, MKL for the encoder) leave spinning threads in each other's way. On the
project's 2-core VM, a tiny model's encoder took 110 ms after an fp32 LLM step on NumPy's OpenBLAS and 9 ms without.
While a runner works, `numpy_serial()` keeps NumPy's own OpenBLAS (its small attention products) to one thread, and
only that one: the loaded BLAS keeps its threads.

Without a loaded BLAS (FUNASR_NANO_BLAS=off) the same products go through NumPy's matmul.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import blas_load

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _cblas(library: str, name: str, argtypes: list) -> Callable | None:
    """A cblas routine of `library`, typed, or None where the library lacks it."""
    fn = getattr(ctypes.CDLL(library), name, None)
    if fn is None:
        return None
    fn.argtypes = argtypes
    fn.restype = None
    return fn


@dataclass(frozen=True)
class Blas:
    """The cblas routines the CPU runners' products call; where one is None, NumPy computes the same product.

    `Blas.loaded()` is the BLAS that blas_load loaded into this process (MKL or OpenBLAS); `NUMPY` none at all (the
    runners then compute every product through NumPy's matmul). Runners and products take one explicitly."""

    sgemm: Callable | None = None
    sgemv: Callable | None = None
    gemm_bf16: Callable | None = None  # MKL's cblas_gemm_bf16bf16f32, where the CPU has AVX512-BF16 or AMX
    mkl: bool = False

    @staticmethod
    @functools.cache
    def loaded() -> Blas:
        path = blas_load.loaded
        if not path:
            return NUMPY
        i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        mkl = blas_load.is_mkl()
        bf16 = mkl and sys.platform.startswith("linux") and _cpu_has_bf16()
        return Blas(sgemm=_cblas(path, "cblas_sgemm", [i, i, i, i, i, i, f, p, i, p, i, f, p, i]),
                    sgemv=_cblas(path, "cblas_sgemv", [i, i, i, i, f, p, i, p, i, f, p, i]),
                    gemm_bf16=_cblas(path, "cblas_gemm_bf16bf16f32", [i, i, i, i, i, i, f, p, i, p, i, f, p, i])
                    if bf16 else None, mkl=mkl)


NUMPY = Blas()


def available() -> bool:
    """True where fp32 products go to a loaded BLAS (else NumPy's matmul computes them)."""
    blas = Blas.loaded()
    return blas.sgemm is not None and blas.sgemv is not None


@functools.cache
def _numpy_openblas():
    """threadpoolctl's handle on the OpenBLAS that NumPy's wheel bundles, and on no other BLAS (None without
    threadpoolctl or without such a library). Selecting by `internal_api="openblas"` alone would also take the
    system OpenBLAS that blas_load loaded, and limiting that one to a thread halved the CPU runners' products: a
    Qwen3-0.6B fp32 decode token's products took 124 ms on one thread against 78 ms on two (AMD Zen 4 VM)."""
    return _controller(lambda lib, loaded: lib.internal_api == "openblas" and lib.filepath != loaded)


@functools.cache
def _loaded_controller():
    """threadpoolctl's handle on the BLAS that blas_load loaded (None without one)."""
    return _controller(lambda lib, loaded: loaded is not None and lib.filepath == loaded)


def _controller(keep):
    """threadpoolctl's handle on the libraries `keep(lib, loaded)` keeps (real paths; `loaded`: blas_load's, or None),
    or None without threadpoolctl or without such a library."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    loaded = os.path.realpath(blas_load.loaded) if blas_load.loaded else None
    ctl = ThreadpoolController()
    paths = [lib.filepath for lib in ctl.lib_controllers
             if keep(_Lib(os.path.realpath(lib.filepath), lib.internal_api), loaded)]
    return ctl.select(filepath=paths) if paths else None


@dataclass(frozen=True)
class _Lib:
    filepath: str
    internal_api: str


def can_serialize() -> bool:
    """Whether `loaded_serial()` can put the loaded BLAS on one thread."""
    return _loaded_controller() is not None


def loaded_serial() -> contextlib.AbstractContextManager:
    """The loaded BLAS on one thread for the block (its thread count restored after), for a caller that runs
    independent products on threads of its own (asr.backends.cpu.campplus: two batches of small products on two
    threads beat one batch at a time on a two-thread BLAS by 1.4x on the 2-core VM)."""
    ctl = _loaded_controller()
    return ctl.limit(limits=1) if ctl else contextlib.nullcontext()


def numpy_serial() -> contextlib.AbstractContextManager:
    """NumPy's own BLAS on one thread for the block, while the products run on the loaded BLAS. On the 2-core VM a
    46-token bf16 prefill took 0.8-1.1 s with NumPy's OpenBLAS threads waiting for a core, and 0.28-0.32 s with
    this."""
    ctl = _numpy_openblas()
    return ctl.limit(limits=1) if ctl else contextlib.nullcontext()


def _row_stride(a: np.ndarray) -> int:
    """The leading dimension (in elements) of a 2-D view with contiguous rows."""
    if a.ndim != 2 or (a.shape[1] > 1 and a.strides[1] != a.itemsize):
        raise ValueError(f"product operand {a.shape} {a.strides} has no contiguous rows")
    return max(a.strides[0] // a.itemsize, a.shape[1])


def gemm(a: np.ndarray, b: np.ndarray, out: np.ndarray, *, trans_b: bool = True, alpha: float = 1.0,
         beta: float = 0.0, blas: Blas | None = None) -> np.ndarray:
    """out = alpha * a @ op(b) + beta * out, with op(b) = b.T (trans_b) or b; all 2-D views with contiguous rows
    (any row stride). fp32 operands go to `blas`'s sgemm (default: the loaded BLAS), bf16 bits (uint16) to its bf16
    product; NumPy computes what it lacks."""
    blas = blas or Blas.loaded()
    m, k = a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    if (b.shape[1] if trans_b else b.shape[0]) != k or out.shape != (m, n):
        raise ValueError(f"product shapes do not match: {a.shape} {b.shape} -> {out.shape}")
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.uint16) or out.dtype != np.float32:
        raise ValueError(f"product types do not match: {a.dtype} {b.dtype} -> {out.dtype}")
    lda, ldb, ldc = _row_stride(a), _row_stride(b), _row_stride(out)
    if a.dtype == np.uint16:
        fn = blas.gemm_bf16
        if fn is None:  # the same numbers through NumPy
            a, b = from_bits(a), from_bits(b)
    else:
        fn = blas.sgemm
    if fn is None:
        prod = a @ (b.T if trans_b else b)
        if alpha != 1.0:
            prod *= np.float32(alpha)
        if beta == 0.0:
            out[...] = prod
        else:
            if beta != 1.0:
                out *= np.float32(beta)
            out += prod
        return out
    fn(_ROW_MAJOR, _NO_TRANS, _TRANS if trans_b else _NO_TRANS, m, n, k, alpha, a.ctypes.data, lda, b.ctypes.data,
       ldb, beta, out.ctypes.data, ldc)
    return out


GEMV_ROWS_MAX = 16  # up to this many rows, a product on OpenBLAS is one gemv a row over cache-sized weight blocks
GEMV_BLOCK_BYTES = 4 << 20  # the weight rows each round of gemvs reads: from memory for the first row, from cache after


def linear(x: np.ndarray, w: np.ndarray, *, block_bytes: int = GEMV_BLOCK_BYTES, blas: Blas | None = None) -> np.ndarray:
    """x [M, K] @ w[N, K].T for fp32 weights, in the form the BLAS streams the weights best.

    One row is a gemv. On OpenBLAS, 2-16 rows are a gemv per row over blocks of `block_bytes` of weight rows:
    the first row's gemv reads a block from memory, the others find it in cache, so the weights are read from
    memory about once, as for one row, and each row's values are those of its own gemv. OpenBLAS's sgemm packs
    the weights first, whichever operand they are: on the AMD Zen 4 VM, 3072x1024 weights, 2 / 4 / 8 rows took
    0.55 / 0.78 / 1.23 ms this way against 1.29 / 1.47 / 1.50 ms as x w^T and 1.28 / 3.25 / 3.31 ms as w x^T (one
    row 0.39 ms); whole Qwen3-0.6B decode steps of 12 and 16 rows 319-346 and 402-414 ms against 647-695 ms, but
    of 24, 32 and 64 rows 555-595, 724-732 and 1,459-1,496 ms against 428-434, 427-436 and 1,039-1,044 ms.
    On MKL, 2-4 rows go as x w^T (2 rows 0.49 ms on the Intel VM, 0.88 ms as w x^T). Other products go as
    (w x^T)^T (MKL, 8 rows: 0.88 ms against 1.58 ms; 46 rows 1.76 ms against 2.74 ms)."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or w.dtype != np.float32 or x.dtype != np.float32 or not w.flags.c_contiguous:
        raise ValueError(f"fp32 product: weight {w.shape} {w.dtype} does not match input {x.shape} {x.dtype}")
    blas = blas or Blas.loaded()
    if blas.sgemv is None:  # NumPy: OpenBLAS's gemv streams w once for one row
        return (w @ x[0])[None] if m == 1 else (w @ x.T).T
    x = np.ascontiguousarray(x)
    # MKL: x w^T for 2-4 rows, (w x^T)^T beyond; OpenBLAS: gemvs up to GEMV_ROWS_MAX
    if m == 1 or (not blas.mkl and m <= GEMV_ROWS_MAX):
        return _gemv_rows(blas.sgemv, x, w, block_bytes)
    if m <= 4 and blas.mkl:
        return gemm(x, w, np.empty((m, n), np.float32), blas=blas)
    return gemm(w, x, np.empty((n, m), np.float32), blas=blas).T


def _gemv_rows(gemv, x: np.ndarray, w: np.ndarray, block_bytes: int) -> np.ndarray:
    """x [M, K] (contiguous) @ w[N, K].T as one gemv a row, `block_bytes` of weight rows at a time."""
    m, k = x.shape
    n = w.shape[0]
    out = np.empty((m, n), np.float32)
    block = n if m == 1 else max(1, block_bytes // (4 * k))
    w0, x0, o0 = w.ctypes.data, x.ctypes.data, out.ctypes.data
    for j in range(0, n, block):
        rows = min(block, n - j)
        for i in range(m):
            gemv(_ROW_MAJOR, _NO_TRANS, rows, k, 1.0, w0 + 4 * j * k, k, x0 + 4 * i * k, 1, 0.0,
                 o0 + 4 * (i * n + j), 1)
    return out


# --- bf16 ---------------------------------------------------------------------------------------------------------
# bf16 x bf16 -> fp32 products through Intel MKL on x86-64 CPUs with AMX / AVX512-BF16: MLX 0.32's CPU backend has
# no fast bf16 products and NumPy has no bf16 type. MKL's `cblas_gemm_bf16bf16f32` reads half the bytes of fp32
# weights: on the project's Intel VM a 46-row product is 4x faster than fp32 sgemm, and one decode token's 28 layers
# stream in 57 ms instead of 80 ms (docs/performance.md). On an AMD Zen 4 (AVX512-BF16 too) it measured slower than
# fp32, so there it is not `bf16_preferred` and blas_load loads the system OpenBLAS ahead of MKL. The numbers are a
# bf16 model's: weights bf16 (the stored bits, zero-copy from MLX), each product's input rounded to bf16 (round to
# nearest even), fp32 accumulation and output. Available only with MKL loaded (`pip install funasr-nano-mlx[mkl]`).
_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_has_bf16(cpu: blas_load.Cpu | None = None) -> bool:
    """Whether the CPU (blas_load.read_cpuinfo's vendor and flags; default this machine) has AMX or AVX512-BF16."""
    return any(flag in (cpu or blas_load.this_cpu())[1] for flag in _CPU_FLAGS)


def _faster_than_fp32(cpu: blas_load.Cpu | None = None) -> bool:
    """Where MKL's bf16 products beat fp32 ones: Intel CPUs with AMX or AVX512-BF16 (measured on a Sapphire
    Rapids-class VM). On an AMD Zen 4 (AVX512-BF16) MKL's one-row bf16 product streamed 5-7 GB/s against 18-20 GB/s
    for fp32 `sgemv`, and a clip's decode took 4.9 s in bf16 against 4.1 s in fp32 (docs/performance.md)."""
    cpu = cpu or blas_load.this_cpu()
    return cpu[0] == blas_load.INTEL and _cpu_has_bf16(cpu)


def bf16_available() -> bool:
    """True where bf16 products can run through MKL's bf16 kernels."""
    return Blas.loaded().gemm_bf16 is not None


def bf16_preferred() -> bool:
    """True where those products are also faster than fp32 ones (`dtype="auto"` then picks bf16 on the CPU)."""
    return bf16_available() and _faster_than_fp32()


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


def matmul(x: np.ndarray, w: np.ndarray, blas: Blas | None = None) -> np.ndarray:
    """x [M, K] fp32 @ w[N, K].T, w bf16 bits: x rounded to bf16, fp32 accumulate, fp32 [M, N]."""
    return matmul_bits(to_bits(x), w, blas)


def matmul_bits(xb: np.ndarray, w: np.ndarray, blas: Blas | None = None) -> np.ndarray:
    """xb [M, K] @ w[N, K].T, both bf16 bits (uint16): fp32 accumulate, fp32 [M, N]."""
    m, k = xb.shape
    n = w.shape[0]
    if w.shape[1] != k or w.dtype != np.uint16 or xb.dtype != np.uint16 or not w.flags.c_contiguous:
        raise ValueError(f"bf16 product: weight {w.shape} {w.dtype} does not match input {xb.shape} {xb.dtype}")
    return gemm(np.ascontiguousarray(xb), w, np.empty((m, n), np.float32), blas=blas)
