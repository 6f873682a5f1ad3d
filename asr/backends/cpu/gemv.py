"""fp32 inputs times bf16-stored weights, fp32 accumulation and output: the bf16 LLM's products on a CPU
(asr.backends.cpu.llm, cpu_bf16="gemv").

The official checkpoint stores every LLM weight in bf16, and the official code computes in fp32 on those
bf16-valued weights. Here the weights stay bf16 in memory (half of fp32's bytes: 1.2 GB for Qwen3-0.6B against
2.4 GB) and each product widens them to fp32 on the fly (a bf16 value is the top half of its fp32 value, so this is
exact), multiplied by the fp32 input: the numbers of an fp32 product on the same weights, up to summation order. A
decode step reads every weight once, so halving the bytes halves the step where memory bandwidth bounds it.

No BLAS has this product (MKL's and OpenBLAS's bf16 products round the input to bf16 too; the OpenBLAS builds on PyPI
and in Debian 12 have none at all), so the kernels are compiled by Numba (LLVM; `numba` is a dependency on Linux):
- one row: a dot product per weight row, the rows shared out over the cores;
- 2 to `ROWS_MAX` rows: each task widens 4 weight rows into a small buffer, then multiplies them by 4 input rows at
  a time, a 4x4 tile of sums in registers (8 loads for 16 multiply-adds), so the weights are read from memory once;
- more rows (compute-bound): 4 MB blocks of the weight widened to fp32 on the calling thread, then the BLAS's sgemm.
Measured on the project's 2-core AMD Zen 4 VM, weights 3072x1024 / 1024x3072 not in cache, against fp32 `sgemv` /
`sgemm` on the same values in the same run: one row 0.17 / 0.26 ms against 0.44 / 0.93 ms; 4 rows 0.40 / 0.45 ms
against 0.76 / 0.75; 16 rows 0.84 / 0.83 against 1.9 / 2.0; 46 rows 1.96 / 1.91 against 2.6 / 2.6; 183 rows 6.4 /
9.0 against 7.0 / 9.2. At 736 rows the tile and the widened blocks measured alike; beyond 256 rows the blocks +
sgemm are used, whose cache blocking holds up for the thousands of rows of a long-audio batch's prefill.

The kernels compile on first use (a few seconds; cached on disk by Numba) and run on Numba's threads. Without
Numba `available()` is False and a bf16 LLM on the CPU takes another path.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from types import SimpleNamespace

import numpy as np

from .blas import gemm

log = logging.getLogger(__name__)

BLOCK = 16  # weight rows per parallel task
ROWS_MAX = 256  # up to this many input rows the kernels; beyond, weight blocks widened to fp32 and the BLAS's sgemm
WIDEN_BYTES = 4 << 20  # fp32 bytes of one widened weight block (a buffer kept per thread)


@functools.cache
def _kernels() -> SimpleNamespace | None:
    """The compiled kernels, or None without Numba or without a thread-safe threading layer."""
    try:
        import numba
    except ImportError:
        return None
    return compile_with(numba)


def compile_with(numba) -> SimpleNamespace | None:
    """The kernels compiled by `numba` (the module), on disk-cached Numba where it can write its cache, else in
    memory; None where its threading layer cannot run them."""
    if not os.environ.get("NUMBA_THREADING_LAYER"):
        # OpenMP or TBB: callers on several threads at once (a library user's threads) are safe there, while
        # Numba's fallback layer (workqueue) aborts the process on concurrent parallel calls
        numba.config.THREADING_LAYER = "threadsafe"
    try:
        kernels = _build(numba, cache=True)
    except RuntimeError as exc:  # Numba found no writable place for its disk cache: compile in memory each run
        log.info("cpu gemv kernels: no Numba disk cache (%s)", exc)
        kernels = _build(numba, cache=False)
    try:  # the first parallel call loads the threading layer
        kernels.one(np.zeros(1, np.float32), np.zeros((1, 1), np.uint16), np.zeros(1, np.float32))
    except Exception as exc:  # noqa: BLE001  (Numba raises ValueError and others; any of them: not this path)
        log.warning("the cpu gemv kernels cannot run (%s): a bf16 LLM on this CPU takes another path", exc)
        return None
    return kernels


def _build(numba, cache: bool) -> SimpleNamespace:
    """The kernels, compiled lazily by Numba (on first call, or loaded from its disk cache where `cache`)."""
    prange = numba.prange
    jit = numba.njit(parallel=True, fastmath={"reassoc", "contract"}, cache=cache, nogil=True, boundscheck=False)
    serial = numba.njit(cache=cache, nogil=True, boundscheck=False)
    BL = BLOCK

    @numba.njit(inline="always")
    def wide(bits):  # a bf16 bit pattern -> its fp32 value (the top half of the fp32 bits): exact
        return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)

    @jit
    def one(x, w, out):  # x [K] f32, w [N, K] u16 (bf16 bits), out [N] f32
        n_rows, k_len = w.shape
        for b in prange((n_rows + BL - 1) // BL):
            for n in range(b * BL, min(n_rows, (b + 1) * BL)):
                row = w[n]
                acc = np.float32(0.0)
                for k in range(k_len):
                    acc += wide(row[k]) * x[k]
                out[n] = acc

    @jit
    def rows(x, w, out):  # x [M, K] f32 with M a multiple of 4, w [N, K] u16, out [M, N] f32
        m_len, k_len = x.shape
        n_rows = w.shape[0]
        for b in prange((n_rows + BL - 1) // BL):
            buf = np.zeros((4, k_len), np.float32)
            w0, w1, w2, w3 = buf[0], buf[1], buf[2], buf[3]
            tile = np.empty((4, 4), np.float32)
            n_end = min(n_rows, (b + 1) * BL)
            for n0 in range(b * BL, n_end, 4):
                r = min(4, n_end - n0)
                for i in range(4):
                    dst = buf[i]
                    if i < r:
                        row = w[n0 + i]
                        for k in range(k_len):
                            dst[k] = wide(row[k])
                    else:  # a short last group: zero rows, their sums are not stored
                        dst[:] = 0.0
                for m0 in range(0, m_len, 4):
                    x0, x1, x2, x3 = x[m0], x[m0 + 1], x[m0 + 2], x[m0 + 3]
                    a00 = a01 = a02 = a03 = np.float32(0.0)
                    a10 = a11 = a12 = a13 = np.float32(0.0)
                    a20 = a21 = a22 = a23 = np.float32(0.0)
                    a30 = a31 = a32 = a33 = np.float32(0.0)
                    for k in range(k_len):  # a 4x4 tile: 8 loads for 16 multiply-adds
                        v0, v1, v2, v3 = x0[k], x1[k], x2[k], x3[k]
                        c0, c1, c2, c3 = w0[k], w1[k], w2[k], w3[k]
                        a00 += v0 * c0
                        a01 += v0 * c1
                        a02 += v0 * c2
                        a03 += v0 * c3
                        a10 += v1 * c0
                        a11 += v1 * c1
                        a12 += v1 * c2
                        a13 += v1 * c3
                        a20 += v2 * c0
                        a21 += v2 * c1
                        a22 += v2 * c2
                        a23 += v2 * c3
                        a30 += v3 * c0
                        a31 += v3 * c1
                        a32 += v3 * c2
                        a33 += v3 * c3
                    tile[0, 0], tile[0, 1], tile[0, 2], tile[0, 3] = a00, a01, a02, a03
                    tile[1, 0], tile[1, 1], tile[1, 2], tile[1, 3] = a10, a11, a12, a13
                    tile[2, 0], tile[2, 1], tile[2, 2], tile[2, 3] = a20, a21, a22, a23
                    tile[3, 0], tile[3, 1], tile[3, 2], tile[3, 3] = a30, a31, a32, a33
                    for i in range(4):
                        for j in range(r):
                            out[m0 + i, n0 + j] = tile[i, j]

    @serial
    def widen(w, out):  # w [N, K] u16 -> out [N, K] f32; on the calling thread: Numba's threads would spin-wait
        n_rows, k_len = w.shape  # (OpenMP) while the BLAS's threads multiply right after
        for n in range(n_rows):
            row = w[n]
            dst = out[n]
            for k in range(k_len):
                dst[k] = wide(row[k])

    return SimpleNamespace(one=one, rows=rows, widen=widen)


_local = threading.local()


def _scratch(size: int) -> np.ndarray:
    """This thread's fp32 buffer of at least `size` elements, kept between calls: with a fresh 16 MB array a product
    (page faults, zeroing by the kernel) a 4 x 46-row prefill took 1.66-1.69 s against 1.23-1.34 s on the 2-core VM."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < size:
        buf = _local.buf = np.empty(size, np.float32)
    return buf[:size]


