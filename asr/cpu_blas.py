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


GEMV_ROWS_MAX = 16  # up to this many rows, a product on OpenBLAS is one gemv a row over cache-sized weight blocks
GEMV_BLOCK_BYTES = 4 << 20  # the weight rows each round of gemvs reads: from memory for the first row, from cache after


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [M, K] @ w[N, K].T for fp32 weights, in the form the BLAS streams the weights best.

    One row is a gemv. On OpenBLAS, 2-16 rows are a gemv per row over blocks of `GEMV_BLOCK_BYTES` of weight rows:
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
    gemv = _sgemv()
    if gemv is None:  # NumPy: OpenBLAS's gemv streams w once for one row
        return (w @ x[0])[None] if m == 1 else (w @ x.T).T
    x = np.ascontiguousarray(x)
    mkl = _blas.is_mkl()  # MKL: x w^T for 2-4 rows, (w x^T)^T beyond; OpenBLAS: gemvs up to GEMV_ROWS_MAX
    if m == 1 or (not mkl and m <= GEMV_ROWS_MAX):
        return _gemv_rows(gemv, x, w)
    if m <= 4 and mkl:
        return gemm(x, w, np.empty((m, n), np.float32))
    return gemm(w, x, np.empty((n, m), np.float32)).T


def _gemv_rows(gemv, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [M, K] (contiguous) @ w[N, K].T as one gemv a row, block of weight rows by block."""
    m, k = x.shape
    n = w.shape[0]
    out = np.empty((m, n), np.float32)
    block = n if m == 1 else max(1, GEMV_BLOCK_BYTES // (4 * k))
    w0, x0, o0 = w.ctypes.data, x.ctypes.data, out.ctypes.data
    for j in range(0, n, block):
        rows = min(block, n - j)
        for i in range(m):
            gemv(_ROW_MAJOR, _NO_TRANS, rows, k, 1.0, w0 + 4 * j * k, k, x0 + 4 * i * k, 1, 0.0,
                 o0 + 4 * (i * n + j), 1)
    return out
