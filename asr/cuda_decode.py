"""Greedy decode steps on CUDA with few kernels: FusedStep (a batch of one, five custom kernels a layer) and
RowsStep (batches and quantized LLMs: MLX's products with two custom kernels between them; see its docstring).

A decode step built from MLX operations is ~450 kernels, and on MLX's CUDA backend each costs 2.6-4.5 us of host
time, so the step is bound by the host, not by the GPU (tools/gpu/probe_step.py). FusedStep does the same math in
five kernels a layer, and the whole step is one `mx.compile`d function (no Python per operation):

1. `gemv` (matrix-vector: a batch of one reads each weight once) after the input RMSNorm: q|k|v;
2. `attend`: q/k RMSNorm and RoPE, the new k and v written into the KV cache at the current position, and
   single-query attention over positions 0..pos (16 warps per head share the positions, two at a time);
3. `gemv` with the residual add: x + o_proj(attention);
4. `gemv` for gate|up after the post-attention RMSNorm, with SwiGLU: silu(gate) * up;
5. `gemv` with the residual add: x + down_proj(...).

The head is `gemv` after the final norm over the (tied) embedding, which keeps each block's argmax key; the token
is the largest key's row (`argmax_of_keys`), without writing the logits. Rounding follows the
MLX operations it replaces (each op's result is rounded to the model dtype where MLX rounds it), with float32
accumulation; products sum in a different order than cuBLAS, so logits agree to rounding, not bit for bit.

The KV cache is written in place: `attend` receives the cache arrays as inputs and writes position `pos` through
them. That is safe here because the caches belong to the decoder alone, nothing else reads them, and every later
reader (the next step's `attend` of the same layer) depends on this one through the hidden state.

FusedStep is used only where `available()`: MLX's CUDA backend, a batch of one, unquantized bf16 or fp32 weights;
RowsStep where `rows_available()`: MLX's CUDA backend and bf16 or fp32 activations (bf16 batches of 2..64 rows run
asr.cuda_rows.PersistentRows instead where it can run). Metal, the CPU and fp16 models
keep `asr.llm.FastDecoder`'s MLX steps (with MLX's masked attention for batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.activations import swiglu

ENABLED = True  # A/B switch (benchmarks, tools/gpu/probe_step.py)
COMPILE = True  # False: build the step kernel by kernel every time (A/B switch for tools/gpu/probe_step.py)
# key/value positions a warp of `attend` loads at a time (attend_head), read when a step is built. A batch of one is
# bound by the latency of these reads: 8 (asr.cuda_persistent's SCHEDULE starts from it). RowsStep at a batch of 64
# has 1,024 blocks to hide it and fewer registers matter more: 2 (H200, tools/gpu/probe_batch.py --attend-par 8 2
# 8 2: 4.61 / 4.80 ms a step against 5.05 / 5.17 for 8).
ATTEND_PAR = 8
ROWS_ATTEND_PAR = 2

_HEADER = """
template <typename A, typename B> struct same_type { static constexpr bool value = false; };
template <typename A> struct same_type<A, A> { static constexpr bool value = true; };

// *p = v where the types match, nothing otherwise: a kernel's `out` type depends on its mode, and MLX compiles every
// mode's branches (its template constants are constexpr values, not template parameters)
template <typename O, typename V>
__device__ __forceinline__ void store(O* p, V v) {
  if constexpr (same_type<O, V>::value) *p = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, off));
  return v;
}

// the sum of v over the block (every thread gets it); red holds a float per warp
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = 0.f;
  for (int i = 0; i < nw; ++i) t += red[i];
  return t;
}

// the largest of the keys lane 0 of each warp holds, in thread 0 (best: one per warp)
__device__ __forceinline__ unsigned long long block_max_key(unsigned long long key, unsigned long long* best) {
  const int nw = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) best[threadIdx.x >> 5] = key;
  __syncthreads();
  for (int i = 1; i < nw; ++i) key = best[i] > key ? best[i] : key;
  return key;
}

