"""KV caches of the MLX-based steps: mlx-lm's caches for a prefill, taken over as fixed-capacity buffers that grow
CACHE_STEP positions at a time (a step's shapes then change only every CACHE_STEP tokens)."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

CACHE_STEP = 128


def capacity_for(positions: int) -> int:
    """The buffer size that holds `positions`: rounded up to CACHE_STEP."""
    return -(-positions // CACHE_STEP) * CACHE_STEP


def prefill_cache(layers: int, left_pad: list[int]) -> list:
    """mlx-lm KV caches (one a layer) for a prefill of len(left_pad) rows, row b left-padded by left_pad[b]
    positions. A batch of one needs no padding mask: mlx-lm's plain cache gives causal attention."""
    cache = [KVCache() if len(left_pad) == 1 else BatchKVCache(left_pad) for _ in range(layers)]
    for c in cache:  # mlx-lm allocates (and zero-fills) 256 positions a time by default
        c.step = CACHE_STEP
    return cache


def decode_buffer(a: mx.array, prompt_slots: int) -> mx.array:
    """A prefill cache buffer [B, H, T, D] (positions 0..prompt_slots-1 written) as a decode buffer with room for the
    next position: the buffer itself when it has room and a CACHE_STEP capacity, else a grown copy. Positions past
    prompt_slots hold zeros (mlx-lm allocates with zeros) and are read only once written or masked."""
    if a.shape[2] > prompt_slots and a.shape[2] % CACHE_STEP == 0:
        return a
    return grow(a[..., :prompt_slots, :], prompt_slots + 1)


def grow(a: mx.array, size: int) -> mx.array:
    """`a` [B, H, T, D] zero-padded along T to hold `size` positions (capacity_for)."""
    extra = capacity_for(size) - a.shape[2]
    return a if extra <= 0 else mx.concatenate([a, mx.zeros((*a.shape[:2], extra, a.shape[3]), a.dtype)], axis=2)


def with_room(kv: list, slot: int) -> list:
    """The [k, v] buffers of every layer, grown by CACHE_STEP positions when position `slot` does not fit."""
    if slot < kv[0][0].shape[2]:
        return kv
    return [[grow(k, slot + 1), grow(v, slot + 1)] for k, v in kv]
