"""The SAN-M encoder layer's attention and FSMN memory on CUDA in two custom kernels (asr.encoder uses them).

On MLX's CUDA backend a layer built from MLX operations is ~23 kernels, and at a batch of one the encoder is bound by
the host (MLX's per-kernel cost; tools/gpu/profile_clip.py: 1,622 kernels, 5 ms of GPU work in 14 ms). Eleven of
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

from .cuda_decode import _on_cuda, kernel

ENABLED = True  # A/B switch (tools/gpu/profile_batch.py, tools/gpu/probe_encoder.py, tests)
# The largest batch the kernels take, per encoder dtype, from tools/gpu/profile_batch.py's A/Bs on H200s (encoder
# alone, segments of 5.6 and 11 s, kernels on / MLX operations, ms). float32 gains at every batch size; with this
# attend kernel: 18.9 / 32.7 at 1, 33.3 / 65.0 at 8, 35.0 / 69.5 at 16, 58.1 / 65.3 at 64 (MLX 0.32 has no fused
# fp32 attention). bfloat16 gains up to 16: 20.5 / 28.8 at 1, 17.7 / 28.4 at 8, 15.2 / 31.0 at 16 (with the
# previous kernel 18.3 / 36.7 and 17.1 / 16.9 at 16: never worse there), not beyond: 27.5 / 18.3 at 32 (previous
# kernel), 40.4 / 34.5 at 64, where MLX's fused bf16 attention (cuDNN's) beats this kernel's FP32 arithmetic.
MAX_BATCH = {mx.float32: 1 << 30, mx.bfloat16: 16}

# one thread per output element (b, t, c) of [B, L, D]; v = qkv[b, t, 2D + c]; valid[b] rows are real, the rest
# (padding) read as zeros and are written as zeros
_FSMN = """
  const int L = qkv_shape[1];
  const int B = qkv_shape[0];
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)B * L * D) return;
  const int c = idx % D;
  const int t = (idx / D) % L;
  const int b = idx / ((size_t)D * L);
  const int n = valid[b];
  if (t >= n) {
    out[idx] = static_cast<T>(0.f);
    return;
  }
  const T* v = qkv + (size_t)b * L * 3 * D + 2 * D + c;
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < KS; ++i) {
    const int s = t + i - LEFT;
    if (s >= 0 && s < n) acc += static_cast<float>(w[c * KS + i]) * static_cast<float>(v[(size_t)s * 3 * D]);
  }
  out[idx] = static_cast<T>(static_cast<float>(static_cast<T>(acc)) + static_cast<float>(v[(size_t)t * 3 * D]));
"""

# grid: B * H * ceil(L / QT) blocks of NW warps; block -> (row b, head h, queries q0..q0+QT-1), QT / NW per warp
_ATTEND = """
  constexpr int DK = D / H;
  constexpr int R = DK / 32;
  constexpr int KT = 32;
  constexpr int QPW = QT / NW;
  __shared__ float kt[DK][KT + 1];
  __shared__ float vt[KT][DK];
  __shared__ __align__(16) float qs[QT][DK];  // read 4 dims at a time
  const int L = qkv_shape[1];
  const int tiles = (L + QT - 1) / QT;
  const int b = blockIdx.x / (H * tiles), h = (blockIdx.x / tiles) % H, q0 = (blockIdx.x % tiles) * QT;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n = valid[b];
  const T* base = qkv + (size_t)b * L * 3 * D + h * DK;
  for (int e = tid; e < QT * DK; e += 32 * NW) {
    const int qi = e / DK, d = e % DK;
    qs[qi][d] = q0 + qi < L ? static_cast<float>(base[(size_t)(q0 + qi) * 3 * D + d]) * SCALE : 0.f;
  }
  float m[QPW], l[QPW], acc[QPW][R];