// weight rows row, row + N, ... (NR of W [NR * N, K]) as this lane's 16-byte pieces of every 512-byte chunk, through
// the read-only cache; a row past N reads row N - 1 (its sum is not stored). Loading first and summing later
// (dot_lane) keeps a warp's loads in flight together.
template <typename T, int K, int NR>
__device__ __forceinline__ void load_row(const T* w, int N, int row, uint4 (&raw)[NR][K * (int)sizeof(T) / 512]) {
  constexpr int VEC = 16 / (int)sizeof(T);
  const int lane = threadIdx.x & 31;
  row = row < N ? row : N - 1;
#pragma unroll
  for (int s = 0; s < NR; ++s) {
    const T* wr = w + (size_t)(row + s * N) * K + lane * VEC;
#pragma unroll
    for (int c = 0; c < K * (int)sizeof(T) / 512; ++c) raw[s][c] = __ldg(reinterpret_cast<const uint4*>(wr + c * 32 * VEC));
  }
}

// this lane's part of one loaded row (load_row) times xs [K]
template <typename T, int K>
__device__ __forceinline__ float dot_lane(const uint4 (&raw)[K * (int)sizeof(T) / 512], const float* xs) {
  constexpr int VEC = 16 / (int)sizeof(T);
  const int lane = threadIdx.x & 31;
  float acc = 0.f;
#pragma unroll
  for (int c = 0; c < K * (int)sizeof(T) / 512; ++c) {
    const T* wv = reinterpret_cast<const T*>(&raw[c]);
    const float* xp = xs + (c * 32 + lane) * VEC;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc += static_cast<float>(wv[i]) * xp[i];
  }
  return acc;
}
// a float from an activation: scratch buffers other blocks write in the same launch are read through L2
__device__ __forceinline__ float ldf(const float* p) { return __ldcg(p); }
template <typename T>
__device__ __forceinline__ float ldf(const T* p) { return static_cast<float>(*p); }

// argmax as a max: the rounded value's order in the high half, the row's complement in the low half (the first
// row of the largest value has the largest key); -0 and +0 tie, as in argmax
__device__ __forceinline__ unsigned long long argmax_key(float v, int row) {
  v = v == 0.f ? 0.f : v;
  const unsigned int u = __float_as_uint(v);
  const unsigned int ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ((unsigned long long)ord << 32) | (unsigned long long)(0xFFFFFFFFu - (unsigned int)row);
}

// this lane's R = HD / 32 elements (lane + 32 j) of the head vector src, RMS-normalised with nw and rotated to RoPE
// position pos (rotate-half: element j pairs with j + HD / 2, in this same lane), each op rounded to T as MLX
// rounds it
template <typename T, int HD, typename S>
__device__ __forceinline__ void norm_rope_lane(const S* src, const T* nw, const float* freqs, int pos, float eps,
                                               float (&e)[HD / 32]) {
  constexpr int R = HD / 32;
  constexpr int HALF = R / 2;
  const int lane = threadIdx.x & 31;
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < R; ++j) {
    e[j] = ldf(src + lane + 32 * j);
    ss += e[j] * e[j];
  }
  const float r = rsqrtf(warp_sum(ss) / HD + eps);
#pragma unroll
  for (int j = 0; j < R; ++j) e[j] = static_cast<float>(nw[lane + 32 * j] * static_cast<T>(e[j] * r));
#pragma unroll
  for (int j = 0; j < HALF; ++j) {
    const float inv_freq = 1.0 / freqs[lane + 32 * j];
    const float theta = static_cast<float>(pos) * inv_freq;
    const float c = cosf(theta), s = sinf(theta);
    const float x1 = e[j], x2 = e[j + HALF];
    e[j] = static_cast<float>(static_cast<T>(x1 * c - x2 * s));
    e[j + HALF] = static_cast<float>(static_cast<T>(x1 * s + x2 * c));
  }
}

