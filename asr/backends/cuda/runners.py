"""The CUDA backend's runners, chosen once at load.

Audio: the model's MLX encoder with the attention and FSMN kernels where they take the batch (`KernelCore`), and the
audio path's fp32 weights stored [in, out] (asr.backends.cuda.layout). LLM: the reference prefill (MLX), then the
fastest step the device and the model allow for each batch size:
- a batch of one: `PersistentStep` (the whole step in one launch), else `FusedStep` (five kernels a layer);
- 2 to 64 rows of a bf16 LLM: `PersistentRows` (one launch, tensor-core products);
- other batches, fp32 and quantized LLMs: `RowsStep` (MLX's products and two kernels a layer);
- what none of them takes (fp16): the reference MLX step.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models import qwen3

from ...decode.kv import decode_buffer
from ...model.encoder import SANMCore
from ...model.network import FunASRNanoNet
from ...options import RuntimeOptions
from ..mlx.runners import MLXLLM, MLXAudio
from . import persistent, rows
from .encoder import KernelCore, takes
from .kernels import Device
from .layout import use_nn_layout
from .steps import KERNELS, FusedStep, Launches, RowsStep, prepare, supports, supports_rows


class CUDAAudio(MLXAudio):
    """The reference audio runner on CUDA, the encoder's attention and memory through the kernels where they take
    the batch."""

    def __init__(self, net: FunASRNanoNet, options: RuntimeOptions):
        super().__init__(net, options)
        self.kernels = options.cuda_encoder_kernels
        fp32 = use_nn_layout(net, skip=("llm",))  # the audio path's fp32 products in the layout CUDA graphs update
        self.description = ("MLX operations" + (", attention and FSMN kernels" if self.kernels else "")
                            + (", fp32 weights stored [in, out]" if fp32 else ""))

    def core(self, x: mx.array, lengths: mx.array | None) -> SANMCore | None:
        cfg = self.net.encoder.cfg
        if not (self.kernels and takes(x.shape[0], x.dtype, cfg.attention_heads, cfg.output_size)):
            return None
        return KernelCore(lengths if lengths is not None else mx.full((x.shape[0],), x.shape[1]))


class CUDALLM:
    """The reference prefill, then the CUDA step that takes the batch (see the module docstring)."""

    def __init__(self, llm: qwen3.Model, options: RuntimeOptions, device: Device | None = None,
                 launches: Launches = KERNELS):
        """device: the CUDA device's facts (default: read from the current device); launches: the kernels the
        multi-kernel steps launch (tests pass their MLX-operation twins to check the wiring anywhere)."""
        self.reference = MLXLLM(llm, options)
        self.embeds_dtype = self.reference.embeds_dtype
        self.llm = llm
        self.device = Device.current() if device is None else device
        one, batch = supports(llm), supports_rows(llm)
        plans = prepare(llm) if one or batch else []
        self.one = (persistent.make(llm, plans, self.device) if one and options.cuda_one_launch else None) or (
            FusedStep(llm, plans, launches) if one else None)
        self.rows_one = rows.make(llm, plans, self.device) if batch and options.cuda_one_launch else None
        self.rows = RowsStep(llm, plans, launches) if batch else None
        parts = [f"batch of one: {type(self.one).__name__}" if self.one else None,
                 f"2-{rows.MAX_ROWS} rows: PersistentRows" if self.rows_one else None,
                 "batches: RowsStep" if self.rows else None]
        self.description = "CUDA kernels (" + ", ".join(p for p in parts if p) + ")" if any(parts) else \
            self.reference.description

    def start(self, prompts: mx.array, lengths: list[int]):
        B, P = len(lengths), prompts.shape[1]
        if B == 1 and self.one is not None:
            kind = self.one
        elif 1 < B <= rows.MAX_ROWS and self.rows_one is not None:
            kind = self.rows_one
        else:
            kind = self.rows
        if kind is None:
            return self.reference.start(prompts, lengths)
        first, cache = self.reference.prefill(prompts, lengths)
        kv = [[decode_buffer(c.keys, P), decode_buffer(c.values, P)] for c in cache]
        if kind is self.one:
            return first, kind.start(kv, P)
        return first, kind.start(kv, P, [P - n for n in lengths])

    def warm_batches(self, batch_size: int) -> list[int]:
        """Batch sizes that compile every kernel PersistentRows needs up to `batch_size` rows."""
        return rows.warm_rows(self.llm, batch_size, self.device) if self.rows_one is not None else []
