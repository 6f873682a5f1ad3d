"""Loading: an official directory, a Hugging Face repo id or a converted directory -> strict conversion (cached) ->
the network in the requested precision -> the backend's runners, chosen once -> a ready model.

Ref: funasr/models/fun_asr_nano/model.py::__init__ and funasr/auto/auto_model.py::build_model for what the
official code builds from the same files.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..backends import select
from ..errors import CheckpointError, InvalidOptionError, ModelLoadError
from ..model.config import DTYPES, ModelConfig
from ..model.network import FunASRNanoNet
from ..model.prompt import PromptTokenizer
from ..options import RuntimeOptions
from ..pipeline import FunASRNano
from . import checkpoint as ckpt
from .convert import convert, strict_check

log = logging.getLogger(__name__)

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "f32": "float32", "f16": "float16"}


def _dtype(dtype: str, *, backend: str, part: str, options: RuntimeOptions) -> str:
    """A dtype name or alias -> its canonical name; "auto" -> what computes `part` ("llm", "quantized-llm" or
    "encoder") fastest on `backend` (asr.backends.select.auto_dtype)."""
    d = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if d == "auto":
        return select.auto_dtype(backend, part, options)
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
    runtime: RuntimeOptions | None = None,
    download_root: str | os.PathLike | None = None,
    local_files_only: bool = False,
    speaker_model: object | None = None,
) -> FunASRNano:
    """Load a model from an official directory, a Hugging Face repo id, or a converted directory.

    dtype: the LLM's dtype: "auto" (bfloat16 on a GPU; on the CPU backend bfloat16 weights with fp32 arithmetic
    where its Numba kernels run, else float32), "bfloat16", "float32" (the parity dtype) or "float16".
    encoder_dtype: the audio encoder's (float32 default; bfloat16 is faster on GPUs and, with MKL's bf16 products,
    on Intel CPUs with AMX; never float16, whose range the adaptor overflows).
    quantize: 4 or 8 to quantize the LLM's linear layers and embeddings (cached after the first time).
    runtime: what computes the model (asr.options.RuntimeOptions; default: RuntimeOptions.from_env()), decided
    here once and reported as `model.runtime.info` and in every result.
    download_root: where a hub id is looked up and downloaded (default: huggingface_hub's cache, HF_HOME).
    local_files_only: never download; a hub id must already be in the cache.
    speaker_model: for transcribe(speakers=...): a CAM++ speaker model (the official
    iic/speech_campplus_sv_zh-cn_16k-common layout: a local folder or hub id, converted once like the ASR model), or
    an already loaded speaker runner (anything with `embed_windows(list of 16 kHz windows) -> [N, D]`).
    """
    options = RuntimeOptions.from_env() if runtime is None else runtime
    if not isinstance(options, RuntimeOptions):
        raise InvalidOptionError(f"runtime must be an asr.RuntimeOptions, got {type(options).__name__}")
    if quantize not in (None, 4, 8):
        raise InvalidOptionError(f"quantize must be 4, 8 or None; got {quantize!r}")
    backend = select.choose(options)
    dtype = _dtype(dtype, backend=backend, part="quantized-llm" if quantize else "llm", options=options)
    encoder_dtype = _dtype(encoder_dtype, backend=backend, part="encoder", options=options)
    if encoder_dtype == "float16":
        raise InvalidOptionError("encoder_dtype float16 is not supported: the audio path overflows fp16; use bfloat16")
    for message in select.check():
        log.warning(message)
    src = ckpt.resolve(path_or_repo, download_root=download_root, local_files_only=local_files_only)
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
    runners = select.build(backend, net, options)
    log.info("backend %s on %s: audio %s; LLM %s", backend, runners.info.device, runners.info.audio, runners.info.llm)
    model = FunASRNano(net, cfg, tokenizer, runners, name=src.name, dtype=dtype, quantization=quantize,
                       encoder_dtype=encoder_dtype, model_dir=model_dir)
    if speaker_model is not None:
        if isinstance(speaker_model, (str, os.PathLike)):
            from .speaker import load_campplus

            speaker_model = load_campplus(speaker_model, download_root=download_root,
                                          local_files_only=local_files_only,
                                          backend="cpu" if backend == "cpu" else "mlx")
        if not callable(getattr(speaker_model, "embed_windows", None)):
            raise InvalidOptionError("speaker_model must be a CAM++ model folder or hub id, or a runner with "
                                     f"embed_windows(); got {type(speaker_model).__name__}")
        model.speaker_model = speaker_model
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
    strict_check({k: tuple(v.shape) for k, v in weights.items()},
                 {k: tuple(v.shape) for k, v in tree_flatten(net.parameters())}, str(path))
    part_dtype = {"llm.": DTYPES[dtype], "encoder.": DTYPES[encoder_dtype]}
    cast = [(k, v.astype(part_dtype.get(k[: k.index(".") + 1], mx.float32))) for k, v in weights.items()]
    net.load_weights(cast, strict=True)
    del weights, cast
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
