__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned int ld_acquire(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// A grid-wide barrier in two halves on bar (counters that persist across launches: bar[0] counts arrivals, bar[1]
// is the generation), so that loads that depend on no other block (the next product's weights) are issued between
// them and their latency overlaps the wait. grid_arrive: this block's writes so far are released to the grid;
// returns the generation to wait past (thread 0's). grid_wait: returns once every block has arrived, with their
// writes visible. With `mark` (timing, tools/gpu/probe_persistent.py): mark[0] = the latest time a block arrived,
// mark[1] = when block 0 left.
__device__ __forceinline__ unsigned int grid_arrive(unsigned int* bar, unsigned long long* mark) {
  __syncthreads();
  unsigned int g = 0;
  if (threadIdx.x == 0) {
    if (mark != nullptr) atomicMax(mark, global_ns());
    g = ld_acquire(bar + 1);
    __threadfence();
    if (atomicAdd(bar, 1u) == gridDim.x - 1) {
      atomicExch(bar, 0u);
      __threadfence();
      atomicAdd(bar + 1, 1u);
    }
  }
  return g;
}

__device__ __forceinline__ void grid_wait(const unsigned int* bar, unsigned int g, unsigned long long* mark) {
  if (threadIdx.x == 0) {
    while (ld_acquire(bar + 1) == g) {
    }
    if (mark != nullptr && blockIdx.x == 0) mark[1] = global_ns();
  }
  __syncthreads();
}

// xs[0..n) = src (a float scratch buffer, read through L2, or a weight row), RMS-normalised with nw when
// nw != nullptr (as mx.fast.rms_norm rounds it)
template <typename T, typename S>
__device__ __forceinline__ void load_x(float* xs, const S* src, const T* nw, int n, float eps, float* red) {
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = ldf(src + i);
    xs[i] = v;
    ss += v * v;
  }
  if (nw != nullptr) {
    const float r = rsqrtf(block_sum(ss, red) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) xs[i] = static_cast<float>(nw[i] * static_cast<T>(xs[i] * r));
  }
  __syncthreads();
}

// the weight rows a warp holds for gemv_rows: RG rows (each NR rows of W [NR * N, K]) as load_row's pieces
template <typename T, int K, int RG, int NR>
struct Rows {
  uint4 raw[RG][NR][K * (int)sizeof(T) / 512];
};

// the first RG rows this warp takes in gemv_rows of W [NR * N, K], loaded ahead: weights depend on no other block,
// so they are fetched before the grid barrier that the product waits behind, and their latency overlaps it
template <typename T, int K, int RG, int NR>
__device__ __forceinline__ void fetch_rows(const T* w, int N, Rows<T, K, RG, NR>& rows) {
  const int gw = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
#pragma unroll
  for (int r = 0; r < RG; ++r) load_row<T, K, NR>(w, N, gw * RG + r, rows.raw[r]);
}

// rows [0, N) of W [NR * N, K] against xs, RG rows a warp at a time (their weights loaded first, all in flight;
// the first RG already in `rows` when FETCHED); epi(row, sum of gate or plain row, sum of up row) runs on every
// lane with the warp's sums
template <typename T, int K, int RG, int NR, bool FETCHED, typename F>
__device__ __forceinline__ void gemv_rows(const T* w, int N, const float* xs, Rows<T, K, RG, NR>& rows, F epi) {
  const int gw = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int GW = gridDim.x * (blockDim.x >> 5);
  for (int base = gw * RG; base < N; base += GW * RG) {
    if (!FETCHED || base != gw * RG) {
#pragma unroll
      for (int r = 0; r < RG; ++r) load_row<T, K, NR>(w, N, base + r, rows.raw[r]);
    }
#pragma unroll
    for (int r = 0; r < RG; ++r) {
      float acc[NR];
#pragma unroll
      for (int s = 0; s < NR; ++s) acc[s] = warp_sum(dot_lane<T, K>(rows.raw[r][s], xs));
      if (base + r < N) epi(base + r, acc[0], acc[NR - 1]);
    }
  }
}