def available() -> bool:
    """True where Numba compiles these kernels (a bf16 LLM on the CPU then computes in fp32 through them)."""
    return _kernels() is not None


def warm() -> None:
    """Compile every kernel (or load it from Numba's disk cache) on tiny inputs, so that no product pays for it:
    ~1 s a kernel the first time on the 2-core VM, ~0.5 s for all three from the cache."""
    w = np.zeros((4, 4), np.uint16)
    for m in (1, 2, ROWS_MAX + 1):
        linear(np.zeros((m, 4), np.float32), w)


def linear(x: np.ndarray, w: np.ndarray, *, rows_max: int = ROWS_MAX, widen_bytes: int = WIDEN_BYTES) -> np.ndarray:
    """x [M, K] fp32 @ w[N, K].T with w bf16 bits (uint16, C-contiguous): fp32 [M, N]. Up to `rows_max` input rows
    through the kernels, more through the BLAS on fp32 blocks of `widen_bytes` of the weight."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or w.dtype != np.uint16 or x.dtype != np.float32 or not w.flags.c_contiguous:
        raise ValueError(f"bf16-weight product: weight {w.shape} {w.dtype} does not match input {x.shape} {x.dtype}")
    kern = _kernels()
    if kern is None:
        raise RuntimeError("the cpu gemv kernels need Numba (pip install numba)")
    if m == 1:
        out = np.empty((1, n), np.float32)
        kern.one(np.ascontiguousarray(x[0]), w, out[0])
        return out
    if m <= rows_max:  # the kernel takes input rows 4 at a time: zero rows pad the last group
        padded = np.zeros((-(-m // 4) * 4, k), np.float32)
        padded[:m] = x
        out = np.empty((padded.shape[0], n), np.float32)
        kern.rows(padded, w, out)
        return out[:m]
    # compute-bound: the BLAS's sgemm on fp32 blocks of the weight
    x = np.ascontiguousarray(x)
    out = np.empty((m, n), np.float32)
    block = max(1, widen_bytes // (4 * k))
    wide = _scratch(min(block, n) * k).reshape(-1, k)
    for j in range(0, n, block):
        rows = min(block, n - j)
        kern.widen(w[j:j + rows], wide[:rows])
        gemm(x, wide[:rows], out[:, j:j + rows])
    return out