#pragma unroll
  for (int j = 0; j < QPW; ++j) {
    m[j] = -cuda::std::numeric_limits<float>::infinity();
    l[j] = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) acc[j][r] = 0.f;
  }
  for (int k0 = 0; k0 < n; k0 += KT) {
    __syncthreads();
    for (int e = tid; e < KT * DK; e += 32 * NW) {
      const int key = e / DK, d = e % DK;
      const bool ok = k0 + key < n;
      const T* row = base + (size_t)(k0 + key) * 3 * D + d;
      kt[d][key] = ok ? static_cast<float>(row[D]) : 0.f;
      vt[key][d] = ok ? static_cast<float>(row[2 * D]) : 0.f;
    }
    __syncthreads();
    // scores: every k value read from shared memory serves the warp's QPW queries (q: 4 dims a broadcast load)
    float s[QPW];
#pragma unroll
    for (int j = 0; j < QPW; ++j) s[j] = 0.f;
#pragma unroll 4
    for (int d4 = 0; d4 < DK / 4; ++d4) {
      const float k0v = kt[4 * d4][lane], k1v = kt[4 * d4 + 1][lane];
      const float k2v = kt[4 * d4 + 2][lane], k3v = kt[4 * d4 + 3][lane];
#pragma unroll
      for (int j = 0; j < QPW; ++j) {
        const float4 q = reinterpret_cast<const float4*>(qs[warp * QPW + j])[d4];
        s[j] = fmaf(q.x, k0v, s[j]);
        s[j] = fmaf(q.y, k1v, s[j]);
        s[j] = fmaf(q.z, k2v, s[j]);
        s[j] = fmaf(q.w, k3v, s[j]);
      }
    }
    float p[QPW];
#pragma unroll
    for (int j = 0; j < QPW; ++j) {
      const float sj = k0 + lane < n ? s[j] : -cuda::std::numeric_limits<float>::infinity();
      const float m_new = fmaxf(m[j], warp_max(sj));
      const float corr = expf(m[j] - m_new);
      p[j] = expf(sj - m_new);
      l[j] = l[j] * corr + warp_sum(p[j]);
#pragma unroll
      for (int r = 0; r < R; ++r) acc[j][r] *= corr;
      m[j] = m_new;
    }
    // p v: every v value read serves the QPW queries
#pragma unroll 4
    for (int key = 0; key < KT; ++key) {
      float v[R];
#pragma unroll
      for (int r = 0; r < R; ++r) v[r] = vt[key][lane + 32 * r];
#pragma unroll
      for (int j = 0; j < QPW; ++j) {
        const float pk = __shfl_sync(0xffffffff, p[j], key);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[j][r] += pk * v[r];
      }
    }
  }
#pragma unroll
  for (int j = 0; j < QPW; ++j) {
    const int t = q0 + warp * QPW + j;
    if (t < L) {
      T* o = out + ((size_t)b * L + t) * D + h * DK;
      const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) o[lane + 32 * r] = static_cast<T>(acc[j][r] * inv);
    }
  }
"""

THREADS = 256
QT, NW = 16, 4  # 4 queries a warp: each k and v value read from shared memory serves all four


def applies(x: mx.array, heads: int, dim: int) -> bool:
    """Whether the kernels take this layer input [B, L, dim] here: CUDA, bf16/fp32, a batch within MAX_BATCH, head
    width a multiple of 32."""
    return (ENABLED and _on_cuda() and x.shape[0] <= MAX_BATCH.get(x.dtype, 0)
            and dim % heads == 0 and (dim // heads) % 32 == 0)


def fsmn(qkv: mx.array, weight: mx.array, valid: mx.array, left: int) -> mx.array:
    """qkv [B, L, 3D], depthwise weight [D, K, 1], valid [B] int32 -> the FSMN memory [B, L, D]."""
    B, L, three_d = qkv.shape
    D, K = weight.shape[0], weight.shape[1]
    k = kernel("enc_fsmn", _FSMN, ["qkv", "w", "valid"])
    total = B * L * D
    return k(inputs=[qkv, weight, valid], template=[("T", qkv.dtype), ("D", D), ("KS", K), ("LEFT", left)],
             grid=(-(-total // THREADS) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
             output_shapes=[(B, L, D)], output_dtypes=[qkv.dtype])[0]


def attend(qkv: mx.array, valid: mx.array, heads: int, scale: float) -> mx.array:
    """qkv [B, L, 3D], valid [B] int32 -> attention over each row's valid keys, [B, L, D] (heads side by side)."""
    B, L, three_d = qkv.shape
    D = three_d // 3
    k = kernel("enc_attend", _ATTEND, ["qkv", "valid"], SCALE=scale)
    blocks = B * heads * -(-L // QT)
    return k(inputs=[qkv, valid], template=[("T", qkv.dtype), ("D", D), ("H", heads), ("QT", QT), ("NW", NW)],
             grid=(blocks * 32 * NW, 1, 1), threadgroup=(32 * NW, 1, 1),
             output_shapes=[(B, L, D)], output_dtypes=[qkv.dtype])[0]
