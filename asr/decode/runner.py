"""What a backend provides: an audio runner (encoder, adaptor, CTC decoder) and an LLM runner (prefill, then one
greedy step at a time), chosen once when the model loads (asr.backends.select) and held by the pipeline.

The decode loop, the repetition guard and cancellation are not a runner's business (asr.decode.loop); a runner only
turns prompt embeddings into first tokens and a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx

from ..types import RuntimeInfo


class Step(Protocol):
    """tokens [B] int32 -> the next tokens [B] int32 (may be lazy: the loop evaluates them)."""

    def __call__(self, tokens: mx.array) -> mx.array: ...


class AudioRunner(Protocol):
    description: str

    def encode(self, feats: mx.array, lengths: mx.array | None) -> mx.array:
        """Features [B, L, 560] (lengths [B] valid rows, None: all) -> encoder output [B, L, 512] fp32."""

    def adapt(self, enc: mx.array, lengths: mx.array | None) -> mx.array:
        """Encoder output [B, L, 512] -> adaptor output [B, L, D_llm]."""

    def ctc_decode(self, enc: mx.array, lengths: mx.array | None) -> mx.array:
        """Encoder output [B, L, 512] -> the CTC decoder's output (checkpoints with the CTC head only)."""


class LLMRunner(Protocol):
    description: str
    embeds_dtype: mx.Dtype  # what the prompt embeddings are built in

    def start(self, prompts: mx.array, lengths: list[int]) -> tuple[mx.array, Step]:
        """Prefill prompts left-padded into [B, P, D] (row b's prompt is its last lengths[b] rows): the first
        tokens [B] and the step that continues from them."""

    def warm_batches(self, batch_size: int) -> list[int]:
        """Batch sizes up to `batch_size` whose first use compiles something, for a warm-up."""


@dataclass(frozen=True)
class Runtime:
    """The runners a loaded model uses, and what they are (reported in every result and by the server)."""

    audio: AudioRunner
    llm: LLMRunner
    info: RuntimeInfo
