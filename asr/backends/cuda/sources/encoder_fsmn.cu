// one thread per output element (b, t, c) of [B, L, D]; v = qkv[b, t, 2D + c]; valid[b] rows are real, the rest
// (padding) read as zeros and are written as zeros
  const int L = qkv_shape[1];
  const int B = qkv_shape[0];
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)B * L * D) return;
  const int c = idx % D;
  const int t = (idx / D) % L;
  const int b = idx / ((size_t)D * L);
  const int n = valid[b];
  if (t >= n) {
    out[idx] = static_cast<T>(0.f);
    return;
  }
  const T* v = qkv + (size_t)b * L * 3 * D + 2 * D + c;
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < KS; ++i) {
    const int s = t + i - LEFT;
    if (s >= 0 && s < n) acc += static_cast<float>(w[c * KS + i]) * static_cast<float>(v[(size_t)s * 3 * D]);
  }
  out[idx] = static_cast<T>(static_cast<float>(static_cast<T>(acc)) + static_cast<float>(v[(size_t)t * 3 * D]));
