"""A batch's whole decode step of a Qwen3 in ONE CUDA kernel launch, with tensor-core products (PersistentRows).

RowsStep (asr.cuda_decode) runs a batch's step as ~230 kernels (cuBLAS products and custom kernels) and on MLX's
CUDA backend each kernel costs host time, so at 64 rows the step waited on the host: ~2.8-4.1 ms a step against
~1.9 ms of GPU work (tools/gpu/probe_batch.py). Here one launch does the step, as asr.cuda_persistent does for a
batch of one: one block per SM, all resident, meeting at grid-wide barriers between phases:

  start: each row's embedding (the residual stream x, float) and its RMSNorm (A, bf16) | per layer:
  q|k|v product | attention (items (row, query head), 1-8 warps an item: attend_warp, merge_warps) |
  o product, summed over K in KB slices whose partial sums go to a buffer | residual add of those sums + RMSNorm |
  gate|up product + SwiGLU | down product (K in KB slices, as o) | residual add + the next RMSNorm (or the final
  one) | end: the LM head, each row's largest argmax key kept per block and then over the blocks (atomicMax).

Products run on tensor cores (`mma.sync` m16n8k16, bf16 operands, float32 sums): the rows (up to MAX_ROWS) are MT
tiles of 16, W's rows tiles of 8. A block stages its slice of A (the activations, bf16) in shared memory once and
its warps read it from there; a warp loads its W rows straight from memory (each weight is read once a step), all
of a tile's chunks at once, the next tile's while this one is summed, and a product's first ones between the two
halves of the grid barrier in front of it (weights depend on no other block, so their latency overlaps the wait).
Within each 32-wide k chunk, lane (g, t) holds elements 8t..8t+7 of A rows g and g + 8 and of W row g, in 16-byte
loads: both operands take the same permutation of k, which the sum does not see.

Rounding follows RowsStep (each op's result rounded to bf16 where MLX rounds it); sums run in another order than
cuBLAS's, so logits agree to rounding, not bit for bit. bf16 models only (mma takes bf16 operands; an fp32 model
keeps RowsStep), 2..MAX_ROWS rows; larger batches keep RowsStep, and so do devices before sm_80 or with less
shared memory a block than the kernel takes (`device_takes`: ~172 KB at Qwen3-0.6B's widths, so an H100 or H200,
not an A100). Buffers other blocks wrote in the same launch are read through L2 (`__ldcg`).
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import cuda_persistent
from .cuda_decode import SMALL_ARRAY, _prepare_caches, _stepper, kernel, supports
from .cuda_persistent import scratch

ENABLED = os.environ.get("FUNASR_NANO_PERSISTENT_ROWS", "1") != "0"  # A/B switch (tools/gpu/probe_batch.py, tests)
MAX_ROWS = 64
ROW_TILE = 16  # rows of an mma row tile (m16n8k16); the kernel is compiled once per count of them (its MT)
NW = 8  # warps a block
KB = 8  # slices of K for the o and down products (a block takes one slice of one 64-column tile)
TIMING = 0  # 1: record when each phase ends (PersistentRows.times; tools/gpu/probe_batch.py), read by start()
ATTN_PAR = 6  # loads of key and value rows a lane of attend_warp has in flight (x 2 positions a warp at head_dim 128; 8 spills registers)
PART_COLUMNS = 16  # columns a warp's partial sums take in product()'s shared sums (its NTW n8 tiles: NTW <= 2)
SMEM_LIMIT = 200 * 1024  # dynamic shared memory this kernel may ask for (an SM of sm_80/sm_90 has 227 KB)

_DEVICE = """
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
"""

_BODY = """
  constexpr int QKV = (H + 2 * KV) * HD;
  constexpr int MP = MT * 16;
  extern __shared__ uint4 sa[];
  __shared__ float part[NWARPS * MP * PART_W];
  __shared__ float red[32];
  __shared__ float qbuf[NWARPS * HD];
  __shared__ float mbuf[NWARPS], lbuf[NWARPS];
  __shared__ unsigned long long best[MP];
  const int tid = threadIdx.x, warp = tid >> 5;
  const int B = tok_shape[0];
  // warps an attention item takes: the most (a power of two up to NWARPS) that still give every warp of the grid
  // some positions, so that a few rows' heads spread over the grid (one warp an item at 64 rows)
  int SPLIT = 1;
  while (SPLIT < NWARPS && B * H * SPLIT * 2 <= (int)gridDim.x * NWARPS) SPLIT *= 2;
  const int IPB = NWARPS / SPLIT;
  float* x = const_cast<float*>(xbuf);
  float* qkv = const_cast<float*>(qkvbuf);
  float* psum = const_cast<float*>(pbuf);
  T* an = const_cast<T*>(abuf);
  T* att = const_cast<T*>(attbuf);
  T* hid = const_cast<T*>(hbuf);
  unsigned int* bar = const_cast<unsigned int*>(barrier);
  unsigned long long* keys = const_cast<unsigned long long*>(keybuf);
  const int last = at[0];
  const int cap = kc0_shape[2];
  unsigned int gen = 0;
  // TIMING (tools/gpu/probe_batch.py): block 0 marks the start and the end of every phase's barrier
  unsigned long long* times = TIMING ? const_cast<unsigned long long*>(tbuf) : nullptr;
  int phase = 0;
  if (times != nullptr && blockIdx.x == 0 && tid == 0) times[phase++] = global_ns();
