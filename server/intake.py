"""What every front end (the MCP server, the HTTP API) does with audio before it reaches the model thread, shared
so that limits and errors are the same everywhere: the model loader, and the decoding of an opened file.

A file arrives as one opened descriptor (`asr.audio.io.AudioFile`: a checked local path, a download, an upload) and
is probed, checked against the duration cap, decoded to 16 kHz mono in memory and checked for silence - or, when it
is long or says no length, handed on as a `LongAudio` that the model streams in blocks with the cap enforced while
it reads. Nothing here imports MLX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from asr.audio import io as audio_io
from asr.audio.io import AudioFile
from asr.errors import AudioTooLargeError, EmptyAudioError

from .config import Settings
from .worker import Model

SILENCE_PEAK = 10 ** (-60 / 20)  # -60 dBFS: below this the clip holds nothing to transcribe
STREAM_ABOVE_S = audio_io.STREAM_ABOVE_S  # longer files are handed to the model to stream


class AudioAPI:
    """The two audio functions the front ends need (asr.audio.io's; a fake in unit tests)."""

    def __init__(self, probe: Callable[..., Any], load_audio: Callable[..., Any]):
        self.probe = probe
        self.load_audio = load_audio

    @classmethod
    def default(cls) -> AudioAPI:
        return cls(audio_io.probe, audio_io.load_audio)


def default_loader(settings: Settings) -> Callable[[], Model]:
    """`asr.load_model` with the settings' model options (it runs on the engine's thread)."""

    def load() -> Model:
        import asr  # first: preloads the BLAS before MLX

        runtime = dataclasses.replace(asr.RuntimeOptions.from_env(), backend=settings.backend)
        return asr.load_model(settings.model, dtype=settings.dtype, quantize=settings.quantize,
                              variant=settings.variant, encoder_dtype=settings.encoder_dtype, runtime=runtime,
                              speaker_model=settings.speaker_model)

    return load


@dataclass(frozen=True)
class LongAudio:
    """A file the model streams in blocks from its one opened descriptor (bounded memory) instead of the server
    holding every sample: long per its header, or of unknown length (WebM as browsers record it says none). The
    duration limit is then enforced while the model decodes it; its VAD decides whether it holds speech."""

    file: AudioFile
    duration_s: float  # per the header; 0.0 where unknown until read
    warnings: tuple[str, ...] = ()


def model_input(audio: Any) -> Any:
    """What the model's `transcribe` gets: the opened file of a long one, else the decoded `Audio`."""
    return audio.file if isinstance(audio, LongAudio) else audio


def decode(settings: Settings, api: AudioAPI, file: AudioFile, *, max_bytes: int | None = None) -> Any:
    """Probe, check the duration cap, decode to 16 kHz mono in memory, and refuse silence (runs in a thread).

    Memory is bounded for every input: what is longer than STREAM_ABOVE_S per its header, or says no length at all,
    is not decoded here but handed to the model as a `LongAudio`, which reads it twice in blocks (see
    asr.pipeline.FunASRNano.transcribe) with the duration limit enforced as it reads; and what is decoded here is
    cut at STREAM_ABOVE_S even where its header understated its length (then it is streamed too). Silence in a
    streamed file comes back as an empty transcript with the model's "no speech detected" warning.
    """
    info = api.probe(file)
    duration = getattr(info, "duration_s", None)
    if duration is not None and duration > settings.max_duration_s:
        raise AudioTooLargeError(
            f"the audio lasts {fmt_duration(duration)}, over this server's {fmt_duration(settings.max_duration_s)} "
            "limit (--max-duration-s); split it into shorter parts"
        )
    if duration is None or duration > STREAM_ABOVE_S:
        return LongAudio(file=file, duration_s=float(duration or 0.0))
    try:
        audio = api.load_audio(file, max_bytes=settings.max_file_bytes if max_bytes is None else max_bytes,
                               max_duration_s=min(settings.max_duration_s, STREAM_ABOVE_S))
    except AudioTooLargeError:
        if settings.max_duration_s <= STREAM_ABOVE_S:
            raise
        return LongAudio(file=file, duration_s=0.0)  # the header understated the length
    file.close()  # decoded: the samples are all the job needs
    samples = np.asarray(audio.samples)
    if samples.size == 0 or audio.duration_s <= 0:
        raise EmptyAudioError("the file contains no audio samples; pass a recording with sound in it")
    if float(np.max(np.abs(samples))) < SILENCE_PEAK:
        raise EmptyAudioError("the audio is silent (peak below -60 dBFS), so there is no speech to transcribe; "
                              "check that the right file or audio track was passed")
    return audio


def fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
