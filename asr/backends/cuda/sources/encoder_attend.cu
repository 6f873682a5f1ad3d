// grid: B * H * ceil(L / QT) blocks of NW warps; block -> (row b, head h, queries q0..q0+QT-1), QT / NW per warp
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
