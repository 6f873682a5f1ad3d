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
#define WAIT                    grid_wait(bar, gen, nullptr);   if (times != nullptr && blockIdx.x == 0 && tid == 0) times[phase++] = global_ns()
#define SYNC_GRID   ARRIVE;           WAIT
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
