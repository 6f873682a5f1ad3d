constexpr int PART_W = PART_COLUMNS;  // columns a warp's partial sums take in product()'s shared `part`

__device__ __forceinline__ void mma_bf16(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A [MT * 16, KL] (columns [k0, k0 + KL) of a row-major [., K] bf16 buffer other blocks wrote) into shared memory,
// rows KL / 8 + 4 16-byte words apart (the 64-byte pad keeps a quarter-warp's reads off each other's banks). The
// copies are cp.async through L2 (no registers, so all of a thread's copies are in flight at once).
template <int MT, int K, int KL>
__device__ __forceinline__ void stage_a(uint4* sa, const __nv_bfloat16* a, int k0) {
  constexpr int RW = KL / 8, SKU = KL / 8 + 4;
  const uint4* src = reinterpret_cast<const uint4*>(a + k0);
  for (int i = threadIdx.x; i < MT * 16 * RW; i += NWARPS * 32) {
    const int r = i / RW, c = i % RW;
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(sa + r * SKU + c));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src + (size_t)r * (K / 8) + c) : "memory");
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();
}

// bw[c][j] = chunk c (32 elements of k) of this lane's 16-byte words of W rows wr[j] (each pointing at its row's
// first element of the warp's k range, this lane's word already added)
template <int NTW, int CH>
__device__ __forceinline__ void load_chunks(uint4 (&bw)[CH][NTW], const uint4* const (&wr)[NTW]) {
#pragma unroll
  for (int c = 0; c < CH; ++c)
#pragma unroll
    for (int j = 0; j < NTW; ++j) bw[c][j] = __ldg(wr[j] + c * 4);
}

// acc += A chunk c (shared memory, stage_a's layout with KL columns, from column k0 + 32 c) times W chunk bw
template <int MT, int NTW, int KL>
__device__ __forceinline__ void mma_chunk(float (&acc)[MT][NTW][4], const uint4* sa, int k0, int c,
                                          const uint4 (&bw)[NTW]) {
  constexpr int SKU = KL / 8 + 4;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int kq = k0 / 8 + c * 4 + t;
  uint4 al[MT], ah[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    al[m] = sa[(m * 16 + g) * SKU + kq];
    ah[m] = sa[(m * 16 + g + 8) * SKU + kq];
  }
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < NTW; ++j) {
      mma_bf16(acc[m][j], al[m].x, ah[m].x, al[m].y, ah[m].y, bw[j].x, bw[j].y);
      mma_bf16(acc[m][j], al[m].z, ah[m].z, al[m].w, ah[m].w, bw[j].z, bw[j].w);
    }
}

template <int MT, int NTW>
__device__ __forceinline__ void zero(float (&acc)[MT][NTW][4]) {
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < NTW; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.f;
}

// A product's tiling. product(): a warp takes NTW n8 tiles of W's rows (PAIR: NTW / 2 gate tiles and the matching up
// tiles, W [2N, K] holding gate rows then up rows) over a K / KS slice; a block's NWARPS / KS warp tiles side by side
// make a column tile of BW columns. product_slices(): K cut in KB slices across blocks, a warp takes one n8 tile of
// one slice, NWARPS of them side by side.
template <int K, int NTW, int KS, bool PAIR, int KB = 1>
struct Tiling {
  static constexpr int NT = NWARPS / KS, TW = PAIR ? NTW / 2 : NTW, CW = TW * 8, BW = NT * CW;
  static constexpr int KSL = K / KB / KS, CH = KSL / 32;
  // the tiles of N columns (x KB slices)
  static __device__ __forceinline__ int tiles(int N) { return (N + BW - 1) / BW * KB; }
  // this lane's W row pointers for `tile`
  static __device__ __forceinline__ void rows(const __nv_bfloat16* w, int N, int tile, const uint4* (&wr)[NTW]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int ctiles = (N + BW - 1) / BW, kb = tile / ctiles;
    const int c0 = (tile % ctiles) * BW + (warp / KS) * CW, k0 = kb * (K / KB) + (warp % KS) * KSL;
#pragma unroll
    for (int j = 0; j < NTW; ++j) {
      const int col = min(c0 + (j % TW) * 8 + g, N - 1);
      wr[j] = reinterpret_cast<const uint4*>(w + ((size_t)(PAIR && j >= TW ? N : 0) + col) * K + k0) + t;
    }
  }
  // the first C chunks of this block's first tile's weights (all of them by default), loaded ahead (before the grid
  // barrier in front of the product: they depend on no other block, so their latency overlaps the wait)
  template <int C = CH>
  static __device__ __forceinline__ void fetch(const __nv_bfloat16* w, int N, uint4 (&bw)[C][NTW]) {
    if (blockIdx.x < tiles(N)) {
      const uint4* wr[NTW];
      rows(w, N, blockIdx.x, wr);
      load_chunks<NTW, C>(bw, wr);
    }
  }
};

