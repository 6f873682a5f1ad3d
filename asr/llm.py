"""Qwen3 through mlx-lm, fed with spliced embeddings; greedy decoding with a KV cache.

Reference: funasr/models/fun_asr_nano/model.py::inference_llm (`llm.generate(inputs_embeds=...)` with the bare
default generation config: greedy, stop on eos 151645, max_new_tokens=512).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.models import qwen3
from mlx_lm.models.cache import make_prompt_cache

from .errors import ModelLoadError, TranscriptionCancelled

SYNC_EVERY = 8  # decode steps queued lazily per host sync (token-exact: extra steps are discarded)


def build_llm(config: dict) -> qwen3.Model:
    """A Qwen3 model from `Qwen3-0.6B/config.json` (weights are set later, strictly)."""
    if config.get("model_type") not in ("qwen3", None) and "Qwen3" not in str(config.get("architectures")):
        raise ModelLoadError(f"the LLM config is {config.get('model_type')!r}, expected qwen3")
    try:
        args = qwen3.ModelArgs.from_dict({"model_type": "qwen3", **config})
        return qwen3.Model(args)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"invalid Qwen3 config.json: {exc}") from exc


@dataclass
class DecodeResult:
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "repetition"
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    warnings: list[str] = field(default_factory=list)


StopCheck = Callable[[list[int]], bool]


def greedy_decode(
    model: qwen3.Model,
    embeds: mx.array,
    *,
    eos_ids: set[int],
    max_new_tokens: int,
    cancel: threading.Event | None = None,
    repetition_check: StopCheck | None = None,
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
            if repetition_check is not None and repetition_check(tokens):
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