// a warp's online softmax over the positions t0, t0 + 1, ..., t0 + PAR - 1, then STEP further on, up to `last`
// (kc / vc: [cap, HD] of one kv head; q already scaled): m, l and acc carry the running max, sum and weighted values.
// A warp's PAR key and value rows are all loaded before any is used (a step's attention is bound by the latency of
// these reads); positions past `last` re-read row `last` and weigh nothing.
template <typename T, int HD, int PAR>
__device__ __forceinline__ void attend_span(const float (&q)[HD / 32], const T* kc, const T* vc, int t_begin, int step,
                                            int last, float& m, float& l, float (&acc)[HD / 32]) {
  constexpr int R = HD / 32;
  const int lane = threadIdx.x & 31;
  for (int t0 = t_begin; t0 <= last; t0 += step) {
    T kr[PAR][R], vr[PAR][R];
#pragma unroll
    for (int u = 0; u < PAR; ++u) {
      const size_t t = (size_t)(t0 + u <= last ? t0 + u : last) * HD;
#pragma unroll
      for (int j = 0; j < R; ++j) {
        kr[u][j] = kc[t + lane + 32 * j];
        vr[u][j] = vc[t + lane + 32 * j];
      }
    }
    float d[PAR];
    float m_new = m;
#pragma unroll
    for (int u = 0; u < PAR; ++u) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < R; ++j) s += q[j] * static_cast<float>(kr[u][j]);
      d[u] = warp_sum(s);
      if (t0 + u <= last) m_new = fmaxf(m_new, d[u]);
    }
    const float corr = expf(m - m_new);
    l *= corr;
#pragma unroll
    for (int j = 0; j < R; ++j) acc[j] *= corr;
#pragma unroll
    for (int u = 0; u < PAR; ++u) {
      const float p = t0 + u <= last ? expf(d[u] - m_new) : 0.f;
      l += p;
#pragma unroll
      for (int j = 0; j < R; ++j) acc[j] += p * static_cast<float>(vr[u][j]);
    }
    m = m_new;
  }
}