// A [MT * 16, K] (bf16, staged whole) times W^T (Tiling<K, NTW, KS, PAIR>): the KS warps of a column tile sum in
// shared memory `part` in a fixed order, and epi(row, column, sum, up sum) runs once per output of rows [0, B).
// bw: the block's first tile's weights (Tiling::fetch); each next tile's are loaded before this one's sums.
template <int K, int MT, int NTW, int KS, bool PAIR, typename F>
__device__ __forceinline__ void product(uint4* sa, const __nv_bfloat16* a, const __nv_bfloat16* w, int N, int B,
                                        float* part, uint4 (&bw)[K / KS / 32][NTW], F epi) {
  using Tl = Tiling<K, NTW, KS, PAIR>;
  constexpr int MP = MT * 16, PW = NTW * 8;
  static_assert(PW <= PART_W, "part holds PART_W columns a warp");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int kt = warp % KS;
  const int tiles = Tl::tiles(N);
  if (blockIdx.x >= tiles) return;
  stage_a<MT, K, K>(sa, a, 0);
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    float acc[MT][NTW][4];
    zero(acc);
#pragma unroll
    for (int c = 0; c < Tl::CH; ++c) mma_chunk<MT, NTW, K>(acc, sa, kt * Tl::KSL, c, bw[c]);
    if (tile + gridDim.x < tiles) {
      const uint4* wr[NTW];
      Tl::rows(w, N, tile + gridDim.x, wr);
      load_chunks<NTW, Tl::CH>(bw, wr);
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < NTW; ++j) {
        float* p = part + (warp * MP + m * 16 + g) * PW + j * 8 + 2 * t;
        p[0] = acc[m][j][0];
        p[1] = acc[m][j][1];
        p[8 * PW] = acc[m][j][2];
        p[8 * PW + 1] = acc[m][j][3];
      }
    __syncthreads();
    for (int e = threadIdx.x; e < B * Tl::BW; e += blockDim.x) {
      const int r = e / Tl::BW, cb = e % Tl::BW, n = cb / Tl::CW, cw = cb % Tl::CW;
      const int col = tile * Tl::BW + cb;
      if (col < N) {
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int k = 0; k < KS; ++k) {
          const float* p = part + ((n * KS + k) * MP + r) * PW;
          s0 += p[cw];
          if (PAIR) s1 += p[cw + Tl::CW];
        }
        epi(r, col, s0, s1);
      }
    }
    __syncthreads();
  }
}

// A [MT * 16, K] times W^T (W [N, K]) with K cut in KB slices (Tiling<K, 1, 1, false, KB>): a block takes 64
// columns (one n8 tile a warp) of one slice, and the partial sums go to out [KB, MT * 16, N] (summed by the phase
// after the barrier, in slice order). bw: as in product().
template <int K, int MT, int KB>
__device__ __forceinline__ void product_slices(uint4* sa, const __nv_bfloat16* a, const __nv_bfloat16* w, int N,
                                               float* out, uint4 (&bw)[K / KB / 32][1]) {
  using Tl = Tiling<K, 1, 1, false, KB>;
  constexpr int MP = MT * 16, KL = K / KB;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int ctiles = (N + Tl::BW - 1) / Tl::BW;
  for (int tile = blockIdx.x; tile < Tl::tiles(N); tile += gridDim.x) {
    const int kb = tile / ctiles, col = (tile % ctiles) * Tl::BW + warp * 8 + 2 * t;
    if (tile != blockIdx.x) __syncthreads();  // the previous tile's warps are done with sa
    stage_a<MT, K, KL>(sa, a, kb * KL);
    float acc[MT][1][4];
    zero(acc);
#pragma unroll
    for (int c = 0; c < Tl::CH; ++c) mma_chunk<MT, 1, KL>(acc, sa, 0, c, bw[c]);
    if (tile + gridDim.x < Tl::tiles(N)) {
      const uint4* wr[1];
      Tl::rows(w, N, tile + gridDim.x, wr);
      load_chunks<1, Tl::CH>(bw, wr);
    }
    if (col < N) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        float* p = out + ((size_t)kb * MP + m * 16 + g) * N + col;
        __stcg(reinterpret_cast<float2*>(p), make_float2(acc[m][0][0], acc[m][0][1]));
        __stcg(reinterpret_cast<float2*>(p + 8 * (size_t)N), make_float2(acc[m][0][2], acc[m][0][3]));
      }
    }
  }
}

