"""Find, read, validate and convert Fun-ASR-Nano checkpoints.

Three sources are accepted by `resolve()`:
  (a) an official model directory as distributed (config.yaml, model.pt, Qwen3-0.6B/, multilingual.tiktoken);
  (b) a Hugging Face repo id (downloaded through huggingface_hub and its cache; HF_HUB_OFFLINE honoured);
  (c) a directory converted by this package (mlx_config.json + weights.safetensors + tokenizer.json).
An official directory is converted once (strict, by name) into an MLX safetensors cache, so the next start
reads safetensors directly. `model.pt` is read without torch by a restricted unpickler (asr/torch_zip.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import CheckpointError, ModelLoadError
from ..model.config import CONFIG_FILE, FORMAT_VERSION

log = logging.getLogger(__name__)

DEFAULT_REPO = "FunAudioLLM/Fun-ASR-Nano-2512"
MLX_CONFIG = CONFIG_FILE
MLX_WEIGHTS = "weights.safetensors"
_HUB_FILES = ["config.yaml", "configuration.json", "model.pt", "Qwen3-0.6B/*", "multilingual.tiktoken"]


def cache_root() -> Path:
    env = os.environ.get("FUNASR_NANO_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "funasr-nano-mlx"


@dataclass(frozen=True)
class Source:
    kind: str  # "official" | "converted"
    path: Path
    name: str  # what the user asked for (path or repo id)


def resolve(path_or_repo: str | os.PathLike | None, *, download_root: str | os.PathLike | None = None,
            local_files_only: bool = False) -> Source:
    """Turn a path or hub id into a local directory, downloading when needed. A hub id is looked up in (and
    downloaded to) `download_root`, default huggingface_hub's cache; `local_files_only` never touches the network."""
    spec = str(path_or_repo) if path_or_repo is not None else os.environ.get("FUNASR_NANO_MODEL", DEFAULT_REPO)
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"model path {p} is a file; pass the model directory that holds config.yaml and model.pt")
        return Source(kind=_dir_kind(p), path=p.resolve(), name=spec)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return Source(kind="official", path=_download(spec, download_root, local_files_only), name=spec)
    raise ModelLoadError(
        f"model {spec!r} not found: pass an existing model directory or a Hugging Face repo id such as {DEFAULT_REPO!r}"
    )


def _dir_kind(p: Path) -> str:
    if (p / MLX_CONFIG).is_file():
        return "converted"
    missing = [f for f in ("config.yaml", "model.pt") if not (p / f).is_file()]
    if missing:
        raise ModelLoadError(
            f"{p} is not a Fun-ASR-Nano model directory: missing {', '.join(missing)}. Download the full model "
            f"(e.g. `huggingface-cli download {DEFAULT_REPO}`) or pass a directory converted by funasr-nano-mlx"
        )
    return "official"


def _download(repo_id: str, cache_dir: str | os.PathLike | None, local_files_only: bool) -> Path:
    return download(repo_id, _HUB_FILES, cache_dir, local_files_only)


def download(repo_id: str, patterns: list[str], cache_dir: str | os.PathLike | None, local_files_only: bool,
             what: str = "model") -> Path:
    """A Hugging Face snapshot of `repo_id` (only `patterns`) in `cache_dir` (default: huggingface_hub's cache),
    or a ModelLoadError that says why and what to do."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise ModelLoadError("huggingface_hub is needed to download models; pip install huggingface_hub") from exc
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_files_only,
                                 cache_dir=None if cache_dir is None else str(Path(cache_dir).expanduser()))
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache{'' if cache_dir is None else f' ({cache_dir})'} "
            "and downloading is off or impossible (local_files_only, HF_HUB_OFFLINE=1 or no network). Download it "
            "once with network access, or pass a local directory"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"could not download {repo_id!r} from Hugging Face: {type(exc).__name__}: {exc}") from exc
    return Path(path)


# --- official directory ----------------------------------------------------------------------------------
@dataclass
class OfficialConfig:
    yaml: dict
    llm_dir: Path
    llm_config: dict


def inside(base: Path, rel: str, what: str) -> Path:
    """base / rel, resolved, where it stays inside base (a config that names a file elsewhere is refused)."""
    target = (base / rel).resolve()
    if not target.is_relative_to(base.resolve()):
        raise CheckpointError(f"{what} points outside the model directory ({rel!r}); refusing to follow it")
    return target


def read_official_config(model_dir: Path) -> OfficialConfig:
    cfg_path = model_dir / "config.yaml"
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot parse {cfg_path}: {exc}") from exc
    if not isinstance(cfg, dict) or cfg.get("model") != "FunASRNano":
        raise CheckpointError(f"{cfg_path} does not describe a FunASRNano model (model: {cfg.get('model') if isinstance(cfg, dict) else None!r})")
    for key in ("audio_encoder_conf", "audio_adaptor_conf", "llm_conf"):
        if not isinstance(cfg.get(key), dict):
            raise CheckpointError(f"{cfg_path} lacks the section {key!r}")
    if cfg.get("audio_encoder") != "SenseVoiceEncoderSmall" or cfg.get("audio_adaptor") != "Transformer":
        raise CheckpointError(f"{cfg_path}: unsupported encoder/adaptor {cfg.get('audio_encoder')}/{cfg.get('audio_adaptor')}")
    rel = str(cfg["llm_conf"].get("init_param_path") or "Qwen3-0.6B")
    llm_dir = inside(model_dir, rel, "config.yaml's LLM path (llm_conf.init_param_path)")
    try:
        llm_config = json.loads((llm_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read the LLM config {llm_dir / 'config.json'}: {exc}") from exc
    if not (llm_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"the tokenizer {llm_dir / 'tokenizer.json'} is missing; re-download the model")
    return OfficialConfig(yaml=cfg, llm_dir=llm_dir, llm_config=llm_config)


def official_key_to_mlx(key: str) -> str | None:
    """Rename one official state-dict key to our module tree (None: drop)."""
    if key == "llm.lm_head.weight":
        return None  # tied to llm.model.embed_tokens.weight; checked separately
    for src, dst in (("audio_encoder.", "encoder."), ("audio_adaptor.", "adaptor."), ("llm.", "llm."),
                     ("ctc_decoder.", "ctc_decoder."), ("ctc.ctc_lo.", "ctc_lo.")):
        if key.startswith(src):
            name = dst + key[len(src):]
            return name.replace(".self_attn.fsmn_block.weight", ".self_attn.fsmn_weight")
    return key  # unknown: reported as unexpected by the strict check


def fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{FORMAT_VERSION}".encode()).hexdigest()[:16]


def converted_dir_for(model_dir: Path) -> Path:
    return cache_root() / "converted" / f"{model_dir.name}-{fingerprint(model_dir / 'model.pt')}"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """A temp dir beside `final` that replaces it only if the block succeeds (nothing half-written)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
