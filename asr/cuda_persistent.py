"""The whole batch-of-one decode step of a Qwen3 in ONE CUDA kernel launch (PersistentStep).

FusedStep (asr.cuda_decode) is five kernels a layer, ~146 a step, and on MLX's CUDA backend each kernel costs host
time (MLX builds and launches a CUDA graph node for it): tools/gpu/profile_clip.py measured 1.25-1.5 ms of host time
a step against ~0.85 ms of GPU work, so the step waited on the host. Here one launch does the step: one block per
streaming multiprocessor (all resident at once), and the blocks meet at a grid-wide barrier between phases:

  per layer: RMSNorm + q|k|v products | attention (one block per query head: q/k RMSNorm, RoPE, the KV write in
  place, online softmax over positions 0..pos) | o product + residual | RMSNorm + gate|up + SwiGLU |
  down product + residual;  then the final RMSNorm + the LM head, each warp keeping the largest argmax key of its
  rows, the blocks' keys reduced by block 0 into the token.

The math and its rounding are FusedStep's (each op's result rounded to the model dtype where MLX rounds it, float32
accumulation); activations live in float32 scratch buffers holding dtype-rounded values. The barrier needs every
block resident: the grid is the device's SM count (read through the CUDA runtime MLX loaded) with 256 threads a
block, which fits one block per SM whatever registers the kernel takes. Where the SM count cannot be read, or the
process has an MPS share of the GPU (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE below 100: fewer SMs than reported),
FusedStep runs instead.

Buffers written by other blocks are read through L2 (`__ldcg`): L1 is not coherent across SMs within a launch.
"""

from __future__ import annotations

import ctypes
import os

import mlx.core as mx

from .cuda_decode import ATTEND_PAR, SMALL_ARRAY, _prepare_caches, _stepper, kernel

ENABLED = os.environ.get("FUNASR_NANO_PERSISTENT", "1") != "0"  # A/B switch (tools/gpu/profile_clip.py, tests)
NW = 8  # warps a block
# How the step hides the latency of its weight reads (A/B switches: tools/gpu/probe_persistent.py --schedules):
# AHEAD: each warp loads its first rows of a product before the grid barrier in front of it (GU_ROWS rows of
# gate|up a warp, so that one round covers all of them on 132 SMs).
# ATTN_PAR: key/value positions a warp loads at a time in the attention (asr.cuda_decode's attend_head).
# TIMING: record each phase's end (tools/gpu/probe_persistent.py reads PersistentStep.times).
SCHEDULE = dict(AHEAD=1, GU_ROWS=3, ATTN_PAR=ATTEND_PAR, TIMING=0)

_DEVICE = """
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
"""

_BODY = """
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
"""

_PER_LAYER = ("ln1", "ln2", "qn", "kn", "wqkv", "wo", "wgu", "wd", "kc", "vc")
_FIXED = ("tok", "at", "embed", "freqs", "norm", "head", "xbuf", "qkvbuf", "attbuf", "hbuf", "keybuf", "barrier", "tbuf")


def with_layer_tables(body: str, fixed: tuple[str, ...], layers: int) -> tuple[str, list[str]]:
    """A one-launch step's kernel body for `layers` layers and its input names: the `fixed` inputs, then each of
    _PER_LAYER's arrays of every layer, which the body reads through pointer tables (`$TABLES`: WQKV[l] etc.)."""
    names = list(fixed)
    tables = []
    for kind in _PER_LAYER:
        names += [f"{kind}{i}" for i in range(layers)]
        tables.append(f"  const T* const {kind.upper()}[LAYERS] = {{{', '.join(f'{kind}{i}' for i in range(layers))}}};")
    return body.replace("$TABLES", "\n".join(tables)), names


def scratch(n: int, dtype=mx.float32) -> mx.array:
    """A one-launch step's scratch buffer of at least n zeros, filled on the device so that MLX allocates device
    memory (host-made arrays and any of 8 bytes or less go to managed memory, where every access of the barrier's
    spin crossed PCIe: 116 ms a step)."""
    return mx.zeros((max(n, 64),), dtype=dtype)


def device_attribute(code: int) -> int | None:
    """A cudaDeviceAttr of the current CUDA device (driver_types.h: 16 SM count, 75 compute capability major, 97
    opt-in shared memory a block), through the CUDA runtime MLX has loaded; None where it cannot be read."""
    try:
        lib = ctypes.CDLL("libcudart.so.13")
        dev, value = ctypes.c_int(0), ctypes.c_int(0)
        if lib.cudaGetDevice(ctypes.byref(dev)) != 0:
            return None
        if lib.cudaDeviceGetAttribute(ctypes.byref(value), code, dev.value) != 0:
            return None
        return value.value if value.value > 0 else None
    except (OSError, AttributeError):
        return None


