"""Loading: official directory / hub id / converted directory -> strict conversion (cached) -> a ready model.

Ref: funasr/models/fun_asr_nano/model.py::__init__ and funasr/auto/auto_model.py::build_model for what the
official code builds from the same files.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import checkpoint as ckpt
from . import cpu_bf16, cpu_llm, linear_nn
from .errors import CheckpointError, InvalidOptionError, ModelLoadError
from .model import FunASRNano
from .network import DTYPES, FunASRNanoNet, ModelConfig
from .prompt import PromptTokenizer

log = logging.getLogger(__name__)

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "f32": "float32", "f16": "float16"}


# --- conversion ----------------------------------------------------------------------------------------
def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    net = FunASRNanoNet(cfg)  # MLX allocates lazily; shapes only
    return {k: tuple(v.shape) for k, v in tree_flatten(net.parameters())}


def _strict_check(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"{where} is incomplete: {len(missing)} tensors missing, e.g. {missing[:5]}; "
                              "the file is truncated or not a Fun-ASR-Nano checkpoint")
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} unexpected tensors, e.g. {unexpected[:5]}; "
                              "is it a different model or a mismatched config.yaml?")
    for k, shape in expected.items():
        if found[k] != shape:
            raise CheckpointError(f"{where}: tensor {k!r} has shape {list(found[k])}, the config expects {list(shape)}")


def convert(model_dir: Path, out_dir: Path, variant: str) -> Path:
    """Convert an official directory into our MLX layout, atomically (nothing half-written on failure)."""
    from .torch_zip import load_state_dict

    oc = ckpt.read_official_config(model_dir)
    cfg = ModelConfig.from_official(oc, variant)
    t0 = time.perf_counter()
    state = load_state_dict(model_dir / "model.pt")
    has_ctc = cfg.ctc is not None and any(k.startswith("ctc_decoder.") for k in state)
    if cfg.ctc is not None and not has_ctc:
        log.info("checkpoint has no CTC tensors: timestamps from CTC alignment are unavailable")
        cfg = replace(cfg, ctc=None)
    expected = _expected_shapes(cfg)
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
    _strict_check(found, expected, str(model_dir / "model.pt"))
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


# --- loading -------------------------------------------------------------------------------------------
def _normalize_dtype(dtype: str, *, part: str = "llm") -> str:
    """A dtype name or alias -> its canonical name; "auto" -> the faster dtype for `part` ("llm", "encoder" or
    "quantized-llm") on this device."""
    d = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if d == "auto":
        # bf16 halves memory and is fast on GPUs. On a CPU, MLX has no fast bf16 kernels (bf16 decoding ~2x and
        # prefill ~14x slower than fp32 there, docs/performance.md). There a bf16 LLM is picked where asr.cpu_llm
        # computes it faster than fp32 (cpu_llm.bf16_preferred: fp32 inputs on the bf16 weights through
        # asr.cpu_gemv, or MKL's bf16 products on an Intel CPU with AMX/AVX512-BF16); a bf16 encoder only where
        # MKL's bf16 products beat fp32 (asr.cpu_gemv does not serve the encoder); a quantized LLM runs on MLX's
        # own CPU kernels, so its activations stay fp32
        if mx.default_device() != mx.cpu:
            return "bfloat16"
        faster = {"llm": cpu_llm.bf16_preferred, "encoder": cpu_bf16.preferred, "quantized-llm": lambda: False}
        return "bfloat16" if faster[part]() else "float32"
    if d not in DTYPES:
        raise InvalidOptionError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return d


def _detect_variant(name: str, explicit: str | None) -> str:
    if explicit:
        v = explicit.lower()
        if v not in ("nano", "mlt"):
            raise InvalidOptionError(f"variant {explicit!r} is not supported; use 'nano' or 'mlt'")
        return v
    return "mlt" if "mlt" in name.lower() else "nano"


def load_model(
    path_or_repo: str | None = None,
    *,
    dtype: str = "auto",
    quantize: int | None = None,
    variant: str | None = None,
    encoder_dtype: str = "float32",
    warmup: bool = False,
) -> FunASRNano:
    """Load a model from an official directory, a Hugging Face repo id, or a converted directory.

    dtype: the LLM's dtype: "auto" (bfloat16 on a GPU; on a CPU bfloat16 weights with fp32 arithmetic where
    asr.cpu_gemv's kernels run (Linux, with numba), else float32), "bfloat16", "float32" (the parity dtype) or
    "float16". On a CPU a bfloat16 LLM computes in fp32 on its bf16 weights (asr.cpu_gemv), or through MKL's bf16
    products on Intel CPUs with AMX/AVX512-BF16 (asr.cpu_bf16, inputs rounded to bf16).
    encoder_dtype: the audio encoder's (float32 default; bfloat16 is faster on GPUs and, with MKL's bf16 products,
    on CPUs; never float16, whose range the adaptor overflows).
    quantize: 4 or 8 to quantize the LLM's linear layers and embeddings (cached after the first time).
    """
    dtype = _normalize_dtype(dtype, part="quantized-llm" if quantize else "llm")
    encoder_dtype = _normalize_dtype(encoder_dtype, part="encoder")
    if encoder_dtype == "float16":
        raise InvalidOptionError("encoder_dtype float16 is not supported: the audio path overflows fp16; use bfloat16")
    if quantize not in (None, 4, 8):
        raise InvalidOptionError(f"quantize must be 4, 8 or None; got {quantize!r}")
    from . import backend

    for message in backend.check():
        log.warning(message)
    src = ckpt.resolve(path_or_repo)
    if src.kind == "official":
        conv = ckpt.converted_dir_for(src.path)
        if not (conv / ckpt.MLX_CONFIG).is_file():
            log.info("converting %s to MLX (once) ...", src.path)
            convert(src.path, conv, _detect_variant(src.name, variant))
        model_dir = conv
    else:
        model_dir = src.path
    try:
        raw = json.loads((model_dir / ckpt.MLX_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {model_dir / ckpt.MLX_CONFIG}: {exc}") from exc
    cfg = ModelConfig.from_json(raw)
    if variant or "mlt" in src.name.lower():  # an explicit variant, or the name says MLT, beats the stored one
        cfg = replace(cfg, variant=_detect_variant(src.name, variant))
    net = _load_net(model_dir, cfg, dtype, encoder_dtype, quantize)
    tokenizer = PromptTokenizer(model_dir / "tokenizer.json")
    model = FunASRNano(net, cfg, tokenizer, name=src.name, dtype=dtype, quantization=quantize,
                       encoder_dtype=encoder_dtype, model_dir=model_dir)
    if warmup:
        model.warmup()
    return model


def _load_net(model_dir: Path, cfg: ModelConfig, dtype: str, encoder_dtype: str, quantize: int | None) -> FunASRNanoNet:
    path = model_dir / ckpt.MLX_WEIGHTS
    try:
        weights = mx.load(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; delete the directory to convert again") from exc
    net = FunASRNanoNet(cfg)
    _strict_check({k: tuple(v.shape) for k, v in weights.items()},
                  {k: tuple(v.shape) for k, v in tree_flatten(net.parameters())}, str(path))
    # a bf16 encoder on a CPU with MKL's bf16 products: loaded fp32, then only its linear weights become bf16
    bf16_products = encoder_dtype == "bfloat16" and cpu_bf16.applies()
    encoder_load = "float32" if bf16_products else encoder_dtype
    cast = {}
    for k, v in weights.items():
        if k.startswith("llm."):
            cast[k] = v.astype(DTYPES[dtype])
        elif k.startswith("encoder."):
            cast[k] = v.astype(DTYPES[encoder_load])
        else:
            cast[k] = v.astype(mx.float32)
    net.load_weights(list(cast.items()), strict=True)
    del weights, cast
    if bf16_products:
        cpu_bf16.use_bf16_products(net.encoder)
    if linear_nn.applies():  # the audio path's fp32 products in the layout MLX's CUDA graphs can update (linear_nn)
        linear_nn.use_nn_layout(net, skip=("llm",))
    if quantize:
        _quantize_llm(net, model_dir, quantize)
    mx.eval(net.parameters())
    net.eval()
    return net


def _quantize_llm(net: FunASRNanoNet, model_dir: Path, bits: int, group_size: int = 64) -> None:
    """Quantize the LLM (mlx-lm style affine quantization); cache the result next to the weights."""
    dtype = str(net.llm.model.norm.weight.dtype).split(".")[-1]
    qpath = model_dir / f"llm-q{bits}g{group_size}-{dtype}.safetensors"
    nn.quantize(net.llm, group_size=group_size, bits=bits)
    if qpath.is_file():
        try:
            net.llm.load_weights(str(qpath), strict=True)
            return
        except Exception as exc:
            raise ModelLoadError(f"quantized cache {qpath} is unreadable ({exc}); delete it and load again") from exc
    tmp = qpath.with_suffix(".tmp.safetensors")
    mx.save_safetensors(str(tmp), dict(tree_flatten(net.llm.parameters())))
    tmp.replace(qpath)
