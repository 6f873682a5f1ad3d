"""asr.cuda_encoder: the SAN-M layer's attention and FSMN kernels against the MLX operations they replace (CUDA only),
and where the encoder uses them."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from asr import cuda_encoder
from asr.attention import attention
from asr.encoder import EncoderConfig, SANMAttention, SenseVoiceEncoder

CUDA = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
needs_cuda = pytest.mark.skipif(not CUDA, reason="MLX's CUDA backend is not available here")


def _close(ours: mx.array, ref: mx.array, dtype) -> None:
    a, b = np.array(ours.astype(mx.float32)), np.array(ref.astype(mx.float32))
    assert a.shape == b.shape
    # MLX's CUDA products run float32 as TF32 (10-bit mantissa), the kernels in float32: they differ by ~1e-4 of
    # the largest value per product
    tol = 2e-3 if dtype == mx.float32 else 2e-2
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), np.abs(a - b).max()


def _masks(lengths: list[int], L: int, dtype):
    valid = mx.arange(L)[None, :] < mx.array(lengths)[:, None]
    return valid[:, :, None].astype(dtype), mx.where(valid, 0.0, -mx.inf)[:, None, None, :].astype(dtype)


def _attn(dtype, seed=0) -> SANMAttention:
    a = SANMAttention(512, 512, 4, 11, 0)
    a.fsmn_weight = mx.random.normal(a.fsmn_weight.shape, key=mx.random.key(seed)) * 0.3
    a.set_dtype(dtype)
    return a


def test_not_used_off_cuda_or_for_large_batches():
    x = mx.zeros((1, 10, 512))
    assert cuda_encoder.applies(x, 4, 512) == (CUDA and mx.default_device() == mx.gpu)
    big = cuda_encoder.MAX_BATCH[mx.bfloat16] + 1
    assert not cuda_encoder.applies(mx.zeros((big, 10, 512), dtype=mx.bfloat16), 4, 512)
    assert not cuda_encoder.applies(x.astype(mx.float16), 4, 512)
    assert not cuda_encoder.applies(x, 5, 500)  # head width 100: not a multiple of 32


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("lengths", [[1], [9], [184], [250], [184, 97, 3]])
def test_fsmn_and_attention_match_mlx(dtype, lengths):
    """Both kernels against the layer's MLX operations (masks for the padded rows of a batch)."""
    B, L = len(lengths), max(lengths)
    a = _attn(dtype)
    x = mx.random.normal((B, L, 512), key=mx.random.key(1)).astype(dtype)
    qkv = a.linear_q_k_v(x)
    mask, attn_mask = _masks(lengths, L, dtype) if B > 1 else (None, None)
    q, k, v = mx.split(qkv, 3, axis=-1)
    valid = mx.array(lengths, dtype=mx.int32)
    _close(cuda_encoder.fsmn(qkv, a.fsmn_weight, valid, a.left_pad), a.fsmn(v, mask), dtype)
    heads = (t.reshape(B, L, 4, 128).transpose(0, 2, 1, 3) for t in (q, k, v))
    ref = attention(*heads, 128**-0.5, attn_mask).transpose(0, 2, 1, 3).reshape(B, L, 512)
    _close(cuda_encoder.attend(qkv, valid, 4, 128**-0.5), ref, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_encoder_with_kernels_matches_without(dtype, monkeypatch):
    """A 3-layer SenseVoice encoder (the real widths), alone and as a padded batch, with and without the kernels."""
    enc = SenseVoiceEncoder(EncoderConfig(num_blocks=2, tp_blocks=1))
    for layer in enc.encoders0 + enc.encoders + enc.tp_encoders:
        layer.self_attn.fsmn_weight = mx.random.normal(layer.self_attn.fsmn_weight.shape) * 0.3
    enc.set_dtype(dtype)
    xs = mx.random.normal((3, 120, 560), key=mx.random.key(2)).astype(dtype)
    lengths = mx.array([120, 77, 31])
    for inputs in ((xs[:1], None), (xs, lengths)):
        ours = enc(*inputs)
        monkeypatch.setattr(cuda_encoder, "ENABLED", False)
        ref = enc(*inputs)
        monkeypatch.setattr(cuda_encoder, "ENABLED", True)
        _close(ours, ref, dtype)  # padded rows included: their queries see the same keys either way
