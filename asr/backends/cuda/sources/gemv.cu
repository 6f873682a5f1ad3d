// One block = WARPS warps; each warp computes ROWS outputs. MODE 0: out = W x; 1: out = res + W x;
// 2 (SwiGLU): W holds gate rows [0, N) then up rows [N, 2N); out[j] = silu(gate_j x) * (up_j x);
// 3 (argmax keys): out[block] = the block's largest key over its rows, key = order(T(W_j x)) << 32 | ~j, so the
// largest key over all blocks is the first row of the largest rounded value (what argmax returns).
// NORM: x is first RMS-normalised with weight nw (as mx.fast.rms_norm rounds it).
// The warp's weights are loaded into registers first: their latency overlaps reading and normalising x.
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
