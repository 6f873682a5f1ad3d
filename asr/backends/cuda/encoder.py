"""The SAN-M encoder layer's attention and FSMN memory on CUDA in two custom kernels: `KernelCore`, which the model's
encoder takes in place of its plain `MaskedCore` (asr.model.encoder).

On MLX's CUDA backend a layer built from MLX operations is ~23 kernels, and at a batch of one the encoder is bound by
the host (MLX's per-kernel cost; a profile: 1,622 kernels, 5 ms of GPU work in 14 ms). Eleven of
them are the attention (fp32 has no fused attention kernel in MLX 0.32: scale, transposes, two products, softmax)
and the FSMN (pad, depthwise conv, add). Both kernels read q|k|v straight from the q_k_v product [B, L, 3D]:

- `fsmn`: memory = (conv1d(v * mask, w, groups=D) + v * mask) * mask, the conv zero-padded left/right as the layer
  pads it; one thread per output element.
- `attend`: softmax(q k^T * scale, keys of each row's valid length) v for every head, written as [B, L, D]
  (heads side by side: what `linear_out` reads). A block takes 16 queries of one (row, head), four a warp; the keys
  and values go through shared memory 32 at a time, each lane scoring one key for the warp's four queries, with an
  online softmax.

Rounding follows the operations they replace (each op's result rounded to the encoder dtype, float32 accumulation);
sums run in another order than cuBLAS/cuDNN, so results agree to rounding, not bit for bit.
"""

from __future__ import annotations

import mlx.core as mx

from ...model.encoder import SANMAttention
from .kernels import kernel, source

# The largest batch the kernels take, per encoder dtype, from A/Bs on H200s (encoder
# alone, segments of 5.6 and 11 s, kernels on / MLX operations, ms). float32 gains at every batch size; with this
# attend kernel: 18.9 / 32.7 at 1, 33.3 / 65.0 at 8, 35.0 / 69.5 at 16, 58.1 / 65.3 at 64 (MLX 0.32 has no fused
# fp32 attention). bfloat16 gains up to 16: 20.5 / 28.8 at 1, 17.7 / 28.4 at 8, 15.2 / 31.0 at 16 (with the
# previous kernel 18.3 / 36.7 and 17.1 / 16.9 at 16: never worse there), not beyond: 27.5 / 18.3 at 32 (previous
# kernel), 40.4 / 34.5 at 64, where MLX's fused bf16 attention (cuDNN's) beats this kernel's FP32 arithmetic.
MAX_BATCH = {mx.float32: 1 << 30, mx.bfloat16: 16}

_FSMN = source("encoder_fsmn.cu")
_ATTEND = source("encoder_attend.cu")
THREADS = 256
QT, NW = 16, 4  # 4 queries a warp: each k and v value read from shared memory serves all four


def takes(batch: int, dtype: mx.Dtype, heads: int, dim: int) -> bool:
    """Whether the kernels take a batch of `batch` rows in `dtype`: bf16/fp32, a batch within MAX_BATCH, head width
    a multiple of 32."""
    return batch <= MAX_BATCH.get(dtype, 0) and dim % heads == 0 and (dim // heads) % 32 == 0


class KernelCore:
    """The SAN-M attention and FSMN memory of every layer through the two kernels, each row of the batch masked by
    its valid length (a `SANMCore`)."""

    def __init__(self, valid: mx.array):
        self.valid = valid.astype(mx.int32)

    def __call__(self, attn: SANMAttention, qkv: mx.array) -> tuple[mx.array, mx.array]:
        memory = fsmn(qkv, attn.fsmn_weight, self.valid, attn.left_pad)
        att = attend(qkv, self.valid, attn.heads, (qkv.shape[-1] // 3 // attn.heads) ** -0.5)
        return att, memory


def fsmn(qkv: mx.array, weight: mx.array, valid: mx.array, left: int) -> mx.array:
    """qkv [B, L, 3D], depthwise weight [D, K, 1], valid [B] int32 -> the FSMN memory [B, L, D]."""
    B, L, three_d = qkv.shape
    D, K = weight.shape[0], weight.shape[1]
    k = kernel("enc_fsmn", _FSMN, ("qkv", "w", "valid"))
    total = B * L * D
    return k(inputs=[qkv, weight, valid], template=[("T", qkv.dtype), ("D", D), ("KS", K), ("LEFT", left)],
             grid=(-(-total // THREADS) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
             output_shapes=[(B, L, D)], output_dtypes=[qkv.dtype])[0]


def attend(qkv: mx.array, valid: mx.array, heads: int, scale: float) -> mx.array:
    """qkv [B, L, 3D], valid [B] int32 -> attention over each row's valid keys, [B, L, D] (heads side by side)."""
    B, L, three_d = qkv.shape
    D = three_d // 3
    k = kernel("enc_attend", _ATTEND, ("qkv", "valid"), SCALE=scale)
    blocks = B * heads * -(-L // QT)
    return k(inputs=[qkv, valid], template=[("T", qkv.dtype), ("D", D), ("H", heads), ("QT", QT), ("NW", NW)],
             grid=(blocks * 32 * NW, 1, 1), threadgroup=(32 * NW, 1, 1),
             output_shapes=[(B, L, D)], output_dtypes=[qkv.dtype])[0]
