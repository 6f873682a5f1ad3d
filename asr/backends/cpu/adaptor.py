"""The audio adaptor (and the CTC decoder, the same module) on the CPU through NumPy and the process's BLAS, as
asr.backends.cpu.encoder does for the encoder.

MLX's CPU backend runs the adaptor's LayerNorms, softmax and activations one operation at a time; here each product
is one BLAS call (asr.backends.cpu.blas) on strided views and the rest NumPy's vectorised passes, and every heavy product of
a CPU transcription stays on the main thread's BLAS. Same math as asr.model.adaptor: Linear-ReLU-Linear, then pre-norm
transformer layers (LayerNorm eps 1e-12, multi-head attention with separate q/k/v, ReLU feed-forward). A padded
batch runs utterance by utterance on its valid rows (the MLX adaptor masks padded keys, so valid rows do not depend
on the padding); padded rows come out 0.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...model.adaptor import Adaptor
from .blas import Blas
from .encoder import _LayerNorm, _Linear, add_feed_forward, attention, per_utterance


class _Block:
    def __init__(self, block: nn.Module, blas: Blas):
        self.blas = blas
        a = block.self_attn
        self.heads = a.heads
        self.norm1, self.norm2 = _LayerNorm(block.norm1), _LayerNorm(block.norm2)
        self.q, self.k, self.v, self.out = (_Linear(m, blas) for m in (a.linear_q, a.linear_k, a.linear_v, a.linear_out))
        self.w_1, self.w_2 = _Linear(block.feed_forward.w_1, blas), _Linear(block.feed_forward.w_2, blas)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [L, D] -> x + attention(norm1(x)), then + feed_forward(norm2(x))."""
        h = self.norm1(x)
        y = x + self.out.bias
        self.out.into(attention(self.q(h), self.k(h), self.v(h), self.heads, self.blas), y)
        return add_feed_forward(y, self.norm2, self.w_1, self.w_2)


class NumpyAdaptor:
    """The adaptor's layers as NumPy arrays (views of the MLX weights); calling it runs a padded batch, utterance by
    utterance. blas: what computes the products (default: the BLAS loaded in this process)."""

    def __init__(self, adaptor: Adaptor, blas: Blas | None = None):
        blas = blas or Blas.loaded()
        self.linear1, self.linear2 = _Linear(adaptor.linear1, blas), _Linear(adaptor.linear2, blas)
        self.blocks = [_Block(b, blas) for b in adaptor.blocks]
        self.dim = adaptor.cfg.llm_dim

    def one(self, x: np.ndarray) -> np.ndarray:
        """x [L, encoder_dim] fp32 -> [L, llm_dim]."""
        h = self.linear1(x)
        np.maximum(h, np.float32(0.0), out=h)
        h = self.linear2(h)
        for block in self.blocks:
            h = block(h)
        return h

    def __call__(self, xs: mx.array, lengths: mx.array | None = None) -> mx.array:
        """xs [B, L, encoder_dim], lengths [B] valid rows (None: all) -> [B, L, llm_dim] (padded rows 0)."""
        return per_utterance(self.one, xs, lengths, self.dim)
