"""Qwen3 prefill and greedy decode steps on the CPU through NumPy and the process's BLAS, on the model's own weights.

Why a second runner for the CPU: MLX 0.32's CPU backend hands every product to `cblas_sgemm` (a one-row product
packs the whole weight matrix) and evaluates `exp`/`sigmoid` one element at a time. Here one row is a `cblas_sgemv`
that streams the weights at memory speed, and the element-wise math is NumPy's (asr.backends.cpu.blas: the BLAS blas_load
loaded, else NumPy's own). Measured on the project's 2-core VM, Qwen3-0.6B fp32, one token: 71 ms on NumPy's
OpenBLAS against 140 ms (MLX + MKL) and 265 ms (MLX + Debian's OpenBLAS 0.3.21); see docs/performance.md.

The math is mlx-lm's/Hugging Face's Qwen3, step for step: RMSNorm, per-head q/k RMSNorm, rotate-half RoPE with the
model's own inverse frequencies (bf16-rounded like the official code, `llm.HFRoPE`), grouped-query attention
with a causal + left-padding mask, SwiGLU MLP, final norm, tied (or separate) LM head, argmax. The weights are
zero-copy NumPy views of the MLX arrays (no extra memory); activations and the KV cache are NumPy fp32. A bf16
LLM runs here too, its weights staying bf16 bits: with fp32 inputs through asr.backends.cpu.gemv (the numbers of
the fp32 LLM on the same bf16-valued weights, as the official code computes them, at half the bytes a decode step;
`dtype="auto"` on a CPU), or through MKL's bf16 products (asr.backends.cpu.blas, where those beat fp32).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen3

from ...decode.kv import capacity_for
from . import gemv
from .blas import Blas, from_bits, linear, matmul_bits, numpy_serial, to_bits

Products = Literal["fp32", "gemv", "mkl"]  # fp32 weights; bf16 weights through asr.backends.cpu.gemv or MKL


def _np(a: mx.array) -> np.ndarray:
    """A zero-copy NumPy view of an evaluated MLX array (CPU memory): fp32 values, or bf16 bits as uint16."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    mx.eval(a)
    return np.asarray(a)


def _np32(a: mx.array) -> np.ndarray:
    """An fp32 NumPy array of a small MLX array (norm weights): a view if it is fp32, else a converted copy."""
    return _np(a) if a.dtype == mx.float32 else np.asarray(a.astype(mx.float32))


