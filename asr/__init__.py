"""funasr-nano-mlx: Fun-ASR-Nano speech recognition on MLX."""

from ._blas import preload as _preload_blas
from ._mlx_env import apply_defaults as _mlx_env_defaults

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
from .types import Language, Segment, Timings, TranscriptionResult  # noqa: E402

__all__ = [
    "ASRError", "AudioDecodeError", "AudioError", "AudioNotFoundError", "AudioTooLargeError",
    "CheckpointError", "EmptyAudioError", "InvalidOptionError", "ModelLoadError", "TranscriptionCancelled",
    "UnsupportedLanguageError", "Language", "Segment", "Timings", "TranscriptionResult", "load_model",
]


def load_model(*args, **kwargs):
    """Load a Fun-ASR-Nano model; see `asr.load.load_model`."""
    from .load import load_model as _load

    return _load(*args, **kwargs)