// One query head h of one row, for the token at cache position `last` with RoPE position last - first: `row` holds
// [q (H*HD) | k (KV*HD) | v (KV*HD)] before the norms; kc/vc point at this row's caches [KV, cap, HD].
// Warp 0 normalises and rotates q into shared memory; warp 1 does k and writes it to the cache; warp 2 writes v.
// (The blocks of the query heads that share a kv head write the same k and v.) Then every warp takes ATTEND_PAR
// positions at a time (first + ATTEND_PAR warp, ..., then NW ATTEND_PAR further on: attend_span), and the block
// merges the warps' partial results into out[0..HD) (rounded to T).
template <typename T, int H, int KV, int HD, int NW, int ATTEND_PAR, typename S, typename O>
__device__ __forceinline__ void attend_head(const S* row, const T* q_norm, const T* k_norm, const float* freqs,
                                            T* kc, T* vc, int cap, int first, int last, int h, float eps,
                                            float scale, O* out) {
  constexpr int R = HD / 32;
  __shared__ float qs[HD];
  __shared__ float ms[NW], ls[NW];
  __shared__ float accs[NW][HD];
  const int g = h / (H / KV);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  kc += (size_t)g * cap * HD;
  vc += (size_t)g * cap * HD;
  if (warp < 2) {
    float e[R];
    norm_rope_lane<T, HD>(row + (warp == 0 ? h * HD : H * HD + g * HD), warp == 0 ? q_norm : k_norm, freqs,
                          last - first, eps, e);
#pragma unroll
    for (int j = 0; j < R; ++j) {
      if (warp == 0) {
        qs[lane + 32 * j] = e[j];
      } else {
        kc[(size_t)last * HD + lane + 32 * j] = static_cast<T>(e[j]);
      }
    }
  } else if (warp == 2) {
    const S* src = row + H * HD + KV * HD + g * HD;
#pragma unroll
    for (int j = 0; j < R; ++j) vc[(size_t)last * HD + lane + 32 * j] = static_cast<T>(ldf(src + lane + 32 * j));
  }
  __syncthreads();
  float q[R], acc[R];
#pragma unroll
  for (int j = 0; j < R; ++j) {
    q[j] = qs[lane + 32 * j] * scale;
    acc[j] = 0.f;
  }
  float m = -cuda::std::numeric_limits<float>::infinity(), l = 0.f;
  attend_span<T, HD, ATTEND_PAR>(q, kc, vc, first + warp * ATTEND_PAR, NW * ATTEND_PAR, last, m, l, acc);
  if (lane == 0) {
    ms[warp] = m;
    ls[warp] = l;
  }
#pragma unroll
  for (int j = 0; j < R; ++j) accs[warp][lane + 32 * j] = acc[j];
  __syncthreads();
  for (int e = tid; e < HD; e += 32 * NW) {
    float mx_ = -cuda::std::numeric_limits<float>::infinity();
#pragma unroll
    for (int w = 0; w < NW; ++w) mx_ = fmaxf(mx_, ms[w]);
    float num = 0.f, den = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      if (ls[w] > 0.f) {
        const float f = expf(ms[w] - mx_);
        num += accs[w][e] * f;
        den += ls[w] * f;
      }
    }
    out[e] = static_cast<O>(static_cast<float>(static_cast<T>(num / den)));
  }
}
"""

# One block = WARPS warps; each warp computes ROWS outputs. MODE 0: out = W x; 1: out = res + W x;
# 2 (SwiGLU): W holds gate rows [0, N) then up rows [N, 2N); out[j] = silu(gate_j x) * (up_j x);
# 3 (argmax keys): out[block] = the block's largest key over its rows, key = order(T(W_j x)) << 32 | ~j, so the
# largest key over all blocks is the first row of the largest rounded value (what argmax returns).
# NORM: x is first RMS-normalised with weight nw (as mx.fast.rms_norm rounds it).
# The warp's weights are loaded into registers first: their latency overlaps reading and normalising x.
_GEMV = """
  constexpr int NR = MODE == 2 ? 2 : 1;
  __shared__ float xs[K];
  __shared__ float red[WARPS];
  __shared__ unsigned long long best[WARPS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int first = (blockIdx.x * WARPS + warp) * ROWS;
  uint4 wraw[ROWS][NR][K * (int)sizeof(T) / 512];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) load_row<T, K, NR>(w, N, first + r, wraw[r]);
  float ss = 0.f;
  for (int i = tid; i < K; i += 32 * WARPS) {
    const float v = static_cast<float>(x[i]);
    xs[i] = v;
    ss += v * v;
  }
  if (NORM) {
    const float r = rsqrtf(block_sum(ss, red) / K + EPS);
    for (int i = tid; i < K; i += 32 * WARPS) xs[i] = static_cast<float>(nw[i] * static_cast<T>(xs[i] * r));
  }
  __syncthreads();
  unsigned long long key = 0ull;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = first + r;
    float a0 = warp_sum(dot_lane<T, K>(wraw[r][0], xs));
    float a1 = NR == 2 ? warp_sum(dot_lane<T, K>(wraw[r][NR - 1], xs)) : 0.f;
    if (lane == 0 && row < N) {
      if constexpr (MODE == 0) {
        store(out + row, static_cast<T>(a0));
      } else if constexpr (MODE == 1) {
        store(out + row, static_cast<T>(static_cast<float>(res[row]) + static_cast<float>(static_cast<T>(a0))));
      } else if constexpr (MODE == 2) {
        const float g = static_cast<float>(static_cast<T>(a0));
        const float u = static_cast<float>(static_cast<T>(a1));
        const float sg = static_cast<float>(static_cast<T>(1.0f / (1.0f + expf(-g))));
        const float silu = static_cast<float>(static_cast<T>(g * sg));
        store(out + row, static_cast<T>(silu * u));
      } else {
        const unsigned long long k = argmax_key(static_cast<float>(static_cast<T>(a0)), row);
        key = k > key ? k : key;
      }
    }
  }
  if constexpr (MODE == 3) {
    key = block_max_key(key, best);
    if (tid == 0) store(out + blockIdx.x, key);
  }
"""

# grid: B * H blocks (row b, query head h), NW warps each: attend_head (above) for row b's token. Row b's cache holds
# its tokens at positions left_pad[b]..slot (a batch's prompts are left-padded to one length); its new token goes to
# position `slot` with RoPE position slot - left_pad[b]. The cache capacity is read at run time (k_cache_shape), so
# one compiled kernel serves every cache size.
_ATTEND = """
  const int b = blockIdx.x / H, h = blockIdx.x % H;
  const size_t cache_row = (size_t)b * KV * k_cache_shape[2] * HD;
  attend_head<T, H, KV, HD, NW, PAR>(qkv + (size_t)b * (H + 2 * KV) * HD, q_norm, k_norm, freqs,
                                     const_cast<T*>(k_cache) + cache_row, const_cast<T*>(v_cache) + cache_row,
                                     k_cache_shape[2], left_pad[b], slot[0], h, EPS, SCALE,
                                     out + ((size_t)b * H + h) * HD);
