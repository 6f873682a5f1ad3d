// grid: B * H blocks (row b, query head h), NW warps each: attend_head (above) for row b's token. Row b's cache holds
// its tokens at positions left_pad[b]..slot (a batch's prompts are left-padded to one length); its new token goes to
// position `slot` with RoPE position slot - left_pad[b]. The cache capacity is read at run time (k_cache_shape), so
// one compiled kernel serves every cache size.
  const int b = blockIdx.x / H, h = blockIdx.x % H;
  const size_t cache_row = (size_t)b * KV * k_cache_shape[2] * HD;
  attend_head<T, H, KV, HD, NW, PAR>(qkv + (size_t)b * (H + 2 * KV) * HD, q_norm, k_norm, freqs,
                                     const_cast<T*>(k_cache) + cache_row, const_cast<T*>(v_cache) + cache_row,
                                     k_cache_shape[2], left_pad[b], slot[0], h, EPS, SCALE,
                                     out + ((size_t)b * H + h) * HD);
