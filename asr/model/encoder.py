"""SenseVoiceEncoderSmall: 1 + (num_blocks-1) SAN-M layers, after_norm, tp_blocks SAN-M layers, tp_norm.

Reference: funasr/models/sense_voice/model.py (SinusoidalPositionEncoder, MultiHeadedAttentionSANM,
EncoderLayerSANM, SenseVoiceEncoderSmall).

Pure MLX. A layer's attention and FSMN memory run through a `SANMCore`: `MaskedCore` (plain MLX operations under
a padding mask) unless the caller passes another one built from the same inputs (a backend's kernels); the rest
of the layer is the same code either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True)
class EncoderConfig:
    input_size: int = 560
    output_size: int = 512
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 50
    tp_blocks: int = 20
    kernel_size: int = 11
    sanm_shfit: int = 0

    @classmethod
    def from_dict(cls, conf: dict, input_size: int) -> EncoderConfig:
        if not conf.get("normalize_before", True) or conf.get("concat_after", False):
            raise ValueError("only normalize_before=True, concat_after=False SAN-M encoders are supported")
        if conf.get("selfattention_layer_type", "sanm") != "sanm":
            raise ValueError(f"unsupported selfattention_layer_type {conf.get('selfattention_layer_type')!r}")
        return cls(
            input_size=input_size,
            output_size=int(conf.get("output_size", 512)),
            attention_heads=int(conf.get("attention_heads", 4)),
            linear_units=int(conf.get("linear_units", 2048)),
            num_blocks=int(conf.get("num_blocks", 50)),
            tp_blocks=int(conf.get("tp_blocks", 20)),
            kernel_size=int(conf.get("kernel_size", 11)),
            sanm_shfit=int(conf.get("sanm_shfit", 0)),
        )


def sinusoidal_position_encoding(length: int, depth: int) -> mx.array:
    """[length, depth] with positions 1..length, sin/cos halves concatenated (fp32)."""
    positions = mx.arange(1, length + 1, dtype=mx.float32)
    increment = math.log(10000.0) / (depth / 2 - 1)
    inv = mx.exp(mx.arange(depth // 2, dtype=mx.float32) * -increment)
    scaled = positions[:, None] * inv[None, :]
    return mx.concatenate([mx.sin(scaled), mx.cos(scaled)], axis=1)


def padding_masks(lengths: mx.array | None, L: int, dtype: mx.Dtype) -> tuple[mx.array | None, mx.array | None]:
    """For rows of `lengths` valid positions out of L: a [B, L, 1] 0/1 row mask and a [B, 1, 1, L] additive key mask
    (-inf on padded keys); (None, None) when nothing is padded."""
    if lengths is None:
        return None, None
    valid = mx.arange(L)[None, :] < lengths[:, None]  # [B, L]
    return valid[:, :, None].astype(dtype), mx.where(valid, 0.0, -mx.inf)[:, None, None, :].astype(dtype)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w_2(nn.relu(self.w_1(x)))


class SANMAttention(nn.Module):
    """Multi-head self-attention plus an FSMN memory (depthwise conv over v), both read from one q|k|v product."""

    def __init__(self, in_dim: int, dim: int, heads: int, kernel_size: int, shift: int):
        super().__init__()
        self.heads = heads
        self.linear_q_k_v = nn.Linear(in_dim, 3 * dim)
        self.linear_out = nn.Linear(dim, dim)
        # depthwise Conv1d weight, stored MLX-style [C, K, 1] (torch: [C, 1, K])
        self.fsmn_weight = mx.zeros((dim, kernel_size, 1))
        self.left_pad = (kernel_size - 1) // 2 + shift
        self.right_pad = kernel_size - 1 - self.left_pad

    def __call__(self, x: mx.array, core: SANMCore) -> mx.array:
        att, memory = core(self, self.linear_q_k_v(x))
        return self.linear_out(att) + memory


class SANMCore(Protocol):
    """A SAN-M layer's attention and FSMN memory from its q|k|v product [B, L, 3D]: (attention [B, L, D] with the
    heads side by side, memory [B, L, D])."""

    def __call__(self, attn: SANMAttention, qkv: mx.array) -> tuple[mx.array, mx.array]: ...


class MaskedCore:
    """The plain `SANMCore`: MLX's attention and depthwise convolution, padded rows masked."""

    def __init__(self, lengths: mx.array | None, L: int, dtype: mx.Dtype):
        self.mask, self.attn_mask = padding_masks(lengths, L, dtype)

    def __call__(self, attn: SANMAttention, qkv: mx.array) -> tuple[mx.array, mx.array]:
        B, L, _ = qkv.shape
        q, k, v = mx.split(qkv, 3, axis=-1)
        memory = self.fsmn(attn, v)
        d_k = q.shape[-1] // attn.heads
        q, k, vh = (t.reshape(B, L, attn.heads, d_k).transpose(0, 2, 1, 3) for t in (q, k, v))
        att = mx.fast.scaled_dot_product_attention(q, k, vh, scale=d_k**-0.5, mask=self.attn_mask)
        return att.transpose(0, 2, 1, 3).reshape(B, L, -1), memory

    def fsmn(self, attn: SANMAttention, v: mx.array) -> mx.array:
        """(conv1d(v * mask) + v * mask) * mask, the conv zero-padded as the layer pads it."""
        if self.mask is not None:
            v = v * self.mask
        padded = mx.pad(v, [(0, 0), (attn.left_pad, attn.right_pad), (0, 0)])
        out = mx.conv1d(padded, attn.fsmn_weight, groups=v.shape[-1]) + v
        return out * self.mask if self.mask is not None else out


