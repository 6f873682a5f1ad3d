"""Decode steps on CUDA with few kernels: FusedStep (a batch of one, five custom kernels a layer) and RowsStep (any
batch, and quantized LLMs: MLX's products with two custom kernels between them), on the layer plans prepared when
the model loads (`prepare`: q|k|v and gate|up fused into one product each).

A decode step built from MLX operations is ~450 kernels, and on MLX's CUDA backend each costs 2.6-4.5 us of host
time, so the step is bound by the host, not by the GPU. FusedStep does the same math in five kernels a layer, and
the whole step is one `mx.compile`d function (no Python per operation):

1. `gemv` (matrix-vector: a batch of one reads each weight once) after the input RMSNorm: q|k|v;
2. `attend`: q/k RMSNorm and RoPE, the new k and v written into the KV cache at the current position, and
   single-query attention over positions 0..pos (16 warps per head share the positions, two at a time);
3. `gemv` with the residual add: x + o_proj(attention);
4. `gemv` for gate|up after the post-attention RMSNorm, with SwiGLU: silu(gate) * up;
5. `gemv` with the residual add: x + down_proj(...).

The head is `gemv` after the final norm over the (tied) embedding, which keeps each block's argmax key; the token
is the largest key's row (`argmax_of_keys`), without writing the logits. Rounding follows the MLX operations it
replaces (each op's result is rounded to the model dtype where MLX rounds it), with float32 accumulation; products
sum in a different order than cuBLAS, so logits agree to rounding, not bit for bit.

The KV cache is written in place: `attend` receives the cache arrays as inputs and writes position `pos` through
them. That is safe here because the caches belong to the decoder alone, nothing else reads them, and every later
reader (the next step's `attend` of the same layer) depends on this one through the hidden state.

FusedStep takes unquantized bf16 or fp32 weights (`supports`); RowsStep bf16 or fp32 activations, quantized
products included (`supports_rows`). The one-launch steps (asr.backends.cuda.persistent, .rows) replace them where
the device can run those; fp16 models keep the reference MLX step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3
from mlx_lm.models.activations import swiglu

from ...decode.kv import with_room
from ...model.llm import HFRoPE, lm_head
from .kernels import SMALL_ARRAY, Launch, Launch2, kernel, source

# key/value positions a warp of `attend` loads at a time (attend_head). A batch of one is bound by the latency of
# these reads: 8 (PersistentStep's schedule starts from it). RowsStep at a batch of 64 has 1,024 blocks to hide it and
# fewer registers matter more: 2 (H200: 4.61 / 4.80 ms a step against 5.05 / 5.17 for 8).
ATTEND_PAR = 8
ROWS_ATTEND_PAR = 2
GEMV_WARPS = 4
NORM_WARPS = 4

_GEMV = source("gemv.cu")
_ATTEND = source("attend.cu")
_ADD_NORM = source("add_norm.cu")


# --- the layers' weights, prepared at load ---------------------------------------------------------------------
class FusedLinear:
    """One or several bias-free linear layers on the same input as one product (q|k|v, gate|up, o, down).

    Several layers' weights are concatenated once, at load; the original layers' parameters are replaced by row
    slices of them (views: no extra memory), so the mlx-lm modules (prefill, teacher forcing) keep working
    unchanged. The transposed weight is prepared once, so a step adds no transpose per product.
    """

    def __init__(self, layers: list[nn.Module]):
        first = layers[0]
        self.quantized = isinstance(first, nn.QuantizedLinear)
        if any("bias" in m for m in layers) or any(type(m) is not type(first) for m in layers):
            raise TypeError("only bias-free layers of one kind can be fused")
        names = [k for k in ("weight", "scales", "biases") if k in first]
        if self.quantized:
            self.group_size, self.bits, self.mode = first.group_size, first.bits, first.mode
        self.sizes = [int(m["weight"].shape[0]) for m in layers]
        if len(layers) == 1:
            self.params = {k: first[k] for k in names}
        else:
            self.params = {k: mx.concatenate([m[k] for m in layers], axis=0) for k in names}
            mx.eval(self.params)
            offset = 0
            for m, n in zip(layers, self.sizes, strict=True):
                for k in names:
                    setattr(m, k, self.params[k][offset: offset + n])
                offset += n
            mx.eval([m.parameters() for m in layers])
        self._w_t = None if self.quantized else self.params["weight"].T

    @property
    def weight(self) -> mx.array:
        """The (fused) weight [N, K]."""
        return self.params["weight"]

    def __call__(self, x: mx.array) -> mx.array:
        """x [B, K] -> [B, N]."""
        p = self.params
        if self.quantized:
            return mx.quantized_matmul(x, p["weight"], scales=p["scales"], biases=p.get("biases"), transpose=True,
                                       group_size=self.group_size, bits=self.bits, mode=self.mode)
        return x @ self._w_t


@dataclass
class LayerPlan:
    """One decoder layer's arrays and products, looked up once (module attribute access is slow in a hot loop)."""

    ln1: mx.array
    ln2: mx.array
    q_norm: mx.array
    k_norm: mx.array
    eps: float
    freqs: mx.array
    rope_dims: int
    scale: float
    q_shape: tuple[int, ...]
    kv_shape: tuple[int, ...]
    qkv: FusedLinear
    o: FusedLinear
    gate_up: FusedLinear
    down: FusedLinear


