"""asr.cuda_decode: the fused batch-of-one decode step for CUDA.

On any machine: the step's wiring (which weights feed which kernel, the position, the KV cache written in place and
grown) is checked by running FusedStep with each kernel replaced by the MLX operations it stands for, against
FastDecoder's own step. On a CUDA machine (MLX's CUDA backend) the kernels themselves are checked against MLX
operations, and the compiled step against the unfused one.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import KVCache

from asr import cpu_llm, cuda_decode, cuda_persistent, cuda_rows
from asr import llm as llm_mod

CUDA = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
needs_cuda = pytest.mark.skipif(not CUDA, reason="MLX's CUDA backend is not available here")


@pytest.fixture(autouse=True)
def _mlx_decoders_on_the_cpu(monkeypatch):
    """These tests drive MLX's decoders; on a CPU a bf16 LLM would go to asr.cpu_llm (asr.cpu_gemv's kernels, or
    MKL's bf16 products)."""
    from asr import cpu_bf16, cpu_gemv

    monkeypatch.setattr(cpu_bf16, "available", lambda: False)
    monkeypatch.setattr(cpu_gemv, "available", lambda: False)


def _mlx_gemv(w, x, *, norm=None, eps=0.0, res=None, swiglu_=False, rows=2):
    """What a cuda_decode gemv launch computes, in MLX operations."""
    if norm is not None:
        x = mx.fast.rms_norm(x, norm, eps)
    y = (w @ x[:, None])[:, 0]
    if swiglu_:
        gate, up = mx.split(y, 2)
        return swiglu(gate, up)
    return y if res is None else res + y


def _mlx_attend(qkv, q_norm, k_norm, freqs, slot, left_pad, k_cache, v_cache, *, heads, kv_heads, eps, scale):
    """What a cuda_decode attend launch computes, in MLX operations; the cache write goes to the same Python objects.

    qkv [B, N] (or [N] for a batch of one); row b's new token sits at cache position slot[0] with RoPE position
    slot[0] - left_pad[b] and attends to positions left_pad[b]..slot[0]."""
    hd = k_cache.shape[-1]
    B = k_cache.shape[0]
    last = int(slot[0].item())
    left_pad = left_pad[:B]  # the kernels read the first B entries (the arrays are padded, see SMALL_ARRAY)
    q, k, v = mx.split(qkv.reshape(B, -1), [heads * hd, (heads + kv_heads) * hd], axis=-1)
    offset = last - left_pad

    def rope(t, n):
        t = mx.fast.rms_norm(t.reshape(B, n, 1, hd), q_norm if n == heads else k_norm, eps)
        return mx.fast.rope(t, hd, traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)

    q, k = rope(q, heads), rope(k, kv_heads)
    k_cache[:, :, last: last + 1, :] = k
    v_cache[:, :, last: last + 1, :] = v.reshape(B, kv_heads, 1, hd)
    pos = mx.arange(k_cache.shape[2])
    mask = ((pos[None] >= left_pad[:, None]) & (pos[None] <= last))[:, None, None, :]
    o = mx.fast.scaled_dot_product_attention(q, k_cache, v_cache, scale=scale, mask=mask)
    return o.reshape(B, heads * hd)


def _mlx_add_norm(x, y, w, eps):
    """What a cuda_decode add_norm launch computes, in MLX operations."""
    h = x + y
    return h, mx.fast.rms_norm(h, w, eps)


