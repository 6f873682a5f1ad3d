"""Conversion of an official model directory into our MLX layout, once: strict by name and shape, atomic (nothing
half-written on failure), cached (asr.loading.checkpoint.converted_dir_for).

Ref: funasr/models/fun_asr_nano/model.py::__init__ for what the official code builds from the same files.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import CheckpointError
from ..model.config import ModelConfig
from ..model.network import FunASRNanoNet
from . import checkpoint as ckpt
from .torch_zip import load_state_dict

log = logging.getLogger(__name__)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    net = FunASRNanoNet(cfg)  # MLX allocates lazily; shapes only
    return {k: tuple(v.shape) for k, v in tree_flatten(net.parameters())}


def strict_check(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str,
                 model: str = "Fun-ASR-Nano", described_by: str = "config.yaml") -> None:
    """The tensors of a checkpoint (`found`: name -> shape) are exactly those the model built from its config needs
    (`expected`), or a CheckpointError that names the first difference (`where`: the file; `model`: what it should
    be; `described_by`: the config the shapes come from)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"{where} is incomplete: {len(missing)} tensors missing, e.g. {missing[:5]}; "
                              f"the file is truncated or not a {model} checkpoint (re-download it)")
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} unexpected tensors, e.g. {unexpected[:5]}; "
                              f"is it a different model than {model}, or a mismatched {described_by}?")
    for k, shape in expected.items():
        if found[k] != shape:
            raise CheckpointError(f"{where}: tensor {k!r} has shape {list(found[k])}, the config ({described_by}) "
                                  f"expects {list(shape)}; the config does not match the weights")


def convert(model_dir: Path, out_dir: Path, variant: str) -> Path:
    """Convert an official directory into our MLX layout, atomically (nothing half-written on failure)."""
    oc = ckpt.read_official_config(model_dir)
    cfg = ModelConfig.from_official(oc.yaml, oc.llm_config, variant)
    t0 = time.perf_counter()
    state = load_state_dict(model_dir / "model.pt")
    has_ctc = cfg.ctc is not None and any(k.startswith("ctc_decoder.") for k in state)
    if cfg.ctc is not None and not has_ctc:
        log.info("checkpoint has no CTC tensors: timestamps from CTC alignment are unavailable")
        cfg = replace(cfg, ctc=None)
    expected = expected_shapes(cfg)
    weights: dict[str, mx.array] = {}
    found: dict[str, tuple[int, ...]] = {}
    for key, tensor in state.items():
        name = ckpt.official_key_to_mlx(key)
        if name is None:
            continue
        if cfg.ctc is None and (name.startswith("ctc_decoder.") or name.startswith("ctc_lo.")):
            continue
        arr = tensor.to_mlx()
        if name.endswith("self_attn.fsmn_weight"):
            arr = arr.transpose(0, 2, 1)  # torch [C, 1, K] -> MLX depthwise [C, K, 1]
        weights[name] = arr
        found[name] = tuple(arr.shape)
    strict_check(found, expected, str(model_dir / "model.pt"))
    lm_head = state.get("llm.lm_head.weight")
    if lm_head is not None and cfg.llm.get("tie_word_embeddings", True):
        emb = state["llm.model.embed_tokens.weight"]
        if lm_head.array.shape != emb.array.shape:
            raise CheckpointError("model.pt: llm.lm_head.weight and llm.model.embed_tokens.weight differ in shape")
        if not np.array_equal(lm_head.array, emb.array):
            # the reference ties both to one tensor and loads lm_head last, so its values win
            log.warning("llm.lm_head.weight differs from the embeddings; using lm_head values for both (as the reference)")
            weights["llm.model.embed_tokens.weight"] = lm_head.to_mlx()
    del state
    with ckpt.atomic_dir(out_dir) as tmp:
        mx.save_safetensors(str(tmp / ckpt.MLX_WEIGHTS), weights)
        (tmp / ckpt.MLX_CONFIG).write_text(json.dumps({**cfg.to_json(), "source": str(model_dir)}, indent=1,
                                                      ensure_ascii=False))
        shutil.copy2(oc.llm_dir / "tokenizer.json", tmp / "tokenizer.json")
        if (model_dir / "multilingual.tiktoken").is_file():
            shutil.copy2(model_dir / "multilingual.tiktoken", tmp / "multilingual.tiktoken")
    log.info("converted %s -> %s in %.1f s", model_dir, out_dir, time.perf_counter() - t0)
    return out_dir
