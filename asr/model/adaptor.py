"""Audio adaptor (and CTC decoder): Linear-ReLU-Linear, then pre-norm transformer layers. Pure MLX.

Reference: funasr/models/llm_asr/adaptor.py::Transformer, funasr/models/transformer/encoder.py::EncoderLayer,
funasr/models/transformer/attention.py::MultiHeadedAttention (LayerNorm eps 1e-12).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .encoder import FeedForward, padding_masks


@dataclass(frozen=True)
class AdaptorConfig:
    encoder_dim: int = 512
    ffn_dim: int = 2048
    llm_dim: int = 1024
    n_layer: int = 2
    attention_heads: int = 8
    downsample_rate: int = 1

    @classmethod
    def from_dict(cls, conf: dict, encoder_dim: int, llm_dim: int | None = None) -> AdaptorConfig:
        if int(conf.get("downsample_rate", 1)) != 1:
            raise ValueError("only adaptor downsample_rate 1 is supported (as in Fun-ASR-Nano)")
        return cls(
            encoder_dim=encoder_dim,
            ffn_dim=int(conf.get("ffn_dim", 2048)),
            llm_dim=int(llm_dim if llm_dim is not None else conf.get("llm_dim", 1024)),
            n_layer=int(conf.get("n_layer", 2)),
            attention_heads=int(conf.get("attention_heads", 8)),
        )


class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, attn_mask: mx.array | None) -> mx.array:
        B, L, D = x.shape
        d_k = D // self.heads
        q, k, v = (lin(x).reshape(B, L, self.heads, d_k).transpose(0, 2, 1, 3)
                   for lin in (self.linear_q, self.linear_k, self.linear_v))
        att = mx.fast.scaled_dot_product_attention(q, k, v, scale=d_k**-0.5, mask=attn_mask)
        return self.linear_out(att.transpose(0, 2, 1, 3).reshape(B, L, D))


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-12)
        self.self_attn = MultiHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-12)
        self.feed_forward = FeedForward(dim, dim // 4)

    def __call__(self, x: mx.array, attn_mask: mx.array | None) -> mx.array:
        x = x + self.self_attn(self.norm1(x), attn_mask)
        return x + self.feed_forward(self.norm2(x))


class Adaptor(nn.Module):
    def __init__(self, cfg: AdaptorConfig):
        super().__init__()
        self.cfg = cfg
        self.linear1 = nn.Linear(cfg.encoder_dim, cfg.ffn_dim)
        self.linear2 = nn.Linear(cfg.ffn_dim, cfg.llm_dim)
        self.blocks = [TransformerLayer(cfg.llm_dim, cfg.attention_heads) for _ in range(cfg.n_layer)]

    def __call__(self, x: mx.array, lengths: mx.array | None = None) -> mx.array:
        """x: [B, L, encoder_dim] -> [B, L, llm_dim]."""
        _, attn_mask = padding_masks(lengths, x.shape[1], x.dtype)
        h = self.linear2(nn.relu(self.linear1(x)))
        for block in self.blocks:
            h = block(h, attn_mask)
        return h