@pytest.fixture
def on_cpu():
    """The wiring tests compare token for token, so both sides run on the CPU (on a GPU machine too): there GPU
    kernels may sum in other orders than the emulation, and a random 4-bit model's near-ties flipped."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def _emulated(monkeypatch) -> None:
    """Replace the steps' kernel launches by the MLX operations they stand for (same input order)."""

    def gemv_launch(shape, dtype, *, norm=False, eps=0.0, res=False, swiglu=False, argmax=False, rows=2):
        def run(x, nw, w, r):
            y = _mlx_gemv(w, x.reshape(-1), norm=nw if norm else None, eps=eps, res=r.reshape(-1) if res else None,
                          swiglu_=swiglu)
            if argmax:  # one block key holding the first index of the largest value
                return (0xFFFFFFFF - mx.argmax(y, keepdims=True).astype(mx.uint64)).astype(mx.uint64)
            return y

        return run

    def attend_launch(dtype, *, batch, heads, kv_heads, head_dim, eps, scale, warps, par):
        def run(qkv, q_norm, k_norm, freqs, slot, left_pad, k_cache, v_cache):
            assert k_cache.shape[0] == batch and k_cache.shape[-1] == head_dim
            return _mlx_attend(qkv, q_norm, k_norm, freqs, slot, left_pad, k_cache, v_cache, heads=heads,
                               kv_heads=kv_heads, eps=eps, scale=scale)

        return run

    def add_norm_launch(dtype, *, batch, dim, eps):
        def run(x, y, w):
            assert x.shape == y.shape == (batch, dim)
            return _mlx_add_norm(x, y, w, eps)

        return run

    monkeypatch.setattr(cuda_decode, "gemv_launch", gemv_launch)
    monkeypatch.setattr(cuda_decode, "attend_launch", attend_launch)
    monkeypatch.setattr(cuda_decode, "add_norm_launch", add_norm_launch)
    monkeypatch.setattr(cuda_decode, "COMPILE", False)  # the emulation writes the caches through Python objects


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


def _small(dtype, config=SMALL):
    mx.random.seed(11)
    llm = llm_mod.build_llm(config)
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
    assert not cuda_decode.supports_rows(q4)  # head_dim 32
    small_q4 = _small(mx.bfloat16)
    nn.quantize(small_q4, group_size=64, bits=4)
    assert cuda_decode.supports_rows(small) and cuda_decode.supports_rows(small_q4)  # quantized: MLX's products
    assert cuda_decode.rows_available(small_q4) == CUDA and not cuda_decode.available(small_q4, 1)
    assert not cuda_decode.supports_rows(_small(mx.float16))
    small.model.norm.weight = small.model.norm.weight.astype(mx.float32)  # the kernels read one dtype
    assert not cuda_decode.supports(small) and not cuda_decode.supports_rows(small)


def test_server_status_names_the_fused_step(tiny_checkpoint, monkeypatch):
    import asr
    from server.worker import _compute

    model = asr.load_model(str(tiny_checkpoint), dtype="bfloat16")
    assert "CUDA step" not in _compute(model) and "CUDA rows step" not in _compute(model)
    monkeypatch.setattr(cpu_llm, "applies", lambda llm: False)  # as on a GPU (on a CPU, asr.cpu_llm runs bf16 too)
    monkeypatch.setattr(cuda_decode, "rows_available", lambda llm: True)
    assert "LLM batches: CUDA rows step (asr/cuda_decode.py" in _compute(model)
    monkeypatch.setattr(cuda_decode, "available", lambda llm, batch: batch == 1)
    monkeypatch.setattr(cuda_persistent, "sm_count", lambda: 132)
    assert "LLM batch of one: one-launch CUDA step, batches: CUDA rows step" in _compute(model)
    monkeypatch.setattr(cuda_persistent, "ENABLED", False)
    assert "LLM batch of one: fused CUDA step, batches: CUDA rows step" in _compute(model)
    monkeypatch.setattr(cuda_rows, "fits", lambda llm: True)  # the tiny model's widths are not the kernel's
    monkeypatch.setattr(cuda_rows, "device_takes", lambda llm: True)  # no CUDA runtime to ask here
    assert ("batch of one: fused CUDA step, batches up to 64: one-launch CUDA rows step, larger batches: CUDA "
            "rows step") in _compute(model)