def prepare(model: qwen3.Model) -> list[LayerPlan]:
    """Every layer's plan, with q|k|v and gate|up fused (the model's own layers then read views of them)."""
    plans = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        head_dim = a.q_norm.weight.shape[0]
        plans.append(LayerPlan(
            ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
            q_norm=a.q_norm.weight, k_norm=a.k_norm.weight, eps=layer.input_layernorm.eps,
            freqs=a.rope.freqs, rope_dims=a.rope.dims, scale=a.scale,
            q_shape=(1, a.n_heads, 1, head_dim), kv_shape=(1, a.n_kv_heads, 1, head_dim),
            qkv=FusedLinear([a.q_proj, a.k_proj, a.v_proj]), o=FusedLinear([a.o_proj]),
            gate_up=FusedLinear([mlp.gate_proj, mlp.up_proj]), down=FusedLinear([mlp.down_proj])))
    return plans


# --- kernel launches ---------------------------------------------------------------------------------------------
def gemv_launch(shape: tuple[int, int], dtype, *, norm: bool = False, eps: float = 0.0, res: bool = False,
                swiglu: bool = False, argmax: bool = False, rows: int = 2) -> Launch:
    """W [N', K] x [K] -> [N] (N = N' / 2 with swiglu); inputs (x, norm weight, W, residual), unused ones any array.
    argmax: instead of the N values, each block's largest argmax key (uint64, see _GEMV; `argmax_of_keys`)."""
    n_out, k = shape[0] // (2 if swiglu else 1), shape[1]
    per_block = GEMV_WARPS * rows
    blocks = -(-n_out // per_block)
    mode = 3 if argmax else 2 if swiglu else 1 if res else 0
    return Launch(kernel("gemv", _GEMV, ("x", "nw", "w", "res"), EPS=eps), dict(
        template=[("T", dtype), ("K", k), ("N", n_out), ("ROWS", rows), ("WARPS", GEMV_WARPS),
                  ("MODE", mode), ("NORM", norm)],
        grid=(32 * GEMV_WARPS * blocks, 1, 1), threadgroup=(32 * GEMV_WARPS, 1, 1),
        output_shapes=[(blocks,) if argmax else (n_out,)], output_dtypes=[mx.uint64 if argmax else dtype]))


def argmax_of_keys(keys: mx.array) -> mx.array:
    """The row index [1] (int32) held by the largest of a MODE-3 gemv's block keys."""
    low = mx.max(keys, keepdims=True) & 0xFFFFFFFF
    return (0xFFFFFFFF - low).astype(mx.int32)


def attend_launch(dtype, *, batch: int, heads: int, kv_heads: int, head_dim: int, eps: float, scale: float,
                  warps: int, par: int) -> Launch:
    """Inputs (qkv [batch, (heads + 2 kv_heads) head_dim], q_norm, k_norm, freqs, slot [1], left_pad [batch],
    k_cache, v_cache [batch, kv_heads, capacity, head_dim]) -> [batch, heads * head_dim]."""
    inputs = ("qkv", "q_norm", "k_norm", "freqs", "slot", "left_pad", "k_cache", "v_cache")
    return Launch(kernel("attend", _ATTEND, inputs, EPS=eps, SCALE=scale), dict(
        template=[("T", dtype), ("H", heads), ("KV", kv_heads), ("HD", head_dim), ("NW", warps),
                  ("PAR", par)],
        grid=(32 * warps * batch * heads, 1, 1), threadgroup=(32 * warps, 1, 1),
        output_shapes=[(batch, heads * head_dim)], output_dtypes=[dtype]))


def add_norm_launch(dtype, *, batch: int, dim: int, eps: float) -> Launch2:
    """Inputs (x, y [batch, dim], norm weight [dim]) -> (x + y, rms_norm(x + y))."""
    return Launch2(kernel("add_norm", _ADD_NORM, ("x", "y", "nw"), ("h_out", "n_out"), EPS=eps), dict(
        template=[("T", dtype), ("D", dim), ("WARPS", NORM_WARPS)],
        grid=(32 * NORM_WARPS * batch, 1, 1), threadgroup=(32 * NORM_WARPS, 1, 1),
        output_shapes=[(batch, dim), (batch, dim)], output_dtypes=[dtype, dtype]))


@dataclass(frozen=True)
class Launches:
    """The kernel launches a step builds on (each a factory of prepared launches), and whether the step may be one
    compiled graph. The default is the CUDA kernels; tests pass the MLX operations they stand for, uncompiled
    (those write the caches through Python objects), to check a step's wiring on any machine."""

    gemv: Callable[..., Callable] = gemv_launch
    attend: Callable[..., Callable] = attend_launch
    add_norm: Callable[..., Callable] = add_norm_launch
    compile: bool = True


KERNELS = Launches()


def prepare_caches(kv: list) -> list:
    """The caches (grown by the caller) as evaluated, row-contiguous buffers: the kernels write into them through
    raw pointers, so no views, and they must exist before the first write."""
    kv = [[mx.contiguous(k), mx.contiguous(v)] for k, v in kv]
    mx.eval(kv)
    return kv


def stepper(run, kv: list, prompt_slots: int, *extra: mx.array):
    """A step function tokens -> next tokens over `run(tok, at, *extra, kv)` (a compiled step returning the next
    tokens and at + 1), growing the caches by asr.decode.kv.CACHE_STEP positions when full."""
    state = {"kv": kv, "slot": prompt_slots, "at": mx.array([prompt_slots] * SMALL_ARRAY, dtype=mx.int32)}

    def step(tok: mx.array) -> mx.array:
        slot = state["slot"]
        grown = with_room(state["kv"], slot)
        if grown is not state["kv"]:
            mx.eval(grown)  # the kernels write into these buffers: they must exist before the first write
            state["kv"] = grown
        nxt, state["at"] = run(tok, state["at"], *extra, grown)
        state["slot"] = slot + 1
        return nxt

    return step


class FusedStep:
    """The batch-of-one step of an mlx-lm Qwen3, on its layer plans (`LayerPlan`: the prepared arrays and the fused
    q|k|v and gate|up weights)."""

    def __init__(self, model, plans: list[LayerPlan], launches: Launches = KERNELS) -> None:
        p = plans[0]
        self.layers = plans
        self.freqs = p.freqs
        m = model.model
        self.embed = m.embed_tokens.weight
        self.norm = m.norm.weight
        self.head = self.embed if model.args.tie_word_embeddings else model.lm_head.weight
        dtype = self.embed.dtype
        gemv = launches.gemv
        self._qkv = gemv(p.qkv.weight.shape, dtype, norm=True, eps=p.eps)
        self._attend = launches.attend(dtype, batch=1, heads=p.q_shape[1], kv_heads=p.kv_shape[1],
                                     head_dim=p.q_shape[3], eps=p.eps, scale=p.scale, warps=16,
                                     par=ATTEND_PAR)
        self._o = gemv(p.o.weight.shape, dtype, res=True, rows=1)
        self._gate_up = gemv(p.gate_up.weight.shape, dtype, norm=True, eps=p.eps, swiglu=True)
        self._down = gemv(p.down.weight.shape, dtype, res=True, rows=1)
        self._head = gemv(self.head.shape, dtype, norm=True, eps=p.eps, argmax=True, rows=4)
        self._left_pad = mx.zeros((SMALL_ARRAY,), dtype=mx.int32)
        # compiled: 1.59-1.76 ms a step on an H100 against 2.1-2.4 ms built kernel by kernel
        self._step = mx.compile(self._forward) if launches.compile else self._forward

    def start(self, kv: list, prompt_slots: int):
        """A step function tokens [1] -> [1] continuing after `prompt_slots` cached positions in `kv`."""
        return stepper(self._step, prepare_caches(kv), prompt_slots)

    def _forward(self, tok: mx.array, at: mx.array, kv: list) -> tuple[mx.array, mx.array]:
        qkv_, attend_, o_, gate_up_, down_ = self._qkv, self._attend, self._o, self._gate_up, self._down
        freqs, left_pad = self.freqs, self._left_pad
        x = mx.take(self.embed, tok, axis=0)  # [1, D]
        for p, (k_cache, v_cache) in zip(self.layers, kv, strict=True):
            qkv = qkv_(x, p.ln1, p.qkv.weight, x)
            o = attend_(qkv, p.q_norm, p.k_norm, freqs, at, left_pad, k_cache, v_cache)
            x = o_(o, o, p.o.weight, x)
            h = gate_up_(x, p.ln2, p.gate_up.weight, x)
            x = down_(h, h, p.down.weight, x)
        return argmax_of_keys(self._head(x, self.norm, self.head, x)), at + 1


class RowsStep:
    """The step for batches (rows left-padded to one prompt length) and for quantized models: MLX's products
    (cuBLAS, or MLX's quantized kernels) with two custom kernels in between, one compiled step.

    Per layer: q|k|v product; `attend` (q/k RMSNorm, RoPE at each row's own position, the cache write in place,
    attention over each row's valid positions); o product; `add_norm` (residual add + RMSNorm); gate|up product;
    SwiGLU; down product; `add_norm` (with the next layer's input norm, or the final norm). Eight kernels a layer,
    against ~17 for the same step from MLX operations.
    """

    def __init__(self, model, plans: list[LayerPlan], launches: Launches = KERNELS) -> None:
        self.model = model
        self.layers = plans
        self.norms = [q.ln1 for q in plans[1:]] + [model.model.norm.weight]  # the norm after each layer
        self.launches = launches
        self._prepared: dict[int, tuple[Launch, Launch2]] = {}  # by batch size
        self._step = mx.compile(self._forward) if launches.compile else self._forward

    def start(self, kv: list, prompt_slots: int, left_pad: list[int]):
        """A step function tokens [B] -> [B] continuing after `prompt_slots` cached positions in `kv`."""
        pad = mx.array(left_pad + [0] * (SMALL_ARRAY - len(left_pad)), dtype=mx.int32)
        return stepper(self._step, prepare_caches(kv), prompt_slots, pad)

    def _kernels(self, batch: int) -> tuple[Launch, Launch2]:
        found = self._prepared.get(batch)
        if found is None:
            p = self.layers[0]
            found = self._prepared[batch] = (
                self.launches.attend(p.ln1.dtype, batch=batch, heads=p.q_shape[1], kv_heads=p.kv_shape[1],
                              head_dim=p.q_shape[3], eps=p.eps, scale=p.scale, warps=4,
                              par=ROWS_ATTEND_PAR),
                self.launches.add_norm(p.ln1.dtype, batch=batch, dim=p.ln1.shape[0], eps=p.eps))
        return found

    def _forward(self, tok: mx.array, at: mx.array, left_pad: mx.array, kv: list) -> tuple[mx.array, mx.array]:
        attend_, add_norm_ = self._kernels(tok.shape[0])
        x = self.model.model.embed_tokens(tok)  # [B, D]
        n = mx.fast.rms_norm(x, self.layers[0].ln1, self.layers[0].eps)
        for p, next_norm, (k_cache, v_cache) in zip(self.layers, self.norms, kv, strict=True):
            o = attend_(p.qkv(n), p.q_norm, p.k_norm, p.freqs, at, left_pad, k_cache, v_cache)
            x, n = add_norm_(x, p.o(o), p.ln2)
            gate, up = mx.split(p.gate_up(n), 2, axis=-1)
            x, n = add_norm_(x, p.down(swiglu(gate, up)), next_norm)
        return mx.argmax(lm_head(self.model, n), axis=-1).astype(mx.int32), at + 1


def supports(model: qwen3.Model) -> bool:
    """Whether FusedStep's kernels fit `model` (on any device): unquantized bf16 or fp32 weights of one dtype,
    widths that are multiples of 32 16-byte vectors, and an `attend` that fits (`attend_fits`)."""
    m = model.model
    layer = m.layers[0]
    a = layer.self_attn
    w = a.q_proj.weight
    if w.dtype not in (mx.bfloat16, mx.float32) or "scales" in a.q_proj:  # the dtypes run on a GPU (fp16: not yet)
        return False
    # every kernel reads all its inputs as one type
    head = m.embed_tokens if model.args.tie_word_embeddings else model.lm_head
    others = (m.embed_tokens.weight, layer.input_layernorm.weight, a.q_norm.weight, m.norm.weight, head.weight)
    if "scales" in head or any(x.dtype != w.dtype for x in others):
        return False
    vec = 16 // w.dtype.size
    dims = (m.embed_tokens.weight.shape[1], a.n_heads * a.q_norm.weight.shape[0], layer.mlp.down_proj.weight.shape[1])
    return all(d % (32 * vec) == 0 and d <= 8192 for d in dims) and attend_fits(model)


def supports_rows(model: qwen3.Model) -> bool:
    """Whether RowsStep fits `model` (on any device): activations, norms and products of one dtype, bf16 or fp32
    (quantized products included: they compute in their scales' dtype), and an `attend` that fits."""
    m = model.model
    layer = m.layers[0]
    a = layer.self_attn
    dtype = layer.input_layernorm.weight.dtype
    if dtype not in (mx.bfloat16, mx.float32):  # the dtypes run on a GPU (fp16: not yet)
        return False
    head = m.embed_tokens if model.args.tie_word_embeddings else model.lm_head
    modules = (m.embed_tokens, head, a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp.gate_proj,
               layer.mlp.up_proj, layer.mlp.down_proj)
    computes_in = [(x["scales"] if "scales" in x else x["weight"]).dtype for x in modules]
    norms = (layer.post_attention_layernorm.weight, a.q_norm.weight, a.k_norm.weight, m.norm.weight)
    return all(d == dtype for d in computes_in + [x.dtype for x in norms]) and attend_fits(model)


def attend_fits(model: qwen3.Model) -> bool:
    """head_dim a multiple of 64 up to 256 (the RoPE halves split evenly across a warp), grouped heads, and
    asr.model.llm.HFRoPE, whose float32 periods `attend` reads."""
    a = model.model.layers[0].self_attn
    head_dim = a.q_norm.weight.shape[0]
    return (head_dim % 64 == 0 and head_dim <= 256 and isinstance(a.rope, HFRoPE) and a.rope.dims == head_dim
            and a.n_heads % a.n_kv_heads == 0)