"""

# grid: B blocks (rows) of 32 * WARPS threads. The residual add and the RMSNorm after it, rounded as MLX rounds
# `x + y` and mx.fast.rms_norm: h = x + y; n = w * (h * rsqrt(mean(h^2) + eps)).
_ADD_NORM = """
  constexpr int PER = (D + 32 * WARPS - 1) / (32 * WARPS);
  __shared__ float red[WARPS];
  const int b = blockIdx.x, tid = threadIdx.x;
  const size_t base = (size_t)b * D;
  float hv[PER];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = tid + j * 32 * WARPS;
    hv[j] = 0.f;
    if (i < D) {
      const T s = static_cast<T>(static_cast<float>(x[base + i]) + static_cast<float>(y[base + i]));
      h_out[base + i] = s;
      hv[j] = static_cast<float>(s);
      ss += hv[j] * hv[j];
    }
  }
  const float r = rsqrtf(block_sum(ss, red) / D + EPS);
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = tid + j * 32 * WARPS;
    if (i < D) n_out[base + i] = nw[i] * static_cast<T>(hv[j] * r);
  }
"""

GEMV_WARPS = 4
# MLX's CUDA allocator puts arrays of 8 bytes or less in a pool of managed memory that the host may read (token
# outputs are), where a kernel reads them over PCIe. The position and padding arrays the kernels read every layer are
# kept at 4 int32 (16 bytes, device memory); the kernels read the first entries only.
SMALL_ARRAY = 4
NORM_WARPS = 4

_kernels: dict[tuple, object] = {}


def kernel(kind: str, source: str, inputs: list[str], outputs: tuple[str, ...] = ("out",), header: str = "",
           shared_memory: int = 0, **constants: float) -> object:
    """The mx.fast.cuda_kernel for `kind` (made once), with float constants written into the source as literals
    (one kernel per value) and this module's device helpers (_HEADER, then `header`) in front; `shared_memory`:
    bytes of dynamic shared memory a block gets."""
    key = (kind, shared_memory, *sorted(constants.items()))
    found = _kernels.get(key)
    if found is None:
        for name, value in constants.items():
            source = source.replace(name, f"{float(value)!r}f")
        found = mx.fast.cuda_kernel(name=f"funasr_{kind}_{len(_kernels)}", input_names=inputs,
                                    output_names=list(outputs), source=source, header=_HEADER + header,
                                    shared_memory=shared_memory)
        _kernels[key] = found
    return found


@dataclass(frozen=True)
class _Launch:
    """A kernel with everything but its inputs decided: a step launches the same few shapes in every layer, so
    they are prepared once (Python time per launch is most of a step's host time)."""

    kernel: object
    options: dict

    def __call__(self, *inputs: mx.array) -> mx.array:
        return self.kernel(inputs=list(inputs), **self.options)[0]


@dataclass(frozen=True)
class _Launch2(_Launch):
    """A _Launch whose kernel has two outputs."""

    def __call__(self, *inputs: mx.array) -> list[mx.array]:
        return self.kernel(inputs=list(inputs), **self.options)


def gemv_launch(shape: tuple[int, int], dtype, *, norm: bool = False, eps: float = 0.0, res: bool = False,
                swiglu: bool = False, argmax: bool = False, rows: int = 2) -> _Launch:
    """W [N', K] x [K] -> [N] (N = N' / 2 with swiglu); inputs (x, norm weight, W, residual), unused ones any array.
    argmax: instead of the N values, each block's largest argmax key (uint64, see _GEMV; `argmax_of_keys`)."""
    n_out, k = shape[0] // (2 if swiglu else 1), shape[1]
    per_block = GEMV_WARPS * rows
    blocks = -(-n_out // per_block)
    mode = 3 if argmax else 2 if swiglu else 1 if res else 0
    return _Launch(kernel("gemv", _GEMV, ["x", "nw", "w", "res"], EPS=eps), dict(
        template=[("T", dtype), ("K", k), ("N", n_out), ("ROWS", rows), ("WARPS", GEMV_WARPS),
                  ("MODE", mode), ("NORM", norm)],
        grid=(32 * GEMV_WARPS * blocks, 1, 1), threadgroup=(32 * GEMV_WARPS, 1, 1),
        output_shapes=[(blocks,) if argmax else (n_out,)], output_dtypes=[mx.uint64 if argmax else dtype]))


def argmax_of_keys(keys: mx.array) -> mx.array:
    """The row index [1] (int32) held by the largest of a MODE-3 gemv's block keys."""
    low = mx.max(keys, keepdims=True) & 0xFFFFFFFF
    return (0xFFFFFFFF - low).astype(mx.int32)


def attend_launch(dtype, *, batch: int, heads: int, kv_heads: int, head_dim: int, eps: float, scale: float,
                  warps: int, par: int) -> _Launch:
    """Inputs (qkv [batch, (heads + 2 kv_heads) head_dim], q_norm, k_norm, freqs, slot [1], left_pad [batch],
    k_cache, v_cache [batch, kv_heads, capacity, head_dim]) -> [batch, heads * head_dim]."""
    inputs = ["qkv", "q_norm", "k_norm", "freqs", "slot", "left_pad", "k_cache", "v_cache"]
    return _Launch(kernel("attend", _ATTEND, inputs, EPS=eps, SCALE=scale), dict(
        template=[("T", dtype), ("H", heads), ("KV", kv_heads), ("HD", head_dim), ("NW", warps),
                  ("PAR", par)],
        grid=(32 * warps * batch * heads, 1, 1), threadgroup=(32 * warps, 1, 1),
        output_shapes=[(batch, heads * head_dim)], output_dtypes=[dtype]))


def add_norm_launch(dtype, *, batch: int, dim: int, eps: float) -> _Launch2:
    """Inputs (x, y [batch, dim], norm weight [dim]) -> (x + y, rms_norm(x + y))."""
    return _Launch2(kernel("add_norm", _ADD_NORM, ["x", "y", "nw"], ("h_out", "n_out"), EPS=eps), dict(
        template=[("T", dtype), ("D", dim), ("WARPS", NORM_WARPS)],
        grid=(32 * NORM_WARPS * batch, 1, 1), threadgroup=(32 * NORM_WARPS, 1, 1),
        output_shapes=[(batch, dim), (batch, dim)], output_dtypes=[dtype, dtype]))


def _prepare_caches(kv: list) -> list:
    """The caches (grown by the caller, asr.llm.FastDecoder.start) as evaluated, row-contiguous buffers: the
    kernels write into them through raw pointers, so no views, and they must exist before the first write."""
    kv = [[mx.contiguous(k), mx.contiguous(v)] for k, v in kv]
    mx.eval(kv)
    return kv


def _stepper(run, kv: list, prompt_slots: int, *extra: mx.array):
    """A step function tokens -> next tokens over `run(tok, at, *extra, kv)` (a compiled step returning the next
    tokens and at + 1), growing the caches by asr.llm.CACHE_STEP positions when full."""
    from .llm import _with_room  # noqa: PLC0415 (llm imports this module)

    state = {"kv": kv, "slot": prompt_slots, "at": mx.array([prompt_slots] * SMALL_ARRAY, dtype=mx.int32)}

    def step(tok: mx.array) -> mx.array:
        slot = state["slot"]
        grown = _with_room(state["kv"], slot)
        if grown is not state["kv"]:
            mx.eval(grown)  # the kernels write into these buffers: they must exist before the first write
            state["kv"] = grown
        nxt, state["at"] = run(tok, state["at"], *extra, grown)
        state["slot"] = slot + 1
        return nxt

    return step


class FusedStep:
    """The batch-of-one step of an mlx-lm Qwen3, on the layer plans (`asr.llm._LayerPlan`: the prepared arrays and
    the fused q|k|v and gate|up weights) of its asr.llm.FastDecoder."""

    def __init__(self, model, plans: list) -> None:
        p = plans[0]
        self.layers = plans
        self.freqs = p.freqs
        m = model.model
        self.embed = m.embed_tokens.weight
        self.norm = m.norm.weight
        self.head = self.embed if model.args.tie_word_embeddings else model.lm_head.weight
        dtype = self.embed.dtype
        self._qkv = gemv_launch(p.qkv.weight.shape, dtype, norm=True, eps=p.eps)
        self._attend = attend_launch(dtype, batch=1, heads=p.q_shape[1], kv_heads=p.kv_shape[1],
                                     head_dim=p.q_shape[3], eps=p.eps, scale=p.scale, warps=16,
                                     par=ATTEND_PAR)
        self._o = gemv_launch(p.o.weight.shape, dtype, res=True, rows=1)
        self._gate_up = gemv_launch(p.gate_up.weight.shape, dtype, norm=True, eps=p.eps, swiglu=True)
        self._down = gemv_launch(p.down.weight.shape, dtype, res=True, rows=1)
        self._head = gemv_launch(self.head.shape, dtype, norm=True, eps=p.eps, argmax=True, rows=4)
        self._left_pad = mx.zeros((SMALL_ARRAY,), dtype=mx.int32)
        # compiled: 1.59-1.76 ms a step on an H100 against 2.1-2.4 ms built kernel by kernel (tools/gpu/probe_step.py)
        self._step = mx.compile(self._forward) if COMPILE else self._forward

    def start(self, kv: list, prompt_slots: int):
        """A step function tokens [1] -> [1] continuing after `prompt_slots` cached positions in `kv`."""
        return _stepper(self._step, _prepare_caches(kv), prompt_slots)

    def _forward(self, tok: mx.array, at: mx.array, kv: list) -> tuple[mx.array, mx.array]:
        qkv_, attend_, o_, gate_up_, down_ = self._qkv, self._attend, self._o, self._gate_up, self._down
        freqs, left_pad = self.freqs, self._left_pad
        x = mx.take(self.embed, tok, axis=0)  # [1, D]
        for p, (k_cache, v_cache) in zip(self.layers, kv, strict=True):
            qkv = qkv_(x, p.ln1, p.qkv.weight, x)
            o = attend_(qkv, p.q_norm, p.k_norm, freqs, at, left_pad, k_cache, v_cache)
            x = o_(o, o, p.o.weight, x)
            h = gate_up_(x, p.ln2, p.gate_up.weight, x)
            x = down_(h, h, p.down.weight, x)
        return argmax_of_keys(self._head(x, self.norm, self.head, x)), at + 1


class RowsStep:
    """The step for batches (rows left-padded to one prompt length) and for quantized models: MLX's products
    (cuBLAS, or MLX's quantized kernels) with two custom kernels in between, one compiled step.

    Per layer: q|k|v product; `attend` (q/k RMSNorm, RoPE at each row's own position, the cache write in place,
    attention over each row's valid positions); o product; `add_norm` (residual add + RMSNorm); gate|up product;
    SwiGLU; down product; `add_norm` (with the next layer's input norm, or the final norm). Eight kernels a layer,
    against ~17 for the same step from MLX operations.
    """

    def __init__(self, model, plans: list) -> None:
        self.model = model
        self.layers = plans
        self.norms = [q.ln1 for q in plans[1:]] + [model.model.norm.weight]  # the norm after each layer
        self._launches: dict[int, tuple[_Launch, _Launch2]] = {}  # by batch size
        self._step = mx.compile(self._forward) if COMPILE else self._forward

    def start(self, kv: list, prompt_slots: int, left_pad: list[int]):
        """A step function tokens [B] -> [B] continuing after `prompt_slots` cached positions in `kv`."""
        pad = mx.array(left_pad + [0] * (SMALL_ARRAY - len(left_pad)), dtype=mx.int32)
        return _stepper(self._step, _prepare_caches(kv), prompt_slots, pad)

    def _kernels(self, batch: int) -> tuple[_Launch, _Launch2]:
        found = self._launches.get(batch)
        if found is None:
            p = self.layers[0]
            found = self._launches[batch] = (
                attend_launch(p.ln1.dtype, batch=batch, heads=p.q_shape[1], kv_heads=p.kv_shape[1],
                              head_dim=p.q_shape[3], eps=p.eps, scale=p.scale, warps=4,
                              par=ROWS_ATTEND_PAR),
                add_norm_launch(p.ln1.dtype, batch=batch, dim=p.ln1.shape[0], eps=p.eps))
        return found

    def _forward(self, tok: mx.array, at: mx.array, left_pad: mx.array, kv: list) -> tuple[mx.array, mx.array]:
        from .llm import _lm_head  # noqa: PLC0415 (llm imports this module)

        attend_, add_norm_ = self._kernels(tok.shape[0])
        x = self.model.model.embed_tokens(tok)  # [B, D]
        n = mx.fast.rms_norm(x, self.layers[0].ln1, self.layers[0].eps)
        for p, next_norm, (k_cache, v_cache) in zip(self.layers, self.norms, kv, strict=True):
            o = attend_(p.qkv(n), p.q_norm, p.k_norm, p.freqs, at, left_pad, k_cache, v_cache)
            x, n = add_norm_(x, p.o(o), p.ln2)
            gate, up = mx.split(p.gate_up(n), 2, axis=-1)
            x, n = add_norm_(x, p.down(swiglu(gate, up)), next_norm)
        return mx.argmax(_lm_head(self.model, n), axis=-1).astype(mx.int32), at + 1


def _on_cuda() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda and cuda.is_available() and mx.default_device() == mx.gpu)


def available(model, batch: int) -> bool:
    """Whether FusedStep runs `model` here: CUDA, a batch of one, and a model it `supports`."""
    return ENABLED and batch == 1 and _on_cuda() and supports(model)


def rows_available(model) -> bool:
    """Whether RowsStep runs `model` here (any batch): CUDA and a model it `supports_rows`."""
    return ENABLED and _on_cuda() and supports_rows(model)


def supports(model) -> bool:
    """Whether FusedStep's kernels fit `model` (on any device): unquantized bf16 or fp32 weights of one dtype,
    widths that are multiples of 32 16-byte vectors, and an `attend` that fits (`_attend_fits`)."""
    m = model.model
    layer = m.layers[0]
    a = layer.self_attn
    w = a.q_proj.weight
    if w.dtype not in (mx.bfloat16, mx.float32) or "scales" in a.q_proj:  # the dtypes run on a GPU (fp16: not yet)
        return False
    # every kernel reads all its inputs as one type
    head = m.embed_tokens if model.args.tie_word_embeddings else model.lm_head
    others = (m.embed_tokens.weight, layer.input_layernorm.weight, a.q_norm.weight, m.norm.weight, head.weight)
    if "scales" in head or any(x.dtype != w.dtype for x in others):
        return False
    vec = 16 // w.dtype.size
    dims = (m.embed_tokens.weight.shape[1], a.n_heads * a.q_norm.weight.shape[0], layer.mlp.down_proj.weight.shape[1])
    return all(d % (32 * vec) == 0 and d <= 8192 for d in dims) and _attend_fits(model)


def supports_rows(model) -> bool:
    """Whether RowsStep fits `model` (on any device): activations, norms and products of one dtype, bf16 or fp32
    (quantized products included: they compute in their scales' dtype), and an `attend` that fits."""
    m = model.model
    layer = m.layers[0]
    a = layer.self_attn
    dtype = layer.input_layernorm.weight.dtype
    if dtype not in (mx.bfloat16, mx.float32):  # the dtypes run on a GPU (fp16: not yet)
        return False
    head = m.embed_tokens if model.args.tie_word_embeddings else model.lm_head
    modules = (m.embed_tokens, head, a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp.gate_proj,
               layer.mlp.up_proj, layer.mlp.down_proj)
    computes_in = [(x["scales"] if "scales" in x else x["weight"]).dtype for x in modules]
    norms = (layer.post_attention_layernorm.weight, a.q_norm.weight, a.k_norm.weight, m.norm.weight)
    return all(d == dtype for d in computes_in + [x.dtype for x in norms]) and _attend_fits(model)


def _attend_fits(model) -> bool:
    """head_dim a multiple of 64 up to 256 (the RoPE halves split evenly across a warp), grouped heads, and
    asr.llm.HFRoPE, whose float32 periods `attend` reads."""
    from .llm import HFRoPE  # noqa: PLC0415 (llm imports this module)

    a = model.model.layers[0].self_attn
    head_dim = a.q_norm.weight.shape[0]
    return (head_dim % 64 == 0 and head_dim <= 256 and isinstance(a.rope, HFRoPE) and a.rope.dims == head_dim
            and a.n_heads % a.n_kv_heads == 0)
