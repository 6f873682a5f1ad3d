"""Public result and option types (pydantic models at the API boundary)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# segments of long audio `transcribe` decodes together: the default (a decode step reads every weight once whatever
# the batch; docs/performance.md, "Long audio end to end") and the most it accepts. The library, the CLI and the
# server all take these.
BATCH_SIZE_DEFAULT = 16
BATCH_SIZE_MAX = 256


class Language(BaseModel):
    """A language the loaded model variant accepts."""

    code: str = Field(description="ISO 639 code, e.g. 'zh', 'en', 'ja', 'yue' (accepted as language=)")
    name: str = Field(description="English name (also accepted as language=)")
    prompt_name: str = Field(description="The name the model's prompt expects, e.g. '中文' (also accepted as language=)")
    note: str | None = Field(default=None, description="How this language is handled, when not obvious")


class TokenTimestamp(BaseModel):
    """One token placed in the audio by CTC forced alignment (seconds; 60 ms frames; end exclusive)."""

    token: str
    start: float
    end: float
    score: float = Field(description="best frame probability of the token (3 decimals, as the official code)")


class Segment(BaseModel):
    """One decoded stretch of audio, with times in seconds in the original audio."""

    start: float
    end: float
    text: str
    token_ids: list[int] = Field(default_factory=list)
    timestamps: list[TokenTimestamp] | None = Field(
        default=None, description="per-token times from CTC alignment; None when the checkpoint has no CTC head")
    speaker: str | None = Field(default=None, description="'S1', 'S2', ... when speakers were asked for (diarization)")


class Timings(BaseModel):
    """Per-stage wall times in seconds, plus throughput figures."""

    audio_decode_s: float = 0.0
    features_s: float = 0.0
    encoder_s: float = 0.0
    adaptor_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    timestamps_s: float = Field(default=0.0, description="CTC forced alignment (0 when timestamps are unavailable)")
    speakers_s: float = Field(default=0.0, description="diarization: speaker windows, embeddings, clustering")
    total_s: float = 0.0
    audio_duration_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    real_time_factor: float = Field(default=0.0, description="processing time / audio duration (lower is faster)")


class RuntimeInfo(BaseModel):
    """What computes a loaded model: chosen once at load (asr.options.RuntimeOptions), reported with every result."""

    backend: Literal["mlx", "cpu", "cuda"] = Field(
        description="mlx: MLX's own operations (Apple Silicon: Metal); cpu: NumPy + BLAS runners; cuda: CUDA kernels")
    device: str = Field(description="MLX's device and build, e.g. 'gpu (metal)', 'cpu', 'gpu (cuda)'")
    audio: str = Field(description="what runs the encoder, the adaptor and the CTC decoder")
    llm: str = Field(description="what runs the LLM's prefill and decode steps")
    cpu_blas: str | None = Field(default=None, description="the BLAS library loaded for CPU products, if any")
    fp32_products: Literal["ieee", "tf32"] = Field(
        default="ieee", description="how float32 matrix products are computed: ieee, or tf32 (MLX's default on CUDA; "
        "MLX_ENABLE_TF32=0 before start gives IEEE fp32, the official code's numbers)")


FinishReason = Literal["stop", "length", "repetition", "empty"]


class TranscriptionResult(BaseModel):
    """What `FunASRNano.transcribe` returns."""

    text: str
    language: str | None = Field(description="ISO code of the language, requested or detected; None if unknown")
    language_source: Literal["requested", "detected", "unknown"] = "unknown"
    language_method: str | None = Field(
        default=None, description="How the language was detected (e.g. 'script-heuristic'); None when requested"
    )
    segments: list[Segment] = Field(default_factory=list)
    token_ids: list[int] = Field(default_factory=list, description="generated token ids (all segments, in order)")
    finish_reason: FinishReason = "stop"
    timestamps: list[TokenTimestamp] | None = Field(
        default=None, description="per-token times (CTC forced alignment, as the official code); None if unavailable")
    timestamps_note: str = Field(
        default="", description="why token timestamps are missing, when they are (times are never invented)")
    timings: Timings = Field(default_factory=Timings)
    runtime: RuntimeInfo | None = Field(default=None, description="what computed this result")
    warnings: list[str] = Field(default_factory=list)
