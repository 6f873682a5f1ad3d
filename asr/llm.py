"""Qwen3 through mlx-lm, fed with spliced embeddings; greedy decoding with a KV cache.

Reference: funasr/models/fun_asr_nano/model.py::inference_llm (`llm.generate(inputs_embeds=...)` with the bare
default generation config: greedy, stop on eos 151645, max_new_tokens=512).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen3
from mlx_lm.models.activations import swiglu

from . import cpu_llm, cuda_decode, cuda_persistent, cuda_rows
from .errors import ModelLoadError, TranscriptionCancelled
from .inflight import InFlight
from .kept import KeptOn

SYNC_EVERY = 8  # decode steps queued lazily per host sync (token-exact: extra steps are discarded)
CACHE_STEP = 128  # the fast decoder's KV cache grows by this many positions (each size is compiled once)
FAST_DECODE = True  # False: step through mlx-lm's own model and cache (A/B switch for benchmarks)
NUMPY_ON_CPU = True  # fp32 LLM on the CPU: prefill and decode through asr.cpu_llm (A/B switch for benchmarks)

COMPILE_DECODE: bool | None = None  # None: compile the fast step on GPUs only (A/B switch for benchmarks)


class HFRoPE(nn.Module):
    """Rotate-half RoPE with Hugging Face's float32 inverse frequencies, optionally rounded to bf16.

    The official code builds the LLM and casts it with `.to(bfloat16)` (llm_conf.llm_dtype: bf16) before any
    fp32 use, which also rounds the `rotary_emb.inv_freq` buffer to bf16; every later forward pass uses those
    rounded frequencies (ref: funasr/models/fun_asr_nano/model.py::__init__, `self.llm = model.to(dtype)`).
    """

    def __init__(self, dims: int, base: float, round_to_bf16: bool):
        super().__init__()
        self.dims = dims
        inv = 1.0 / (np.float32(base) ** (np.arange(0, dims, 2, dtype=np.float32) / np.float32(dims)))
        if round_to_bf16:
            inv = np.array(mx.array(inv).astype(mx.bfloat16).astype(mx.float32))
        self.inv_freq = inv.astype(np.float32)  # NumPy, not a parameter (asr.cpu_llm multiplies by it)
        self._freqs = mx.array((1.0 / inv.astype(np.float64)).astype(np.float32))  # mx.fast.rope takes periods

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)


def build_llm(config: dict, rope_bf16: bool = True) -> qwen3.Model:
    """A Qwen3 model from `Qwen3-0.6B/config.json` (weights are set later, strictly)."""
    if config.get("model_type") not in ("qwen3", None) and "Qwen3" not in str(config.get("architectures")):
        raise ModelLoadError(f"the LLM config is {config.get('model_type')!r}, expected qwen3")
    try:
        args = qwen3.ModelArgs.from_dict({"model_type": "qwen3", **config})
        model = qwen3.Model(args)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"invalid Qwen3 config.json: {exc}") from exc
    if args.rope_scaling and args.rope_scaling.get("rope_type", args.rope_scaling.get("type")) not in (None, "default"):
        raise ModelLoadError(f"unsupported rope_scaling {args.rope_scaling!r} in the Qwen3 config")
    for layer in model.layers:
        layer.self_attn.rope = HFRoPE(args.head_dim, args.rope_theta, rope_bf16)
    return model


@dataclass
class DecodeResult:
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "repetition"
    prefill_s: float
    decode_s: float
    prompt_tokens: int


def greedy_decode(
    model: qwen3.Model,
    embeds: mx.array,
    *,
    eos_ids: set[int],
    max_new_tokens: int,
    cancel: threading.Event | None = None,
    repetition_guard: bool = True,
) -> DecodeResult:
    """Greedy decoding of one sequence from prompt embeddings `embeds` [1, P, D] (a batch of one)."""
    return greedy_decode_batch(model, [embeds[0]], eos_ids=eos_ids, max_new_tokens=max_new_tokens, cancel=cancel,
                               repetition_guard=repetition_guard)[0]


def last_logits(model, dummy: mx.array, cache, embeds: mx.array) -> mx.array:
    """Prefill: run the prompt into `cache`; logits of the last position only, [B, 1, V].

    The LM head (151936 x 1024) is applied to one row, not to every prompt position: for a 46-token prompt that
    saves ~7 GFLOP and a [B, P, 151936] fp32 buffer (~200 MB at batch 4 with 30 s segments).
    """
    if not isinstance(model, qwen3.Model):  # a wrapped model (tests) keeps its own call
        return model(dummy, cache=cache, input_embeddings=embeds)[:, -1:, :]
    return _lm_head(model, _prefill_last(model, cache, embeds))


def on_numpy(model) -> bool:
    """Whether greedy decoding of this LLM runs on asr.cpu_llm's NumPy runner (a CPU, weights it takes)."""
    return NUMPY_ON_CPU and cpu_llm.applies(model)


