"""asr.backends.cuda.encoder: the SAN-M layer's attention and FSMN kernels (KernelCore) against the plain MLX core
they replace (CUDA only), and which batches take them."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from asr.backends.cuda import encoder as cuda_encoder
from asr.model.encoder import EncoderConfig, MaskedCore, SANMAttention, SenseVoiceEncoder

CUDA = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
needs_cuda = pytest.mark.skipif(not CUDA, reason="MLX's CUDA backend is not available here")


def _close(ours: mx.array, ref: mx.array, dtype) -> None:
    a, b = np.array(ours.astype(mx.float32)), np.array(ref.astype(mx.float32))
    assert a.shape == b.shape
    # MLX's CUDA products run float32 as TF32 (10-bit mantissa), the kernels in float32: they differ by ~1e-4 of
    # the largest value per product
    tol = 2e-3 if dtype == mx.float32 else 2e-2
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), np.abs(a - b).max()


def _attn(dtype, seed=0) -> SANMAttention:
    a = SANMAttention(512, 512, 4, 11, 0)
    a.fsmn_weight = mx.random.normal(a.fsmn_weight.shape, key=mx.random.key(seed)) * 0.3
    a.set_dtype(dtype)
    return a


def test_which_batches_the_kernels_take():
    assert cuda_encoder.takes(1, mx.float32, 4, 512) and cuda_encoder.takes(64, mx.float32, 4, 512)
    big = cuda_encoder.MAX_BATCH[mx.bfloat16] + 1
    assert cuda_encoder.takes(big - 1, mx.bfloat16, 4, 512) and not cuda_encoder.takes(big, mx.bfloat16, 4, 512)
    assert not cuda_encoder.takes(1, mx.float16, 4, 512)
    assert not cuda_encoder.takes(1, mx.float32, 5, 500)  # head width 100: not a multiple of 32


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("lengths", [[1], [9], [184], [250], [184, 97, 3]])
def test_kernel_core_matches_the_plain_core(dtype, lengths):
    """Attention and memory of one layer through the kernels against the plain core (masks for the padded rows)."""
    B, L = len(lengths), max(lengths)
    a = _attn(dtype)
    x = mx.random.normal((B, L, 512), key=mx.random.key(1)).astype(dtype)
    qkv = a.linear_q_k_v(x)
    plain = MaskedCore(mx.array(lengths) if B > 1 else None, L, dtype)
    kernels = cuda_encoder.KernelCore(mx.array(lengths))
    for ours, ref in zip(kernels(a, qkv), plain(a, qkv), strict=True):
        _close(ours, ref, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_encoder_with_kernels_matches_without(dtype):
    """A 3-layer SenseVoice encoder (the real widths), alone and as a padded batch, with and without the kernels."""
    enc = SenseVoiceEncoder(EncoderConfig(num_blocks=2, tp_blocks=1))
    for layer in enc.encoders0 + enc.encoders + enc.tp_encoders:
        layer.self_attn.fsmn_weight = mx.random.normal(layer.self_attn.fsmn_weight.shape) * 0.3
    enc.set_dtype(dtype)
    xs = mx.random.normal((3, 120, 560), key=mx.random.key(2)).astype(dtype)
    lengths = mx.array([120, 77, 31])
    for x, n in ((xs[:1], None), (xs, lengths)):
        ours = enc(x, n, core=cuda_encoder.KernelCore(n if n is not None else mx.array([120])))
        _close(ours, enc(x, n), dtype)  # padded rows included: their queries see the same keys either way
