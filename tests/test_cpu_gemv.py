"""asr.backends.cpu.gemv (fp32 inputs times bf16-stored weights, compiled by Numba) and the bf16 LLM runner built on
it: the products equal fp32 products on the widened weights (the inputs are not rounded), for every row count and
shape edge, and the bf16 LLM's greedy tokens equal the fp32 LLM's on the same bf16-valued weights."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

import asr
from asr.backends.cpu import blas as cpu_bf16
from asr.backends.cpu import gemv as cpu_gemv
from asr.backends.cpu.llm import NumpyQwen3, _State
from asr.decode.loop import greedy, left_pad
from asr.options import RuntimeOptions

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="numba is a dependency on Linux only")


def _bits(rng, shape) -> np.ndarray:
    return cpu_bf16.to_bits(rng.standard_normal(shape).astype(np.float32))


def test_numba_is_there_and_warm_compiles_every_kernel():
    """A dependency on Linux: without it a CPU install would silently fall back to the slower fp32 default. warm()
    (run when a bf16 LLM's runner is built, i.e. at the model's warm-up) leaves no kernel to compile later."""
    assert cpu_gemv.available()
    cpu_gemv.warm()
    kernels = cpu_gemv._kernels()
    assert all(len(getattr(kernels, name).signatures) >= 1 for name in ("one", "rows", "widen"))


@pytest.mark.parametrize("m", [1, 2, 3, 5, 16, 17, 64, 130, cpu_gemv.ROWS_MAX, cpu_gemv.ROWS_MAX + 1, 300])
def test_linear_is_an_fp32_product_on_the_widened_weights(m):
    """Every path (one row; the 4x4-tile kernel with input rows padded to a multiple of 4, a short last group of
    weight rows and a short last block of 16; the widened blocks + sgemm beyond ROWS_MAX, here forced into three
    blocks) against float64 on the same values; the input is kept fp32, not rounded to bf16 as MKL's bf16 product
    would."""
    rng = np.random.default_rng(m)
    w = _bits(rng, (37, 67))
    x = rng.standard_normal((m, 67)).astype(np.float32)
    wide = cpu_bf16.from_bits(w).astype(np.float64)
    out = cpu_gemv.linear(x, w, widen_bytes=4 * 67 * 16)  # 16 weight rows a block: 37 rows in three
    assert out.shape == (m, 37) and out.dtype == np.float32
    ref = x.astype(np.float64) @ wide.T
    assert np.abs(out - ref).max() < 2e-5 * np.abs(ref).max()
    rounded = cpu_bf16.from_bits(cpu_bf16.to_bits(x)).astype(np.float64) @ wide.T
    assert np.abs(out - rounded).max() > 100 * np.abs(out - ref).max()


def test_linear_takes_strided_rows_and_rejects_mismatches():
    rng = np.random.default_rng(0)
    w = _bits(rng, (20, 32))
    x = rng.standard_normal((3, 64)).astype(np.float32)[:, ::2]  # not contiguous: copied
    ref = x.astype(np.float64) @ cpu_bf16.from_bits(w).astype(np.float64).T
    assert np.allclose(cpu_gemv.linear(x, w), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        cpu_gemv.linear(x, w[:, :16].copy())
    with pytest.raises(ValueError, match="does not match"):
        cpu_gemv.linear(x, cpu_bf16.from_bits(w))  # fp32 weights are not this module's
    with pytest.raises(ValueError, match="does not match"):
        cpu_gemv.linear(x.astype(np.float64), w)


def _greedy(runner, prompts) -> list[list[int]]:
    outs = greedy(runner, *left_pad(prompts), eos_ids=set(), max_new_tokens=40, repetition_guard=False)
    return [o.tokens for o in outs]


def test_bf16_llm_through_gemv_equals_the_fp32_llm(tiny_checkpoint):
    """The tiny checkpoint stores bf16 weights (as the official one does), so the fp32 LLM is their exact widening:
    the bf16 LLM on this path computes the same numbers (fp32 activations) up to summation order. Its weights stay
    bf16 bits, zero-copy views of MLX's."""
    mlx = RuntimeOptions(backend="mlx")
    llm = asr.load_model(str(tiny_checkpoint), dtype="bfloat16", runtime=mlx).net.llm
    runner = NumpyQwen3(llm, "gemv")
    assert runner.layers[0].wq.dtype == np.uint16 and not runner.layers[0].wq.flags.owndata
    fp32 = NumpyQwen3(asr.load_model(str(tiny_checkpoint), dtype="float32", runtime=mlx).net.llm, "fp32")
    mx.random.seed(5)
    # bf16-valued prompt embeddings, so that both models see the same inputs
    prompts = [(mx.random.normal((n, llm.args.hidden_size)) * 0.5).astype(mx.bfloat16).astype(mx.float32)
               for n in (30, 11)]
    for batch in ([prompts[0]], prompts):
        ours = _greedy(runner, batch)
        assert all(len(set(t)) > 5 for t in ours), "degenerate tokens make this comparison meaningless"
        assert ours == _greedy(fp32, batch)
    x = np.array(prompts[0][None])
    logits, ref = ((r._mm(r._forward(_State(1, len(r.layers), r.layers[0].n_kv, r.head_dim, np.zeros(1, np.int64)),
                                     x), r.head)[0]) for r in (runner, fp32))
    assert np.abs(logits - ref).max() < 1e-4 * np.abs(ref).max()


def test_concurrent_callers_get_their_own_results():
    """Products from several threads at once (a library user's threads): the kernels run on a thread-safe layer
    (OpenMP or TBB; Numba's workqueue fallback would abort the process) and each caller gets its own numbers."""
    import threading

    import numba

    rng = np.random.default_rng(7)
    w = _bits(rng, (300, 128))
    xs = [rng.standard_normal((m, 128)).astype(np.float32) for m in (1, 3, 1, 5)]
    refs = [x.astype(np.float64) @ cpu_bf16.from_bits(w).astype(np.float64).T for x in xs]
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(50):
            out = cpu_gemv.linear(xs[i], w)
            if not np.allclose(out, refs[i], rtol=1e-5, atol=1e-4):
                errors.append(f"thread {i}: wrong values")
                return

    cpu_gemv.warm()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert numba.threading_layer() in ("omp", "tbb")


def test_kernels_without_a_disk_cache():
    """Where Numba finds no writable cache location (it raises RuntimeError when the kernels are decorated), the
    kernels are compiled in memory instead: the path stays on and computes the same numbers."""
    import numba

    class NoDiskCache:
        """numba, whose njit refuses cache=True as it does without a writable cache location."""

        def __getattr__(self, name):
            return getattr(numba, name)

        def njit(self, *args, **kwargs):
            if kwargs.get("cache"):
                raise RuntimeError("cannot cache function: no locator available")
            return numba.njit(*args, **kwargs)

    kernels = cpu_gemv.compile_with(NoDiskCache())
    assert kernels is not None
    rng = np.random.default_rng(3)
    w = _bits(rng, (9, 20))
    x = rng.standard_normal((2, 20)).astype(np.float32)
    out = np.empty((4, 9), np.float32)
    padded = np.zeros((4, 20), np.float32)
    padded[:2] = x
    kernels.rows(padded, w, out)
    ref = x.astype(np.float64) @ cpu_bf16.from_bits(w).astype(np.float64).T
    assert np.allclose(out[:2], ref, rtol=1e-5, atol=1e-5)
