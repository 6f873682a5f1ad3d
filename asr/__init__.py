"""funasr-nano-mlx: Fun-ASR-Nano speech recognition on MLX.

    model = asr.load_model()                      # RuntimeOptions choose the backend; see asr.options
    result = model.transcribe("talk.m4a")

The pipeline, in the order audio flows: asr.audio (decode, features, VAD) -> asr.model (encoder, adaptor, Qwen3,
prompt, CTC: pure MLX) -> asr.decode (the runner protocol and the one greedy loop) -> asr.backends (mlx, cpu,
cuda runners) -> asr.pipeline (transcribe) -> asr.loading (checkpoints, conversion, load_model) -> asr.cli and the
MCP server (the `server` package).
"""

from .backends.cpu.blas_load import preload as _preload_blas
from .backends.cuda.env import apply_defaults as _mlx_env_defaults

_preload_blas()  # must precede the first `import mlx` anywhere in the process
_mlx_env_defaults()  # read by MLX when it loads

from .errors import (  # noqa: E402
    ASRError,
    AudioDecodeError,
    AudioError,
    AudioNotFoundError,
    AudioTooLargeError,
    CheckpointError,
    EmptyAudioError,
    InvalidOptionError,
    ModelLoadError,
    TranscriptionCancelled,
    UnsupportedLanguageError,
)
from .options import RuntimeOptions  # noqa: E402
from .types import Language, RuntimeInfo, Segment, Timings, TranscriptionResult  # noqa: E402

__all__ = [
    "ASRError", "AudioDecodeError", "AudioError", "AudioNotFoundError", "AudioTooLargeError",
    "CheckpointError", "EmptyAudioError", "InvalidOptionError", "ModelLoadError", "TranscriptionCancelled",
    "UnsupportedLanguageError", "Language", "RuntimeInfo", "RuntimeOptions", "Segment", "Timings",
    "TranscriptionResult", "load_model",
]


def load_model(*args, **kwargs):
    """Load a Fun-ASR-Nano model; see `asr.loading.load.load_model`."""
    from .loading.load import load_model as _load

    return _load(*args, **kwargs)
