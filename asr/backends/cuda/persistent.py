"""The whole batch-of-one decode step of a Qwen3 in ONE CUDA kernel launch (PersistentStep).

FusedStep (asr.backends.cuda.steps) is five kernels a layer, ~146 a step, and on MLX's CUDA backend each kernel costs host
time (MLX builds and launches a CUDA graph node for it): a profile measured 1.25-1.5 ms of host time a step against
~0.85 ms of GPU work, so the step waited on the host. Here one launch does the step: one block per
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

from dataclasses import asdict, dataclass

import mlx.core as mx

from .kernels import SMALL_ARRAY, Device, kernel, scratch, source
from .steps import ATTEND_PAR, LayerPlan, prepare_caches, stepper

NW = 8  # warps a block


@dataclass(frozen=True)
class Schedule:
    """How the step hides the latency of its weight reads (compile-time constants of the kernel).

    AHEAD: each warp loads its first rows of a product before the grid barrier in front of it (GU_ROWS rows of
    gate|up a warp, so that one round covers all of them on 132 SMs). ATTN_PAR: key/value positions a warp loads at
    a time in the attention (attend_head). TIMING: record each phase's end in PersistentStep.times (profiling)."""

    AHEAD: int = 1
    GU_ROWS: int = 3
    ATTN_PAR: int = ATTEND_PAR
    TIMING: int = 0

DEVICE_HEADER = source("persistent.cuh")  # the grid barrier and row loads, shared with .rows

_BODY = source("persistent_step.cu")

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


def blocks_for(model, device: Device) -> int | None:
    """The grid (blocks = SMs) PersistentStep takes for `model` on `device`, or None where it cannot run: resident
    blocks unknown, or fewer SMs than query heads (one block a head)."""
    blocks = device.resident_blocks
    return blocks if blocks and blocks >= model.model.layers[0].self_attn.n_heads else None


def make(model, plans: list[LayerPlan], device: Device, schedule: Schedule = Schedule()) -> PersistentStep | None:
    """PersistentStep for this model on `device`, or None where it cannot run (`blocks_for`)."""
    blocks = blocks_for(model, device)
    return PersistentStep(model, plans, blocks, schedule) if blocks else None


class PersistentStep:
    """The batch-of-one step of an mlx-lm Qwen3 as one kernel launch, on the layer plans of asr.backends.cuda.steps
    (see the module docstring); same interface as its FusedStep."""

    def __init__(self, model, plans: list[LayerPlan], blocks: int, schedule: Schedule = Schedule()) -> None:
        p = plans[0]
        m = model.model
        self.embed = m.embed_tokens.weight
        dtype = self.embed.dtype
        head = self.embed if model.args.tie_word_embeddings else model.lm_head.weight
        heads, kv_heads, head_dim = p.q_shape[1], p.kv_shape[1], p.q_shape[3]
        dim, inter = self.embed.shape[1], p.down.weight.shape[1]
        if blocks < heads:
            raise ValueError(f"PersistentStep needs at least {heads} blocks; the device has {blocks} SMs")
        body, self.names = with_layer_tables(_BODY, _FIXED, len(plans))
        self.kernel = kernel(f"step{len(plans)}", body.replace("NWARPS", str(NW)), self.names, ("out", "at_out"),
                             header=DEVICE_HEADER, EPS=p.eps, SCALE=p.scale)

        self.fixed = [self.embed, p.freqs, m.norm.weight, head, scratch(dim), scratch((heads + 2 * kv_heads) * head_dim),
                      scratch(heads * head_dim), scratch(inter), scratch(blocks, mx.uint64), scratch(2, mx.uint32),
                      scratch(2 * (5 * len(plans) + 2), mx.uint64)]
        mx.eval(self.fixed)
        self.times = self.fixed[-1]  # with schedule.TIMING: [start, end] then [last arrival, block 0 left] a phase
        per_layer = [[q.ln1, q.ln2, q.q_norm, q.k_norm, q.qkv.weight, q.o.weight, q.gate_up.weight, q.down.weight]
                     for q in plans]
        # every input but the token, position and caches, in the kernel's order (built once, not per token)
        self.constant = self.fixed + [a for kind in zip(*per_layer, strict=True) for a in kind]
        self.options = dict(
            template=[("T", dtype), ("LAYERS", len(plans)), ("D", dim), ("FF", inter), ("H", heads), ("KV", kv_heads),
                      ("HD", head_dim), ("V", head.shape[0]), *asdict(schedule).items()],
            grid=(blocks * 32 * NW, 1, 1), threadgroup=(32 * NW, 1, 1),
            output_shapes=[(SMALL_ARRAY,), (SMALL_ARRAY,)], output_dtypes=[mx.int32, mx.int32])

    def start(self, kv: list, prompt_slots: int):
        """A step function tokens [1] -> [1] continuing after `prompt_slots` cached positions in `kv`."""
        return stepper(self._forward, prepare_caches(kv), prompt_slots)

    def _forward(self, tok: mx.array, at: mx.array, kv: list) -> tuple[mx.array, mx.array]:
        inputs = [tok, at, *self.constant, *(k for k, _ in kv), *(v for _, v in kv)]
        nxt, at_next = self.kernel(inputs=inputs, **self.options)  # [SMALL_ARRAY]: device memory, see there
        return nxt[:1], at_next