// Query head h of one row, by S warps (asr.cuda_decode's attend_head does the same with a block); this is warp w of
// them. Each warp: q/k RMSNorm and RoPE (norm_rope_lane), the new k and v written at `last` (every warp of the
// heads sharing a kv head writes the same values, and reads back only what it wrote itself), then the online
// softmax over its share of positions first..last with 16-byte loads: HD / 8 lanes (a group) take one position,
// 8 elements a lane, so a warp reads GROUPS = 32 / (HD / 8) positions at a time, PAR times over (GROUPS * PAR
// positions a trip; warp w takes trips w, w + S, ...); the groups' partial results merge at the end. S == 1: the
// warp writes out. S > 1: it leaves its partial result for merge_warps (acc in qw, its m and l in ms[w], ls[w]).
// qw: this warp's HD floats of shared memory.
template <typename T, int H, int KV, int HD, int PAR>
__device__ __forceinline__ void attend_warp(const float* row, const T* q_norm, const T* k_norm, const float* freqs,
                                            T* kc, T* vc, int cap, int first, int last, int h, float eps,
                                            float scale, T* out, float* qw, int w, int S, float* ms, float* ls) {
  constexpr int R = HD / 32, LP = HD / 8, GROUPS = 32 / LP;
  constexpr float NEG = -cuda::std::numeric_limits<float>::infinity();
  const int lane = threadIdx.x & 31, g = h / (H / KV), grp = lane / LP, sub = lane % LP;
  kc += (size_t)g * cap * HD;
  vc += (size_t)g * cap * HD;
  {
    float q[R], k[R];
    norm_rope_lane<T, HD>(row + h * HD, q_norm, freqs, last - first, eps, q);
    norm_rope_lane<T, HD>(row + H * HD + g * HD, k_norm, freqs, last - first, eps, k);
#pragma unroll
    for (int j = 0; j < R; ++j) {
      kc[(size_t)last * HD + lane + 32 * j] = static_cast<T>(k[j]);
      vc[(size_t)last * HD + lane + 32 * j] = static_cast<T>(__ldcg(row + H * HD + KV * HD + g * HD + lane + 32 * j));
      qw[lane + 32 * j] = q[j] * scale;
    }
  }
  __syncwarp();  // the lanes read back what the warp's other lanes wrote
  float qv[8], acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    qv[i] = qw[8 * sub + i];
    acc[i] = 0.f;
  }
  float m = NEG, l = 0.f;
  for (int t0 = first + w * GROUPS * PAR; t0 <= last; t0 += S * GROUPS * PAR) {  // the same trips for every lane
    uint4 kr[PAR], vr[PAR];
#pragma unroll
    for (int u = 0; u < PAR; ++u) {
      const int t = min(t0 + u * GROUPS + grp, last);
      kr[u] = *reinterpret_cast<const uint4*>(kc + (size_t)t * HD + 8 * sub);
      vr[u] = *reinterpret_cast<const uint4*>(vc + (size_t)t * HD + 8 * sub);
    }
    float d[PAR];
    float m_new = m;
#pragma unroll
    for (int u = 0; u < PAR; ++u) {
      const T* kp = reinterpret_cast<const T*>(&kr[u]);
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) s += qv[i] * static_cast<float>(kp[i]);
#pragma unroll
      for (int off = 1; off < LP; off <<= 1) s += __shfl_xor_sync(0xffffffff, s, off);
      d[u] = s;
      if (t0 + u * GROUPS + grp <= last) m_new = fmaxf(m_new, s);
    }
    const float corr = m == NEG ? 0.f : expf(m - m_new);  // nothing summed yet: l and acc are 0
    l *= corr;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] *= corr;
#pragma unroll
    for (int u = 0; u < PAR; ++u) {
      const float p = t0 + u * GROUPS + grp <= last ? expf(d[u] - m_new) : 0.f;
      const T* vp = reinterpret_cast<const T*>(&vr[u]);
      l += p;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += p * static_cast<float>(vp[i]);
    }
    m = m_new;
  }