def test_step_wiring_matches_fast_decoder(tiny_checkpoint, monkeypatch, on_cpu):
    """FusedStep with its kernels emulated gives FastDecoder's tokens for 150 steps after a 21-token prompt (the
    cache starts at 128 positions and grows past them)."""
    import asr

    llm = asr.load_model(str(tiny_checkpoint), dtype="bfloat16").net.llm
    dec = llm_mod.FastDecoder(llm)
    monkeypatch.setattr(cuda_decode, "ENABLED", False)
    first, _, cache = _prefill(llm, 21)
    theirs = _run(dec.start(cache, 21, [0]), first, 150)

    _emulated(monkeypatch)
    fused = cuda_decode.FusedStep(llm, dec._layer_plans())
    first, kv, _ = _prefill(llm, 21)
    assert kv[0][0].shape[2] == 128
    ours = _run(fused.start(kv, 21), first, 150)
    assert len(set(theirs)) > 10, "degenerate tokens make this comparison meaningless"
    assert ours == theirs


def _batch_prompts(llm, lengths, seed=4):
    dim = llm.args.hidden_size
    dtype = llm.model.norm.weight.dtype
    keys = mx.random.split(mx.random.key(seed), len(lengths))
    return [(mx.random.normal((n, dim), key=k) * 0.5).astype(dtype) for n, k in zip(lengths, keys, strict=True)]


def _decode_batch(llm, prompts, steps):
    outs = llm_mod.greedy_decode_batch(llm, prompts, eos_ids=set(), max_new_tokens=steps, repetition_guard=False)
    return [o.tokens for o in outs]


@pytest.mark.parametrize("quantize,lengths,steps", [(None, [30, 9, 21], 150), (None, [17], 150),
                                                    (4, [30, 9, 21], 30)])
def test_rows_step_wiring_matches_masked_step(tiny_checkpoint, monkeypatch, on_cpu, quantize, lengths, steps):
    """RowsStep with its kernels emulated gives the masked MLX step's tokens: rows left-padded differently and a batch
    of one, for 150 steps (the caches grow past 128 positions); and a 4-bit LLM (30 steps: MLX's CPU quantized
    products are slow)."""
    import asr

    llm = asr.load_model(str(tiny_checkpoint), dtype="bfloat16", quantize=quantize).net.llm
    monkeypatch.setattr(cuda_decode, "ENABLED", False)
    monkeypatch.setattr(llm_mod, "COMPILE_DECODE", False)
    prompts = _batch_prompts(llm, lengths)
    theirs = _decode_batch(llm, prompts, steps)
    _emulated(monkeypatch)
    monkeypatch.setattr(cuda_decode, "rows_available", lambda model: True)
    llm._fast_decoder = None
    ours = _decode_batch(llm, prompts, steps)
    assert llm._fast_decoder._rows_step is not None
    assert all(len(set(t)) > 5 for t in theirs), "degenerate tokens make this comparison meaningless"
    assert ours == theirs


def test_rows_step_wiring_fails_when_miswired(tiny_checkpoint, monkeypatch, on_cpu):
    """The comparison above can fail: RowsStep fed the wrong norm (ln1 for ln2) gives other tokens."""
    import asr

    llm = asr.load_model(str(tiny_checkpoint), dtype="bfloat16").net.llm
    monkeypatch.setattr(cuda_decode, "ENABLED", False)
    monkeypatch.setattr(llm_mod, "COMPILE_DECODE", False)
    prompts = _batch_prompts(llm, [30, 9, 21])
    theirs = _decode_batch(llm, prompts, 40)
    _emulated(monkeypatch)
    monkeypatch.setattr(cuda_decode, "rows_available", lambda model: True)
    llm._fast_decoder = None
    dec = llm_mod.FastDecoder.of(llm)
    for plan in dec._layer_plans():
        plan.ln2 = plan.ln1
    assert _decode_batch(llm, prompts, 40) != theirs