def embeds_dtype(model, weights_dtype: mx.Dtype) -> mx.Dtype:
    """The dtype to build this LLM's prompt embeddings in: fp32 where it computes in fp32 whatever its weights
    (the NumPy runner on fp32 weights, or on bf16 ones through asr.cpu_gemv: so a bf16 LLM there gives the fp32
    LLM's numbers), else its weights' dtype."""
    return mx.float32 if on_numpy(model) and cpu_llm.fp32_arithmetic(model) else weights_dtype


def prefill_cache(model: qwen3.Model, left_pad: list[int]) -> list:
    """mlx-lm KV caches for the prefill of len(left_pad) rows, each left-padded by left_pad[b] positions. A batch
    of one needs no padding mask: mlx-lm's plain cache gives causal attention (MLX's fused kernel)."""
    from mlx_lm.models.cache import BatchKVCache, KVCache

    cache = [KVCache() if len(left_pad) == 1 else BatchKVCache(left_pad) for _ in model.layers]
    for c in cache:  # mlx-lm allocates (and zero-fills) 256 positions; the decode step grows by CACHE_STEP
        c.step = CACHE_STEP
    return cache


def _prefill_last(model: qwen3.Model, cache: list, embeds: mx.array) -> mx.array:
    """mlx-lm's `Qwen3Model.__call__` on prompt embeddings [B, P, D] into `cache`: the normed hidden state of the
    last position, [B, 1, D]. The layers' graph reaches the device a chunk at a time (asr.inflight), so a large
    batch's prefill does not hold every layer's intermediates at once; small batches are one chunk, as before."""
    m = model.model
    mask = qwen3.create_attention_mask(embeds, cache[0])
    bound = InFlight(prefill_layer_bytes(model.args, *embeds.shape[:2], embeds.dtype))
    h = embeds
    for layer, c in zip(m.layers, cache, strict=True):
        h = bound(layer(h, mask, c))
    return m.norm(h[:, -1:, :])  # RMSNorm is per position: the last one's norm alone is the same value


def prefill_layer_bytes(args: qwen3.ModelArgs, B: int, P: int, dtype: mx.Dtype) -> int:
    """An upper bound on the intermediates one Qwen3 layer allocates in a prefill of [B, P] positions (for
    asr.inflight): per position 8 hidden widths, 4 of the query heads, 6 of the kv heads and 3 of the MLP
    (norms, projections, RoPE, attention out, residuals, gate/up/SwiGLU), plus fp32 attention scores."""
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    per_position = 8 * args.hidden_size + 4 * q + 6 * kv + 3 * args.intermediate_size
    return B * P * (dtype.size * per_position + 4 * args.num_attention_heads * P)


def _lm_head(model: qwen3.Model, h: mx.array) -> mx.array:
    """Logits of hidden states h: the tied embedding or the separate head."""
    return model.model.embed_tokens.as_linear(h) if model.args.tie_word_embeddings else model.lm_head(h)


def teacher_forced_logits(model: qwen3.Model, embeds: mx.array, token_ids: list[int]) -> mx.array:
    """Logits predicting each of `token_ids` given the prompt and the previous ids: [len(ids), vocab] fp32."""
    if not token_ids:
        return mx.zeros((0, model.args.vocab_size))
    ids = mx.array(token_ids, dtype=mx.int32)[None]
    tok_emb = model.model.embed_tokens(ids).astype(embeds.dtype)
    full = mx.concatenate([embeds, tok_emb], axis=1)
    dummy = mx.zeros(full.shape[:2], dtype=mx.int32)
    logits = model(dummy, cache=None, input_embeddings=full)
    p = embeds.shape[1]
    return logits[0, p - 1 : p - 1 + len(token_ids)].astype(mx.float32)


