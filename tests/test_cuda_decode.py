"""asr.cuda_decode: the fused batch-of-one decode step for CUDA.

On any machine: the step's wiring (which weights feed which kernel, the position, the KV cache written in place and
grown) is checked by running FusedStep with each kernel replaced by the MLX operations it stands for, against
FastDecoder's own step. On a CUDA machine (MLX's CUDA backend) the kernels themselves are checked against MLX
operations, and the compiled step against the unfused one.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import KVCache

from asr import cuda_decode
from asr import llm as llm_mod

CUDA = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
needs_cuda = pytest.mark.skipif(not CUDA, reason="MLX's CUDA backend is not available here")


def _mlx_gemv(w, x, *, norm=None, eps=0.0, res=None, swiglu_=False, rows=2):
    """What a cuda_decode gemv launch computes, in MLX operations."""
    if norm is not None:
        x = mx.fast.rms_norm(x, norm, eps)
    y = (w @ x[:, None])[:, 0]
    if swiglu_:
        gate, up = mx.split(y, 2)
        return swiglu(gate, up)
    return y if res is None else res + y


def _mlx_attend(qkv, q_norm, k_norm, freqs, slot, k_cache, v_cache, *, heads, kv_heads, eps, scale, write=True):
    """What a cuda_decode attend launch computes, in MLX operations; the cache write goes to the same Python objects."""
    hd = k_cache.shape[-1]
    pos = int(slot[0].item())
    q, k, v = mx.split(qkv, [heads * hd, (heads + kv_heads) * hd])

    def rope(t, n):
        t = mx.fast.rms_norm(t.reshape(1, n, 1, hd), q_norm if n == heads else k_norm, eps)
        return mx.fast.rope(t, hd, traditional=False, base=None, scale=1.0, offset=pos, freqs=freqs)

    q, k = rope(q, heads), rope(k, kv_heads)
    if write:
        k_cache[:, :, pos: pos + 1, :] = k
        v_cache[:, :, pos: pos + 1, :] = v.reshape(1, kv_heads, 1, hd)
    o = mx.fast.scaled_dot_product_attention(q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1], scale=scale)
    return o.reshape(-1)


def _emulated(monkeypatch) -> set[int]:
    """Replace FusedStep's kernel launches by the MLX operations they stand for (same input order); returns the
    set that collects the cache capacities `attend` is prepared for."""

    def gemv_launch(shape, dtype, *, norm=False, eps=0.0, res=False, swiglu=False, rows=2):
        def run(x, nw, w, r):
            return _mlx_gemv(w, x.reshape(-1), norm=nw if norm else None, eps=eps, res=r.reshape(-1) if res else None,
                             swiglu_=swiglu)

        return run

    capacities = set()

    def attend_launch(dtype, *, heads, kv_heads, head_dim, capacity, eps, scale):
        capacities.add(capacity)

        def run(qkv, q_norm, k_norm, freqs, slot, k_cache, v_cache):
            assert k_cache.shape[2] == capacity
            return _mlx_attend(qkv, q_norm, k_norm, freqs, slot, k_cache, v_cache, heads=heads, kv_heads=kv_heads,
                               eps=eps, scale=scale)

        return run

    monkeypatch.setattr(cuda_decode, "gemv_launch", gemv_launch)
    monkeypatch.setattr(cuda_decode, "attend_launch", attend_launch)
    return capacities


def _prefill(llm, n: int, seed: int = 5):
    dim = llm.args.hidden_size
    emb = (mx.random.normal((1, n, dim), key=mx.random.key(seed)) * 0.5).astype(llm.model.embed_tokens.weight.dtype)
    cache = [KVCache() for _ in llm.layers]
    logits = llm_mod.last_logits(llm, mx.zeros((1, n), dtype=mx.int32), cache, emb)
    first = mx.argmax(logits[:, -1, :], axis=-1).astype(mx.int32)
    kv = [[llm_mod._grow(c.keys[..., :n, :], n + 1), llm_mod._grow(c.values[..., :n, :], n + 1)] for c in cache]
    return first, kv, cache


def _run(step, first, n: int, forced: list[int] | None = None) -> list[int]:
    """n greedy tokens; with `forced`, step i is fed forced[i - 1] instead of its own previous token."""
    out, cur = [], first
    for i in range(n):
        if forced is not None and i > 0:
            cur = mx.array([forced[i - 1]], dtype=mx.int32)
        cur = step(cur)
        out.append(int(cur.item()))
    return out


# the smallest Qwen3 whose widths the kernels take (multiples of 256 bf16 values; head_dim a multiple of 64)
SMALL = dict(model_type="qwen3", hidden_size=256, num_hidden_layers=2, intermediate_size=768, num_attention_heads=4,
             num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-6, vocab_size=1000, rope_theta=1000000.0,
             tie_word_embeddings=True, max_position_embeddings=4096)


def _small(dtype):
    mx.random.seed(11)
    llm = llm_mod.build_llm(SMALL)
    llm.update(tree_map(lambda p: p * 8 if p.ndim == 2 else p, llm.parameters()))  # livelier logits
    llm.set_dtype(dtype)
    mx.eval(llm.parameters())
    return llm


def test_used_on_cuda_only_for_what_it_supports(tiny_checkpoint):
    import asr

    small = _small(mx.bfloat16)
    assert cuda_decode.available(small, 1) == CUDA
    assert not cuda_decode.available(small, 2)
    assert cuda_decode.supports(small) and cuda_decode.supports(_small(mx.float32))
    assert not cuda_decode.supports(_small(mx.float16))  # compiles, but never run on a GPU
    tiny = asr.load_model(str(tiny_checkpoint), dtype="bfloat16").net.llm  # hidden size 64: not a multiple of 256
    assert not cuda_decode.supports(tiny) and not cuda_decode.available(tiny, 1)
    q4 = asr.load_model(str(tiny_checkpoint), dtype="bfloat16", quantize=4).net.llm
    assert not cuda_decode.supports(q4)
    small.model.norm.weight = small.model.norm.weight.astype(mx.float32)  # the kernels read one dtype
    assert not cuda_decode.supports(small)


def test_server_status_names_the_fused_step(tiny_checkpoint, monkeypatch):
    import asr
    from server.worker import _compute

    model = asr.load_model(str(tiny_checkpoint), dtype="bfloat16")
    assert "fused CUDA step" not in _compute(model)
    monkeypatch.setattr(cuda_decode, "available", lambda llm, batch: batch == 1)
    assert "LLM batch of one: fused CUDA step" in _compute(model)


@pytest.mark.parametrize("capacity,seen", [(512, {512}), (128, {128, 256})])
def test_step_wiring_matches_fast_decoder(tiny_checkpoint, monkeypatch, capacity, seen):
    """FusedStep with its kernels emulated gives FastDecoder's tokens for 150 steps after a 21-token prompt: in one
    cache of the starting capacity, or (a small start) growing past it."""
    import asr

    llm = asr.load_model(str(tiny_checkpoint), dtype="bfloat16").net.llm
    dec = llm_mod.FastDecoder(llm)
    monkeypatch.setattr(cuda_decode, "ENABLED", False)
    first, _, cache = _prefill(llm, 21)
    theirs = _run(dec.start(cache, 21, [0]), first, 150)

    capacities = _emulated(monkeypatch)
    monkeypatch.setattr(cuda_decode, "COMPILE", False)  # the emulation writes the cache through Python objects
    monkeypatch.setattr(cuda_decode, "CAPACITY", capacity)
    fused = cuda_decode.FusedStep(llm, dec._layer_plans())
    first, kv, _ = _prefill(llm, 21)
    ours = _run(fused.start(kv, 21), first, 150)
    assert len(set(theirs)) > 10, "degenerate tokens make this comparison meaningless"
    assert ours == theirs
    assert capacities == seen


# --- the kernels themselves (CUDA only) ---------------------------------------------------------------------------
def _gemv(w, x, *, norm=None, eps=0.0, res=None, swiglu=False, rows=2):
    """One cuda_decode gemv launch on these arrays (unused inputs: any array)."""
    launch = cuda_decode.gemv_launch(w.shape, w.dtype, norm=norm is not None, eps=eps, res=res is not None,
                                     swiglu=swiglu, rows=rows)
    return launch(x, norm if norm is not None else x, w, res if res is not None else x)


def _attend(qkv, q_norm, k_norm, freqs, slot, k_cache, v_cache, *, heads, kv_heads, eps, scale):
    """One cuda_decode attend launch (writes k_cache/v_cache at slot[0] in place)."""
    launch = cuda_decode.attend_launch(qkv.dtype, heads=heads, kv_heads=kv_heads, head_dim=k_cache.shape[-1],
                                       capacity=k_cache.shape[-2], eps=eps, scale=scale)
    return launch(qkv, q_norm, k_norm, freqs, slot, k_cache, v_cache)


def _close(ours: mx.array, ref: mx.array, dtype) -> None:
    a, b = np.array(ours.astype(mx.float32)), np.array(ref.astype(mx.float32))
    tol = 1e-4 if dtype == mx.float32 else 2e-2
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), np.abs(a - b).max()


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("n,k,rows", [(4096, 1024, 2), (1000, 1024, 4), (1024, 3072, 1), (1024, 2048, 1)])
def test_gemv_matches_mlx(dtype, n, k, rows):
    keys = mx.random.split(mx.random.key(0), 4)
    w = (mx.random.normal((2 * n, k), key=keys[0]) * 0.05).astype(dtype)
    x = mx.random.normal((k,), key=keys[1]).astype(dtype)
    nw = (1 + 0.1 * mx.random.normal((k,), key=keys[2])).astype(dtype)
    res = mx.random.normal((n,), key=keys[3]).astype(dtype)
    _close(_gemv(w[:n], x, rows=rows), _mlx_gemv(w[:n], x), dtype)
    _close(_gemv(w[:n], x, norm=nw, eps=1e-6, rows=rows), _mlx_gemv(w[:n], x, norm=nw, eps=1e-6), dtype)
    _close(_gemv(w[:n], x, res=res, rows=rows), _mlx_gemv(w[:n], x, res=res), dtype)
    _close(_gemv(w, x, norm=nw, eps=1e-6, swiglu=True, rows=rows),
           _mlx_gemv(w, x, norm=nw, eps=1e-6, swiglu_=True), dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("pos", [0, 5, 77, 255])
def test_attend_matches_mlx(dtype, pos):
    heads, kv_heads, hd, cap = 16, 8, 128, 256
    keys = mx.random.split(mx.random.key(1), 5)
    qkv = mx.random.normal(((heads + 2 * kv_heads) * hd,), key=keys[0]).astype(dtype)
    q_norm = (1 + 0.1 * mx.random.normal((hd,), key=keys[1])).astype(dtype)
    k_norm = (1 + 0.1 * mx.random.normal((hd,), key=keys[2])).astype(dtype)
    freqs = 1000000.0 ** (mx.arange(0, hd, 2, dtype=mx.float32) / hd)
    k_cache = mx.random.normal((1, kv_heads, cap, hd), key=keys[3]).astype(dtype)
    v_cache = mx.random.normal((1, kv_heads, cap, hd), key=keys[4]).astype(dtype)
    mx.eval(k_cache, v_cache)
    k_ref, v_ref = mx.array(k_cache), mx.array(v_cache)
    slot = mx.array([pos], dtype=mx.int32)
    kw = dict(heads=heads, kv_heads=kv_heads, eps=1e-6, scale=hd**-0.5)
    ref = _mlx_attend(qkv, q_norm, k_norm, freqs, slot, k_ref, v_ref, **kw)
    ours = _attend(qkv, q_norm, k_norm, freqs, slot, k_cache, v_cache, **kw)
    mx.eval(ours)
    _close(ours, ref, dtype)
    # written in place at `pos` (as the MLX ops round it), untouched elsewhere
    _close(k_cache[:, :, pos], k_ref[:, :, pos], dtype)
    assert mx.array_equal(v_cache, v_ref).item()
    ours_k, ref_k = np.array(k_cache.astype(mx.float32)), np.array(k_ref.astype(mx.float32))
    others = np.arange(cap) != pos
    assert (ours_k[:, :, others] == ref_k[:, :, others]).all()


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_compiled_step_tokens_match_unfused(dtype, monkeypatch):
    """Teacher-forced on the unfused step's tokens (one flipped near-tie would derail a free-running comparison of a
    random model), the compiled fused step predicts the same next token at nearly every one of 150 steps."""
    llm = _small(dtype)
    monkeypatch.setattr(cuda_decode, "ENABLED", False)
    first, _, cache = _prefill(llm, 21)
    theirs = _run(llm_mod.FastDecoder(llm).start(cache, 21, [0]), first, 150)
    assert len(set(theirs)) > 10, "degenerate tokens make this comparison meaningless"
    monkeypatch.setattr(cuda_decode, "ENABLED", True)
    dec = llm_mod.FastDecoder(llm)
    first, _, cache = _prefill(llm, 21)
    ours = _run(dec.start(cache, 21, [0]), first, 150, forced=theirs)
    assert dec._fused_step is not None and dec._fused_step._step is not dec._fused_step._forward
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    assert same >= 145, f"{same}/150 tokens equal"


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_batched_attention_kernel_matches_masked_sdpa(dtype):
    """asr.cuda_attention (batches: rows left-padded differently) against MLX's masked attention."""
    from asr import cuda_attention

    B, heads, kv_heads, hd, cap, slot = 3, 16, 8, 128, 256, 140
    keys = mx.random.split(mx.random.key(2), 3)
    q = mx.random.normal((B, heads, 1, hd), key=keys[0]).astype(dtype)
    k = mx.random.normal((B, kv_heads, cap, hd), key=keys[1]).astype(dtype)
    v = mx.random.normal((B, kv_heads, cap, hd), key=keys[2]).astype(dtype)
    pad = mx.array([0, 17, 139], dtype=mx.int32)
    pos = mx.arange(cap)
    mask = ((pos[None] >= pad[:, None]) & (pos[None] <= slot))[:, None, None, :]
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd**-0.5, mask=mask)
    ours = cuda_attention.attention(q, k, v, pad, mx.array(slot, dtype=mx.int32), hd**-0.5)
    _close(ours, ref, dtype)
