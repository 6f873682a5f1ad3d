"""The CUDA backend's decode steps (asr.backends.cuda.steps, .persistent, .rows) and how its LLM runner picks them.

On any machine: which step takes which batch on which device, and the steps' wiring (which weights feed which kernel,
the position, the KV cache written in place and grown), checked by running the runner with each kernel replaced by
the MLX operations it stands for (steps.Launches) against the reference MLX runner, token for token. On a CUDA
machine (MLX's CUDA backend) the kernels themselves are checked against MLX operations, and the compiled steps
against the reference step.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.models.activations import swiglu

import asr
from asr.backends.cuda import persistent, rows, steps
from asr.backends.cuda.kernels import Device, resident_blocks
from asr.backends.cuda.runners import CUDALLM
from asr.backends.mlx.runners import MLXLLM
from asr.decode.loop import greedy, left_pad
from asr.model.llm import build_llm
from asr.options import RuntimeOptions

UNBOUNDED = RuntimeOptions(inflight_mb=0, inflight_layers=0)  # the reference runner with no in-flight bound

CUDA = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
needs_cuda = pytest.mark.skipif(not CUDA, reason="MLX's CUDA backend is not available here")
H200 = Device(resident_blocks=132, major=9, shared_memory=232448)
NO_ONE_LAUNCH = Device(resident_blocks=None, major=None, shared_memory=None)


def _mlx_gemv(w, x, *, norm=None, eps=0.0, res=None, swiglu_=False, rows=2):
    """What a gemv launch computes, in MLX operations."""
    if norm is not None:
        x = mx.fast.rms_norm(x, norm, eps)
    y = (w @ x[:, None])[:, 0]
    if swiglu_:
        gate, up = mx.split(y, 2)
        return swiglu(gate, up)
    return y if res is None else res + y


def _mlx_attend(qkv, q_norm, k_norm, freqs, slot, left_pad, k_cache, v_cache, *, heads, kv_heads, eps, scale):
    """What an attend launch computes, in MLX operations; the cache write goes to the same Python objects.

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
    """What an add_norm launch computes, in MLX operations."""
    h = x + y
    return h, mx.fast.rms_norm(h, w, eps)


def emulated_launches() -> steps.Launches:
    """The steps' kernel launches as the MLX operations they stand for (same inputs), uncompiled."""

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

    return steps.Launches(gemv=gemv_launch, attend=attend_launch, add_norm=add_norm_launch, compile=False)