#pragma unroll
  for (int off = LP; off < 32; off <<= 1) {  // merge the groups
    const float mo = __shfl_xor_sync(0xffffffff, m, off), lo = __shfl_xor_sync(0xffffffff, l, off);
    const float mn = fmaxf(m, mo);
    const float f = m == NEG ? 0.f : expf(m - mn), fo = mo == NEG ? 0.f : expf(mo - mn);
    l = l * f + lo * fo;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = acc[i] * f + __shfl_xor_sync(0xffffffff, acc[i], off) * fo;
    m = mn;
  }
  if (S == 1) {
    if (grp == 0) {
      uint4 o;
      T* op = reinterpret_cast<T*>(&o);
#pragma unroll
      for (int i = 0; i < 8; ++i) op[i] = static_cast<T>(acc[i] / l);
      *reinterpret_cast<uint4*>(out + 8 * sub) = o;
    }
    return;
  }
  __syncwarp();  // every lane has read its q from qw
  if (grp == 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) qw[8 * sub + i] = acc[i];
  }
  if (lane == 0) {
    ms[w] = m;
    ls[w] = l;
  }
}

// The S partial results of one query head (attend_warp's, in qw[0..S) x HD, ms, ls) merged into out[0..HD) by
// `threads` threads, thread i taking elements i, i + threads, ... A warp that had no positions has l == 0.
template <typename T, int HD>
__device__ __forceinline__ void merge_warps(const float* qw, const float* ms, const float* ls, int S, int i,
                                            int threads, T* out) {
  float mx_ = -cuda::std::numeric_limits<float>::infinity();
  for (int w = 0; w < S; ++w) mx_ = ls[w] > 0.f ? fmaxf(mx_, ms[w]) : mx_;
  for (int e = i; e < HD; e += threads) {
    float num = 0.f, den = 0.f;
    for (int w = 0; w < S; ++w) {
      if (ls[w] > 0.f) {
        const float f = expf(ms[w] - mx_);
        num += qw[w * HD + e] * f;
        den += ls[w] * f;
      }
    }
    out[e] = static_cast<T>(num / den);
  }
}

// the LM head over A [MT * 16, K] (staged whole): each row's largest argmax key over this block's columns of
// W [N, K] (Tiling<K, NTW, 1, false>: NTW n8 tiles a warp), then atomicMax into keys[row]; `best` holds a key per
// row (shared). A warp's weights stream through bw, AHEAD chunks in flight ahead of the one being summed (across
// tiles too); bw holds the first tile's first AHEAD chunks on entry (Tiling::fetch<AHEAD>).
template <int K, int MT, int NTW, int AHEAD>
__device__ __forceinline__ void head_argmax(uint4* sa, const __nv_bfloat16* a, const __nv_bfloat16* w, int N, int B,
                                            unsigned long long* best, unsigned long long* keys,
                                            uint4 (&bw)[AHEAD][NTW]) {
  using Tl = Tiling<K, NTW, 1, false>;
  constexpr int CH = K / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int tiles = Tl::tiles(N);
  if (blockIdx.x >= tiles) return;
  for (int i = threadIdx.x; i < MT * 16; i += blockDim.x) best[i] = 0ull;
  stage_a<MT, K, K>(sa, a, 0);
  unsigned long long kbest[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m) kbest[m][0] = kbest[m][1] = 0ull;
  const uint4* wr[NTW];
  const uint4* wn[NTW];
  Tl::rows(w, N, blockIdx.x, wr);
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int next = tile + gridDim.x < tiles ? tile + gridDim.x : tile;  // the last tile re-reads itself: unused
    Tl::rows(w, N, next, wn);
    float acc[MT][NTW][4];
    zero(acc);
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      mma_chunk<MT, NTW, K>(acc, sa, 0, c, bw[c % AHEAD]);
#pragma unroll
      for (int j = 0; j < NTW; ++j) {
        bw[c % AHEAD][j] = c + AHEAD < CH ? __ldg(wr[j] + (c + AHEAD) * 4) : __ldg(wn[j] + (c + AHEAD - CH) * 4);
      }
    }
    const int c0 = tile * Tl::BW + warp * Tl::CW;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < NTW; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = c0 + j * 8 + 2 * t + (e & 1);
          if (col < N) {
            const unsigned long long k = argmax_key(static_cast<float>(static_cast<__nv_bfloat16>(acc[m][j][e])), col);
            kbest[m][e >> 1] = k > kbest[m][e >> 1] ? k : kbest[m][e >> 1];
          }
        }
#pragma unroll
    for (int j = 0; j < NTW; ++j) wr[j] = wn[j];
  }
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      unsigned long long k = kbest[m][h];
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        const unsigned long long o = __shfl_xor_sync(0xffffffff, k, off);
        k = o > k ? o : k;
      }
      if (t == 0) atomicMax(best + m * 16 + g + 8 * h, k);
    }
  __syncthreads();
  for (int r = threadIdx.x; r < B; r += blockDim.x) atomicMax(keys + r, best[r]);
}
