"""SenseVoiceEncoderSmall: 1 + (num_blocks-1) SAN-M layers, after_norm, tp_blocks SAN-M layers, tp_norm.

Reference: funasr/models/sense_voice/model.py (SinusoidalPositionEncoder, MultiHeadedAttentionSANM,
EncoderLayerSANM, SenseVoiceEncoderSmall).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import cpu_encoder, cuda_encoder
from .attention import attention
from .inflight import InFlight


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


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w_2(nn.relu(self.w_1(x)))


class SANMAttention(nn.Module):
    """Multi-head self-attention plus an FSMN memory (depthwise conv over v)."""

    def __init__(self, in_dim: int, dim: int, heads: int, kernel_size: int, shift: int):
        super().__init__()
        self.heads = heads
        self.linear_q_k_v = nn.Linear(in_dim, 3 * dim)
        self.linear_out = nn.Linear(dim, dim)
        # depthwise Conv1d weight, stored MLX-style [C, K, 1] (torch: [C, 1, K])
        self.fsmn_weight = mx.zeros((dim, kernel_size, 1))
        self.left_pad = (kernel_size - 1) // 2 + shift
        self.right_pad = kernel_size - 1 - self.left_pad

    def fsmn(self, v: mx.array, mask: mx.array | None) -> mx.array:
        if mask is not None:
            v = v * mask
        padded = mx.pad(v, [(0, 0), (self.left_pad, self.right_pad), (0, 0)])
        if mx.default_device() == mx.cpu:
            # MLX's CPU depthwise conv1d costs ~1.3 ms a layer here; kernel_size shifted multiply-adds ~0.4 ms
            # (same sum, tap by tap). GPUs keep the single conv kernel.
            taps = self.fsmn_weight[:, :, 0].T  # [K, C]
            length = v.shape[1]
            c = padded[:, :length] * taps[0]
            for i in range(1, taps.shape[0]):
                c = c + padded[:, i: i + length] * taps[i]
        else:
            c = mx.conv1d(padded, self.fsmn_weight, groups=v.shape[-1])
        out = c + v
        return out * mask if mask is not None else out

    def __call__(self, x: mx.array, mask: mx.array | None, attn_mask: mx.array | None,
                 valid: mx.array | None = None) -> mx.array:
        """valid: [B] int32 valid rows, given when asr.cuda_encoder's kernels take this layer (CUDA)."""
        B, L, _ = x.shape
        if valid is not None:
            qkv = self.linear_q_k_v(x)
            memory = cuda_encoder.fsmn(qkv, self.fsmn_weight, valid, self.left_pad)
            att = cuda_encoder.attend(qkv, valid, self.heads, (qkv.shape[-1] // 3 // self.heads) ** -0.5)
            return self.linear_out(att) + memory
        q, k, v = mx.split(self.linear_q_k_v(x), 3, axis=-1)
        memory = self.fsmn(v, mask)
        d_k = q.shape[-1] // self.heads
        q, k, vh = (t.reshape(B, L, self.heads, d_k).transpose(0, 2, 1, 3) for t in (q, k, v))
        att = attention(q, k, vh, d_k**-0.5, attn_mask)
        att = att.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.linear_out(att) + memory


class SANMLayer(nn.Module):
    def __init__(self, in_dim: int, cfg: EncoderConfig):
        super().__init__()
        self.residual = in_dim == cfg.output_size  # encoders0.0 (560 -> 512) has no residual
        self.norm1 = nn.LayerNorm(in_dim, eps=1e-5)
        self.self_attn = SANMAttention(in_dim, cfg.output_size, cfg.attention_heads, cfg.kernel_size,
                                       cfg.sanm_shfit)
        self.norm2 = nn.LayerNorm(cfg.output_size, eps=1e-5)
        self.feed_forward = FeedForward(cfg.output_size, cfg.linear_units)

    def __call__(self, x: mx.array, mask: mx.array | None, attn_mask: mx.array | None,
                 valid: mx.array | None = None) -> mx.array:
        y = self.self_attn(self.norm1(x), mask, attn_mask, valid)
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

    def __call__(self, xs: mx.array, lengths: mx.array | None = None) -> mx.array:
        """xs: [B, L, input_size] fp32 features; lengths: [B] valid rows (None: all valid)."""
        if cpu_encoder.applies(self):  # the CPU: NumPy and the BLAS, utterance by utterance (asr.cpu_encoder)
            return cpu_encoder.NumpyEncoder.of(self)(xs, lengths)
        B, L, D = xs.shape
        mask = attn_mask = rows = None
        if cuda_encoder.applies(xs, self.cfg.attention_heads, self.cfg.output_size):
            # CUDA: each layer's attention and FSMN in two kernels (asr.cuda_encoder), masked by the row counts
            rows = (lengths if lengths is not None else mx.full((B,), L)).astype(mx.int32)
        elif lengths is not None:
            valid = mx.arange(L)[None, :] < lengths[:, None]                      # [B, L]
            mask = valid[:, :, None].astype(xs.dtype)
            attn_mask = mx.where(valid, 0.0, -mx.inf)[:, None, None, :].astype(xs.dtype)
        bound = InFlight(self.layer_bytes(B, L, xs.dtype))  # a batch's intermediates, not the whole graph's
        x = xs * math.sqrt(self.cfg.output_size) + sinusoidal_position_encoding(L, D).astype(xs.dtype)
        for layer in self.encoders0 + self.encoders:
            x = bound(layer(x, mask, attn_mask, rows))
        x = self.after_norm(x)
        for layer in self.tp_encoders:
            x = bound(layer(x, mask, attn_mask, rows))
        return self.tp_norm(x)

    def layer_bytes(self, B: int, L: int, dtype: mx.Dtype) -> int:
        """An upper bound on the intermediates one layer allocates for [B, L] rows (for asr.inflight): 8 widths of
        output_size and 2 of linear_units a row. Measured on an H200: ~257 MB a layer at 64 x 183 rows in fp32,
        where this gives 384 MB."""
        return B * L * dtype.size * (8 * self.cfg.output_size + 2 * self.cfg.linear_units)