@pytest.fixture
def on_cpu():
    """The wiring tests compare token for token, so both sides run on the CPU (on a GPU machine too): there GPU
    kernels may sum in other orders than the emulation, and a random 4-bit model's near-ties flipped."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def _prompts(llm, lengths, seed=4):
    dim = llm.args.hidden_size
    dtype = llm.model.norm.weight.dtype
    keys = mx.random.split(mx.random.key(seed), len(lengths))
    return left_pad([(mx.random.normal((n, dim), key=k) * 0.5).astype(dtype) for n, k in zip(lengths, keys, strict=True)])


def _decode(runner, prompts, steps_: int) -> list[list[int]]:
    outs = greedy(runner, *prompts, eos_ids=set(), max_new_tokens=steps_, repetition_guard=False)
    return [o.tokens for o in outs]


def _run(runner, prompts, n: int, forced: list[list[int]] | None = None) -> list[list[int]]:
    """n greedy steps of a batch through runner.start: [B][n] tokens; with `forced`, step i is fed forced[.][i - 1]
    (teacher forcing on another step's tokens)."""
    first, step = runner.start(*prompts)
    out, cur = [first.tolist()], first
    for i in range(1, n):
        if forced is not None:
            cur = mx.array([f[i - 1] for f in forced], dtype=mx.int32)
        cur = step(cur)
        out.append(cur.tolist())
    return [list(r) for r in zip(*out, strict=True)]


# the smallest Qwen3 whose widths the kernels take (multiples of 256 bf16 values; head_dim a multiple of 64)
SMALL = dict(model_type="qwen3", hidden_size=256, num_hidden_layers=2, intermediate_size=768, num_attention_heads=4,
             num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-6, vocab_size=1000, rope_theta=1000000.0,
             tie_word_embeddings=True, max_position_embeddings=4096)
# Qwen3-0.6B's widths (the model Fun-ASR-Nano decodes with), two layers
WIDE = dict(SMALL, hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
            vocab_size=151936)


def _small(dtype, config=SMALL, bits=None):
    mx.random.seed(11)
    llm = build_llm(config)
    llm.update(tree_map(lambda p: p * 8 if p.ndim == 2 else p, llm.parameters()))  # livelier logits
    llm.set_dtype(dtype)
    if bits:
        nn.quantize(llm, group_size=64, bits=bits)
    mx.eval(llm.parameters())
    return llm


def _runner(llm, device=NO_ONE_LAUNCH, launches=steps.KERNELS, **options):
    return CUDALLM(llm, RuntimeOptions(**options), device=device, launches=launches)


def test_what_the_steps_take(tiny_checkpoint):
    small = _small(mx.bfloat16)
    assert steps.supports(small) and steps.supports(_small(mx.float32))
    assert not steps.supports(_small(mx.float16))  # compiles, but never run on a GPU
    tiny = asr.load_model(str(tiny_checkpoint), dtype="bfloat16", runtime=RuntimeOptions(backend="mlx")).net.llm
    assert not steps.supports(tiny)  # hidden size 64: not a multiple of 256
    q4 = asr.load_model(str(tiny_checkpoint), dtype="bfloat16", quantize=4, runtime=RuntimeOptions(backend="mlx"))
    assert not steps.supports(q4.net.llm) and not steps.supports_rows(q4.net.llm)  # head_dim 32
    small_q4 = _small(mx.bfloat16, bits=4)
    assert steps.supports_rows(small) and steps.supports_rows(small_q4)  # quantized: MLX's products
    assert not steps.supports(small_q4)
    assert not steps.supports_rows(_small(mx.float16))
    small.model.norm.weight = small.model.norm.weight.astype(mx.float32)  # the kernels read one dtype
    assert not steps.supports(small) and not steps.supports_rows(small)


def test_the_runner_picks_a_step_per_batch_and_says_which():
    """A batch of one takes the one-launch step where every block fits, else the fused step; 2-64 rows of a bf16
    LLM the one-launch rows step where the device takes it; other batches RowsStep; an fp16 LLM the reference."""
    llm = _small(mx.bfloat16)
    r = _runner(llm, H200)
    assert isinstance(r.one, persistent.PersistentStep) and isinstance(r.rows_one, rows.PersistentRows)
    assert isinstance(r.rows, steps.RowsStep)
    assert r.description == "CUDA kernels (batch of one: PersistentStep, 2-64 rows: PersistentRows, batches: RowsStep)"
    assert r.warm_batches(64) == [2, 17, 33, 49]
    r = _runner(llm, H200, cuda_one_launch=False)
    assert isinstance(r.one, steps.FusedStep) and r.rows_one is None and r.warm_batches(64) == []
    assert r.description == "CUDA kernels (batch of one: FusedStep, batches: RowsStep)"
    r = _runner(_small(mx.float32), H200)
    assert isinstance(r.one, persistent.PersistentStep) and r.rows_one is None  # mma takes bf16 operands only
    r = _runner(_small(mx.bfloat16, bits=4), H200)
    assert r.one is None and r.rows_one is None and isinstance(r.rows, steps.RowsStep)
    r = _runner(_small(mx.float16), H200)
    assert r.one is None and r.rows is None and r.description == r.reference.description


def test_one_launch_step_only_where_every_block_fits(monkeypatch):
    """PersistentStep's barrier needs all its blocks resident: no SM count, too few SMs, or an MPS share of the GPU
    (the SM count overstates what is resident) fall back to FusedStep."""
    llm = _small(mx.bfloat16)
    plans = steps.prepare(llm)
    assert persistent.make(llm, plans, NO_ONE_LAUNCH) is None
    assert persistent.make(llm, plans, Device(3, 9, 232448)) is None  # fewer than the 4 query heads
    step = persistent.make(llm, plans, H200)
    assert isinstance(step, persistent.PersistentStep) and step.options["grid"][0] == 132 * 32 * persistent.NW
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "50")
    assert resident_blocks() is None


