// grid: B blocks (rows) of 32 * WARPS threads. The residual add and the RMSNorm after it, rounded as MLX rounds
// `x + y` and mx.fast.rms_norm: h = x + y; n = w * (h * rsqrt(mean(h^2) + eps)).
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