// between ARRIVE and WAIT, each block loads its first weights of the next product (they depend on no other block)
#define ARRIVE gen = grid_arrive(bar, nullptr)
#define WAIT                  \
  grid_wait(bar, gen, nullptr); \
  if (times != nullptr && blockIdx.x == 0 && tid == 0) times[phase++] = global_ns()
#define SYNC_GRID \
  ARRIVE;         \
  WAIT
$TABLES
  using TQKV = Tiling<D, 2, 8, false>;
  using TGU = Tiling<D, 2, 8, true>;
  using TO = Tiling<H * HD, 1, 1, false, KB>;
  using TD = Tiling<FF, 1, 1, false, KB>;
  using THEAD = Tiling<D, HEAD_NTW, 1, false>;
  uint4 w_qkv[TQKV::CH][2], w_gu[TGU::CH][2], w_o[TO::CH][1], w_d[TD::CH][1], w_head[HEAD_AHEAD][HEAD_NTW];
  // a row of D values is PER values a thread (thread tid holds elements tid, tid + NWARPS * 32, ...: D is a
  // multiple of 256, `fits`)
  constexpr int PER = D / (NWARPS * 32);
  static_assert(D % (NWARPS * 32) == 0, "a row is whole values a thread");
  // an[b] = the RMSNorm of row b (v: this thread's values of it) with weight nw: nw * T(v * r), as
  // mx.fast.rms_norm rounds it
  auto norm_row = [&](int b, const float (&v)[PER], const T* nw) {
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < PER; ++j) ss += v[j] * v[j];
    const float r = rsqrtf(block_sum(ss, red) / D + EPS);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int i = tid + j * NWARPS * 32;
      an[(size_t)b * D + i] = nw[i] * static_cast<T>(v[j] * r);
    }
    __syncthreads();
  };
  // x[b] = T(x[b] + T(sum of the KB partial sums)) then an[b] = its RMSNorm with nw (RowsStep's add_norm); x and
  // the partial sums read through L2, each once
  auto add_norm_row = [&](int b, const T* nw) {
    float v[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const size_t i = (size_t)b * D + tid + j * NWARPS * 32;
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < KB; ++k) s += __ldcg(psum + (size_t)k * MP * D + i);
      v[j] = static_cast<float>(static_cast<T>(__ldcg(x + i) + static_cast<float>(static_cast<T>(s))));
      x[i] = v[j];
    }
    norm_row(b, v, nw);
  };
  // start: the embeddings and the first RMSNorm; block 0 clears the argmax keys
  for (int b = blockIdx.x; b < B; b += gridDim.x) {
    const T* e = embed + (size_t)tok[b] * D;
    float v[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int i = tid + j * NWARPS * 32;
      v[j] = static_cast<float>(e[i]);
      x[(size_t)b * D + i] = v[j];
    }
    norm_row(b, v, LN1[0]);
  }
  if (blockIdx.x == 0) {
    for (int i = tid; i < MP; i += blockDim.x) keys[i] = 0ull;
  }
  ARRIVE;
  TQKV::fetch(WQKV[0], QKV, w_qkv);
  WAIT;
  for (int l = 0; l < LAYERS; ++l) {
    // 1. q|k|v
    product<D, MT, 2, 8, false>(sa, an, WQKV[l], QKV, B, part, w_qkv, [&](int r, int c, float s, float) {
      qkv[(size_t)r * QKV + c] = static_cast<float>(static_cast<T>(s));
    });
    SYNC_GRID;
    // 2. attention: items (row, query head), SPLIT warps an item, NWARPS / SPLIT items a block
    for (int base = blockIdx.x * IPB; base < B * H; base += gridDim.x * IPB) {
      const int item = base + warp / SPLIT, b = item / H, h = item % H, w0 = warp - warp % SPLIT;
      if (item < B * H) {
        const size_t crow = (size_t)b * KV * cap * HD;
        attend_warp<T, H, KV, HD, ATTN_PAR>(static_cast<const float*>(qkv) + (size_t)b * QKV, QN[l], KN[l], freqs,
                                            const_cast<T*>(KC[l]) + crow, const_cast<T*>(VC[l]) + crow, cap, pad[b],
                                            last, h, EPS, SCALE, att + ((size_t)b * H + h) * HD, qbuf + warp * HD,
                                            warp % SPLIT, SPLIT, mbuf + w0, lbuf + w0);
      }
      if (SPLIT > 1) {  // the same for every block (B and the grid are)
        __syncthreads();
        if (item < B * H)
          merge_warps<T, HD>(qbuf + w0 * HD, mbuf + w0, lbuf + w0, SPLIT, tid - w0 * 32, SPLIT * 32,
                             att + ((size_t)b * H + h) * HD);
        __syncthreads();
      }
    }
    ARRIVE;
    TO::fetch(WO[l], D, w_o);
    WAIT;
    // 3. o, in K slices
    product_slices<H * HD, MT, KB>(sa, att, WO[l], D, psum, w_o);
    ARRIVE;
    TGU::fetch(WGU[l], FF, w_gu);
    WAIT;
    // 4. residual add + RMSNorm
    for (int b = blockIdx.x; b < B; b += gridDim.x) add_norm_row(b, LN2[l]);
    SYNC_GRID;
    // 5. gate|up + SwiGLU
    product<D, MT, 2, 8, true>(sa, an, WGU[l], FF, B, part, w_gu, [&](int r, int c, float a0, float a1) {
      const float gt = static_cast<float>(static_cast<T>(a0));
      const float u = static_cast<float>(static_cast<T>(a1));
      const float sg = static_cast<float>(static_cast<T>(1.0f / (1.0f + expf(-gt))));
      const float silu = static_cast<float>(static_cast<T>(gt * sg));
      hid[(size_t)r * FF + c] = static_cast<T>(silu * u);
    });
    ARRIVE;
    TD::fetch(WD[l], D, w_d);
    WAIT;
    // 6. down, in K slices
    product_slices<FF, MT, KB>(sa, hid, WD[l], D, psum, w_d);
    ARRIVE;
    if (l + 1 < LAYERS) TQKV::fetch(WQKV[l + 1], QKV, w_qkv);
    WAIT;
    // 7. residual add + the next layer's RMSNorm (or the final one)
    for (int b = blockIdx.x; b < B; b += gridDim.x) add_norm_row(b, l + 1 < LAYERS ? LN1[l + 1] : norm);
    SYNC_GRID;
  }
  // the LM head: each row's first largest rounded logit
  THEAD::fetch<HEAD_AHEAD>(head, V, w_head);
  head_argmax<D, MT, HEAD_NTW, HEAD_AHEAD>(sa, an, head, V, B, best, keys, w_head);
  SYNC_GRID;