def _rows(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Embedding rows as fp32 (the table holds fp32 values or bf16 bits)."""
    rows = table[ids]
    return from_bits(rows) if rows.dtype == np.uint16 else rows


class _Layer:
    def __init__(self, layer):
        a, mlp = layer.self_attn, layer.mlp
        self.n_heads, self.n_kv, self.scale = a.n_heads, a.n_kv_heads, np.float32(a.scale)
        self.wq, self.wk, self.wv, self.wo = (_np(p.weight) for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
        self.w_gate, self.w_up, self.w_down = (_np(p.weight) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        self.norm1, self.norm2 = _Norm(layer.input_layernorm), _Norm(layer.post_attention_layernorm)
        self.q_norm, self.k_norm = _Norm(a.q_norm), _Norm(a.k_norm)


class _Norm:
    def __init__(self, norm: nn.RMSNorm):
        self.weight, self.eps = _np32(norm.weight), np.float32(norm.eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # np.mean's own sum and division without its Python wrapper (~20 us a call, 113 calls a token)
        ms = np.add.reduce(np.square(x), axis=-1, keepdims=True) / np.float32(x.shape[-1])
        return x * (np.float32(1.0) / np.sqrt(ms + self.eps)) * self.weight


class NumpyQwen3:
    """The model's LLM as NumPy arrays (an LLM runner, asr.decode.runner): `start` prefills a batch, the returned
    step decodes one token per row. products: how its products run ("fp32" for fp32 weights, "gemv" or "mkl" for
    bf16 weights), decided when the model loads."""

    embeds_dtype = mx.float32  # computes in fp32 (except the inputs of MKL's bf16 products)

    def __init__(self, model: qwen3.Model, products: Products, blas: Blas | None = None):
        self.blas = blas or Blas.loaded()
        m = model.model
        self.layers = [_Layer(layer) for layer in m.layers]
        self.embed = _np(m.embed_tokens.weight)
        self.head = self.embed if model.args.tie_word_embeddings else _np(model.lm_head.weight)
        self.norm = _Norm(m.norm)
        self.head_dim = int(model.args.head_dim)
        rope = m.layers[0].self_attn.rope
        inv = getattr(rope, "inv_freq", None)  # llm.HFRoPE (bf16-rounded like the official code)
        if inv is None:  # mlx-lm's own RoPE: Hugging Face's float32 inverse frequencies
            dims = np.arange(0, self.head_dim, 2, dtype=np.float32) / np.float32(self.head_dim)
            inv = 1.0 / (np.float32(model.args.rope_theta) ** dims)
        self.inv_freq = np.asarray(inv, dtype=np.float32)
        if (products == "fp32") != (self.embed.dtype == np.float32):
            raise ValueError(f"products {products!r} do not fit the LLM's {self.embed.dtype} weights")
        self.products = products
        self.description = {"fp32": "NumPy + BLAS, fp32", "gemv": "NumPy, bf16 weights x fp32 inputs (Numba kernels)",
                            "mkl": "NumPy + MKL bf16 products"}[products]
        if products == "gemv":
            gemv.warm()  # compiled (or read from Numba's cache) at load, not in a user's first transcription

    def _mms(self, x: np.ndarray, *ws: np.ndarray) -> tuple[np.ndarray, ...]:
        """x [..., K] @ w[N, K].T for each w (fp32, or bf16 bits: fp32 x through asr.backends.cpu.gemv, or MKL's
        bf16 products with x rounded to bf16 once for all of them)."""
        flat = x.reshape(-1, x.shape[-1])
        if self.products == "gemv":
            outs = [gemv.linear(flat, w) for w in ws]
        elif self.products == "mkl":
            bits = to_bits(flat)
            outs = [matmul_bits(bits, w, self.blas) for w in ws]
        else:
            outs = [linear(flat, w, blas=self.blas) for w in ws]
        return tuple(o.reshape(*x.shape[:-1], w.shape[0]) for o, w in zip(outs, ws, strict=True))

    def _mm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return self._mms(x, w)[0]

    # --- one forward pass over T new positions of every row ----------------------------------------------
    def _rotation(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [B, T, 1, hd/2] of positions [B, T] (fp32 like HF): once per pass, for every layer."""
        theta = positions.astype(np.float32)[..., None] * self.inv_freq
        return np.cos(theta)[:, :, None, :], np.sin(theta)[:, :, None, :]

    def _rope(self, x: np.ndarray, rotation: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """x [B, T, H, hd] rotated (rotate-half convention)."""
        cos, sin = rotation
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def _forward(self, state: _State, x: np.ndarray) -> np.ndarray:
        """x [B, T, D] at cache positions slot..slot+T-1; returns the hidden state of the last position [B, D]."""
        B, T, _ = x.shape
        start = state.slot
        end = start + T
        state.reserve(end)
        q_pos = np.arange(start, end)
        k_pos = np.arange(end)
        # key j is visible to query i of row b if left_pad[b] <= j <= i; a padding query also sees itself so
        # that no softmax row is empty (its output is never attended to by real positions)
        valid = ((k_pos[None, None, :] >= state.left_pad[:, None, None]) & (k_pos[None, None, :] <= q_pos[None, :, None])
                 | (k_pos[None, None, :] == q_pos[None, :, None]))                                    # [B, T, end]
        bias = np.where(valid, np.float32(0.0), np.float32(-np.inf))[:, None, None]               # [B, 1, 1, T, end]
        rotation = self._rotation(q_pos[None, :] - state.left_pad[:, None])  # RoPE positions [B, T]
        for layer, k_cache, v_cache in zip(self.layers, state.k, state.v, strict=True):
            x = x + self._attention(layer, layer.norm1(x), rotation, bias, k_cache, v_cache, start)
            h = layer.norm2(x)
            gate, up = self._mms(h, layer.w_gate, layer.w_up)
            with np.errstate(over="ignore"):  # exp(-gate) -> inf gives silu = -0.0, as in fp32 elsewhere
                x = x + self._mm(gate / (np.float32(1.0) + np.exp(-gate)) * up, layer.w_down)
        state.slot = end
        return self.norm(x[:, -1])

    def _attention(self, layer: _Layer, h: np.ndarray, rotation: tuple[np.ndarray, np.ndarray], bias: np.ndarray,
                   k_cache: np.ndarray, v_cache: np.ndarray, start: int) -> np.ndarray:
        B, T, _ = h.shape
        hd, H, KV = self.head_dim, layer.n_heads, layer.n_kv
        G = H // KV
        q, k, v = self._mms(h, layer.wq, layer.wk, layer.wv)
        q = self._rope(layer.q_norm(q.reshape(B, T, H, hd)), rotation)
        k = self._rope(layer.k_norm(k.reshape(B, T, KV, hd)), rotation)
        v = v.reshape(B, T, KV, hd)
        end = start + T
        k_cache[:, :, start:end] = k.transpose(0, 2, 1, 3)
        v_cache[:, :, start:end] = v.transpose(0, 2, 1, 3)
        # query head n uses kv head n // G (HF repeat_kv): group the queries by kv head
        qg = q.reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, KV, G * T, hd)
        scores = (qg @ k_cache[:, :, :end].transpose(0, 1, 3, 2)) * layer.scale  # [B, KV, G*T, end]
        scores = scores.reshape(B, KV, G, T, end) + bias
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = (scores / scores.sum(axis=-1, keepdims=True)).reshape(B, KV, G * T, end)
        out = (probs @ v_cache[:, :, :end]).reshape(B, KV, G, T, hd).transpose(0, 3, 1, 2, 4)
        return self._mm(out.reshape(B, T, H * hd), layer.wo)

    def _next(self, h: np.ndarray) -> np.ndarray:
        return np.argmax(self._mm(h, self.head), axis=-1).astype(np.int32)

    def _threads(self):
        """NumPy's own BLAS (the attention products) on one thread while the loaded BLAS computes the weight
        products; without one, NumPy's BLAS computes everything on all its threads."""
        if self.products != "fp32" or self.blas.sgemm is not None:
            return numpy_serial()
        return contextlib.nullcontext()

    # --- prefill + steps ---------------------------------------------------------------------------------
    def warm_batches(self, batch_size: int) -> list[int]:
        return []

    def start(self, embeds: mx.array, lengths: list[int]):
        """Prefill left-padded prompt embeddings [B, P, D]; returns (first tokens [B], step tokens [B] -> [B])."""
        x = np.array(embeds.astype(mx.float32))  # a copy: the caller's array stays untouched
        B, P = x.shape[:2]
        n_kv = self.layers[0].n_kv
        left_pad = np.asarray([P - n for n in lengths], dtype=np.int64)
        state = _State(B, len(self.layers), n_kv, self.head_dim, left_pad)
        with self._threads():
            first = self._next(self._forward(state, x))

        def step(tok: mx.array) -> mx.array:
            ids = np.asarray(tok, dtype=np.int64)
            with self._threads():
                return mx.array(self._next(self._forward(state, _rows(self.embed, ids)[:, None, :])))

        return mx.array(first), step


class _State:
    """The KV cache of one batch ([B, KV, capacity, hd] per layer) and the next position."""

    def __init__(self, batch: int, layers: int, kv_heads: int, head_dim: int, left_pad: np.ndarray):
        self.shape = (batch, kv_heads, 0, head_dim)
        self.k = [np.zeros(self.shape, np.float32) for _ in range(layers)]
        self.v = [np.zeros(self.shape, np.float32) for _ in range(layers)]
        self.left_pad = left_pad
        self.slot = 0

    def reserve(self, end: int) -> None:
        cap = self.k[0].shape[2]
        if end <= cap:
            return
        grown = capacity_for(end)
        for caches in (self.k, self.v):
            for i, c in enumerate(caches):
                new = np.zeros((*self.shape[:2], grown, self.shape[3]), np.float32)
                new[:, :, :cap] = c
                caches[i] = new