class SANMLayer(nn.Module):
    def __init__(self, in_dim: int, cfg: EncoderConfig):
        super().__init__()
        self.residual = in_dim == cfg.output_size  # encoders0.0 (560 -> 512) has no residual
        self.norm1 = nn.LayerNorm(in_dim, eps=1e-5)
        self.self_attn = SANMAttention(in_dim, cfg.output_size, cfg.attention_heads, cfg.kernel_size,
                                       cfg.sanm_shfit)
        self.norm2 = nn.LayerNorm(cfg.output_size, eps=1e-5)
        self.feed_forward = FeedForward(cfg.output_size, cfg.linear_units)

    def __call__(self, x: mx.array, core: SANMCore) -> mx.array:
        y = self.self_attn(self.norm1(x), core)
        x = x + y if self.residual else y
        return x + self.feed_forward(self.norm2(x))


class SenseVoiceEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoders0 = [SANMLayer(cfg.input_size, cfg)]
        self.encoders = [SANMLayer(cfg.output_size, cfg) for _ in range(cfg.num_blocks - 1)]
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=1e-5)
        self.tp_encoders = [SANMLayer(cfg.output_size, cfg) for _ in range(cfg.tp_blocks)]
        self.tp_norm = nn.LayerNorm(cfg.output_size, eps=1e-5)

    def __call__(self, xs: mx.array, lengths: mx.array | None = None, *, core: SANMCore | None = None,
                 each_layer: Callable[[mx.array], mx.array] | None = None) -> mx.array:
        """xs: [B, L, input_size] features; lengths: [B] valid rows (None: all valid).

        core: how each layer computes its attention and memory (default `MaskedCore` for these lengths);
        each_layer: called on every layer's output in order, returning it (a backend bounds what the device has
        queued with it)."""
        B, L, D = xs.shape
        core = core or MaskedCore(lengths, L, xs.dtype)
        x = xs * math.sqrt(self.cfg.output_size) + sinusoidal_position_encoding(L, D).astype(xs.dtype)
        for layer in self.encoders0 + self.encoders:
            x = layer(x, core)
            x = each_layer(x) if each_layer else x
        x = self.after_norm(x)
        for layer in self.tp_encoders:
            x = layer(x, core)
            x = each_layer(x) if each_layer else x
        return self.tp_norm(x)

    def layer_bytes(self, B: int, L: int, dtype: mx.Dtype) -> int:
        """An upper bound on the intermediates one layer allocates for [B, L] rows: 8 widths of output_size and 2 of
        linear_units a row. Measured on an H200: ~257 MB a layer at 64 x 183 rows in fp32, where this gives 384 MB."""
        return B * L * dtype.size * (8 * self.cfg.output_size + 2 * self.cfg.linear_units)
