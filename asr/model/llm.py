"""The LLM: mlx-lm's Qwen3, fed with spliced prompt embeddings. Pure MLX: how it is stepped lives in `asr.decode`
and the backends.

Reference: funasr/models/fun_asr_nano/model.py::inference_llm (`llm.generate(inputs_embeds=...)` with the bare
default generation config: greedy, stop on eos 151645, max_new_tokens=512).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen3

from ..errors import ModelLoadError


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
        self.inv_freq = inv.astype(np.float32)  # NumPy, not a parameter (the CPU backend multiplies by it)
        # the periods mx.fast.rope takes (underscored: a constant of the module, not a parameter)
        self._freqs = mx.array((1.0 / inv.astype(np.float64)).astype(np.float32))

    @property
    def freqs(self) -> mx.array:
        return self._freqs

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


def lm_head(model: qwen3.Model, h: mx.array) -> mx.array:
    """Logits of hidden states h: the tied embedding or the separate head."""
    return model.model.embed_tokens.as_linear(h) if model.args.tie_word_embeddings else model.lm_head(h)


def prefill_last(model: qwen3.Model, cache: list, embeds: mx.array,
                 each_layer: Callable[[mx.array], mx.array] | None = None) -> mx.array:
    """mlx-lm's `Qwen3Model.__call__` on prompt embeddings [B, P, D] into `cache` (mlx-lm KV caches, one a layer),
    returning the normed hidden state of the last position only, [B, 1, D]: the LM head (151936 x 1024) then
    runs on one row, not on every prompt position (for a 46-token prompt ~7 GFLOP and a [B, P, 151936] buffer
    saved). each_layer: called on every layer's output in order, returning it (a backend bounds what the device
    has queued with it)."""
    m = model.model
    mask = qwen3.create_attention_mask(embeds, cache[0])
    h = embeds
    for layer, c in zip(m.layers, cache, strict=True):
        h = layer(h, mask, c)
        h = each_layer(h) if each_layer else h
    return m.norm(h[:, -1:, :])  # RMSNorm is per position: the last one's norm alone is the same value


def prefill_layer_bytes(args: qwen3.ModelArgs, B: int, P: int, dtype: mx.Dtype) -> int:
    """An upper bound on the intermediates one Qwen3 layer allocates in a prefill of [B, P] positions: per position
    8 hidden widths, 4 of the query heads, 6 of the kv heads and 3 of the MLP (norms, projections, RoPE, attention
    out, residuals, gate/up/SwiGLU), plus fp32 attention scores."""
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    per_position = 8 * args.hidden_size + 4 * q + 6 * kv + 3 * args.intermediate_size
    return B * P * (dtype.size * per_position + 4 * args.num_attention_heads * P)


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
