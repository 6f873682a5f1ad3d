"""Typed errors. Each message names the problem and how to fix it."""

from __future__ import annotations


class ASRError(Exception):
    """Base class of every error this package raises on purpose."""


# --- audio input -------------------------------------------------------------------------------
class AudioError(ASRError):
    """The audio could not be used."""


class AudioNotFoundError(AudioError):
    """The path does not exist or is not a regular file."""


class AudioDecodeError(AudioError):
    """The data is not audio, is corrupt/truncated, or uses a codec we cannot decode."""


class EmptyAudioError(AudioError):
    """The audio holds no samples (or fewer than one 25 ms analysis frame)."""


class AudioTooLargeError(AudioError):
    """The file or the decoded audio exceeds a configured size/duration limit."""


# --- request options ---------------------------------------------------------------------------
class InvalidOptionError(ASRError, ValueError):
    """A transcription option has a bad value (language, hotwords, max_new_tokens, ...)."""


class UnsupportedLanguageError(InvalidOptionError):
    """The language is not supported by the loaded model variant."""

    def __init__(self, message: str, valid: list[str] | None = None):
        super().__init__(message)
        self.valid = valid or []


# --- model -------------------------------------------------------------------------------------
class ModelLoadError(ASRError):
    """The model directory / hub id cannot be loaded."""


class CheckpointError(ModelLoadError):
    """`model.pt` (or a converted checkpoint) is corrupt, incomplete, unsafe or mismatched."""


class TranscriptionCancelled(ASRError):
    """The caller cancelled the transcription."""
