"""Load CAM++ (`iic/speech_campplus_sv_zh-cn_16k-common` and checkpoints of the same class) for MLX.

Accepted by `load_campplus()`:
  (a) an official directory as distributed on ModelScope: config.yaml (`model: CAMPPlus` + model_conf),
      configuration.json (ModelScope metadata; file_path_metas.init_param / model.pretrained_model name the weights;
      in the older layout without config.yaml its model.model_config gives fbank_dim / emb_size) and
      campplus_cn_common.bin, a `torch.save` zip of the bare state dict;
  (b) the weights file itself (its directory's config files are read when present, else the class defaults, which
      are the released zh-cn model's);
  (c) a Hugging Face repo id (downloaded through huggingface_hub and its cache; `local_files_only` never downloads);
  (d) a directory converted by this module (campplus_config.json + campplus.safetensors).
The .bin is read without torch by the restricted reader (asr/loading/torch_zip.py: no pickled code runs), checked
strictly by name and shape, and converted once into the model cache (FUNASR_NANO_CACHE or
~/.cache/funasr-nano-mlx, asr.loading.checkpoint.cache_root) under converted/campplus-<dir>-<fingerprint>/; the
next load reads the safetensors directly. Ref: funasr/auto/auto_model.py::build_model and
funasr/train_utils/load_pretrained_model.py for what the official code builds from the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import yaml
from mlx.utils import tree_flatten

from ..backends.select import device
from ..errors import CheckpointError, InvalidOptionError, ModelLoadError
from ..options import usable_cores
from ..speaker.campplus import CAMPPlus, CAMPPlusConfig, features
from .checkpoint import atomic_dir, cache_root, download, inside
from .convert import strict_check
from .torch_zip import load_state_dict

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the converted layout; part of the cache fingerprint
CONVERTED_CONFIG = "campplus_config.json"
CONVERTED_WEIGHTS = "campplus.safetensors"
DEFAULT_WEIGHTS = "campplus_cn_common.bin"
OFFICIAL_ID = "iic/speech_campplus_sv_zh-cn_16k-common"
_HUB_PATTERNS = ["*.json", "*.yaml", "*.bin", "*.safetensors"]
# windows a CAM++ batch per CPU worker: 239 windows took 5.5 s at 16, 7.6 s at 64, 10.2 s at 256 (2-core VM, one worker)
CPU_BATCH = 16
GPU_BATCH = 256  # on a GPU, where each batch's ~800 operations cost more than its arithmetic (docs/diarization.md)


@dataclass
class SpeakerModel:
    """A loaded CAM++: `embed(audio)` -> np.ndarray [embedding_size]; `embed_windows` for diarization.

    `runner` computes the embeddings from features: the MLX network itself (the reference; what Metal and CUDA run)
    or asr.backends.cpu.campplus.CPUCAMPPlus (NumPy + BLAS, the same numbers, ~2x faster on a CPU); `backend` says
    which ("mlx" or "cpu"), chosen once at load."""

    net: CAMPPlus
    config: CAMPPlusConfig
    name: str  # what the caller asked for
    model_dir: Path  # the converted directory the weights were read from
    converted: bool  # True when this load converted the official checkpoint (False: read from the cache)
    backend: str = "mlx"
    runner: object = None  # embed(features [T, F] or [B, T, F]) -> [E] or [B, E]; embed_samples(windows [B, N])
    batch: int = 16  # windows embedded together in diarization (load_campplus: CPU_BATCH or GPU_BATCH)
    compiled: bool = False  # the runner is the network under mx.compile (asr.backends.mlx.campplus)

    def __post_init__(self):
        if self.runner is None:
            self.runner = self.net

    @property
    def description(self) -> str:
        return f"{self.name} ({self.backend}{', compiled' if self.compiled else ''})"

    def features(self, samples_16k: np.ndarray) -> mx.array:
        return features(samples_16k, self.config.feat_dim)

    def embed_features(self, feats) -> np.ndarray:
        """Embedding [E] of features [T, F], or [B, E] of [B, T, F]."""
        return np.asarray(self.runner.embed(feats), dtype=np.float32)

    def embed_windows(self, windows: list[np.ndarray], batch: int | None = None) -> np.ndarray:
        """[N, E] embeddings of N windows of 16 kHz samples (the diarization runner's call): windows of one length
        (the official 1.5 s ones, but a span's last may be shorter) embedded together, `batch` at a time."""
        batch = batch or self.batch
        rows: list[np.ndarray | None] = [None] * len(windows)
        by_len: dict[int, list[int]] = {}
        for i, w in enumerate(windows):
            by_len.setdefault(int(np.shape(w)[0]), []).append(i)
        for idx in by_len.values():
            for k in range(0, len(idx), batch):
                part = idx[k: k + batch]
                samples = mx.array(np.stack([np.asarray(windows[i], dtype=np.float32) for i in part]))
                emb = np.asarray(self.runner.embed_samples(samples), dtype=np.float32)  # compiled: with the frontend
                for i, e in zip(part, emb, strict=True):
                    rows[i] = e
        return np.stack(rows) if rows else np.zeros((0, self.config.embedding_size), np.float32)

    def embed(self, audio) -> np.ndarray:
        """Embedding of one utterance: 16 kHz mono float samples in [-1, 1], or an audio file (decoded and resampled
        by asr.audio.io.load_audio)."""
        if isinstance(audio, (str, os.PathLike)):
            from ..audio.io import load_audio

            audio = load_audio(audio).samples
        return self.embed_features(self.features(audio))


@dataclass(frozen=True)
class OfficialDir:
    path: Path
    weights: Path
    config: CAMPPlusConfig
    described_by: str  # "config.yaml", "configuration.json" or "defaults"


# --- finding the files ---------------------------------------------------------------------------------------------
def _resolve(spec: str, download_root, local_files_only: bool) -> tuple[Path, Path | None]:
    """(directory, explicit weights file or None)."""
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_file():
            return p.parent.resolve(), p.resolve()
        return p.resolve(), None
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _download(spec, download_root, local_files_only), None
    raise ModelLoadError(
        f"CAM++ model {spec!r} not found: pass an existing model directory (e.g. ModelScope's {OFFICIAL_ID} as "
        "downloaded: config.yaml, configuration.json, campplus_cn_common.bin), its .bin file, or a Hugging Face "
        "repo id (owner/name)"
    )


def _download(repo_id: str, cache_dir, local_files_only: bool) -> Path:
    return download(repo_id, _HUB_PATTERNS, cache_dir, local_files_only, what="CAM++ model")


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot parse {path}: {exc}; re-download the model") from exc
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download the model")
    return doc


def _config_error(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: unsupported CAM++ configuration: {exc}")


def read_official_dir(model_dir: Path, weights: Path | None = None) -> OfficialDir:
    """The config (config.yaml's model_conf, else configuration.json's model_config, else the class defaults) and
    the weights file of an official directory."""
    meta_path, yaml_path = model_dir / "configuration.json", model_dir / "config.yaml"
    meta = _read_json(meta_path) if meta_path.is_file() else {}
    model_meta = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    if yaml_path.is_file():
        try:
            cfg = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise CheckpointError(f"cannot parse {yaml_path}: {exc}; re-download the model") from exc
        if not isinstance(cfg, dict) or cfg.get("model") != "CAMPPlus":
            found = cfg.get("model") if isinstance(cfg, dict) else None
            raise CheckpointError(f"{yaml_path} does not describe a CAM++ model (model: {found!r}, expected "
                                  "'CAMPPlus'); pass a CAM++ directory such as " + OFFICIAL_ID)
        conf = cfg.get("model_conf") or {}
        if not isinstance(conf, dict):
            raise CheckpointError(f"{yaml_path}: model_conf is not a mapping")
        try:
            config, source = CAMPPlusConfig.from_official(conf), "config.yaml"
        except (TypeError, ValueError) as exc:
            raise _config_error(yaml_path, exc) from exc
    elif model_meta:
        mtype = str(model_meta.get("type", ""))
        if "cam++" not in mtype.lower():
            raise CheckpointError(f"{meta_path} describes a {mtype!r} model, not CAM++ (type 'cam++-sv')")
        mc = model_meta.get("model_config") or {}
        if not isinstance(mc, dict):
            raise CheckpointError(f"{meta_path}: model.model_config is not an object")
        try:
            if int(mc.get("sample_rate", 16000)) != 16000:
                raise ValueError(f"sample_rate {mc.get('sample_rate')} (only 16000 is supported)")
            config = CAMPPlusConfig(feat_dim=int(mc.get("fbank_dim", 80)), embedding_size=int(mc.get("emb_size", 192)))
        except (TypeError, ValueError) as exc:
            raise _config_error(meta_path, exc) from exc
        source = "configuration.json"
    else:
        config, source = CAMPPlusConfig(), "defaults"

    if weights is None:
        metas = meta.get("file_path_metas") if isinstance(meta.get("file_path_metas"), dict) else {}
        named = metas.get("init_param") or model_meta.get("pretrained_model")
        if isinstance(named, str) and named:
            weights = inside(model_dir, named, f"{meta_path.name} (init_param / pretrained_model)")
        elif (model_dir / DEFAULT_WEIGHTS).is_file():
            weights = model_dir / DEFAULT_WEIGHTS
        else:
            bins = sorted(model_dir.glob("*.bin"))
            if len(bins) != 1:
                what = "no .bin file" if not bins else f"{len(bins)} .bin files and none named in configuration.json"
                raise ModelLoadError(
                    f"{model_dir} is not a CAM++ model directory: {what}. Download the whole model (e.g. "
                    f"`modelscope download --model {OFFICIAL_ID}`: config.yaml, configuration.json, "
                    f"{DEFAULT_WEIGHTS}) or pass the weights file itself"
                )
            weights = bins[0]
    if not weights.is_file():
        raise ModelLoadError(f"the CAM++ weights {weights} are missing (named by {model_dir / 'configuration.json'}); "
                             f"re-download the model ({OFFICIAL_ID})")
    if source == "defaults":
        log.warning("%s has no config.yaml or configuration.json: using the CAM++ defaults %s", model_dir, config)
    return OfficialDir(path=model_dir, weights=weights, config=config, described_by=source)


# --- conversion ----------------------------------------------------------------------------------------------------
def fingerprint(src: OfficialDir) -> str:
    st = src.weights.stat()
    h = hashlib.sha1(f"{src.weights.resolve()}:{st.st_size}:{st.st_mtime_ns}:{FORMAT_VERSION}".encode())
    h.update(json.dumps(src.config.to_json(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def converted_dir_for(src: OfficialDir) -> Path:
    return cache_root() / "converted" / f"campplus-{src.path.name}-{fingerprint(src)}"


def expected_shapes(config: CAMPPlusConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tree_flatten(CAMPPlus(config).parameters())}


def official_key_to_mlx(key: str) -> str | None:
    """The MLX module uses the official names; BatchNorm's step counter is training state (dropped), and a
    DataParallel `module.` prefix is stripped as FunASR's loader does (scope_map)."""
    if key.endswith(".num_batches_tracked"):
        return None
    return key[len("module."):] if key.startswith("module.") else key


def to_mlx_layout(arr: np.ndarray) -> np.ndarray:
    """torch Conv1d [O, I, k] -> [O, k, I]; Conv2d [O, I, kh, kw] -> [O, kh, kw, I]; vectors unchanged."""
    if arr.ndim == 3:
        return arr.transpose(0, 2, 1)
    if arr.ndim == 4:
        return arr.transpose(0, 2, 3, 1)
    return arr


def convert(src: OfficialDir, out_dir: Path) -> Path:
    """Official weights -> MLX safetensors + config, atomically (nothing half-written on failure)."""
    t0 = time.perf_counter()
    state = load_state_dict(src.weights, key="state_dict")  # a bare state dict (the release) or {"state_dict": ...}
    expected = expected_shapes(src.config)
    weights: dict[str, mx.array] = {}
    found: dict[str, tuple[int, ...]] = {}
    for key, tensor in state.items():
        name = official_key_to_mlx(key)
        if name is None:
            continue
        if not tensor.dtype.startswith(("float", "bfloat")):
            raise CheckpointError(f"{src.weights}: tensor {key!r} is {tensor.dtype}, expected floating point")
        arr = np.ascontiguousarray(to_mlx_layout(tensor.to_float32()))
        weights[name] = mx.array(arr)
        found[name] = tuple(arr.shape)
    strict_check(found, expected, str(src.weights), "CAM++", src.described_by)
    del state
    with atomic_dir(out_dir) as tmp:
        mx.save_safetensors(str(tmp / CONVERTED_WEIGHTS), weights)
        doc = {"format_version": FORMAT_VERSION, "model": "CAMPPlus", **src.config.to_json(),
               "source": str(src.weights), "described_by": src.described_by}
        (tmp / CONVERTED_CONFIG).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    log.info("converted %s -> %s in %.2f s", src.weights, out_dir, time.perf_counter() - t0)
    return out_dir


# --- loading -------------------------------------------------------------------------------------------------------
def _read_converted(model_dir: Path) -> CAMPPlus:
    doc = _read_json(model_dir / CONVERTED_CONFIG)
    if doc.get("format_version") != FORMAT_VERSION or doc.get("model") != "CAMPPlus":
        raise CheckpointError(f"{model_dir} was converted by another version (format {doc.get('format_version')!r}, "
                              f"this one reads {FORMAT_VERSION}); delete it and load the official directory again")
    try:
        config = CAMPPlusConfig.from_json(doc)
    except (TypeError, ValueError) as exc:
        raise _config_error(model_dir / CONVERTED_CONFIG, exc) from exc
    path = model_dir / CONVERTED_WEIGHTS
    try:
        weights = mx.load(str(path))
    except Exception as exc:  # a truncated or garbled cache file
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}; delete {model_dir} so that the "
                              "official checkpoint is converted again") from exc
    strict_check({k: tuple(v.shape) for k, v in weights.items()}, expected_shapes(config), str(path), "CAM++",
                 CONVERTED_CONFIG)
    net = CAMPPlus(config)
    net.load_weights(list(weights.items()), strict=True)
    net.eval()
    mx.eval(net.parameters())
    return net


def load_campplus(path_or_repo: str | os.PathLike, *, download_root: str | os.PathLike | None = None,
                  local_files_only: bool = False, backend: str = "auto", compiled: bool | None = None) -> SpeakerModel:
    """Load CAM++ from an official directory, its .bin, a Hugging Face repo id or a converted directory; an official
    checkpoint is converted once into the model cache and read from there afterwards.

    download_root: where a hub id is looked up and downloaded (default: huggingface_hub's cache).
    local_files_only: never download; a hub id must already be in the cache.
    backend: what computes the embeddings: "mlx" (the reference network on MLX's device: Metal, CUDA or the CPU),
    "cpu" (NumPy + BLAS: the same numbers, faster where MLX computes on the CPU) or "auto" (cpu where MLX computes
    on the CPU, else mlx). load_model passes its own backend's choice.
    compiled: with backend "mlx", run the network's batches under mx.compile (asr.backends.mlx.campplus: the same
    operations fused into fewer kernels); None: on a GPU, where a batch's ~2,000 small kernels cost more than their
    arithmetic (docs/diarization.md).
    Raises ModelLoadError (nothing to load there) or CheckpointError (a file is corrupt, unsafe or mismatched)."""
    if path_or_repo is None:
        raise ModelLoadError(f"pass a CAM++ model directory or hub id (the official model is {OFFICIAL_ID})")
    spec = str(path_or_repo)
    model_dir, weights = _resolve(spec, download_root, local_files_only)
    converted = False
    if weights is None and (model_dir / CONVERTED_CONFIG).is_file():
        conv = model_dir
    else:
        src = read_official_dir(model_dir, weights)
        conv = converted_dir_for(src)
        if not (conv / CONVERTED_CONFIG).is_file():
            log.info("converting CAM++ %s to MLX (once) ...", src.weights)
            convert(src, conv)
            converted = True
    net = _read_converted(conv)
    backend = _choose_backend(backend)
    runner = net
    if backend == "cpu":
        from ..backends.cpu.campplus import CPUCAMPPlus

        runner = CPUCAMPPlus(net, workers=_cpu_workers())
    gpu = backend == "mlx" and device() != "cpu"
    if compiled is None:
        compiled = gpu
    compiled = bool(compiled) and backend == "mlx"
    if compiled:
        from ..backends.mlx.campplus import CompiledCAMPPlus

        runner = CompiledCAMPPlus(net)
    batch = GPU_BATCH if gpu else CPU_BATCH * getattr(runner, "workers", 1)
    return SpeakerModel(net=net, config=net.config, name=spec, model_dir=conv, converted=converted, backend=backend,
                        runner=runner, batch=batch, compiled=compiled)


def _cpu_workers() -> int:
    """Threads for the CPU runner: the cores this process may use, at most 4."""
    return max(1, min(usable_cores(), 4))


def _choose_backend(backend: str) -> str:
    if backend not in ("auto", "mlx", "cpu"):
        raise InvalidOptionError(f"the speaker model's backend must be 'auto', 'mlx' or 'cpu'; got {backend!r}")
    if backend == "auto":
        return "cpu" if device() == "cpu" else "mlx"
    return backend
