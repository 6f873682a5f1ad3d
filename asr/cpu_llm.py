"""Qwen3 prefill and greedy decode steps on the CPU through NumPy and the process's BLAS, on the model's own weights.

Why a second runner for the CPU: MLX 0.32's CPU backend hands every product to `cblas_sgemm` (a one-row product
packs the whole weight matrix) and evaluates `exp`/`sigmoid` one element at a time. Here one row is a `cblas_sgemv`
that streams the weights at memory speed, and the element-wise math is NumPy's (asr.cpu_blas: the BLAS asr._blas
loaded, else NumPy's own). Measured on the project's 2-core VM, Qwen3-0.6B fp32, one token: 71 ms on NumPy's
OpenBLAS against 140 ms (MLX + MKL) and 265 ms (MLX + Debian's OpenBLAS 0.3.21); see docs/performance.md. On a
GPU (Metal, CUDA) MLX runs the LLM (`llm.FastDecoder`); this file is CPU-only.

The math is mlx-lm's/Hugging Face's Qwen3, step for step: RMSNorm, per-head q/k RMSNorm, rotate-half RoPE with the
model's own inverse frequencies (bf16-rounded like the official code, `llm.HFRoPE`), grouped-query attention
with a causal + left-padding mask, SwiGLU MLP, final norm, tied (or separate) LM head, argmax. The weights are
zero-copy NumPy views of the MLX arrays (no extra memory); activations and the KV cache are NumPy fp32. A bf16
LLM runs here too (`bf16_products`), its weights staying bf16 bits: with fp32 inputs through asr.cpu_gemv (the
numbers of the fp32 LLM on the same bf16-valued weights, as the official code computes them, at half the bytes a
decode step; `dtype="auto"` on a CPU), or through MKL's bf16 products where those beat fp32 (asr.cpu_bf16).
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen3

from . import cpu_bf16, cpu_blas, cpu_gemv
from .kept import KeptOn

CACHE_STEP = 128  # KV cache positions added at a time


def bf16_products() -> str | None:
    """How a bf16 LLM's products run on this CPU: "mkl" (asr.cpu_bf16: MKL's bf16 kernels, each input rounded to
    bf16) where they beat fp32 (Intel CPUs with AMX/AVX512-BF16), else "gemv" (asr.cpu_gemv: fp32 inputs, the bf16
    weights widened on the fly), else "mkl" where MKL has them at all, else None (MLX's own, slow)."""
    if cpu_bf16.preferred():
        return "mkl"
    if cpu_gemv.available():
        return "gemv"
    return "mkl" if cpu_bf16.available() else None


def bf16_preferred() -> bool:
    """Whether a bf16 LLM is the faster one on this CPU (so `dtype="auto"` picks it): through asr.cpu_gemv, which
    reads half of fp32's bytes a decode step, or through MKL where its bf16 kernels beat fp32 (asr.cpu_bf16)."""
    return cpu_bf16.preferred() or bf16_products() == "gemv"


def fp32_arithmetic(model) -> bool:
    """Whether this runner computes an LLM it `applies` to in fp32: fp32 weights, or bf16 ones through
    asr.cpu_gemv (llm.embeds_dtype then builds the prompt in fp32 too)."""
    return model.model.norm.weight.dtype == mx.float32 or bf16_products() == "gemv"


def applies(model) -> bool:
    """True for an mlx-lm Qwen3 with plain fp32 weights (or bf16 ones where `bf16_products()` has a path) while MLX
    computes on the CPU."""
    if mx.default_device() != mx.cpu or not isinstance(model, qwen3.Model):
        return False
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.Linear | nn.QuantizedLinear | nn.Embedding)]
    if not all(type(m) in (nn.Linear, nn.Embedding) for m in linears):
        return False
    dtypes = {m.weight.dtype for m in linears}
    return dtypes == {mx.float32} or (dtypes == {mx.bfloat16} and bf16_products() is not None)


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
    return cpu_bf16.from_bits(rows) if rows.dtype == np.uint16 else rows


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


def _product(flat: np.ndarray, w: np.ndarray) -> np.ndarray:
    """flat [M, K] @ w[N, K].T for fp32 w (asr.cpu_blas: the process's BLAS, else NumPy)."""
    return cpu_blas.linear(flat, w)


class NumpyQwen3(KeptOn):
    """The model's LLM as NumPy arrays: `start` prefills a batch, the returned step decodes one token per row.
    `NumpyQwen3.of(model)` builds it on first use and keeps it on the model (asr.kept)."""

    ATTR = "_numpy_qwen3"

    def __init__(self, model: qwen3.Model):
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
        # the bf16 weights' products, decided once ("gemv", "mkl"; None for fp32 weights), not per product
        self.bf16 = bf16_products() if self.embed.dtype == np.uint16 else None
        if self.bf16 == "gemv":
            cpu_gemv.warm()  # at build time (the model's warm-up), not in a user's first transcription

    def _mms(self, x: np.ndarray, *ws: np.ndarray) -> tuple[np.ndarray, ...]:
        """x [..., K] @ w[N, K].T for each w (fp32, or bf16 bits: fp32 x through asr.cpu_gemv, or MKL's bf16
        products, asr.cpu_bf16, with x rounded to bf16 once for all of them)."""
        flat = x.reshape(-1, x.shape[-1])
        if self.bf16 == "gemv":
            outs = [cpu_gemv.linear(flat, w) for w in ws]
        elif self.bf16 == "mkl":
            bits = cpu_bf16.to_bits(flat)
            outs = [cpu_bf16.matmul_bits(bits, w) for w in ws]
        else:
            outs = [_product(flat, w) for w in ws]
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
        products (asr.cpu_blas); without one, NumPy's BLAS computes everything on all its threads."""
        if self.bf16 is not None or cpu_blas.available():
            return cpu_blas.numpy_serial()
        return contextlib.nullcontext()

    # --- prefill + steps ---------------------------------------------------------------------------------
    def start(self, embeds: mx.array, left_pad: list[int]):
        """Prefill left-padded prompt embeddings [B, P, D]; returns (first tokens [B], step tokens [B] -> [B])."""
        x = np.array(embeds.astype(mx.float32))  # a copy: the caller's array stays untouched
        B = x.shape[0]
        n_kv = self.layers[0].n_kv
        state = _State(B, len(self.layers), n_kv, self.head_dim, np.asarray(left_pad, dtype=np.int64))
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
        grown = -(-end // CACHE_STEP) * CACHE_STEP
        for caches in (self.k, self.v):
            for i, c in enumerate(caches):
                new = np.zeros((*self.shape[:2], grown, self.shape[3]), np.float32)
                new[:, :, :cap] = c
                caches[i] = new
