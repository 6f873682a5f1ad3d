"""asr.cpu_gemv (fp32 inputs times bf16-stored weights, compiled by Numba) and the bf16 LLM built on it in asr.cpu_llm:
the products equal fp32 products on the widened weights (the inputs are not rounded), for every row count and
shape edge, and the bf16 LLM's greedy tokens equal the fp32 LLM's on the same bf16-valued weights."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

import asr
from asr import cpu_bf16, cpu_gemv, cpu_llm, load
from asr import llm as llm_mod

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
def test_linear_is_an_fp32_product_on_the_widened_weights(m, monkeypatch):
    """Every path (one row; the 4x4-tile kernel with input rows padded to a multiple of 4, a short last group of
    weight rows and a short last block of 16; the widened blocks + sgemm beyond ROWS_MAX, here forced into three
    blocks) against float64 on the same values; the input is kept fp32, not rounded to bf16 as MKL's bf16 product
    would."""
    monkeypatch.setattr(cpu_gemv, "WIDEN_BYTES", 4 * 67 * 16)  # 16 weight rows a block: 37 rows in three
    rng = np.random.default_rng(m)
    w = _bits(rng, (37, 67))
    x = rng.standard_normal((m, 67)).astype(np.float32)
    wide = cpu_bf16.from_bits(w).astype(np.float64)
    out = cpu_gemv.linear(x, w)
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


def _greedy(llm, prompts) -> list[list[int]]:
    outs = llm_mod.greedy_decode_batch(llm, prompts, eos_ids=set(), max_new_tokens=40, repetition_guard=False)
    return [o.tokens for o in outs]


@pytest.mark.parametrize("rows_max", [cpu_gemv.ROWS_MAX, 8])
def test_bf16_llm_through_gemv_equals_the_fp32_llm(tiny_checkpoint, rows_max, monkeypatch):
    """The tiny checkpoint stores bf16 weights (as the official one does), so the fp32 LLM is their exact widening:
    the bf16 LLM on this path computes the same numbers (fp32 activations) up to summation order. Its weights stay
    bf16 bits, zero-copy views of MLX's. rows_max=8 sends the batch's prefill through widened blocks + sgemm."""
    monkeypatch.setattr(cpu_gemv, "ROWS_MAX", rows_max)
    if cpu_bf16.available():  # MKL with bf16 kernels takes precedence; this test is about the other path
        monkeypatch.setattr(cpu_bf16, "available", lambda: False)
    assert cpu_llm.bf16_products() == "gemv"
    llm = asr.load_model(str(tiny_checkpoint), dtype="bfloat16").net.llm
    assert cpu_llm.applies(llm)
    runner = cpu_llm.NumpyQwen3.of(llm)
    assert runner.layers[0].wq.dtype == np.uint16 and not runner.layers[0].wq.flags.owndata
    fp32 = asr.load_model(str(tiny_checkpoint), dtype="float32").net.llm
    mx.random.seed(5)
    # bf16-valued prompt embeddings, so that both models see the same inputs
    prompts = [(mx.random.normal((n, llm.args.hidden_size)) * 0.5).astype(mx.bfloat16).astype(mx.float32)
               for n in (30, 11)]
    for batch in ([prompts[0]], prompts):
        ours = _greedy(llm, batch)
        assert all(len(set(t)) > 5 for t in ours), "degenerate tokens make this comparison meaningless"
        assert ours == _greedy(fp32, batch)
    x = np.array(prompts[0][None])
    state = cpu_llm._State(1, len(runner.layers), runner.layers[0].n_kv, runner.head_dim, np.zeros(1, np.int64))
    logits = runner._mm(runner._forward(state, x), runner.head)[0]
    ref_runner = cpu_llm.NumpyQwen3.of(fp32)
    state = cpu_llm._State(1, len(runner.layers), runner.layers[0].n_kv, runner.head_dim, np.zeros(1, np.int64))
    ref = ref_runner._mm(ref_runner._forward(state, x), ref_runner.head)[0]
    assert np.abs(logits - ref).max() < 1e-4 * np.abs(ref).max()


def test_auto_dtype_on_the_cpu_follows_the_bf16_path(monkeypatch):
    """dtype="auto" on a CPU: bf16 where cpu_gemv computes it (fp32 numbers, half the bytes) or where MKL's bf16
    products beat fp32 (which then take precedence), fp32 where no fast bf16 path exists (MLX's own bf16 on the CPU
    is slow). MKL's bf16 products where they are slower than fp32 (an AMD CPU with FUNASR_NANO_BLAS=mkl) only serve
    an explicit bf16 model when cpu_gemv is missing."""
    cases = [  # (cpu_gemv, MKL bf16 available, MKL bf16 preferred) -> (products, auto dtype)
        ((True, False, False), ("gemv", "bfloat16")),
        ((True, True, False), ("gemv", "bfloat16")),
        ((True, True, True), ("mkl", "bfloat16")),
        ((False, True, True), ("mkl", "bfloat16")),
        ((False, True, False), ("mkl", "float32")),
        ((False, False, False), (None, "float32")),
    ]
    for (gemv, mkl, preferred), expected in cases:
        monkeypatch.setattr(cpu_gemv, "available", lambda v=gemv: v)
        monkeypatch.setattr(cpu_bf16, "available", lambda v=mkl: v)
        monkeypatch.setattr(cpu_bf16, "preferred", lambda v=preferred: v)
        assert (cpu_llm.bf16_products(), load._normalize_dtype("auto")) == expected, (gemv, mkl, preferred)
        # the encoder has no cpu_gemv path, and a quantized LLM runs on MLX's CPU kernels: bf16 only through MKL
        assert load._normalize_dtype("auto", part="encoder") == ("bfloat16" if preferred else "float32")
        assert load._normalize_dtype("auto", part="quantized-llm") == "float32"

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


def test_kernels_without_a_disk_cache(monkeypatch):
    """Where Numba finds no writable cache location (it raises RuntimeError when the kernels are decorated), the
    kernels are compiled in memory instead: the path stays on and computes the same numbers."""
    import numba

    real = numba.njit

    def njit_without_locator(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", njit_without_locator)
    cpu_gemv._kernels.cache_clear()
    try:
        assert cpu_gemv.available()
        rng = np.random.default_rng(3)
        w = _bits(rng, (9, 20))
        x = rng.standard_normal((2, 20)).astype(np.float32)
        ref = x.astype(np.float64) @ cpu_bf16.from_bits(w).astype(np.float64).T
        assert np.allclose(cpu_gemv.linear(x, w), ref, rtol=1e-5, atol=1e-5)
    finally:
        monkeypatch.undo()
        cpu_gemv._kernels.cache_clear()