#undef SYNC_GRID
#undef ARRIVE
#undef WAIT
  if (blockIdx.x == 0) {
    for (int b = tid; b < B; b += blockDim.x) out[b] = (int)(0xFFFFFFFFu - (unsigned int)(__ldcg(keys + b) & 0xFFFFFFFFull));
    if (tid == 0) at_out[0] = last + 1;
  }
"""

_FIXED = ("tok", "at", "pad", "embed", "freqs", "norm", "head", "xbuf", "qkvbuf", "abuf", "attbuf", "hbuf", "pbuf",
          "keybuf", "barrier", "tbuf")
PHASES = ("q|k|v", "attention", "o", "add+norm", "gate|up", "down", "add+norm'")  # a layer's, as TIMING marks them


def _shape(model) -> dict[str, int]:
    m = model.model
    a = m.layers[0].self_attn
    hd = a.q_norm.weight.shape[0]
    return dict(D=m.embed_tokens.weight.shape[1], H=a.n_heads, KV=a.n_kv_heads, HD=hd,
                FF=m.layers[0].mlp.down_proj.weight.shape[1], V=m.embed_tokens.weight.shape[0])


def shared_bytes(model) -> int:
    """Dynamic shared memory the kernel asks for: the largest staged A (MAX_ROWS rows of the whole hidden size, or
    of a K slice of the o and down products), rows padded by 64 bytes (stage_a). At least 48 KB + 1: MLX raises the
    kernel's limit only above 48,000 bytes, and static plus dynamic shared memory past 48 KB needs it raised."""
    s = _shape(model)
    width = max(s["D"], s["H"] * s["HD"] // KB, s["FF"] // KB)
    return max(MAX_ROWS * (width + 32) * 2, 48 * 1024 + 16)


def fits(model) -> bool:
    """Whether PersistentRows takes `model` (on any device): FusedStep's bf16 models (`supports`), widths that its
    k slices divide (multiples of 256, so that every warp's share is whole 32-wide chunks), head_dim up to 256
    (attend_warp: HD / 8 lanes a position) and a staged A that fits in shared memory."""
    if not supports(model) or model.model.embed_tokens.weight.dtype != mx.bfloat16:
        return False
    s = _shape(model)
    return (all(d % 256 == 0 for d in (s["D"], s["H"] * s["HD"], s["FF"])) and s["HD"] <= 256
            and shared_bytes(model) <= SMEM_LIMIT)


def static_bytes(model) -> int:
    """The kernel's static shared memory, about: product()'s sums of NW warps (MAX_ROWS rows, 16 columns, float),
    attend_warp's q (NW x head_dim floats) and m and l (NW floats each), block_sum's floats and the head's key a
    row (ptxas: 37,568 bytes at Qwen3-0.6B's widths and 64 rows; this gives 37,824)."""
    return (NW * MAX_ROWS * PART_COLUMNS * 4 + NW * _shape(model)["HD"] * 4 + NW * 2 * 4 + 32 * 4 + MAX_ROWS * 8
            + 256)


def device_takes(model) -> bool:
    """Whether this CUDA device runs the kernel: mma.sync on bf16 needs compute capability 8.0 or later, and a
    block needs its shared memory (the staged A and the static buffers: ~172 KB for Qwen3-0.6B, more than an
    A100's 163 KB or a consumer GPU's 99 KB, which keep RowsStep)."""
    major = cuda_persistent.device_attribute(75)  # cudaDevAttrComputeCapabilityMajor
    optin = cuda_persistent.device_attribute(97)  # cudaDevAttrMaxSharedMemoryPerBlockOptin
    return bool(major and major >= 8 and optin and optin >= shared_bytes(model) + static_bytes(model))


def make_possible(model) -> bool:
    """Whether `make` would give a step for `model` here (without building it)."""
    return ENABLED and fits(model) and device_takes(model) and cuda_persistent.resident_blocks() is not None


def warm_rows(model, batch_size: int) -> list[int]:
    """Batch sizes that compile every kernel PersistentRows needs for batches of 2..batch_size rows (one a count of
    ROW_TILE-row tiles: 2, 17, 33, 49 rows; each compile took ~1.4 s on an H200 at first use), for a warm-up; [] where
    PersistentRows does not run."""
    if not make_possible(model):
        return []
    return [2] + [ROW_TILE * t + 1 for t in range(1, _row_tiles(min(batch_size, MAX_ROWS)))]


def _row_tiles(rows: int) -> int:
    """The kernel's MT for a batch of `rows`."""
    return -(-rows // ROW_TILE)


def make(model, plans: list) -> PersistentRows | None:
    """PersistentRows for this model on this device, or None where it cannot run: disabled, a model it does not
    take (`fits`), a device that cannot run it (`device_takes`) or no grid whose blocks are all resident
    (asr.cuda_persistent.resident_blocks)."""
    return PersistentRows(model, plans, cuda_persistent.resident_blocks()) if make_possible(model) else None


class PersistentRows:
    """A batch's step (2..MAX_ROWS rows, left-padded to one prompt length) of a bf16 mlx-lm Qwen3 as one kernel
    launch, on FastDecoder's layer plans (see the module docstring); same interface as asr.cuda_decode.RowsStep."""

    def __init__(self, model, plans: list, blocks: int) -> None:
        p = plans[0]
        m = model.model
        s = _shape(model)
        self.embed = m.embed_tokens.weight
        head = self.embed if model.args.tie_word_embeddings else model.lm_head.weight
        source, self.names = cuda_persistent.with_layer_tables(_BODY, _FIXED, len(plans))
        source = source.replace("NWARPS", str(NW))
        header = cuda_persistent._DEVICE + _DEVICE.replace("NWARPS", str(NW)).replace("PART_COLUMNS", str(PART_COLUMNS))
        self.kernel = kernel(f"rows{len(plans)}", source, self.names, ("out", "at_out"), header=header, EPS=p.eps,
                             SCALE=p.scale, shared_memory=shared_bytes(model))

        qkv = (s["H"] + 2 * s["KV"]) * s["HD"]
        bf16 = mx.bfloat16
        self.fixed = [self.embed, p.freqs, m.norm.weight, head, scratch(MAX_ROWS * s["D"]), scratch(MAX_ROWS * qkv),
                      scratch(MAX_ROWS * s["D"], bf16), scratch(MAX_ROWS * s["H"] * s["HD"], bf16),
                      scratch(MAX_ROWS * s["FF"], bf16), scratch(KB * MAX_ROWS * s["D"]),
                      scratch(MAX_ROWS, mx.uint64), scratch(2, mx.uint32), scratch(len(PHASES) * len(plans) + 3, mx.uint64)]
        mx.eval(self.fixed)
        self.times = self.fixed[-1]  # with TIMING: the start, then the end of each phase (start, layers', head)
        per_layer = [[q.ln1, q.ln2, q.q_norm, q.k_norm, q.qkv.weight, q.o.weight, q.gate_up.weight, q.down.weight]
                     for q in plans]
        # every input but the tokens, position, padding and caches, in the kernel's order (built once)
        self.constant = self.fixed + [a for kind in zip(*per_layer, strict=True) for a in kind]
        self.template = [("T", bf16), ("LAYERS", len(plans)), ("D", s["D"]), ("FF", s["FF"]), ("H", s["H"]),
                         ("KV", s["KV"]), ("HD", s["HD"]), ("V", s["V"]), ("KB", KB), ("ATTN_PAR", ATTN_PAR),
                         ("HEAD_NTW", 2), ("HEAD_AHEAD", 8)]
        self.blocks = blocks

    def start(self, kv: list, prompt_slots: int, left_pad: list[int]):
        """A step function tokens [B] -> [B] (2 <= B <= MAX_ROWS) continuing after `prompt_slots` cached positions."""
        rows = len(left_pad)
        if not 1 < rows <= MAX_ROWS:
            raise ValueError(f"PersistentRows takes 2 to {MAX_ROWS} rows, not {rows}")
        pad = mx.array(left_pad + [0] * (SMALL_ARRAY - len(left_pad)), dtype=mx.int32)
        options = dict(template=[*self.template, ("MT", _row_tiles(rows)), ("TIMING", TIMING)],
                       grid=(self.blocks * 32 * NW, 1, 1), threadgroup=(32 * NW, 1, 1),
                       output_shapes=[(max(rows, SMALL_ARRAY),), (SMALL_ARRAY,)], output_dtypes=[mx.int32, mx.int32])

        def run(tok: mx.array, at: mx.array, pad_: mx.array, kv_: list) -> tuple[mx.array, mx.array]:
            inputs = [tok, at, pad_, *self.constant, *(k for k, _ in kv_), *(v for _, v in kv_)]
            nxt, at_next = self.kernel(inputs=inputs, **options)
            return nxt[:rows], at_next

        return _stepper(run, _prepare_caches(kv), prompt_slots, pad)
