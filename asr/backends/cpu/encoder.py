"""The SAN-M audio encoder on the CPU through NumPy and the process's BLAS, on the model's own weights.

Why a second runner for the CPU: MLX 0.32's CPU backend evaluates a SAN-M layer's ~40 element-wise operations one
at a time, each a pass of its own (a LayerNorm ~0.6 ms, the FSMN memory ~2 ms, the softmax's `exp` one element at a
time), so an encoder layer of an 11 s clip cost ~13 ms, of which its four products were 7.5 ms. Here every product
is one BLAS call on strided views (q, k and v are read in place from the fused qkv output, each head's scores are
one call, biases and residuals ride in the call's C += A B^T), and the rest are NumPy's vectorised passes. Measured
on the project's 2-core VM (docs/performance.md): see "CPU encoder".

Products go to `cblas_sgemm` of the BLAS that blas_load loaded (MKL or OpenBLAS; asr.backends.cpu.blas), else to
NumPy's matmul; a bf16 encoder (`encoder_dtype="bfloat16"`, where MKL has bf16 products) multiplies its bf16 weights
through MKL's bf16 kernels with each input rounded to bf16. Attention and everything else stay fp32 (the checkpoint's
norms and biases are bf16 values, so their fp32 copies here are exact).

Each utterance of a padded batch runs on its own valid rows: the mask of the MLX encoder makes a valid row's value
independent of the padding, so the values agree (to rounding) and padding costs nothing; padded rows come out 0.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...model.encoder import SenseVoiceEncoder, sinusoidal_position_encoding
from .blas import Blas, gemm, to_bits


def _np(a: mx.array) -> np.ndarray:
    """An fp32 NumPy array of an MLX array (a zero-copy view where it is fp32, else an exact widened copy)."""
    if a.dtype != mx.float32:
        a = a.astype(mx.float32)
    mx.eval(a)
    return np.asarray(a)


class _Linear:
    """A linear layer's weight [out, in] (fp32, or the bf16 bits of a bf16 weight, zero-copy) and fp32 bias."""

    def __init__(self, layer: nn.Linear, blas: Blas):
        self.blas = blas
        self.bf16 = layer.weight.dtype == mx.bfloat16
        if self.bf16:
            bits = layer.weight.view(mx.uint16)
            mx.eval(bits)
            self.weight = np.asarray(bits)
        else:
            self.weight = _np(layer.weight)
        self.bias = _np(layer.bias) if "bias" in layer else None

    def into(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out += x @ weight.T (the bias not included)."""
        return gemm(to_bits(x) if self.bf16 else x, self.weight, out, beta=1.0, blas=self.blas)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x @ weight.T + bias."""
        out = np.empty((x.shape[0], self.weight.shape[0]), np.float32)
        if self.bias is None:
            out[...] = 0.0
        else:
            out[...] = self.bias
        return self.into(x, out)


class _LayerNorm:
    def __init__(self, norm: nn.LayerNorm):
        self.weight, self.bias, self.eps = _np(norm.weight), _np(norm.bias), np.float32(norm.eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = np.float32(x.shape[-1])
        y = x - np.add.reduce(x, axis=-1, keepdims=True) / n
        var = np.add.reduce(np.square(y), axis=-1, keepdims=True) / n
        y *= np.float32(1.0) / np.sqrt(var + self.eps)
        y *= self.weight
        y += self.bias
        return y


class _Layer:
    def __init__(self, layer: nn.Module, blas: Blas):
        self.blas = blas
        a = layer.self_attn
        self.residual = layer.residual
        self.heads = a.heads
        self.norm1, self.norm2 = _LayerNorm(layer.norm1), _LayerNorm(layer.norm2)
        self.qkv, self.out = _Linear(a.linear_q_k_v, blas), _Linear(a.linear_out, blas)
        self.w_1, self.w_2 = _Linear(layer.feed_forward.w_1, blas), _Linear(layer.feed_forward.w_2, blas)
        self.taps = np.ascontiguousarray(_np(a.fsmn_weight)[:, :, 0].T)  # [K, C]
        self.left_pad = a.left_pad

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [L, D_in] -> [L, D]: pre-norm SAN-M attention + FSMN memory, then the pre-norm feed-forward."""
        qkv = self.qkv(self.norm1(x))
        dim = qkv.shape[1] // 3
        v = qkv[:, 2 * dim:]
        y = self._memory(v)  # FSMN(v) + v
        y += self.out.bias
        if self.residual:
            y += x
        att = attention(qkv[:, :dim], qkv[:, dim: 2 * dim], v, self.heads, self.blas)  # q, k, v read in place
        self.out.into(att, y)  # y = x + linear_out(attention) + memory
        return add_feed_forward(y, self.norm2, self.w_1, self.w_2)

    def _memory(self, v: np.ndarray) -> np.ndarray:
        """v plus its depthwise convolution over time (zero padding), tap by tap."""
        L, C = v.shape
        K = self.taps.shape[0]
        padded = np.zeros((L + K - 1, C), np.float32)
        padded[self.left_pad: self.left_pad + L] = v
        out = v.copy()
        tmp = np.empty((L, C), np.float32)
        for i in range(K):
            np.multiply(padded[i: i + L], self.taps[i], out=tmp)
            out += tmp
        return out


def add_feed_forward(y: np.ndarray, norm: _LayerNorm, w_1: _Linear, w_2: _Linear) -> np.ndarray:
    """y += w_2(relu(w_1(norm(y)))), in place; returns y."""
    f = w_1(norm(y))
    np.maximum(f, np.float32(0.0), out=f)
    y += w_2.bias
    return w_2.into(f, y)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, blas: Blas) -> np.ndarray:
    """softmax(q k^T / sqrt(d_k)) v per head over [L, D] views (any row stride: columns of a fused qkv output
    are read in place), one BLAS call per head and product; returns [L, D]."""
    L, D = q.shape
    d_k = D // heads
    scores = np.empty((heads, L, L), np.float32)
    for h in range(heads):
        cols = slice(h * d_k, (h + 1) * d_k)
        gemm(q[:, cols], k[:, cols], scores[h], alpha=d_k**-0.5, blas=blas)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.empty((L, D), np.float32)
    for h in range(heads):
        cols = slice(h * d_k, (h + 1) * d_k)
        gemm(scores[h], v[:, cols], out[:, cols], trans_b=False, blas=blas)
    return out


class NumpyEncoder:
    """The encoder's layers as NumPy arrays (views of the MLX weights); calling it runs a padded batch, utterance by
    utterance. Its linear weights are fp32, or bf16 where MKL multiplies them (the rest fp32). blas: what computes
    the products (default: the BLAS loaded in this process)."""

    def __init__(self, encoder: SenseVoiceEncoder, blas: Blas | None = None):
        blas = blas or Blas.loaded()
        self.dim = encoder.cfg.output_size
        self.layers = [_Layer(layer, blas) for layer in encoder.encoders0 + encoder.encoders]
        self.after_norm = _LayerNorm(encoder.after_norm)
        self.tp_layers = [_Layer(layer, blas) for layer in encoder.tp_encoders]
        self.tp_norm = _LayerNorm(encoder.tp_norm)
        self._table = np.zeros((0, encoder.cfg.input_size), np.float32)

    def positions(self, length: int) -> np.ndarray:
        """The first `length` rows of the sinusoidal position table (MLX's own values, grown as needed)."""
        if self._table.shape[0] < length:
            grown = max(length, 2 * self._table.shape[0])
            self._table = _np(sinusoidal_position_encoding(grown, self._table.shape[1]))
        return self._table[:length]

    def one(self, feats: np.ndarray) -> np.ndarray:
        """feats [L, input_size] fp32 -> [L, D]."""
        x = feats * np.float32(math.sqrt(self.dim)) + self.positions(feats.shape[0])
        for layer in self.layers:
            x = layer(x)
        x = self.after_norm(x)
        for layer in self.tp_layers:
            x = layer(x)
        return self.tp_norm(x)

    def __call__(self, xs: mx.array, lengths: mx.array | None = None) -> mx.array:
        """xs [B, L, input_size] fp32, lengths [B] valid rows (None: all) -> [B, L, D] (padded rows 0)."""
        return per_utterance(self.one, xs, lengths, self.dim)


def per_utterance(one, xs: mx.array, lengths: mx.array | None, dim: int) -> mx.array:
    """A padded batch [B, L, D_in] through `one` ([n, D_in] -> [n, dim]) utterance by utterance on its valid rows
    (lengths [B], None: all); padded rows come out 0."""
    B, L, _ = xs.shape
    x = np.ascontiguousarray(_np(xs))
    counts = [L] * B if lengths is None else [int(n) for n in np.asarray(lengths)]
    out = np.zeros((B, L, dim), np.float32)
    for b, n in enumerate(counts):
        if n > 0:
            out[b, :n] = one(x[b, :n])
    return mx.array(out)
