"""A batch's whole decode step of a Qwen3 in ONE CUDA kernel launch, with tensor-core products (PersistentRows).

RowsStep (asr.backends.cuda.steps) runs a batch's step as ~230 kernels (cuBLAS products and custom kernels) and on MLX's
CUDA backend each kernel costs host time, so at 64 rows the step waited on the host: ~2.8-4.1 ms a step against
~1.9 ms of GPU work (benchmarks/gpu/probe_batch.py). Here one launch does the step, as .persistent does for a
batch of one: one block per SM, all resident, meeting at grid-wide barriers between phases:

  start: each row's embedding (the residual stream x, float) and its RMSNorm (A, bf16) | per layer:
  q|k|v product | attention (items (row, query head), 1-8 warps an item: attend_warp, merge_warps) |
  o product, summed over K in KB slices whose partial sums go to a buffer | residual add of those sums + RMSNorm |
  gate|up product + SwiGLU | down product (K in KB slices, as o) | residual add + the next RMSNorm (or the final
  one) | end: the LM head, each row's largest argmax key kept per block and then over the blocks (atomicMax).

Products run on tensor cores (`mma.sync` m16n8k16, bf16 operands, float32 sums): the rows (up to MAX_ROWS) are MT
tiles of 16, W's rows tiles of 8. A block stages its slice of A (the activations, bf16) in shared memory once and
its warps read it from there; a warp loads its W rows straight from memory (each weight is read once a step), all
of a tile's chunks at once, the next tile's while this one is summed, and a product's first ones between the two
halves of the grid barrier in front of it (weights depend on no other block, so their latency overlaps the wait).
Within each 32-wide k chunk, lane (g, t) holds elements 8t..8t+7 of A rows g and g + 8 and of W row g, in 16-byte
loads: both operands take the same permutation of k, which the sum does not see.

Rounding follows RowsStep (each op's result rounded to bf16 where MLX rounds it); sums run in another order than
cuBLAS's, so logits agree to rounding, not bit for bit. bf16 models only (mma takes bf16 operands; an fp32 model
keeps RowsStep), 2..MAX_ROWS rows; larger batches keep RowsStep, and so do devices before sm_80 or with less
shared memory a block than the kernel takes (`device_takes`: ~172 KB at Qwen3-0.6B's widths, so an H100 or H200,
not an A100). Buffers other blocks wrote in the same launch are read through L2 (`__ldcg`).
"""

from __future__ import annotations

import mlx.core as mx

from .kernels import SMALL_ARRAY, Device, kernel, scratch, source
from .persistent import DEVICE_HEADER, with_layer_tables
from .steps import LayerPlan, prepare_caches, stepper, supports

MAX_ROWS = 64
ROW_TILE = 16  # rows of an mma row tile (m16n8k16); the kernel is compiled once per count of them (its MT)
NW = 8  # warps a block
KB = 8  # slices of K for the o and down products (a block takes one slice of one 64-column tile)
ATTN_PAR = 6  # loads of key and value rows a lane of attend_warp has in flight (x 2 positions a warp at head_dim 128; 8 spills registers)
PART_COLUMNS = 16  # columns a warp's partial sums take in product()'s shared sums (its NTW n8 tiles: NTW <= 2)
SMEM_LIMIT = 200 * 1024  # dynamic shared memory this kernel may ask for (an SM of sm_80/sm_90 has 227 KB)

_DEVICE = source("rows.cuh")

_BODY = source("rows_step.cu")

_FIXED = ("tok", "at", "pad", "embed", "freqs", "norm", "head", "xbuf", "qkvbuf", "abuf", "attbuf", "hbuf", "pbuf",
          "keybuf", "barrier", "tbuf")
PHASES = ("q|k|v", "attention", "o", "add+norm", "gate|up", "down", "add+norm'")  # a layer's, as TIMING marks them