def sm_count() -> int | None:
    """The current CUDA device's SM count (None where it cannot be read)."""
    return device_attribute(16)  # cudaDevAttrMultiProcessorCount


def resident_blocks() -> int | None:
    """A grid of one block per SM, all resident at once (what a grid barrier needs), or None where that cannot be
    known: the SM count unknown, or an MPS share of the GPU (there the SM count overstates how many blocks can be
    resident and the barrier would wait forever)."""
    if os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "100").strip() not in ("", "100"):
        return None
    return sm_count()


def blocks_for(model) -> int | None:
    """The grid (blocks = SMs) PersistentStep takes for `model` here, or None where it cannot run: disabled, no
    `resident_blocks`, or fewer SMs than query heads (one block a head)."""
    blocks = resident_blocks() if ENABLED else None
    return blocks if blocks and blocks >= model.model.layers[0].self_attn.n_heads else None


def make(model, plans: list) -> PersistentStep | None:
    """PersistentStep for this model on this device, or None where it cannot run (`blocks_for`)."""
    blocks = blocks_for(model)
    return PersistentStep(model, plans, blocks) if blocks else None


class PersistentStep:
    """The batch-of-one step of an mlx-lm Qwen3 as one kernel launch, on FastDecoder's layer plans (see the module
    docstring); same interface as asr.cuda_decode.FusedStep."""

    def __init__(self, model, plans: list, blocks: int) -> None:
        p = plans[0]
        m = model.model
        self.embed = m.embed_tokens.weight
        dtype = self.embed.dtype
        head = self.embed if model.args.tie_word_embeddings else model.lm_head.weight
        heads, kv_heads, head_dim = p.q_shape[1], p.kv_shape[1], p.q_shape[3]
        dim, inter = self.embed.shape[1], p.down.weight.shape[1]
        if blocks < heads:
            raise ValueError(f"PersistentStep needs at least {heads} blocks; the device has {blocks} SMs")
        source, self.names = with_layer_tables(_BODY, _FIXED, len(plans))
        source = source.replace("NWARPS", str(NW))
        self.kernel = kernel(f"step{len(plans)}", source, self.names, ("out", "at_out"), header=_DEVICE, EPS=p.eps,
                             SCALE=p.scale)

        self.fixed = [self.embed, p.freqs, m.norm.weight, head, scratch(dim), scratch((heads + 2 * kv_heads) * head_dim),
                      scratch(heads * head_dim), scratch(inter), scratch(blocks, mx.uint64), scratch(2, mx.uint32),
                      scratch(2 * (5 * len(plans) + 2), mx.uint64)]
        mx.eval(self.fixed)
        self.times = self.fixed[-1]  # with SCHEDULE["TIMING"]: [start, end] then [last arrival, block 0 left] a phase
        per_layer = [[q.ln1, q.ln2, q.q_norm, q.k_norm, q.qkv.weight, q.o.weight, q.gate_up.weight, q.down.weight]
                     for q in plans]
        # every input but the token, position and caches, in the kernel's order (built once, not per token)
        self.constant = self.fixed + [a for kind in zip(*per_layer, strict=True) for a in kind]
        self.options = dict(
            template=[("T", dtype), ("LAYERS", len(plans)), ("D", dim), ("FF", inter), ("H", heads), ("KV", kv_heads),
                      ("HD", head_dim), ("V", head.shape[0]), *SCHEDULE.items()],
            grid=(blocks * 32 * NW, 1, 1), threadgroup=(32 * NW, 1, 1),
            output_shapes=[(SMALL_ARRAY,), (SMALL_ARRAY,)], output_dtypes=[mx.int32, mx.int32])

    def start(self, kv: list, prompt_slots: int):
        """A step function tokens [1] -> [1] continuing after `prompt_slots` cached positions in `kv`."""
        return _stepper(self._forward, _prepare_caches(kv), prompt_slots)

    def _forward(self, tok: mx.array, at: mx.array, kv: list) -> tuple[mx.array, mx.array]:
        inputs = [tok, at, *self.constant, *(k for k, _ in kv), *(v for _, v in kv)]
        nxt, at_next = self.kernel(inputs=inputs, **self.options)  # [SMALL_ARRAY]: device memory, see there
        return nxt[:1], at_next