# --- the kernels themselves (CUDA only) ---------------------------------------------------------------------------
def _gemv(w, x, *, norm=None, eps=0.0, res=None, swiglu=False, rows=2):
    """One cuda_decode gemv launch on these arrays (unused inputs: any array)."""
    launch = cuda_decode.gemv_launch(w.shape, w.dtype, norm=norm is not None, eps=eps, res=res is not None,
                                     swiglu=swiglu, rows=rows)
    return launch(x, norm if norm is not None else x, w, res if res is not None else x)


def _attend(qkv, q_norm, k_norm, freqs, slot, left_pad, k_cache, v_cache, *, heads, kv_heads, eps, scale, warps,
            par):
    """One cuda_decode attend launch (writes k_cache/v_cache at slot[0] in place)."""
    launch = cuda_decode.attend_launch(qkv.dtype, batch=k_cache.shape[0], heads=heads, kv_heads=kv_heads,
                                       head_dim=k_cache.shape[-1], eps=eps, scale=scale, warps=warps,
                                       par=par)
    return launch(qkv, q_norm, k_norm, freqs, slot, left_pad, k_cache, v_cache)


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
@pytest.mark.parametrize("n,k", [(1000, 256), (151936, 1024)])
def test_gemv_argmax_is_the_first_largest_value(dtype, n, k):
    """The argmax mode (the LM head's: block keys, then `argmax_of_keys`) picks the first index of the largest value
    the plain mode computes, ties included: the weight rows are repeated, so every value occurs at least twice."""
    keys = mx.random.split(mx.random.key(2), 3)
    w = (mx.random.normal((n // 2, k), key=keys[0]) * 0.05).astype(dtype)
    w = mx.concatenate([w, w[::-1]], axis=0)  # row j and row n-1-j are equal
    x = mx.random.normal((k,), key=keys[1]).astype(dtype)
    nw = (1 + 0.1 * mx.random.normal((k,), key=keys[2])).astype(dtype)
    for norm in (None, nw):
        for xs in (x, -x):
            plain = _gemv(w, xs, norm=norm, eps=1e-6, rows=4)
            launch = cuda_decode.gemv_launch(w.shape, dtype, norm=norm is not None, eps=1e-6, argmax=True, rows=4)
            tok = cuda_decode.argmax_of_keys(launch(xs, nw, w, xs))
            assert tok.dtype == mx.int32 and tok.shape == (1,)
            first = int(mx.argmax(plain).item())
            assert tok.item() == first
            assert (np.array(plain.astype(mx.float32)) == float(plain[first].item())).sum() >= 2  # a tie was broken


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("pos,pads,warps,par", [
    (0, [0], 16, 8), (5, [0], 16, 8), (77, [0], 16, 8), (255, [0], 16, 8), (77, [0], 8, 2), (140, [0, 17, 139], 4, 2),
    (200, [3, 0], 8, 8), (140, [0, 17, 139], 4, 8), (77, [0], 16, 3), (33, [5], 4, 1)])
def test_attend_matches_mlx(dtype, pos, pads, warps, par):
    """attend (rows left-padded differently, grouped queries; the cache capacity read at run time; par positions a
    warp at a time, which need not divide the row's length) against MLX operations, including the in-place cache
    write."""
    B, heads, kv_heads, hd, cap = len(pads), 16, 8, 128, 256
    keys = mx.random.split(mx.random.key(1), 5)
    qkv = mx.random.normal((B, (heads + 2 * kv_heads) * hd), key=keys[0]).astype(dtype)
    q_norm = (1 + 0.1 * mx.random.normal((hd,), key=keys[1])).astype(dtype)
    k_norm = (1 + 0.1 * mx.random.normal((hd,), key=keys[2])).astype(dtype)
    freqs = 1000000.0 ** (mx.arange(0, hd, 2, dtype=mx.float32) / hd)
    k_cache = mx.random.normal((B, kv_heads, cap, hd), key=keys[3]).astype(dtype)
    v_cache = mx.random.normal((B, kv_heads, cap, hd), key=keys[4]).astype(dtype)
    mx.eval(k_cache, v_cache)
    k_ref, v_ref = mx.array(k_cache) + 0, mx.array(v_cache) + 0
    mx.eval(k_ref, v_ref)
    slot, left_pad = mx.array([pos], dtype=mx.int32), mx.array(pads, dtype=mx.int32)
    kw = dict(heads=heads, kv_heads=kv_heads, eps=1e-6, scale=hd**-0.5)
    ref = _mlx_attend(qkv, q_norm, k_norm, freqs, slot, left_pad, k_ref, v_ref, **kw)
    ours = _attend(qkv, q_norm, k_norm, freqs, slot, left_pad, k_cache, v_cache, warps=warps, par=par, **kw)
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
@pytest.mark.parametrize("batch,dim", [(1, 1024), (64, 1024), (5, 1000)])
def test_add_norm_matches_mlx(dtype, batch, dim):
    keys = mx.random.split(mx.random.key(3), 3)
    x = mx.random.normal((batch, dim), key=keys[0]).astype(dtype)
    y = mx.random.normal((batch, dim), key=keys[1]).astype(dtype)
    w = (1 + 0.1 * mx.random.normal((dim,), key=keys[2])).astype(dtype)
    h, n = cuda_decode.add_norm_launch(dtype, batch=batch, dim=dim, eps=1e-6)(x, y, w)
    ref_h, ref_n = _mlx_add_norm(x, y, w, 1e-6)
    assert mx.array_equal(h, ref_h).item()
    _close(n, ref_n, dtype)


# Qwen3-0.6B's widths (the model Fun-ASR-Nano decodes with), two layers
WIDE = dict(SMALL, hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
            vocab_size=151936)


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("config", [SMALL, WIDE], ids=["small", "qwen3-0.6b-widths"])
def test_compiled_step_tokens_match_unfused(dtype, persistent, config, monkeypatch):
    """Teacher-forced on the unfused step's tokens (one flipped near-tie would derail a free-running comparison of a
    random model), the one-launch step (PersistentStep) and the compiled fused step (FusedStep) predict the same
    next token at nearly every one of 150 steps."""
    llm = _small(dtype, config)
    monkeypatch.setattr(cuda_persistent, "ENABLED", persistent)
    monkeypatch.setattr(cuda_decode, "ENABLED", False)
    first, _, cache = _prefill(llm, 21)
    theirs = _run(llm_mod.FastDecoder(llm).start(cache, 21, [0]), first, 150)
    assert len(set(theirs)) > 10, "degenerate tokens make this comparison meaningless"
    monkeypatch.setattr(cuda_decode, "ENABLED", True)
    dec = llm_mod.FastDecoder(llm)
    first, _, cache = _prefill(llm, 21)
    ours = _run(dec.start(cache, 21, [0]), first, 150, forced=theirs)
    kind = cuda_persistent.PersistentStep if persistent else cuda_decode.FusedStep
    assert isinstance(dec._fused_step, kind)
    if not persistent:
        assert dec._fused_step._step is not dec._fused_step._forward
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    assert same >= 145, f"{same}/150 tokens equal"


def _prefill_rows(llm, lengths):
    from mlx_lm.models.cache import BatchKVCache

    prompts = _batch_prompts(llm, lengths)
    P = max(lengths)
    left_pad = [P - n for n in lengths]
    padded = mx.stack([mx.pad(p, [(P - n, 0), (0, 0)]) for p, n in zip(prompts, lengths, strict=True)])
    cache = [BatchKVCache(left_pad) for _ in llm.layers]
    logits = llm_mod.last_logits(llm, mx.zeros((len(lengths), P), dtype=mx.int32), cache, padded)
    return mx.argmax(logits[:, -1, :], axis=-1).astype(mx.int32), cache, P, left_pad


def _run_rows(step, first, n: int, forced: list[list[int]] | None = None) -> list[list[int]]:
    """n greedy steps of a batch: [B][n] tokens; with `forced`, step i is fed forced[.][i - 1]."""
    out, cur = [], first
    for i in range(n):
        if forced is not None and i > 0:
            cur = mx.array([f[i - 1] for f in forced], dtype=mx.int32)
        cur = step(cur)
        out.append(cur.tolist())
    return [list(r) for r in zip(*out, strict=True)]


@needs_cuda
@pytest.mark.parametrize("dtype,bits", [(mx.bfloat16, None), (mx.float32, None), (mx.bfloat16, 4)])
def test_compiled_rows_step_tokens_match_masked_step(dtype, bits, monkeypatch):
    """Teacher-forced on the masked MLX step's tokens, the compiled RowsStep predicts the same next token at nearly
    every one of 150 steps, for 3 rows left-padded differently (also with a 4-bit LLM)."""
    llm = _small(dtype)
    if bits:
        nn.quantize(llm, group_size=64, bits=bits)
        mx.eval(llm.parameters())
    assert cuda_decode.supports_rows(llm)
    monkeypatch.setattr(cuda_rows, "ENABLED", False)  # bf16 batches would take the one-launch step
    monkeypatch.setattr(cuda_decode, "ENABLED", False)
    first, cache, P, pad = _prefill_rows(llm, [30, 9, 21])
    theirs = _run_rows(llm_mod.FastDecoder(llm).start(cache, P, pad), first, 150)
    assert all(len(set(t)) > 10 for t in theirs), "degenerate tokens make this comparison meaningless"
    monkeypatch.setattr(cuda_decode, "ENABLED", True)
    dec = llm_mod.FastDecoder(llm)
    first, cache, P, pad = _prefill_rows(llm, [30, 9, 21])
    ours = _run_rows(dec.start(cache, P, pad), first, 150, forced=theirs)
    assert dec._rows_step is not None and dec._rows_step._step is not dec._rows_step._forward
    for o, t in zip(ours, theirs, strict=True):
        same = sum(a == b for a, b in zip(o, t, strict=True))
        assert same >= 145, f"{same}/150 tokens equal"


def test_one_launch_step_only_where_every_block_fits(monkeypatch):
    """PersistentStep's barrier needs all its blocks resident: no SM count, too few SMs, or an MPS share of the GPU
    (the SM count overstates what is resident) fall back to FusedStep."""
    llm = _small(mx.bfloat16)
    plans = llm_mod.FastDecoder(llm)._layer_plans()
    monkeypatch.setattr(cuda_persistent, "sm_count", lambda: None)
    assert cuda_persistent.make(llm, plans) is None
    monkeypatch.setattr(cuda_persistent, "sm_count", lambda: 3)  # fewer than the 4 query heads
    assert cuda_persistent.make(llm, plans) is None
    monkeypatch.setattr(cuda_persistent, "sm_count", lambda: 132)
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "50")
    assert cuda_persistent.make(llm, plans) is None
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "100")
    monkeypatch.setattr(cuda_persistent, "ENABLED", False)
    assert cuda_persistent.make(llm, plans) is None
    monkeypatch.setattr(cuda_persistent, "ENABLED", True)
    monkeypatch.setattr(cuda_persistent, "kernel", lambda *args, **kwargs: None)  # no NVRTC off CUDA
    step = cuda_persistent.make(llm, plans)
    assert isinstance(step, cuda_persistent.PersistentStep) and step.options["grid"][0] == 132 * 32 * cuda_persistent.NW


# 40 and 64 rows of other prompt lengths (3 and 4 row tiles of 16 in PersistentRows)
ROWS_40 = [40 - (i * 7) % 23 for i in range(40)]
ROWS_64 = [25 - (i * 5) % 17 for i in range(64)]


@needs_cuda
@pytest.mark.parametrize("config,lengths", [(SMALL, [30, 9, 21]), (SMALL, ROWS_40), (WIDE, ROWS_64)],
                         ids=["small-3-rows", "small-40-rows", "qwen3-0.6b-widths-64-rows"])
def test_one_launch_rows_step_tokens_match_masked_step(config, lengths, monkeypatch):
    """Teacher-forced on the masked MLX step's tokens, the one-launch batched step (PersistentRows: tensor-core
    products) predicts the same next token at nearly every one of 150 steps in every row, and as often as RowsStep
    does. (The masked step's attention rounds its scores to bf16, where both of these keep float32, so over many
    rows a few near-ties flip in each; RowsStep's rate is the yardstick.)"""
    llm = _small(mx.bfloat16, config)
    assert cuda_rows.fits(llm)
    monkeypatch.setattr(cuda_decode, "ENABLED", False)
    first, cache, P, pad = _prefill_rows(llm, lengths)
    theirs = _run_rows(llm_mod.FastDecoder(llm).start(cache, P, pad), first, 150)
    assert min(len(set(t)) for t in theirs) > 5, "degenerate tokens make this comparison meaningless"
    monkeypatch.setattr(cuda_decode, "ENABLED", True)
    same = {}
    for one_launch in (False, True):
        monkeypatch.setattr(cuda_rows, "ENABLED", one_launch)
        dec = llm_mod.FastDecoder(llm)
        first, cache, P, pad = _prefill_rows(llm, lengths)
        ours = _run_rows(dec.start(cache, P, pad), first, 150, forced=theirs)
        assert isinstance(dec._rows_one, cuda_rows.PersistentRows) == one_launch
        same[one_launch] = [sum(a == b for a, b in zip(o, t, strict=True)) for o, t in zip(ours, theirs, strict=True)]
    total = 150 * len(lengths)
    assert min(same[True]) >= 135, f"tokens equal per row: {same[True]}"
    assert sum(same[True]) >= sum(same[False]) - total // 100, (
        f"PersistentRows {sum(same[True])}/{total}, RowsStep {sum(same[False])}/{total} tokens equal")