def _shape(model) -> dict[str, int]:
    m = model.model
    a = m.layers[0].self_attn
    hd = a.q_norm.weight.shape[0]
    return dict(D=m.embed_tokens.weight.shape[1], H=a.n_heads, KV=a.n_kv_heads, HD=hd,
                FF=m.layers[0].mlp.down_proj.weight.shape[1], V=m.embed_tokens.weight.shape[0])


def shared_bytes(model) -> int:
    """Dynamic shared memory the kernel asks for: the largest staged A (MAX_ROWS rows of the whole hidden size, or
    of a K slice of the o and down products), rows padded by 64 bytes (stage_a). At least 48 KB + 1: MLX raises the
    kernel's limit only above 48,000 bytes, and static plus dynamic shared memory past 48 KB needs it raised."""
    s = _shape(model)
    width = max(s["D"], s["H"] * s["HD"] // KB, s["FF"] // KB)
    return max(MAX_ROWS * (width + 32) * 2, 48 * 1024 + 16)


def fits(model) -> bool:
    """Whether PersistentRows takes `model` (on any device): FusedStep's bf16 models (`supports`), widths that its
    k slices divide (multiples of 256, so that every warp's share is whole 32-wide chunks), head_dim up to 256
    (attend_warp: HD / 8 lanes a position) and a staged A that fits in shared memory."""
    if not supports(model) or model.model.embed_tokens.weight.dtype != mx.bfloat16:
        return False
    s = _shape(model)
    return (all(d % 256 == 0 for d in (s["D"], s["H"] * s["HD"], s["FF"])) and s["HD"] <= 256
            and shared_bytes(model) <= SMEM_LIMIT)


def static_bytes(model) -> int:
    """The kernel's static shared memory, about: product()'s sums of NW warps (MAX_ROWS rows, 16 columns, float),
    attend_warp's q (NW x head_dim floats) and m and l (NW floats each), block_sum's floats and the head's key a
    row (ptxas: 37,568 bytes at Qwen3-0.6B's widths and 64 rows; this gives 37,824)."""
    return (NW * MAX_ROWS * PART_COLUMNS * 4 + NW * _shape(model)["HD"] * 4 + NW * 2 * 4 + 32 * 4 + MAX_ROWS * 8
            + 256)


def device_takes(model, device: Device) -> bool:
    """Whether this CUDA device runs the kernel: mma.sync on bf16 needs compute capability 8.0 or later, and a
    block needs its shared memory (the staged A and the static buffers: ~172 KB for Qwen3-0.6B, more than an
    A100's 163 KB or a consumer GPU's 99 KB, which keep RowsStep)."""
    major, optin = device.major, device.shared_memory
    return bool(major and major >= 8 and optin and optin >= shared_bytes(model) + static_bytes(model))


def make_possible(model, device: Device) -> bool:
    """Whether `make` would give a step for `model` on `device` (without building it)."""
    return fits(model) and device_takes(model, device) and device.resident_blocks is not None


def warm_rows(model, batch_size: int, device: Device) -> list[int]:
    """Batch sizes that compile every kernel PersistentRows needs for batches of 2..batch_size rows (one a count of
    ROW_TILE-row tiles: 2, 17, 33, 49 rows; each compile took ~1.4 s on an H200 at first use), for a warm-up; [] where
    PersistentRows does not run."""
    if not make_possible(model, device):
        return []
    return [2] + [ROW_TILE * t + 1 for t in range(1, _row_tiles(min(batch_size, MAX_ROWS)))]


def _row_tiles(rows: int) -> int:
    """The kernel's MT for a batch of `rows`."""
    return -(-rows // ROW_TILE)


def make(model, plans: list[LayerPlan], device: Device, timing: bool = False) -> PersistentRows | None:
    """PersistentRows for this model on `device`, or None where it cannot run: a model it does not take (`fits`), a
    device that cannot run it (`device_takes`) or no grid whose blocks are all resident. timing: record when each
    phase ends (PersistentRows.times, for profiling)."""
    return PersistentRows(model, plans, device.resident_blocks, timing) if make_possible(model, device) else None


class PersistentRows:
    """A batch's step (2..MAX_ROWS rows, left-padded to one prompt length) of a bf16 mlx-lm Qwen3 as one kernel
    launch, on the layer plans of asr.backends.cuda.steps (see the module docstring); same interface as its
    RowsStep."""

    def __init__(self, model, plans: list[LayerPlan], blocks: int, timing: bool = False) -> None:
        p = plans[0]
        m = model.model
        s = _shape(model)
        self.embed = m.embed_tokens.weight
        head = self.embed if model.args.tie_word_embeddings else model.lm_head.weight
        body, self.names = with_layer_tables(_BODY, _FIXED, len(plans))
        header = DEVICE_HEADER + _DEVICE.replace("NWARPS", str(NW)).replace("PART_COLUMNS", str(PART_COLUMNS))
        self.kernel = kernel(f"rows{len(plans)}", body.replace("NWARPS", str(NW)), self.names, ("out", "at_out"),
                             header=header, EPS=p.eps, SCALE=p.scale, shared_memory=shared_bytes(model))

        qkv = (s["H"] + 2 * s["KV"]) * s["HD"]
        bf16 = mx.bfloat16
        self.fixed = [self.embed, p.freqs, m.norm.weight, head, scratch(MAX_ROWS * s["D"]), scratch(MAX_ROWS * qkv),
                      scratch(MAX_ROWS * s["D"], bf16), scratch(MAX_ROWS * s["H"] * s["HD"], bf16),
                      scratch(MAX_ROWS * s["FF"], bf16), scratch(KB * MAX_ROWS * s["D"]),
                      scratch(MAX_ROWS, mx.uint64), scratch(2, mx.uint32), scratch(len(PHASES) * len(plans) + 3, mx.uint64)]
        mx.eval(self.fixed)
        self.times = self.fixed[-1]  # with timing: the start, then the end of each phase (start, layers', head)
        self.timing = int(timing)
        per_layer = [[q.ln1, q.ln2, q.q_norm, q.k_norm, q.qkv.weight, q.o.weight, q.gate_up.weight, q.down.weight]
                     for q in plans]
        # every input but the tokens, position, padding and caches, in the kernel's order (built once)
        self.constant = self.fixed + [a for kind in zip(*per_layer, strict=True) for a in kind]
        self.template = [("T", bf16), ("LAYERS", len(plans)), ("D", s["D"]), ("FF", s["FF"]), ("H", s["H"]),
                         ("KV", s["KV"]), ("HD", s["HD"]), ("V", s["V"]), ("KB", KB), ("ATTN_PAR", ATTN_PAR),
                         ("HEAD_NTW", 2), ("HEAD_AHEAD", 8)]
        self.blocks = blocks

    def start(self, kv: list, prompt_slots: int, left_pad: list[int]):
        """A step function tokens [B] -> [B] (2 <= B <= MAX_ROWS) continuing after `prompt_slots` cached positions."""
        rows = len(left_pad)
        if not 1 < rows <= MAX_ROWS:
            raise ValueError(f"PersistentRows takes 2 to {MAX_ROWS} rows, not {rows}")
        pad = mx.array(left_pad + [0] * (SMALL_ARRAY - len(left_pad)), dtype=mx.int32)
        options = dict(template=[*self.template, ("MT", _row_tiles(rows)), ("TIMING", self.timing)],
                       grid=(self.blocks * 32 * NW, 1, 1), threadgroup=(32 * NW, 1, 1),
                       output_shapes=[(max(rows, SMALL_ARRAY),), (SMALL_ARRAY,)], output_dtypes=[mx.int32, mx.int32])

        def run(tok: mx.array, at: mx.array, pad_: mx.array, kv_: list) -> tuple[mx.array, mx.array]:
            inputs = [tok, at, pad_, *self.constant, *(k for k, _ in kv_), *(v for _, v in kv_)]
            nxt, at_next = self.kernel(inputs=inputs, **options)
            return nxt[:rows], at_next

        return stepper(run, prepare_caches(kv), prompt_slots, pad)
