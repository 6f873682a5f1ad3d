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
