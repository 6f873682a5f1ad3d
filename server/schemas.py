"""Structured results of the tools (their `outputSchema`), and the one-line text headers around them.

Both channels must stand alone: some clients forward only `content`, others only `structuredContent`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from asr.types import BATCH_SIZE_DEFAULT, Language, RuntimeInfo


class ModelInfo(BaseModel):
    name: str = Field(description="checkpoint name, e.g. 'Fun-ASR-Nano-2512'")
    variant: str = Field(description="'nano' (zh/en/ja + Chinese dialects) or 'mlt' (31 languages)")
    dtype: str = Field(description="weight dtype, e.g. 'bfloat16'")
    quantization: int | None = Field(default=None, description="LLM weight bits when quantized, else null")
    speaker_model: str | None = Field(default=None, description="the speaker model for speakers= (who spoke when), "
                                      "or null when none is configured")


class Timings(BaseModel):
    queue_wait_s: float = Field(description="time waiting for the model (includes load_wait_s)")
    load_wait_s: float = Field(description="part of the wait spent while the model was still loading")
    download_s: float | None = Field(default=None, description="URL download time (transcribe_url only)")
    audio_decode_s: float = Field(description="decoding and resampling the audio")
    features_s: float = Field(description="filterbank features")
    encoder_s: float = Field(description="audio encoder")
    adaptor_s: float = Field(description="audio adaptor")
    prefill_s: float = Field(description="LLM prompt prefill")
    decode_s: float = Field(description="LLM token generation")
    processing_s: float = Field(description="model time for this audio (features to text)")
    total_s: float = Field(description="end to end: download + decode + queue wait + processing")
    real_time_factor: float = Field(description="processing_s / audio duration (lower is faster)")
    prompt_tokens: int
    generated_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


class Segment(BaseModel):
    start: float = Field(description="seconds from the start of the audio")
    end: float = Field(description="seconds from the start of the audio")
    text: str
    speaker: str | None = Field(default=None, description="speaker label, when speakers were identified")


class Page(BaseModel):
    """Which segments a partial transcript holds."""

    offset: int = Field(description="index of the first segment in this page")
    count: int = Field(description="segments in this page")
    total: int = Field(description="segments in the whole transcript")
    next_offset: int | None = Field(description="offset of the next page for get_transcript, or null at the end")


class Progress(BaseModel):
    done_s: float = Field(description="seconds of audio transcribed so far")
    total_s: float = Field(description="duration of the audio in seconds")
    fraction: float = Field(description="done_s / total_s, 0 to 1")
    queue_position: int = Field(description="jobs ahead of this one (0 when running)")
    message: str


class TranscriptionOutput(BaseModel):
    """A finished transcript, or the handle of one still being worked on."""

    status: Literal["completed", "queued", "running"] = Field(
        description="'completed': text holds the transcript; 'queued'/'running': not finished yet, call "
        "get_transcript with job_id to wait for it"
    )
    job_id: str = Field(description="handle for get_transcript / cancel_transcription")
    source: str = Field(description="the file name or URL that was transcribed")
    text: str | None = Field(default=None, description="the transcript (null until completed)")
    language: str | None = Field(default=None, description="ISO code of the language, or null when unknown")
    language_name: str | None = Field(default=None, description="English name of the language")
    language_source: Literal["requested", "detected", "unknown"] | None = Field(
        default=None, description="'requested' by the caller, 'detected' from the transcript, or 'unknown'"
    )
    language_method: str | None = Field(default=None, description="how the language was detected, when it was")
    duration_s: float | None = Field(default=None, description="audio duration in seconds")
    finish_reason: str | None = Field(default=None, description="'stop', 'length', 'repetition' or 'empty'")
    timings: Timings | None = None
    model: ModelInfo | None = None
    warnings: list[str] = Field(default_factory=list)
    segments: list[Segment] | None = Field(default=None, description="time-stamped segments (when requested)")
    progress: Progress | None = Field(default=None, description="progress while queued or running")
    next_step: str | None = Field(default=None, description="what to do next when the transcript is not ready "
                                  "or not whole")
    text_complete: bool = Field(default=True, description="false when `text` holds one page of a long transcript "
                                "(see page, transcript_uri and next_step)")
    page: Page | None = Field(default=None, description="the segments `text` covers, when it is not the whole")
    segment_count: int | None = Field(default=None, description="segments in the whole transcript")
    transcript_uri: str | None = Field(default=None, description="the whole transcript as an MCP resource: "
                                       "transcript://{job_id}/txt (also /srt, /vtt, /json)")
    files: list[str] = Field(default_factory=list, description="transcript files written (output_dir)")


class LanguagesOutput(BaseModel):
    model: ModelInfo
    languages: list[Language]  # the library's own model
    auto: str = Field(description="how automatic detection works")


class JobSummary(BaseModel):
    job_id: str
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    source: str
    duration_s: float
    done_s: float
    age_s: float = Field(description="seconds since it was submitted")
    error: str | None = None


class Limits(BaseModel):
    max_file_mb: float
    max_duration_s: float
    max_download_mb: float
    download_timeout_s: float
    call_budget_s: float = Field(description="a call answers with a job handle after this many seconds")
    queue_size: int
    result_ttl_s: float
    batch_size: int = Field(default=BATCH_SIZE_DEFAULT, description="segments of long audio decoded together")


class Protocol(BaseModel):
    revisions: list[str] = Field(description="MCP protocol revisions this server speaks")
    negotiated: str | None = Field(default=None, description="the revision of this session")
    extensions: list[str] = Field(description="MCP extensions this server offers")
    transports: list[str] = Field(description="how this server can be reached")


class StatusOutput(BaseModel):
    server_version: str
    model_state: Literal["starting", "loading", "warming", "ready", "failed", "stopped"]
    model: ModelInfo | None = None
    model_error: str | None = None
    compute: str | None = Field(default=None, description="what computes the model, in one line")
    runtime: RuntimeInfo | None = Field(default=None, description="what computes the model: backend, device, runners")
    load_elapsed_s: float
    queued: int
    running: int
    jobs: list[JobSummary]
    allowed_roots: list[str]
    url_policy: Literal["public", "allowlist", "any", "off"]
    limits: Limits
    protocol: Protocol | None = None


class CancelOutput(BaseModel):
    job_id: str
    status: Literal["queued", "running", "completed", "failed", "cancelled"] = Field(
        description="the job's state after the request ('running' means the cancel takes effect shortly)"
    )
    message: str
