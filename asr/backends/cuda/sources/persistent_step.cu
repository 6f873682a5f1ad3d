  constexpr int QKV = (H + 2 * KV) * HD;
  constexpr int XS = D > H * HD ? (D > FF ? D : FF) : (H * HD > FF ? H * HD : FF);
  constexpr bool PF = AHEAD != 0;
  __shared__ float xs[XS];
  __shared__ float red[32];
  __shared__ unsigned long long bk[NWARPS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float* x = const_cast<float*>(xbuf);
  float* qkv = const_cast<float*>(qkvbuf);
  float* att = const_cast<float*>(attbuf);
  float* hid = const_cast<float*>(hbuf);
  unsigned int* bar = const_cast<unsigned int*>(barrier);
  unsigned long long* keys = const_cast<unsigned long long*>(keybuf);
  const int last = at[0];
  const int cap = kc0_shape[2];
  const int token = tok[0];
  unsigned long long* times = TIMING ? const_cast<unsigned long long*>(tbuf) : nullptr;
  int phase = 0;
  unsigned int gen = 0;
#define ARRIVE gen = grid_arrive(bar, times == nullptr ? nullptr : times + 2 * (1 + phase))
#define WAIT grid_wait(bar, gen, times == nullptr ? nullptr : times + 2 * (1 + phase++))
  if (times != nullptr && blockIdx.x == 0 && tid == 0) times[0] = global_ns();
$TABLES
  // weight rows loaded ahead of the barrier before their product (AHEAD): q|k|v and the head share one shape
  Rows<T, D, 4, 1> r_qkv;
  Rows<T, H * HD, 1, 1> r_o;
  Rows<T, D, GU_ROWS, 2> r_gu;
  Rows<T, FF, 1, 1> r_d;
  if (PF) fetch_rows(WQKV[0], QKV, r_qkv);
  for (int l = 0; l < LAYERS; ++l) {
    // 1. RMSNorm + q|k|v (layer 0 reads the token's embedding; block 0 keeps it as the residual stream)
    if (l == 0) {
      const T* e = embed + (size_t)token * D;
      if (blockIdx.x == 0) {
        for (int i = tid; i < D; i += blockDim.x) x[i] = static_cast<float>(e[i]);
      }
      load_x<T>(xs, e, LN1[0], D, EPS, red);
    } else {
      load_x<T>(xs, x, LN1[l], D, EPS, red);
    }
    gemv_rows<T, D, 4, 1, PF>(WQKV[l], QKV, xs, r_qkv, [&](int row, float a, float) {
      if (lane == 0) qkv[row] = static_cast<float>(static_cast<T>(a));
    });
    ARRIVE;
    if (PF) fetch_rows(WO[l], D, r_o);
    WAIT;
    // 2. attention: block h < H takes query head h
    if (blockIdx.x < H) {
      attend_head<T, H, KV, HD, NWARPS, ATTN_PAR>(static_cast<const float*>(qkv), QN[l], KN[l], freqs, const_cast<T*>(KC[l]),
                                        const_cast<T*>(VC[l]), cap, 0, last, blockIdx.x, EPS, SCALE,
                                        att + blockIdx.x * HD);
    }
    ARRIVE;
    WAIT;
    // 3. x = x + o(att)
    load_x<T>(xs, att, nullptr, H * HD, 0.f, red);
    gemv_rows<T, H * HD, 1, 1, PF>(WO[l], D, xs, r_o, [&](int row, float a, float) {
      if (lane == 0) x[row] = static_cast<float>(static_cast<T>(__ldcg(x + row) + static_cast<float>(static_cast<T>(a))));
    });
    ARRIVE;
    if (PF) fetch_rows(WGU[l], FF, r_gu);
    WAIT;
    // 4. RMSNorm + gate|up + SwiGLU
    load_x<T>(xs, x, LN2[l], D, EPS, red);
    gemv_rows<T, D, GU_ROWS, 2, PF>(WGU[l], FF, xs, r_gu, [&](int row, float a0, float a1) {
      if (lane == 0) {
        const float gt = static_cast<float>(static_cast<T>(a0));
        const float u = static_cast<float>(static_cast<T>(a1));
        const float sg = static_cast<float>(static_cast<T>(1.0f / (1.0f + expf(-gt))));
        const float silu = static_cast<float>(static_cast<T>(gt * sg));
        hid[row] = static_cast<float>(static_cast<T>(silu * u));
      }
    });
    ARRIVE;
    if (PF) fetch_rows(WD[l], D, r_d);
    WAIT;
    // 5. x = x + down(hid)
    load_x<T>(xs, hid, nullptr, FF, 0.f, red);
    gemv_rows<T, FF, 1, 1, PF>(WD[l], D, xs, r_d, [&](int row, float a, float) {
      if (lane == 0) x[row] = static_cast<float>(static_cast<T>(__ldcg(x + row) + static_cast<float>(static_cast<T>(a))));
    });
    ARRIVE;
    if (PF) {
      if (l + 1 < LAYERS) {
        fetch_rows(WQKV[l + 1], QKV, r_qkv);
      } else {
        fetch_rows(head, V, r_qkv);
      }
    }
    WAIT;
  }
  // final RMSNorm + LM head: the first row of the largest rounded logit
  load_x<T>(xs, x, norm, D, EPS, red);
  unsigned long long best = 0ull;
  gemv_rows<T, D, 4, 1, PF>(head, V, xs, r_qkv, [&](int row, float a, float) {
    const unsigned long long k = argmax_key(static_cast<float>(static_cast<T>(a)), row);
    best = k > best ? k : best;
  });
  best = block_max_key(best, bk);
  if (tid == 0) keys[blockIdx.x] = best;
  ARRIVE;
  WAIT;
#undef ARRIVE
#undef WAIT
  if (blockIdx.x == 0 && warp == 0) {
    unsigned long long b = 0ull;
    for (int i = lane; i < gridDim.x; i += 32) {
      const unsigned long long k = __ldcg(keys + i);
      b = k > b ? k : b;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const unsigned long long o = __shfl_xor_sync(0xffffffff, b, off);
      b = o > b ? o : b;
    }
    if (lane == 0) {
      out[0] = (int)(0xFFFFFFFFu - (unsigned int)(b & 0xFFFFFFFFull));
      at_out[0] = last + 1;
      if (times != nullptr) times[1] = global_ns();
    }
  }
