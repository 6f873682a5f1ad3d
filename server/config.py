"""Server settings: command-line flags, each mirrored by a `FUNASR_NANO_MCP_*` environment variable.

A flag given on the command line wins over its environment variable, which wins over the default.
List-valued variables use the platform path separator (roots) or commas (hosts). Nothing here lets a
tool caller choose a model or pass model arguments: those are fixed when the server starts.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from asr.types import BATCH_SIZE_DEFAULT, BATCH_SIZE_MAX

ENV_PREFIX = "FUNASR_NANO_MCP_"

UrlPolicy = Literal["public", "allowlist", "any", "off"]


class Settings(BaseModel):
    """Everything the server needs to know at start-up."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # model
    model: str | None = Field(default=None, description="model directory or Hugging Face repo id (None: the library default)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    encoder_dtype: Literal["float32", "bfloat16"] = "float32"
    quantize: Literal[4, 8] | None = None
    variant: Literal["nano", "mlt"] | None = None
    backend: Literal["auto", "mlx", "cpu", "cuda"] = "auto"
    speaker_model: str | None = Field(default=None, description="CAM++ speaker model (folder or hub id) for speakers=")
    warmup: bool = True
    batch_size: int = Field(default=BATCH_SIZE_DEFAULT, ge=1, le=BATCH_SIZE_MAX)
    max_new_tokens: int = Field(default=512, ge=1, le=4096)
    # local files
    allowed_roots: tuple[Path, ...] = Field(default_factory=lambda: (Path.home(),))
    allow_hidden: bool = False
    client_roots: Literal["narrow", "ignore"] = "narrow"
    max_file_mb: float = Field(default=1024.0, gt=0)
    max_duration_s: float = Field(default=3 * 3600.0, gt=0)
    # results
    max_inline_tokens: int = Field(default=8000, ge=500, le=200_000)
    output_dir: Path | None = None
    output_formats: tuple[Literal["txt", "srt", "vtt", "json"], ...] = ("txt", "srt", "vtt", "json")
    # URLs
    url_policy: UrlPolicy = "public"
    url_allow_hosts: tuple[str, ...] = ()
    max_download_mb: float = Field(default=200.0, gt=0)
    download_timeout_s: float = Field(default=120.0, gt=0)
    # jobs
    call_budget_s: float = Field(default=45.0, gt=0)
    queue_size: int = Field(default=16, ge=1, le=1024)
    result_ttl_s: float = Field(default=3600.0, gt=0)
    max_jobs_kept: int = Field(default=64, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _roots(cls, value: object) -> object:
        if isinstance(value, (str, Path)):
            value = [value]
        out = []
        for item in value or ():  # type: ignore[union-attr]
            path = Path(os.path.expanduser(str(item)))
            if not path.is_absolute():
                raise ValueError(f"allowed root {str(item)!r} must be an absolute path")
            out.append(path)
        if not out:
            raise ValueError("at least one allowed root is required")
        return tuple(out)

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_dir(cls, value: object) -> object:
        if value is None or value == "":
            return None
        path = Path(os.path.expanduser(str(value)))
        if not path.is_absolute():
            raise ValueError(f"output folder {str(value)!r} must be an absolute path")
        return path

    @field_validator("output_formats", mode="before")
    @classmethod
    def _formats(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        out = [f.strip().lower().lstrip(".") for item in value or () for f in str(item).split(",") if f.strip()]  # type: ignore[union-attr]
        if not out:
            raise ValueError("at least one output format is required (txt, srt, vtt, json)")
        return tuple(dict.fromkeys(out))

    @field_validator("url_allow_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        return tuple(h.strip().lower().strip("[]").rstrip(".") for h in value or () if h.strip())  # type: ignore[union-attr]

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    @property
    def max_download_bytes(self) -> int:
        return int(self.max_download_mb * 1024 * 1024)


# (field, flag, help, kind) - kind: str | bool | list-path | list-comma | optional-int
_OPTIONS: list[tuple[str, str, str, str]] = [
    ("model", "--model", "model directory or Hugging Face repo id (default: the library's default checkpoint)", "str"),
    ("dtype", "--dtype", "LLM dtype: auto (bfloat16; float32 on a CPU without numba), "
     "bfloat16, float16 or float32", "str"),
    ("encoder_dtype", "--encoder-dtype", "audio encoder dtype: float32 (default) or bfloat16 (faster on GPUs and, "
     "with MKL's bf16 products, on CPUs)", "str"),
    ("quantize", "--quantize", "quantize the LLM weights to 4 or 8 bits ('none' to disable; default none)", "int?"),
    ("variant", "--variant", "force the model variant: nano or mlt (default: read from the checkpoint)", "str"),
    ("backend", "--backend", "what computes: auto (default), mlx (MLX's operations; what Apple Silicon runs), cpu "
     "(NumPy + BLAS runners, Linux), cuda (CUDA kernels)", "str"),
    ("speaker_model", "--speaker-model", "CAM++ speaker model for who-spoke-when (speakers=): a local folder of "
     "iic/speech_campplus_sv_zh-cn_16k-common or a Hugging Face id (default: none, speakers= unavailable)", "str"),
    ("warmup", "--warmup", "run one warm-up transcription after loading (default on)", "bool"),
    ("batch_size", "--batch-size", f"segments of long audio decoded together, 1-{BATCH_SIZE_MAX} (default "
     f"{BATCH_SIZE_DEFAULT}; fewer hold less memory, more can be faster on a GPU)", "str"),
    ("max_new_tokens", "--max-new-tokens", "cap on the tokens generated per segment, 1-4096 (default 512; a "
     "segment of at most 30 s rarely needs 200)", "str"),
    ("allowed_roots", "--allowed-root", "folder transcribe_file may read; repeat for several (default: your home "
     "folder). Env: paths separated by the OS path separator", "paths"),
    ("allow_hidden", "--allow-hidden", "also allow files under hidden folders such as ~/.ssh (default off)", "bool"),
    ("client_roots", "--client-roots", "'narrow' (default): roots the client declares further restrict the "
     "allowed folders; 'ignore': use only the configured folders", "str"),
    ("max_file_mb", "--max-file-mb", "largest local file accepted, in MiB (default 1024)", "str"),
    ("max_duration_s", "--max-duration-s", "longest audio accepted, in seconds (default 10800)", "str"),
    ("max_inline_tokens", "--max-inline-tokens", "a transcript longer than about this many tokens is not put "
     "inline whole: the result carries its beginning and a transcript:// link, and get_transcript reads it in "
     "pages (default 8000)", "str"),
    ("output_dir", "--output-dir", "also write every transcript as files into this folder (default: only when a "
     "call asks, with output_dir)", "str"),
    ("output_formats", "--output-format", "file formats written: txt, srt, vtt, json (default all); repeat for "
     "several. Env: comma-separated", "hosts"),
    ("url_policy", "--url-policy", "transcribe_url policy: 'public' (default: public addresses only, plus hosts "
     "from --url-allow-host), 'allowlist' (only those hosts), 'any' (also private addresses), 'off' (no URL tool)",
     "str"),
    ("url_allow_hosts", "--url-allow-host", "host name or IP that transcribe_url may reach even on a private "
     "address; repeat for several. Env: comma-separated", "hosts"),
    ("max_download_mb", "--max-download-mb", "largest download accepted, in MiB (default 200)", "str"),
    ("download_timeout_s", "--download-timeout-s", "wall-clock limit for one download, in seconds (default 120)", "str"),
    ("call_budget_s", "--call-budget-s", "how long a tool call waits before answering with a job handle to fetch "
     "later (default 45; Claude Desktop gives up at about 60)", "str"),
    ("queue_size", "--queue-size", "how many transcriptions may wait for the model (default 16)", "str"),
    ("result_ttl_s", "--result-ttl-s", "how long finished results stay fetchable, in seconds (default 3600)", "str"),
    ("max_jobs_kept", "--max-jobs-kept", "how many finished jobs to keep at most (default 64)", "str"),
    ("log_level", "--log-level", "stderr log level: DEBUG, INFO, WARNING or ERROR (default INFO)", "str"),
]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


HTTP_ENV_PREFIX = "FUNASR_NANO_HTTP_"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class HttpSettings(BaseModel):
    """What `funasr-nano serve` adds to `Settings`: where it listens and who may call it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = Field(default=None, min_length=16, repr=False)
    auth: bool = True  # False (--no-auth): no API key needed even off loopback
    cors_origins: tuple[str, ...] = ()
    max_upload_mb: float = Field(default=200.0, gt=0)
    mcp: bool = True

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        return tuple(o.strip().rstrip("/") for o in value or () if o.strip())  # type: ignore[union-attr]

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def check(self) -> None:
        """Binding beyond this machine needs an API key unless auth is explicitly switched off."""
        if not self.loopback and self.api_key is None and self.auth:
            raise ConfigError(
                f"--host {self.host} makes the API reachable from other machines: set an API key (--api-key or "
                f"{HTTP_ENV_PREFIX}API_KEY, 16+ characters) or pass --no-auth to serve without one")


_HTTP_OPTIONS: list[tuple[str, str, str, str]] = [
    ("host", "--host", "address to listen on (default 127.0.0.1: this machine only; any other needs --api-key "
     "or --no-auth)", "str"),
    ("port", "--port", "TCP port (default 8000)", "str"),
    ("api_key", "--api-key", "require 'Authorization: Bearer KEY' on every request (16+ characters; prefer the "
     "environment variable, which other users cannot see in the process list)", "str"),
    ("auth", "--auth", "--no-auth serves without an API key even on a non-loopback address (default: a key is "
     "required there)", "bool"),
    ("cors_origins", "--cors-origin", "browser origin allowed to call the API (CORS); repeat for several "
     "(default: none). Env: comma-separated", "hosts"),
    ("max_upload_mb", "--max-upload-mb", "largest upload accepted, in MiB (default 200)", "str"),
    ("mcp", "--mcp", "also serve MCP over Streamable HTTP at /mcp (default on)", "bool"),
]


def env_name(field: str, prefix: str = ENV_PREFIX) -> str:
    return prefix + field.upper()


def _add_options(ap: argparse.ArgumentParser, options: list[tuple[str, str, str, str]], prefix: str) -> None:
    for field, flag, help_text, kind in options:
        env_help = f"{help_text} [{env_name(field, prefix)}]"
        if kind == "bool":
            ap.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=None, help=env_help)
        elif kind in ("paths", "hosts"):
            ap.add_argument(flag, dest=field, action="append", default=None, metavar="VALUE", help=env_help)
        else:
            ap.add_argument(flag, dest=field, default=None, metavar="VALUE", help=env_help)


def build_http_parser(prog: str = "funasr-nano serve") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Local speech-to-text (Fun-ASR-Nano on MLX) over HTTP: an OpenAI-compatible "
        "/v1/audio/transcriptions, /v1/models, /health, /metrics and MCP over Streamable HTTP at /mcp. Listening "
        f"options are also read from {HTTP_ENV_PREFIX}..., the model and limit options from {ENV_PREFIX}... "
        "(shared with the stdio MCP server).",
    )
    _add_options(ap, _HTTP_OPTIONS, HTTP_ENV_PREFIX)
    _add_options(ap, _OPTIONS, ENV_PREFIX)
    return ap


def load_http_settings(argv: Sequence[str] | None = None,
                       env: Mapping[str, str] | None = None) -> tuple[Settings, HttpSettings]:
    """(Settings, HttpSettings) for `funasr-nano serve`: flags over environment variables over defaults."""
    env = os.environ if env is None else env
    args = build_http_parser().parse_args(list(argv or []))
    http = _build(HttpSettings, _collect(args, _HTTP_OPTIONS, env, HTTP_ENV_PREFIX), _HTTP_OPTIONS, HTTP_ENV_PREFIX)
    http.check()
    return _build(Settings, _collect(args, _OPTIONS, env, ENV_PREFIX), _OPTIONS, ENV_PREFIX), http


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="funasr-nano-mcp",
        description="Local speech-to-text (Fun-ASR-Nano on MLX) as an MCP server over stdio. "
        f"Every flag can also be set through the environment variable named in brackets ({ENV_PREFIX}...).",
    )
    _add_options(ap, _OPTIONS, ENV_PREFIX)
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    return ap


def _parse_env(kind: str, raw: str) -> object:
    if kind == "bool":
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected true/false, got {raw!r}")
    if kind == "paths":
        return [p for p in raw.split(os.pathsep) if p.strip()]
    if kind == "hosts":
        return [h for h in raw.split(",") if h.strip()]
    return raw


def _normalise(kind: str, value: object) -> object:
    if kind == "int?" and isinstance(value, str):
        low = value.strip().lower()
        if low in ("", "none", "0", "off", "no"):
            return None
        return int(low) if low.isdigit() else low
    if kind == "str" and isinstance(value, str) and value.strip() == "":
        return None
    return value


class ConfigError(ValueError):
    """A flag or environment variable has a bad value."""


def load_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags (`argv`, default: none) over environment variables (`env`, default: os.environ)."""
    env = os.environ if env is None else env
    args = build_parser().parse_args(list(argv or []))
    return _build(Settings, _collect(args, _OPTIONS, env, ENV_PREFIX), _OPTIONS, ENV_PREFIX)


def _collect(args: argparse.Namespace, options: list[tuple[str, str, str, str]], env: Mapping[str, str],
             prefix: str) -> dict[str, object]:
    values: dict[str, object] = {}
    for field, _flag, _help, kind in options:
        value = getattr(args, field)
        if value is None and env.get(env_name(field, prefix)) is not None:
            try:
                value = _parse_env(kind, env[env_name(field, prefix)])
            except ValueError as exc:
                raise ConfigError(f"{env_name(field, prefix)}: {exc}") from None
        value = _normalise(kind, value)
        if value is not None:
            values[field] = value
    return values


def _build(cls, values: dict[str, object], options: list[tuple[str, str, str, str]], prefix: str):
    try:
        return cls(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_where(str(err['loc'][0]) if err['loc'] else '', options, prefix)}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(problems) from None


def _where(field: str, options: list[tuple[str, str, str, str]] = _OPTIONS, prefix: str = ENV_PREFIX) -> str:
    for name, flag, _help, _kind in options:
        if name == field:
            return f"{flag} / {env_name(name, prefix)}"
    return field