def find_loop(tokens: list[int], max_period: int = 32, min_span: int = 32, min_repeats: int = 4) -> int | None:
    """If `tokens` ends in a degenerate loop, return the length to keep (up to the loop's first copy).

    A loop is the last p tokens repeated k times back to back, with k >= min_repeats and p*k >= min_span
    (e.g. one token 32 times, a 4-token phrase 8 times, a 16-token sentence 4 times).
    """
    n = len(tokens)
    for p in range(1, max_period + 1):
        k_needed = max(min_repeats, -(-min_span // p))
        if p * k_needed > n:
            break
        unit = tokens[n - p:]
        if all(tokens[n - (i + 1) * p: n - i * p] == unit for i in range(1, k_needed)):
            k = k_needed
            while p * (k + 1) <= n and tokens[n - (k + 1) * p: n - k * p] == unit:
                k += 1
            return n - (k - 1) * p
    return None


def greedy_decode_batch(
    model: qwen3.Model,
    prompts: list[mx.array],
    *,
    eos_ids: set[int],
    max_new_tokens: int,
    cancel: threading.Event | None = None,
    repetition_guard: bool = True,
) -> list[DecodeResult]:
    """Greedy decoding of several prompts [P_i, D] at once: left padding + per-row positions.

    Each row gets the same positions (0..P_i-1) and the same causal attention as when decoded alone, so the
    tokens equal one-by-one decoding (up to float summation order).
    """
    lengths = [int(p.shape[0]) for p in prompts]
    P = max(lengths)
    padded = mx.stack([mx.pad(p, [(P - n, 0), (0, 0)]) for p, n in zip(prompts, lengths, strict=True)])
    return greedy_decode_padded(model, padded, lengths, eos_ids=eos_ids, max_new_tokens=max_new_tokens,
                                cancel=cancel, repetition_guard=repetition_guard)


def greedy_decode_padded(
    model: qwen3.Model,
    padded: mx.array,
    lengths: list[int],
    *,
    eos_ids: set[int],
    max_new_tokens: int,
    cancel: threading.Event | None = None,
    repetition_guard: bool = True,
) -> list[DecodeResult]:
    """greedy_decode_batch on prompts already left-padded into one array [B, P, D] (zeros before each prompt's
    `lengths[b]` rows)."""
    B, P = padded.shape[:2]
    left_pad = [P - n for n in lengths]
    t0 = time.perf_counter()
    if on_numpy(model):
        cur, step = cpu_llm.NumpyQwen3.of(model).start(padded, left_pad)
    else:
        cache = prefill_cache(model, left_pad)
        logits = last_logits(model, mx.zeros((B, P), dtype=mx.int32), cache, padded)
        cur = mx.argmax(logits[:, -1, :], axis=-1).astype(mx.int32)
        step = _stepper(model, cache, P, left_pad)
    mx.eval(cur)
    prefill_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    tokens, finish = _decode_loop(step, cur, B, eos_ids, max_new_tokens, cancel, repetition_guard)
    decode_s = time.perf_counter() - t1
    return [DecodeResult(tokens=t, finish_reason=f, prefill_s=prefill_s, decode_s=decode_s, prompt_tokens=n)
            for t, f, n in zip(tokens, finish, lengths, strict=True)]


# --- the decode loop -------------------------------------------------------------------------------------
def _decode_loop(step, first: mx.array, batch: int, eos_ids: set[int], max_new_tokens: int,
                 cancel: threading.Event | None, repetition_guard: bool) -> tuple[list[list[int]], list[str]]:
    """Run `step` (tokens [B] -> next tokens [B], lazily) from `first`, reading tokens back every SYNC_EVERY steps.

    Each step is handed to the device as soon as it is built (async_eval), so the device works while Python
    builds the next one; the host waits only at a sync. Steps past a row's stop are computed but dropped.
    """
    tokens: list[list[int]] = [[] for _ in range(batch)]
    finish = ["length"] * batch
    active = set(range(batch))
    cur, produced = first, 0
    while active and produced < max_new_tokens:
        if cancel is not None and cancel.is_set():
            raise TranscriptionCancelled("transcription cancelled")
        seq = [cur]
        mx.async_eval(cur)
        for _ in range(min(SYNC_EVERY, max_new_tokens - produced) - 1):
            seq.append(step(seq[-1]))
            mx.async_eval(seq[-1])
        block = mx.stack(seq, axis=1).tolist()  # [B, k]: the one host sync of this block
        produced += len(seq)
        for b in sorted(active):
            out = tokens[b]
            for tok in block[b]:
                if tok in eos_ids:
                    finish[b] = "stop"
                    break
                out.append(tok)
                if repetition_guard and (keep := find_loop(out)) is not None:
                    del out[keep:]
                    finish[b] = "repetition"
                    break
                if len(out) >= max_new_tokens:
                    break
            if finish[b] != "length" or len(out) >= max_new_tokens:
                active.discard(b)
        if active and produced < max_new_tokens:
            cur = step(seq[-1])
    return tokens, finish


def _stepper(model, cache: list, prompt_slots: int, left_pad: list[int]):
    """A decode step function for `model` after prefill into the mlx-lm `cache`.

    mlx-lm Qwen3 models get the fixed-shape fast path (FastDecoder); anything else that follows the mlx-lm
    call convention (tests wrap the model) is stepped through its own __call__ and cache.
    """
    if FAST_DECODE and isinstance(model, qwen3.Model):
        return FastDecoder.of(model).start(cache, prompt_slots, left_pad)

    def step(tok: mx.array) -> mx.array:
        return mx.argmax(model(tok[:, None], cache=cache)[:, -1, :], axis=-1).astype(mx.int32)

    return step


# --- fixed-shape decode steps ----------------------------------------------------------------------------
class _FusedLinear:
    """One or several bias-free linear layers on the same input as one product (q|k|v, gate|up, o, down).

    Several layers' weights are concatenated once; the original layers' parameters are replaced by row slices of
    them (views: no extra memory), so the mlx-lm modules (prefill, teacher forcing) keep working unchanged. The
    transposed weight is prepared once, so a step adds no transpose per product.
    """

    def __init__(self, layers: list[nn.Module]):
        first = layers[0]
        self.quantized = isinstance(first, nn.QuantizedLinear)
        if any("bias" in m for m in layers) or any(type(m) is not type(first) for m in layers):
            raise TypeError("only bias-free layers of one kind can be fused")
        names = [k for k in ("weight", "scales", "biases") if k in first]
        if self.quantized:
            self.group_size, self.bits, self.mode = first.group_size, first.bits, first.mode
        self.sizes = [int(m["weight"].shape[0]) for m in layers]
        if len(layers) == 1:
            self.params = {k: first[k] for k in names}
        else:
            self.params = {k: mx.concatenate([m[k] for m in layers], axis=0) for k in names}
            mx.eval(self.params)
            offset = 0
            for m, n in zip(layers, self.sizes, strict=True):
                for k in names:
                    setattr(m, k, self.params[k][offset: offset + n])
                offset += n
            mx.eval([m.parameters() for m in layers])
        self._w_t = None if self.quantized else self.params["weight"].T

    @property
    def weight(self) -> mx.array:
        """The (fused) weight [N, K]."""
        return self.params["weight"]

    def __call__(self, x: mx.array) -> mx.array:
        """x [B, K] -> [B, N].

        On the CPU, MLX hands every product to cblas_sgemm; with OpenBLAS, sgemm with one row (M=1) is 2-3x slower
        than the same product with the weight as the left operand (w @ x.T, M=N rows, one column): 5.6 -> 3.0 ms
        per Qwen3 layer on the project's 2-core machine. On GPUs the plain form is kept.
        """
        p = self.params
        if self.quantized:
            return mx.quantized_matmul(x, p["weight"], scales=p["scales"], biases=p.get("biases"), transpose=True,
                                       group_size=self.group_size, bits=self.bits, mode=self.mode)
        if x.shape[0] <= 8 and mx.default_device() == mx.cpu:
            return (p["weight"] @ x.T).T
        return x @ self._w_t


class FastDecoder(KeptOn):
    """Greedy decode steps for an mlx-lm Qwen3 on MLX (GPUs; on a CPU only for non-fp32 LLMs, see cpu_llm).

    - q/k/v and gate/up are fused into one matmul each (4 matmuls a layer instead of 7);
    - a batch of one on CUDA runs `asr.cuda_persistent.PersistentStep` (the whole step in one kernel launch), or
      where that cannot run `asr.cuda_decode.FusedStep` (five custom kernels a layer, one compiled step);
      a bf16 batch of 2..64 rows on CUDA runs `asr.cuda_rows.PersistentRows` (that step in one launch too, with
      tensor-core products); larger batches and quantized models on CUDA run `asr.cuda_decode.RowsStep` (MLX's
      products with two custom kernels in between, eight kernels a layer, one compiled step);
    - elsewhere a batch of one (`_start_single`) needs no attention mask: it attends over the cache up to the current
      position (a slice), so MLX uses its single-query attention kernel; built op by op on prepared arrays;
    - batches of several prompt lengths (`_start_masked`) keep a fixed-size KV cache (CACHE_STEP positions at a
      time) written with `slice_update` at a position held in an array and read under a mask, so shapes do not
      change from one step to the next and the step is `mx.compile`d on GPUs (traced once per (batch, cache
      size)). The CPU does not compile (MLX compiles CPU kernels with the system C++ compiler, which may be
      absent).
    Tokens equal mlx-lm's own step (same layers, same cache contents; masked positions add exact zeros).
    """

    ATTR = "_fast_decoder"  # FastDecoder.of(model): built on first use, kept on the model (asr.kept)

    def __init__(self, model: qwen3.Model):
        self.model = model
        # per layer: q|k|v, gate|up, o, down
        self.fused = [(_FusedLinear([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                       _FusedLinear([layer.mlp.gate_proj, layer.mlp.up_proj]),
                       _FusedLinear([layer.self_attn.o_proj]), _FusedLinear([layer.mlp.down_proj]))
                      for layer in model.model.layers]
        self._plans: list[_LayerPlan] | None = None
        self._fused_step: cuda_persistent.PersistentStep | cuda_decode.FusedStep | None = None
        self._rows_step: cuda_decode.RowsStep | None = None
        self._rows_one: cuda_rows.PersistentRows | bool | None = None  # False: cannot run here (cuda_rows.make)
        compile_ = COMPILE_DECODE if COMPILE_DECODE is not None else mx.default_device().type == mx.gpu
        self._step = mx.compile(self._forward) if compile_ else self._forward

    def start(self, cache: list, prompt_slots: int, left_pad: list[int]):
        """Take over an mlx-lm prefill cache as growable buffers (`_decode_buffer`); return a step function tokens
        [B] -> [B]."""
        kv = [[_decode_buffer(c.keys, prompt_slots), _decode_buffer(c.values, prompt_slots)] for c in cache]
        if cuda_decode.available(self.model, len(left_pad)):
            if self._fused_step is None:
                self._fused_step = cuda_persistent.make(self.model, self._layer_plans()) or cuda_decode.FusedStep(
                    self.model, self._layer_plans())
            return self._fused_step.start(kv, prompt_slots)
        if cuda_decode.rows_available(self.model):
            if 1 < len(left_pad) <= cuda_rows.MAX_ROWS:
                if self._rows_one is None:
                    self._rows_one = cuda_rows.make(self.model, self._layer_plans()) or False
                if self._rows_one:
                    return self._rows_one.start(kv, prompt_slots, left_pad)
            if self._rows_step is None:
                self._rows_step = cuda_decode.RowsStep(self.model, self._layer_plans())
            return self._rows_step.start(kv, prompt_slots, left_pad)
        if left_pad == [0]:
            return self._start_single(kv, prompt_slots)
        return self._start_masked(kv, prompt_slots, left_pad)

    def _start_masked(self, kv: list, prompt_slots: int, left_pad: list[int]):
        """Rows of different prompt lengths: fixed-size caches under a mask, one compiled step (on GPUs)."""
        # the position lives on the device and is advanced by the step itself (no host->device copy per token)
        state = {"kv": kv, "slot": prompt_slots, "at": mx.array(prompt_slots, dtype=mx.int32)}
        pad = mx.array(left_pad, dtype=mx.int32)

        def step(tok: mx.array) -> mx.array:
            slot = state["slot"]
            nxt, state["kv"], state["at"] = self._step(tok, state["at"], pad, _with_room(state["kv"], slot))
            state["slot"] = slot + 1
            return nxt

        return step

    def _start_single(self, kv: list, prompt_slots: int):
        """The step for a batch of one: nothing is padded, so attention needs no mask.

        Attention reads the cache up to the current position (a slice), which lets MLX use its single-query
        attention kernel. With a mask, MLX 0.32's CUDA backend falls back to unfused attention (a matmul, the mask,
        a softmax, a matmul and their copies in every layer): 4.5 of 8 ms a step on an H100
        (tools/gpu/probe_step.py). The shapes grow by one position a step, so this step is not compiled.
        """
        plans = self._layer_plans()
        state = {"kv": kv, "slot": prompt_slots}

        def step(tok: mx.array) -> mx.array:
            slot = state["slot"]
            state["kv"] = _with_room(state["kv"], slot)
            state["slot"] = slot + 1
            return self._forward_single(plans, tok, slot, state["kv"])

        return step

    def _layer_plans(self) -> list[_LayerPlan]:
        if self._plans is None:
            self._plans = [_LayerPlan.of(layer, *products)
                           for layer, products in zip(self.model.model.layers, self.fused, strict=True)]
        return self._plans

    def _forward_single(self, plans: list[_LayerPlan], tok: mx.array, slot: int, kv: list) -> mx.array:
        """One step of a batch of one at cache position `slot` (a Python int); writes the caches in place.

        Built op by op in Python every step, so it calls MLX's functions directly on prepared arrays
        (`_LayerPlan`) rather than through the modules: 1.6 -> 1.3 ms of Python a step on the 2-core VM."""
        rms_norm, rope, sdpa = mx.fast.rms_norm, mx.fast.rope, mx.fast.scaled_dot_product_attention
        m = self.model.model
        x = m.embed_tokens(tok)  # [1, D]
        end = slot + 1
        for p, (k_cache, v_cache) in zip(plans, kv, strict=True):
            q, k, v = mx.split(p.qkv(rms_norm(x, p.ln1, p.eps)), p.split, axis=-1)
            q = rope(rms_norm(q.reshape(p.q_shape), p.q_norm, p.eps), p.rope_dims, traditional=False, base=None,
                     scale=1.0, offset=slot, freqs=p.freqs)
            k = rope(rms_norm(k.reshape(p.kv_shape), p.k_norm, p.eps), p.rope_dims, traditional=False, base=None,
                     scale=1.0, offset=slot, freqs=p.freqs)
            k_cache[:, :, slot:end, :] = k
            v_cache[:, :, slot:end, :] = v.reshape(p.kv_shape)
            o = sdpa(q, k_cache[:, :, :end], v_cache[:, :, :end], scale=p.scale)
            x = x + p.o(o.reshape(1, -1))
            gate, up = mx.split(p.gate_up(rms_norm(x, p.ln2, p.eps)), 2, axis=-1)
            x = x + p.down(swiglu(gate, up))
        logits = _lm_head(self.model, m.norm(x))
        return mx.argmax(logits, axis=-1).astype(mx.int32)

    def _forward(self, tok: mx.array, slot: mx.array, left_pad: mx.array, kv: list) -> tuple[mx.array, list, mx.array]:
        """One step: tokens [B] at cache position `slot` (row b's RoPE position is slot - left_pad[b]).

        Returns the next tokens, the updated caches and slot + 1.

        Activations stay 2-D [B, features] so every projection is one plain [B, K] x [K, N] product: a [B, 1, K]
        input makes MLX run B separate M=1 products (slow for quantized weights on CUDA at small B, and a weight
        copy per call on the CPU).
        """
        m = self.model.model
        x = m.embed_tokens(tok)  # [B, D]
        B = x.shape[0]
        cap = kv[0][0].shape[2]
        pos = mx.arange(cap)
        mask = ((pos[None] >= left_pad[:, None]) & (pos[None] <= slot))[:, None, None, :]  # [B, 1, 1, cap]
        rope_pos = slot - left_pad
        at = slot.reshape(1)
        new_kv = []
        for layer, (qkv, gate_up, o_proj, down), (k_cache, v_cache) in zip(m.layers, self.fused, kv, strict=True):
            a = layer.self_attn
            nq, nk = qkv.sizes[0], qkv.sizes[1]
            q, k, v = mx.split(qkv(layer.input_layernorm(x)), [nq, nq + nk], axis=-1)
            # [B, H*hd] -> [B, H, 1, hd] is a reshape when the sequence length is 1
            q = a.rope(a.q_norm(q.reshape(B, a.n_heads, 1, -1)), offset=rope_pos)
            k = a.rope(a.k_norm(k.reshape(B, a.n_kv_heads, 1, -1)), offset=rope_pos)
            v = v.reshape(B, a.n_kv_heads, 1, -1)
            k_cache = mx.slice_update(k_cache, k.astype(k_cache.dtype), at, axes=(2,))
            v_cache = mx.slice_update(v_cache, v.astype(v_cache.dtype), at, axes=(2,))
            o = mx.fast.scaled_dot_product_attention(q, k_cache, v_cache, scale=a.scale, mask=mask)
            x = x + o_proj(o.reshape(B, -1))
            gate, up = mx.split(gate_up(layer.post_attention_layernorm(x)), 2, axis=-1)
            x = x + down(swiglu(gate, up))
            new_kv.append([k_cache, v_cache])
        logits = _lm_head(self.model, m.norm(x))
        return mx.argmax(logits, axis=-1).astype(mx.int32), new_kv, slot + 1


@dataclass
class _LayerPlan:
    """One decoder layer's arrays and products, looked up once (module attribute access is slow in a hot loop)."""

    ln1: mx.array
    ln2: mx.array
    q_norm: mx.array
    k_norm: mx.array
    eps: float
    freqs: mx.array | None
    rope_dims: int
    scale: float
    split: list[int]
    q_shape: tuple[int, ...]
    kv_shape: tuple[int, ...]
    qkv: _FusedLinear
    o: _FusedLinear
    gate_up: _FusedLinear
    down: _FusedLinear

    @classmethod
    def of(cls, layer, qkv: _FusedLinear, gate_up: _FusedLinear, o: _FusedLinear, down: _FusedLinear) -> _LayerPlan:
        a = layer.self_attn
        head_dim = a.q_norm.weight.shape[0]
        if not isinstance(a.rope, HFRoPE):
            raise TypeError("the batch-of-one step expects asr.llm.HFRoPE (build_llm)")
        return cls(
            ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
            q_norm=a.q_norm.weight, k_norm=a.k_norm.weight, eps=layer.input_layernorm.eps,
            freqs=a.rope._freqs, rope_dims=a.rope.dims, scale=a.scale,
            split=[qkv.sizes[0], qkv.sizes[0] + qkv.sizes[1]],
            q_shape=(1, a.n_heads, 1, head_dim), kv_shape=(1, a.n_kv_heads, 1, head_dim),
            qkv=qkv, o=o, gate_up=gate_up, down=down,
        )


def _round_up(n: int) -> int:
    return -(-n // CACHE_STEP) * CACHE_STEP


def _with_room(kv: list, slot: int) -> list:
    """The [k, v] caches of every layer, grown by CACHE_STEP positions when position `slot` does not fit."""
    if slot < kv[0][0].shape[2]:
        return kv
    return [[_grow(k, slot + CACHE_STEP), _grow(v, slot + CACHE_STEP)] for k, v in kv]


def _decode_buffer(a: mx.array, prompt_slots: int) -> mx.array:
    """A prefill cache buffer [B, H, T, D] (positions 0..prompt_slots-1 written) as a decode cache with room for the
    next position: the buffer itself when it has room (the prefill allocates CACHE_STEP positions at a time), else a
    grown copy. Positions past prompt_slots hold zeros (mlx-lm allocates with zeros) and are read only once written
    or masked."""
    if a.shape[2] > prompt_slots and a.shape[2] % CACHE_STEP == 0:
        return a
    return _grow(a[..., :prompt_slots, :], prompt_slots + 1)


def _grow(a: mx.array, size: int) -> mx.array:
    """`a` [B, H, T, D] zero-padded along T to `size` (rounded up to CACHE_STEP)."""
    extra = _round_up(size) - a.shape[2]
    return a if extra <= 0 else mx.concatenate([a, mx.zeros((*a.shape[:2], extra, a.shape[3]), a.dtype)], axis=2)