def test_one_launch_rows_step_only_where_it_fits():
    """PersistentRows takes unquantized bf16 models only (mma's operands), a device of compute capability 8.0 or
    later with the shared memory a block needs, and every block resident (as PersistentStep)."""
    llm = _small(mx.bfloat16)
    plans = steps.prepare(llm)
    assert rows.fits(llm) and not rows.fits(_small(mx.float32)) and not rows.fits(_small(mx.bfloat16, bits=4))
    need = rows.shared_bytes(llm) + rows.static_bytes(llm)  # ptxas: 37,568 static bytes at 64 rows
    assert rows.make(llm, plans, NO_ONE_LAUNCH) is None
    assert rows.make(llm, plans, Device(132, 9, need - 1)) is None
    assert rows.make(llm, plans, Device(132, 7, 232448)) is None
    assert rows.make(llm, plans, Device(None, 9, 232448)) is None
    step = rows.make(llm, plans, Device(132, 9, need))
    assert isinstance(step, rows.PersistentRows) and step.blocks == 132
    with pytest.raises(ValueError, match="2 to 64 rows"):
        step.start([], 5, [0] * 65)


@pytest.mark.parametrize("quantize,lengths,steps_", [(None, [21], 150), (None, [30, 9, 21], 150),
                                                     (4, [30, 9, 21], 30)])
def test_steps_wiring_matches_the_reference(tiny_checkpoint, on_cpu, quantize, lengths, steps_):
    """The CUDA runner with its kernels emulated gives the reference runner's tokens: FusedStep for a batch of one
    and RowsStep for rows left-padded differently, for 150 steps (the caches start at 128 positions and grow past
    them); and a 4-bit LLM through RowsStep (30 steps: MLX's CPU quantized products are slow)."""
    llm = asr.load_model(str(tiny_checkpoint), dtype="bfloat16", quantize=quantize,
                         runtime=RuntimeOptions(backend="mlx")).net.llm
    prompts = _prompts(llm, lengths)
    theirs = _decode(MLXLLM(llm, UNBOUNDED), prompts, steps_)
    runner = _runner(llm, launches=emulated_launches())
    if quantize is None:  # the tiny model's widths are not the kernels': the steps take it emulated
        runner.one = steps.FusedStep(llm, steps.prepare(llm), emulated_launches())
    runner.rows = steps.RowsStep(llm, steps.prepare(llm), emulated_launches())
    ours = _decode(runner, prompts, steps_)
    assert all(len(set(t)) > 5 for t in theirs), "degenerate tokens make this comparison meaningless"
    assert ours == theirs


def test_steps_wiring_check_fails_when_miswired(tiny_checkpoint, on_cpu):
    """The comparison above can fail: RowsStep fed the wrong norm (ln1 for ln2) gives other tokens."""
    llm = asr.load_model(str(tiny_checkpoint), dtype="bfloat16", runtime=RuntimeOptions(backend="mlx")).net.llm
    prompts = _prompts(llm, [30, 9, 21])
    theirs = _decode(MLXLLM(llm, UNBOUNDED), prompts, 40)
    runner = _runner(llm)
    plans = steps.prepare(llm)
    for plan in plans:
        plan.ln2 = plan.ln1
    runner.rows = steps.RowsStep(llm, plans, emulated_launches())
    assert _decode(runner, prompts, 40) != theirs


# --- the kernels themselves (CUDA only) ---------------------------------------------------------------------------
def _gemv(w, x, *, norm=None, eps=0.0, res=None, swiglu=False, rows=2):
    """One gemv launch on these arrays (unused inputs: any array)."""
    launch = steps.gemv_launch(w.shape, w.dtype, norm=norm is not None, eps=eps, res=res is not None,
                                     swiglu=swiglu, rows=rows)
    return launch(x, norm if norm is not None else x, w, res if res is not None else x)