def test_one_launch_rows_step_only_where_it_fits(monkeypatch):
    """PersistentRows takes unquantized bf16 models only (mma's operands), a device of compute capability 8.0 or
    later with the shared memory a block needs, every block resident (as PersistentStep), and can be switched off;
    where make() says no, FastDecoder keeps RowsStep."""
    llm = _small(mx.bfloat16)
    plans = llm_mod.FastDecoder(llm)._layer_plans()
    assert cuda_rows.fits(llm) and not cuda_rows.fits(_small(mx.float32))
    quantized = _small(mx.bfloat16)
    nn.quantize(quantized, group_size=64, bits=4)
    assert not cuda_rows.fits(quantized)
    h200 = {16: 132, 75: 9, 97: 232448}  # SMs, compute capability major, opt-in shared memory a block
    monkeypatch.setattr(cuda_persistent, "device_attribute", lambda code: None)
    assert cuda_rows.make(llm, plans) is None
    need = cuda_rows.shared_bytes(llm) + cuda_rows.static_bytes(llm)  # ptxas: 37,568 static bytes at 64 rows
    monkeypatch.setattr(cuda_persistent, "device_attribute", lambda code: {**h200, 97: need - 1}[code])
    assert cuda_rows.make(llm, plans) is None
    monkeypatch.setattr(cuda_persistent, "device_attribute", lambda code: {**h200, 75: 7}[code])
    assert cuda_rows.make(llm, plans) is None
    monkeypatch.setattr(cuda_persistent, "device_attribute", lambda code: {**h200, 97: need}[code])
    monkeypatch.setattr(cuda_rows, "kernel", lambda *args, **kwargs: None)  # no NVRTC off CUDA
    monkeypatch.setattr(cuda_rows, "ENABLED", False)
    assert cuda_rows.make(llm, plans) is None
    monkeypatch.setattr(cuda_rows, "ENABLED", True)
    monkeypatch.setattr(cuda_persistent, "ENABLED", False)  # the batch-of-one step's switch is its own
    step = cuda_rows.make(llm, plans)
    assert isinstance(step, cuda_rows.PersistentRows) and step.blocks == 132
    with pytest.raises(ValueError, match="2 to 64 rows"):
        step.start([], 5, [0] * 65)
