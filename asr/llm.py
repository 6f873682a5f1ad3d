"""Qwen3 through mlx-lm, fed with spliced embeddings; greedy decoding with a KV cache.

Reference: funasr/models/fun_asr_nano/model.py::inference_llm (`llm.generate(inputs_embeds=...)` with the bare
default generation config: greedy, stop on eos 151645, max_new_tokens=512).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen3
from mlx_lm.models.cache import make_prompt_cache

from .errors import ModelLoadError, TranscriptionCancelled

SYNC_EVERY = 8  # decode steps queued lazily per host sync (token-exact: extra steps are discarded)


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
    warnings: list[str] = field(default_factory=list)


def greedy_decode(
    model: qwen3.Model,
    embeds: mx.array,
    *,
    eos_ids: set[int],
    max_new_tokens: int,
    cancel: threading.Event | None = None,
    repetition_guard: bool = True,
) -> DecodeResult:
    """Greedy decoding of one sequence from prompt embeddings `embeds` [1, P, D].

    Steps are chained lazily and synchronised every SYNC_EVERY tokens; tokens after a stop are dropped,
    so the output equals step-by-step greedy decoding.
    """
    cache = make_prompt_cache(model)
    prompt_len = embeds.shape[1]
    t0 = time.perf_counter()
    dummy = mx.zeros((1, prompt_len), dtype=mx.int32)
    logits = model(dummy, cache=cache, input_embeddings=embeds)
    y = mx.argmax(logits[:, -1, :], axis=-1).astype(mx.int32)
    mx.eval(y)
    prefill_s = time.perf_counter() - t0

    def step(tok: mx.array) -> mx.array:
        return mx.argmax(model(tok[:, None], cache=cache)[:, -1, :], axis=-1).astype(mx.int32)

    tokens: list[int] = []
    finish = "length"
    t1 = time.perf_counter()
    cur = y
    while len(tokens) < max_new_tokens:
        if cancel is not None and cancel.is_set():
            raise TranscriptionCancelled("transcription cancelled")
        seq = [cur]
        for _ in range(min(SYNC_EVERY, max_new_tokens - len(tokens)) - 1):
            seq.append(step(seq[-1]))
        mx.eval(seq)
        stop = None
        for tok in mx.concatenate(seq).tolist():
            if tok in eos_ids:
                stop = "stop"
                break
            tokens.append(tok)
            if repetition_guard and (keep := find_loop(tokens)) is not None:
                del tokens[keep:]
                stop = "repetition"
                break
        if stop is not None:
            finish = stop
            break
        cur = step(seq[-1])
    decode_s = time.perf_counter() - t1
    return DecodeResult(tokens=tokens, finish_reason=finish, prefill_s=prefill_s, decode_s=decode_s,
                        prompt_tokens=prompt_len)


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
    from mlx_lm.models.cache import BatchKVCache

    B = len(prompts)
    lengths = [int(p.shape[0]) for p in prompts]
    P = max(lengths)
    D = prompts[0].shape[-1]
    padded = mx.stack([mx.concatenate([mx.zeros((P - n, D), dtype=p.dtype), p]) if n < P else p
                       for p, n in zip(prompts, lengths, strict=True)])
    cache = [BatchKVCache([P - n for n in lengths]) for _ in model.layers]
    t0 = time.perf_counter()
    logits = model(mx.zeros((B, P), dtype=mx.int32), cache=cache, input_embeddings=padded)
    cur = mx.argmax(logits[:, -1, :], axis=-1).astype(mx.int32)
    mx.eval(cur)
    prefill_s = time.perf_counter() - t0

    def step(tok: mx.array) -> mx.array:
        return mx.argmax(model(tok[:, None], cache=cache)[:, -1, :], axis=-1).astype(mx.int32)

    outs = [DecodeResult(tokens=[], finish_reason="length", prefill_s=prefill_s, decode_s=0.0, prompt_tokens=n)
            for n in lengths]
    active = set(range(B))
    t1 = time.perf_counter()
    produced = 0
    while active and produced < max_new_tokens:
        if cancel is not None and cancel.is_set():
            raise TranscriptionCancelled("transcription cancelled")
        seq = [cur]
        for _ in range(min(SYNC_EVERY, max_new_tokens - produced) - 1):
            seq.append(step(seq[-1]))
        mx.eval(seq)
        block = mx.stack(seq, axis=1).tolist()  # [B, k]
        produced += len(seq)
        for b in list(active):
            res = outs[b]
            for tok in block[b]:
                if tok in eos_ids:
                    res.finish_reason = "stop"
                    active.discard(b)
                    break
                res.tokens.append(tok)
                if repetition_guard and (keep := find_loop(res.tokens)) is not None:
                    del res.tokens[keep:]
                    res.finish_reason = "repetition"
                    active.discard(b)
                    break
                if len(res.tokens) >= max_new_tokens:
                    active.discard(b)
                    break
        if active:
            cur = step(seq[-1])
    decode_s = time.perf_counter() - t1
    for r in outs:
        r.decode_s = decode_s
    return outs
