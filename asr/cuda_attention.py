"""Single-query attention for batched decoding on CUDA: one custom kernel instead of MLX's masked fallback.

Batched decoding left-pads the prompts, so every row needs a mask. With an array mask, MLX 0.32's CUDA
`scaled_dot_product_attention` cannot use its single-query kernel and falls back to unfused operations (scale,
two batched products, the mask, a softmax, reshapes for grouped queries) in every layer of every step; on an
H100 that was about half of a decode step (tools/gpu/probe_step.py). This kernel reads each row's valid cache
positions [left_pad[b], slot] directly: no mask array, one launch a layer.

NW warps per (row, query head), each taking every NW-th position, merged at the end; grouped-query attention maps query head h to kv head h // (H // KV). Online
softmax in float32 over the keys, like MLX's and PyTorch's fused kernels. Used only where `available()`:
MLX's CUDA backend; Metal and the CPU keep `mx.fast.scaled_dot_product_attention` with the mask.
"""

from __future__ import annotations

import mlx.core as mx

ENABLED = True  # A/B switch (benchmarks, tools/gpu/probe_step.py)

_SOURCE = """
    constexpr int R = HD / 32;
    const int bh = blockIdx.x;
    const int b = bh / H;
    const int g = (bh % H) / (H / KV);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    __shared__ float ms[NW], ls[NW];
    __shared__ float accs[NW][HD];
    const T* qp = q + (size_t)bh * HD;
    const T* kp = k + (size_t)(b * KV + g) * CAP * HD;
    const T* vp = v + (size_t)(b * KV + g) * CAP * HD;
    float qr[R], acc[R];
    for (int j = 0; j < R; ++j) { qr[j] = static_cast<float>(qp[lane + 32 * j]) * SCALE; acc[j] = 0.0f; }
    float m = -cuda::std::numeric_limits<float>::infinity(), l = 0.0f;
    const int end = slot[0];
    for (int t = left_pad[b] + warp; t <= end; t += NW) {
        const T* kt = kp + (size_t)t * HD;
        float d = 0.0f;
        for (int j = 0; j < R; ++j) d += qr[j] * static_cast<float>(kt[lane + 32 * j]);
        for (int off = 16; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffff, d, off);
        const float m_new = fmaxf(m, d);
        const float corr = expf(m - m_new);
        const float p = expf(d - m_new);
        l = l * corr + p;
        const T* vt = vp + (size_t)t * HD;
        for (int j = 0; j < R; ++j) acc[j] = acc[j] * corr + p * static_cast<float>(vt[lane + 32 * j]);
        m = m_new;
    }
    if (lane == 0) { ms[warp] = m; ls[warp] = l; }
    for (int j = 0; j < R; ++j) accs[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    for (int e = tid; e < HD; e += 32 * NW) {
        float top = -cuda::std::numeric_limits<float>::infinity();
        for (int w = 0; w < NW; ++w) top = fmaxf(top, ms[w]);
        float num = 0.0f, den = 0.0f;
        for (int w = 0; w < NW; ++w) {
            if (ls[w] > 0.0f) {
                const float f = expf(ms[w] - top);
                num += accs[w][e] * f;
                den += ls[w] * f;
            }
        }
        out[(size_t)bh * HD + e] = static_cast<T>(num / den);
    }
"""

NW = 4  # warps per (row, head): they share the positions and merge their partial softmax sums

_kernels: dict[tuple, object] = {}


def kernel(kind: str, source: str, inputs: list[str], header: str = "", outputs: tuple[str, ...] = ("out",),
           **constants: float) -> object:
    """The project's mx.fast.cuda_kernel for `kind` (made once), with float constants written into the source as
    literals (one kernel per value). Shared with asr.cuda_decode."""
    key = (kind, *sorted(constants.items()))
    found = _kernels.get(key)
    if found is None:
        for name, value in constants.items():
            source = source.replace(name, f"{float(value)!r}f")
        found = mx.fast.cuda_kernel(name=f"funasr_{kind}_{len(_kernels)}", input_names=inputs, output_names=list(outputs),
                                    source=source, header=header)
        _kernels[key] = found
    return found


def available(head_dim: int) -> bool:
    cuda = getattr(mx, "cuda", None)
    return ENABLED and head_dim % 32 == 0 and bool(cuda and cuda.is_available()) and mx.default_device() == mx.gpu


def attention(q: mx.array, k_cache: mx.array, v_cache: mx.array, left_pad: mx.array, slot: mx.array,
              scale: float) -> mx.array:
    """q [B, H, 1, hd]; caches [B, KV, cap, hd]; row b attends to positions left_pad[b]..slot (inclusive)."""
    B, H, _, hd = q.shape
    KV, cap = k_cache.shape[1], k_cache.shape[2]
    run = kernel("decode_attention", _SOURCE, ["q", "k", "v", "left_pad", "slot"], SCALE=scale)
    return run(inputs=[q, k_cache, v_cache, left_pad.astype(mx.int32), slot.reshape(1).astype(mx.int32)],
                  template=[("T", q.dtype), ("H", H), ("KV", KV), ("HD", hd), ("CAP", cap), ("NW", NW)],
                  grid=(32 * NW * B * H, 1, 1), threadgroup=(32 * NW, 1, 1),
                  output_shapes=[(B, H, 1, hd)], output_dtypes=[q.dtype])[0]
