"""The reference runners: the model's own MLX modules, and mlx-lm's Qwen3 for every decode step.

What Apple Silicon runs (Metal), and what every other backend is measured and checked against. The only additions
to the plain module calls are a bound on what a GPU has queued (asr.backends.mlx.inflight) and a prefill that
applies the LM head to the last position only (asr.model.llm.prefill_last).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models import qwen3

from ...decode.kv import prefill_cache
from ...model.encoder import SANMCore
from ...model.llm import lm_head, prefill_last, prefill_layer_bytes
from ...model.network import FunASRNanoNet
from ...options import RuntimeOptions
from .inflight import InFlight


def _bound(layer_bytes: int, options: RuntimeOptions) -> InFlight:
    return InFlight(layer_bytes, options.inflight_bytes, options.inflight_layers)


class MLXAudio:
    """Encoder, adaptor and CTC decoder as the model's MLX modules."""

    description = "MLX operations"

    def __init__(self, net: FunASRNanoNet, options: RuntimeOptions):
        self.net = net
        self.options = options  # the in-flight bound (inflight_mb, inflight_layers)

    def encode(self, feats: mx.array, lengths: mx.array | None) -> mx.array:
        encoder = self.net.encoder
        x = feats.astype(encoder.tp_norm.weight.dtype)  # the encoder's own dtype
        bound = _bound(encoder.layer_bytes(*x.shape[:2], x.dtype), self.options)
        return encoder(x, lengths, core=self.core(x, lengths), each_layer=bound).astype(mx.float32)

    def core(self, x: mx.array, lengths: mx.array | None) -> SANMCore | None:
        """How the encoder's layers compute attention and memory for input x (None: the model's plain core)."""
        return None

    def adapt(self, enc: mx.array, lengths: mx.array | None) -> mx.array:
        return self.net.adaptor(enc, lengths)

    def ctc_decode(self, enc: mx.array, lengths: mx.array | None) -> mx.array:
        return self.net.ctc_decoder(enc, lengths)


class MLXLLM:
    """mlx-lm's Qwen3: a bounded prefill into mlx-lm's KV caches, then the model's own call for every step (its
    single-query attention for a batch of one, its left-padding mask for a batch)."""

    description = "MLX operations (mlx-lm's Qwen3 step)"

    def __init__(self, llm: qwen3.Model, options: RuntimeOptions):
        self.llm = llm
        self.options = options  # the in-flight bound (inflight_mb, inflight_layers)
        self.embeds_dtype = llm.model.norm.weight.dtype

    def prefill(self, prompts: mx.array, lengths: list[int]) -> tuple[mx.array, list]:
        """The first tokens [B] and the filled mlx-lm caches (also the prefill of asr.backends.cuda's steps)."""
        B, P = prompts.shape[:2]
        cache = prefill_cache(len(self.llm.layers), [P - n for n in lengths])
        bound = _bound(prefill_layer_bytes(self.llm.args, B, P, prompts.dtype), self.options)
        logits = lm_head(self.llm, prefill_last(self.llm, cache, prompts, each_layer=bound))
        return mx.argmax(logits[:, -1, :], axis=-1).astype(mx.int32), cache

    def start(self, prompts: mx.array, lengths: list[int]):
        first, cache = self.prefill(prompts, lengths)

        def step(tokens: mx.array) -> mx.array:
            return mx.argmax(self.llm(tokens[:, None], cache=cache)[:, -1, :], axis=-1).astype(mx.int32)

        return first, step

    def warm_batches(self, batch_size: int) -> list[int]:
        return []