def _attend(qkv, q_norm, k_norm, freqs, slot, left_pad, k_cache, v_cache, *, heads, kv_heads, eps, scale, warps,
            par):
    """One attend launch (writes k_cache/v_cache at slot[0] in place)."""
    launch = steps.attend_launch(qkv.dtype, batch=k_cache.shape[0], heads=heads, kv_heads=kv_heads,
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
            launch = steps.gemv_launch(w.shape, dtype, norm=norm is not None, eps=1e-6, argmax=True, rows=4)
            tok = steps.argmax_of_keys(launch(xs, nw, w, xs))
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
    h, n = steps.add_norm_launch(dtype, batch=batch, dim=dim, eps=1e-6)(x, y, w)
    ref_h, ref_n = _mlx_add_norm(x, y, w, 1e-6)
    assert mx.array_equal(h, ref_h).item()
    _close(n, ref_n, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("one_launch", [True, False])
@pytest.mark.parametrize("config", [SMALL, WIDE], ids=["small", "qwen3-0.6b-widths"])
def test_compiled_step_tokens_match_the_reference(dtype, one_launch, config):
    """Teacher-forced on the reference step's tokens (one flipped near-tie would derail a free-running comparison of
    a random model), the one-launch step (PersistentStep) and the compiled fused step (FusedStep) predict the same
    next token at nearly every one of 150 steps."""
    llm = _small(dtype, config)
    prompts = _prompts(llm, [21], seed=5)
    theirs = _run(MLXLLM(llm, UNBOUNDED), prompts, 150)
    assert len(set(theirs[0])) > 10, "degenerate tokens make this comparison meaningless"
    runner = CUDALLM(llm, RuntimeOptions(cuda_one_launch=one_launch))
    assert isinstance(runner.one, persistent.PersistentStep if one_launch else steps.FusedStep)
    ours = _run(runner, prompts, 150, forced=theirs)
    same = sum(a == b for a, b in zip(ours[0], theirs[0], strict=True))
    assert same >= 145, f"{same}/150 tokens equal"


@needs_cuda
@pytest.mark.parametrize("dtype,bits", [(mx.bfloat16, None), (mx.float32, None), (mx.bfloat16, 4)])
def test_compiled_rows_step_tokens_match_the_reference(dtype, bits):
    """Teacher-forced on the reference step's tokens, the compiled RowsStep predicts the same next token at nearly
    every one of 150 steps, for 3 rows left-padded differently (also with a 4-bit LLM)."""
    llm = _small(dtype, bits=bits)
    prompts = _prompts(llm, [30, 9, 21])
    theirs = _run(MLXLLM(llm, UNBOUNDED), prompts, 150)
    assert all(len(set(t)) > 10 for t in theirs), "degenerate tokens make this comparison meaningless"
    runner = CUDALLM(llm, RuntimeOptions(cuda_one_launch=False))  # bf16 batches would take the one-launch step
    assert runner.rows is not None and runner.rows._step is not runner.rows._forward
    ours = _run(runner, prompts, 150, forced=theirs)
    for o, t in zip(ours, theirs, strict=True):
        same = sum(a == b for a, b in zip(o, t, strict=True))
        assert same >= 145, f"{same}/150 tokens equal"


# 40 and 64 rows of other prompt lengths (3 and 4 row tiles of 16 in PersistentRows)
ROWS_40 = [40 - (i * 7) % 23 for i in range(40)]
ROWS_64 = [25 - (i * 5) % 17 for i in range(64)]


@needs_cuda
@pytest.mark.parametrize("config,lengths", [(SMALL, [30, 9, 21]), (SMALL, ROWS_40), (WIDE, ROWS_64)],
                         ids=["small-3-rows", "small-40-rows", "qwen3-0.6b-widths-64-rows"])
def test_one_launch_rows_step_tokens_match_the_reference(config, lengths):
    """Teacher-forced on the reference step's tokens, the one-launch batched step (PersistentRows: tensor-core
    products) predicts the same next token at nearly every one of 150 steps in every row, and as often as RowsStep
    does. (The reference step's attention rounds its scores to bf16, where both of these keep float32, so over many
    rows a few near-ties flip in each; RowsStep's rate is the yardstick.)"""
    llm = _small(mx.bfloat16, config)
    assert rows.fits(llm)
    prompts = _prompts(llm, lengths)
    theirs = _run(MLXLLM(llm, UNBOUNDED), prompts, 150)
    assert min(len(set(t)) for t in theirs) > 5, "degenerate tokens make this comparison meaningless"
    same = {}
    for one_launch in (False, True):
        runner = CUDALLM(llm, RuntimeOptions(cuda_one_launch=one_launch))
        assert isinstance(runner.rows_one, rows.PersistentRows) == one_launch
        ours = _run(runner, prompts, 150, forced=theirs)
        same[one_launch] = [sum(a == b for a, b in zip(o, t, strict=True)) for o, t in zip(ours, theirs, strict=True)]
    total = 150 * len(lengths)
    assert min(same[True]) >= 135, f"tokens equal per row: {same[True]}"
    assert sum(same[True]) >= sum(same[False]) - total // 100, (
        f"PersistentRows {sum(same[True])}/{total}, RowsStep {sum(same[False])}/{total} tokens equal")
