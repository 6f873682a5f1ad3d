"""Matrix products on NumPy arrays through the one BLAS of this process, for the CPU runners (asr.cpu_encoder,
asr.cpu_adaptor, asr.cpu_llm).

asr._blas loads an optimised BLAS (MKL, else the system OpenBLAS) for MLX; the runners call its `cblas_sgemm` and
`cblas_sgemv` directly (ctypes; the GIL is released during the call) on strided views, and MKL's bf16 product
(asr.cpu_bf16) for bf16 weights. One BLAS runtime for all heavy products matters on a small machine: a BLAS's
worker threads spin-wait after each call (MKL's OpenMP ~200 ms, OpenBLAS's too), so two runtimes taking turns
(NumPy's bundled OpenBLAS for the LLM, MKL for the encoder) leave spinning threads in each other's way. On the
project's 2-core VM, a tiny model's encoder took 110 ms after an fp32 LLM step on NumPy's OpenBLAS and 9 ms without.
While a runner works, `numpy_serial()` keeps NumPy's own OpenBLAS (its small attention products) to one thread, and
only that one: the loaded BLAS keeps its threads.

Without a loaded BLAS (macOS, FUNASR_NANO_BLAS=off) the same products go through NumPy's matmul.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import numpy as np

from . import _blas, cpu_bf16

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@functools.cache
def _cblas(name: str):
    """A cblas routine of the BLAS asr._blas loaded, or None."""
    if not _blas.loaded:
        return None
    fn = getattr(ctypes.CDLL(_blas.loaded), name, None)
    if fn is None:
        return None
    i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    fn.argtypes = {"cblas_sgemm": [i, i, i, i, i, i, f, p, i, p, i, f, p, i],
                   "cblas_sgemv": [i, i, i, i, f, p, i, p, i, f, p, i]}[name]
    fn.restype = None
    return fn


def _sgemm():
    return _cblas("cblas_sgemm")


def _sgemv():
    return _cblas("cblas_sgemv")


def available() -> bool:
    """True where fp32 products go to a loaded BLAS (else NumPy's matmul computes them)."""
    return _sgemm() is not None and _sgemv() is not None


@functools.cache
def _numpy_openblas():
    """threadpoolctl's handle on the OpenBLAS that NumPy's wheel bundles, and on no other BLAS (None without
    threadpoolctl or without such a library). Selecting by `internal_api="openblas"` alone would also take the
    system OpenBLAS that asr._blas loaded, and limiting that one to a thread halved the CPU runners' products: a
    Qwen3-0.6B fp32 decode token's products took 124 ms on one thread against 78 ms on two (AMD Zen 4 VM)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    loaded = os.path.realpath(_blas.loaded) if _blas.loaded else None
    ctl = ThreadpoolController()
    paths = [lib.filepath for lib in ctl.select(internal_api="openblas").lib_controllers
             if os.path.realpath(lib.filepath) != loaded]
    return ctl.select(filepath=paths) if paths else None


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
         beta: float = 0.0) -> np.ndarray:
    """out = alpha * a @ op(b) + beta * out, with op(b) = b.T (trans_b) or b; all 2-D views with contiguous rows
    (any row stride). fp32 operands go to the BLAS's sgemm; bf16 bits (uint16) to MKL's bf16 product."""
    m, k = a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    if (b.shape[1] if trans_b else b.shape[0]) != k or out.shape != (m, n):
        raise ValueError(f"product shapes do not match: {a.shape} {b.shape} -> {out.shape}")
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.uint16) or out.dtype != np.float32:
        raise ValueError(f"product types do not match: {a.dtype} {b.dtype} -> {out.dtype}")
    lda, ldb, ldc = _row_stride(a), _row_stride(b), _row_stride(out)
    if a.dtype == np.uint16:
        fn = cpu_bf16._gemm()
        if fn is None:  # the same numbers through NumPy (tests without MKL)
            a, b = cpu_bf16.from_bits(a), cpu_bf16.from_bits(b)
    else:
        fn = _sgemm()
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


def _few_rows_as_x_wt() -> bool:
    """Whether a product of 2-4 rows goes as x w^T (MKL streams the weights best that way) rather than (w x^T)^T
    (OpenBLAS: its x w^T packs the weights first)."""
    return "mkl" in (_blas.loaded or "")


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [M, K] @ w[N, K].T for fp32 weights, in the form the BLAS streams the weights best: one row is a gemv;
    more rows (w x^T)^T, except 2-4 rows on MKL, x w^T. MKL on the 2-core VM, 3072x1024 weights: 2 rows 0.49 ms as
    x w^T (0.88 ms as w x^T), 8 rows 0.88 ms as w x^T (1.58 ms), 46 rows 1.76 ms (2.74 ms); NumPy's OpenBLAS
    2.35, 1.86 and 3.32 ms. Debian's OpenBLAS 0.3.21 on the Intel VM: 2 / 3 / 4 rows 1.30 / 1.74 / 1.90 ms as
    x w^T, 0.86 / 0.96 / 1.21 ms as w x^T (one gemv 0.44 ms)."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or w.dtype != np.float32 or x.dtype != np.float32 or not w.flags.c_contiguous:
        raise ValueError(f"fp32 product: weight {w.shape} {w.dtype} does not match input {x.shape} {x.dtype}")
    gemv = _sgemv()
    if gemv is None:  # NumPy: OpenBLAS's gemv streams w once for one row
        return (w @ x[0])[None] if m == 1 else (w @ x.T).T
    x = np.ascontiguousarray(x)
    if m == 1:
        out = np.empty((1, n), np.float32)
        gemv(_ROW_MAJOR, _NO_TRANS, n, k, 1.0, w.ctypes.data, k, x.ctypes.data, 1, 0.0, out.ctypes.data, 1)
        return out
    if m <= 4 and _few_rows_as_x_wt():
        return gemm(x, w, np.empty((m, n), np.float32))
    return gemm(w, x, np.empty((n, m), np.float32)).T
