"""One dedicated thread that owns the model, and the jobs it works through.

MLX streams are bound to the thread that created them, so the model is loaded, warmed up and used
on this one thread only. Tool calls submit jobs to a bounded FIFO queue and watch them from the
event loop; a job outlives the call that submitted it (the call may answer with its id and the
result is fetched later) and finished jobs stay fetchable for a while.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from asr.audio.io import AudioFile
from asr.errors import ASRError, TranscriptionCancelled
from asr.languages import resolve
from asr.types import BATCH_SIZE_DEFAULT, Language, RuntimeInfo, Segment, TranscriptionResult

log = logging.getLogger(__name__)

EngineState = Literal["starting", "loading", "warming", "ready", "failed", "stopped"]
JobState = Literal["queued", "running", "completed", "failed", "cancelled"]
FINISHED: tuple[JobState, ...] = ("completed", "failed", "cancelled")


class Runtime(Protocol):
    info: RuntimeInfo


class Model(Protocol):
    variant: str
    name: str
    dtype: str
    quantization: int | None
    runtime: Runtime  # what computes it (asr.decode.runner.Runtime)
    special_tokens: frozenset[str]  # the tokenizer's, which hotwords may not contain

    @property
    def languages(self) -> list[Language]: ...

    def transcribe(self, audio: Any, **kwargs: Any) -> TranscriptionResult: ...

    def transcribe_many(self, audios: list[Any], **kwargs: Any) -> list[TranscriptionResult]: ...

    def warmup(self, batch_size: int = BATCH_SIZE_DEFAULT) -> None: ...


@dataclass(frozen=True)
class ModelInfo:
    """What the tools may know about the model without touching it (read on the worker thread)."""

    name: str
    variant: str
    dtype: str
    quantization: int | None
    languages: tuple[Language, ...]
    runtime: RuntimeInfo  # what computes it, chosen at load
    special_tokens: frozenset[str] = frozenset()
    speaker_model: str | None = None  # the speaker model for speakers=, when one is configured

    @property
    def compute(self) -> str:
        """The runtime in one line, for server_status."""
        r = self.runtime
        blas = f"; CPU BLAS: {r.cpu_blas}" if r.cpu_blas else ""
        return f"{r.backend} backend on {r.device}: audio {r.audio}; LLM {r.llm}{blas}"


class EngineUnavailable(Exception):
    """The engine cannot take the job: `reason` is "failed" (the model failed to load), "busy" (the queue is full)
    or "stopping" (shutting down)."""

    def __init__(self, message: str, reason: Literal["failed", "busy", "stopping"]):
        super().__init__(message)
        self.reason = reason


@dataclass(eq=False)
class Job:
    """One transcription: its input, options, live progress and outcome."""

    source: str
    audio: Any
    duration_s: float
    language: str | None = None
    hotwords: list[str] | None = None
    itn: bool = True
    speakers: int | str | None = None  # diarization: None, "auto" or a number of speakers
    download_s: float | None = None
    audio_decode_s: float = 0.0
    warnings: list[str] = field(default_factory=list)  # from decoding, shown with the result
    id: str = field(default_factory=lambda: secrets.token_hex(6))
    state: JobState = "queued"
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    load_wait_s: float = 0.0
    done_s: float = 0.0
    message: str = "queued"
    result: TranscriptionResult | None = None
    segments: list[Segment] = field(default_factory=list)  # decoded so far, in time order (for streaming)
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    listeners: list[Callable[[], None]] = field(default_factory=list)  # called once it ends (must not block)
    # run on the model thread with the result, before the job is marked completed (e.g. writing files); an
    # exception becomes a warning of the result, never a lost transcript
    finalizers: list[Callable[[Job], None]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def is_finished(self) -> bool:
        return self.state in FINISHED

    @property
    def queue_wait_s(self) -> float:
        end = self.started if self.started is not None else (self.finished or time.monotonic())
        return max(0.0, end - self.submitted)


class Engine:
    """Loads the model in the background and runs jobs one at a time on its own thread."""

    def __init__(
        self,
        loader: Callable[[], Model],
        *,
        queue_size: int = 16,
        warmup: bool = True,
        batch_size: int = BATCH_SIZE_DEFAULT,
        result_ttl_s: float = 3600.0,
        max_jobs_kept: int = 64,
        max_duration_s: float | None = None,
        max_new_tokens: int = 512,
    ):
        self._loader = loader
        self.max_new_tokens = max_new_tokens
        self._warmup = warmup
        self.batch_size = batch_size
        self.queue_size = queue_size
        self.result_ttl_s = result_ttl_s
        self.max_jobs_kept = max_jobs_kept
        self.max_duration_s = max_duration_s  # enforced while a streamed file is decoded
        self.state: EngineState = "starting"
        self.info: ModelInfo | None = None
        self.error: str | None = None
        self.load_started: float | None = None
        self.ready_at: float | None = None
        self._model: Model | None = None
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []  # on the model thread now (several when decoded together)
        self._jobs: dict[str, Job] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="funasr-mlx-worker", daemon=True)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel every job and let the thread finish (a load in progress is abandoned: daemon thread)."""
        with self._cond:
            self._stopping = True
            for job in list(self._pending):
                self._finish(job, "cancelled", error="the server is shutting down")
            self._pending.clear()
            for job in self._running:
                job.cancel.set()
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if self.state not in ("failed",):
            self.state = "stopped"

    @property
    def load_elapsed_s(self) -> float:
        if self.load_started is None:
            return 0.0
        return (self.ready_at or time.monotonic()) - self.load_started

    # ---- jobs ------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cond:
            if self.state == "failed":
                raise EngineUnavailable(self.failure_message(), "failed")
            if self._stopping:
                raise EngineUnavailable("The server is shutting down; try again after it restarts.", "stopping")
            if len(self._pending) >= self.queue_size:
                raise EngineUnavailable(
                    f"The server is busy: {len(self._pending)} transcriptions are already waiting (--queue-size "
                    f"{self.queue_size}). Wait for some to finish (see server_status), then call again.", "busy"
                )
            self._prune()
            job.submitted = time.monotonic()
            self._jobs[job.id] = job
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            self._prune()
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._cond:
            self._prune()
            return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job | None:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            job.cancel.set()
            if job in self._pending:
                self._pending.remove(job)
                self._finish(job, "cancelled", error="cancelled before it started")
            return job

    def position(self, job: Job) -> int:
        """How many jobs run or wait before `job` (0 when it is running or finished)."""
        with self._cond:
            if job not in self._pending:
                return 0
            return list(self._pending).index(job) + (1 if self._running else 0)

    def counts(self) -> tuple[int, int]:
        with self._cond:
            return len(self._pending), len(self._running)

    def failure_message(self) -> str:
        return (
            f"The speech model could not be loaded, so nothing can be transcribed: {self.error}. The user must fix "
            "the server configuration (--model / FUNASR_NANO_MCP_MODEL, --dtype, --quantize) and restart the server."
        )

    # ---- the worker thread ---------------------------------------------------------------------
    def _main(self) -> None:
        if not self._load():
            return
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                batch = [job, *self._companions(job)]
                self._running = batch
            try:
                if len(batch) == 1:
                    self._execute(job)
                else:
                    self._execute_many(batch)
            finally:
                with self._cond:
                    self._running = []

    def _companions(self, job: Job) -> list[Job]:
        """Queued jobs that can be decoded in one pass with `job` (caller holds the lock): decoded in memory
        (not a streamed file), with the same language, hotwords and ITN; at most batch_size jobs in all. They leave
        the queue now."""
        if isinstance(job.audio, AudioFile) or job.cancel.is_set() or job.speakers is not None:
            return []  # streamed, cancelled, or with speakers (diarized alone)
        key = (job.language, tuple(job.hotwords or ()), job.itn)
        out = [j for j in self._pending if not isinstance(j.audio, AudioFile) and not j.cancel.is_set()
               and j.speakers is None and (j.language, tuple(j.hotwords or ()), j.itn) == key][: self.batch_size - 1]
        for j in out:
            self._pending.remove(j)
        return out

    def _load(self) -> bool:
        self.state = "loading"
        self.load_started = time.monotonic()
        log.info("loading the speech model in the background")
        try:
            model = self._loader()
            info = ModelInfo(
                name=str(model.name), variant=str(model.variant), dtype=str(model.dtype),
                quantization=model.quantization, languages=tuple(model.languages), runtime=model.runtime.info,
                special_tokens=frozenset(model.special_tokens),
                speaker_model=_speaker_name(getattr(model, "speaker_model", None)),
            )
            self.info = info
            if self._warmup:
                self.state = "warming"
                model.warmup(batch_size=self.batch_size)
        except BaseException as exc:  # noqa: BLE001 - any load failure must reach the callers, not hang them
            self.error = str(exc) if isinstance(exc, ASRError) else f"{type(exc).__name__}: {exc}"
            log.error("the speech model failed to load: %s", self.error, exc_info=not isinstance(exc, ASRError))
            with self._cond:
                self.state = "failed"
                for job in list(self._pending):
                    self._finish(job, "failed", error=self.failure_message())
                self._pending.clear()
            return False
        self._model = model
        self.ready_at = time.monotonic()
        self.state = "ready"
        log.info("model %s (%s, %s%s) ready after %.1f s", info.name, info.variant, info.dtype,
                 f", q{info.quantization}" if info.quantization else "", self.load_elapsed_s)
        return True

    def _execute(self, job: Job) -> None:
        def progress(done_s: float, total_s: float, message: str = "") -> None:
            if not job.duration_s and total_s:  # a streamed file's length, known once it has been read
                job.duration_s = float(total_s)
            job.done_s = max(job.done_s, min(float(done_s), job.duration_s or float(done_s)))
            if message:
                job.message = message

        def run(language: str | None) -> list[TranscriptionResult]:
            return [self._model.transcribe(
                job.audio, language=language, hotwords=job.hotwords or None, itn=job.itn, speakers=job.speakers,
                batch_size=self.batch_size, progress=progress, cancel=job.cancel, max_duration_s=self.max_duration_s,
                on_segment=job.segments.append, max_new_tokens=self.max_new_tokens,
            )]

        self._run([job], run, "transcribing")

    def _execute_many(self, jobs: list[Job]) -> None:
        """Several queued jobs with the same options in one pass: their segments decode together in batches
        (requests that waited together share each decode step). Each ends as it would alone."""
        first = jobs[0]

        def run(language: str | None) -> list[TranscriptionResult]:
            return self._model.transcribe_many(
                [j.audio for j in jobs], language=language, hotwords=first.hotwords or None, itn=first.itn,
                batch_size=self.batch_size, cancel=_AllCancelled(jobs), max_new_tokens=self.max_new_tokens,
                on_segment=lambda i, segment: jobs[i].segments.append(segment),
            )

        self._run(jobs, run, f"transcribing together with {len(jobs) - 1} other request(s)")

    def _run(self, jobs: list[Job], run: Callable[[str | None], list[TranscriptionResult]], message: str) -> None:
        """Start `jobs`, call `run(language code)` for their results, and end each job with its outcome."""
        with self._cond:
            for job in [j for j in jobs if j.cancel.is_set()]:
                self._finish(job, "cancelled", error="cancelled before it started")
        jobs = [j for j in jobs if not j.is_finished]
        if not jobs:
            return
        assert self._model is not None and self.info is not None
        now = time.monotonic()
        for job in jobs:
            job.started = now
            job.load_wait_s = max(0.0, min(self.ready_at or now, now) - job.submitted)
            job.state = "running"
            job.message = message
        failure: tuple[JobState, str] | None = None
        try:
            lang = resolve(jobs[0].language, self.info.variant)
            results = run(lang.code if lang else None)
        except TranscriptionCancelled:
            failure = ("cancelled", "cancelled while transcribing")
        except ASRError as exc:
            failure = ("failed", str(exc))
        except Exception:
            log.exception("job(s) %s: unexpected error while transcribing", ", ".join(j.id for j in jobs))
            failure = ("failed", "internal error while transcribing (details are in the server log)")
        if failure is not None:
            with self._cond:
                for job in jobs:
                    self._finish(job, failure[0], error=failure[1])
            return
        for job, result in zip(jobs, results, strict=True):
            if not job.cancel.is_set():
                job.result = result
                job.duration_s = job.duration_s or result.timings.audio_duration_s
                job.done_s = job.duration_s
                _finalize(job)
        with self._cond:
            for job in jobs:
                if job.cancel.is_set():
                    self._finish(job, "cancelled", error="cancelled while transcribing")
                else:
                    self._finish(job, "completed")
        t = results[0].timings
        log.info("job(s) %s: %.1f s audio in %.2f s (RTF %.3f, %d tokens, waited %.2f s)",
                 ",".join(j.id for j in jobs), sum(j.duration_s for j in jobs), t.total_s, t.real_time_factor,
                 t.generated_tokens, jobs[0].queue_wait_s)

    def _finish(self, job: Job, state: JobState, error: str | None = None) -> None:
        """Record the outcome (caller holds the lock)."""
        job.state = state
        job.error = error
        job.finished = time.monotonic()
        if isinstance(job.audio, AudioFile):
            job.audio.close()
        job.audio = None  # release the samples, or the file
        job.message = state
        job.done.set()
        for listener in job.listeners:
            try:
                listener()
            except Exception:  # noqa: BLE001 - a listener (e.g. of a closed event loop) must not break the engine
                log.debug("job %s: a listener failed", job.id, exc_info=True)
        if state != "completed":
            log.info("job %s %s%s", job.id, state, f": {error}" if error and state == "failed" else "")

    def _prune(self) -> None:
        """Forget finished jobs past their time-to-live or beyond the cap (caller holds the lock)."""
        now = time.monotonic()
        finished = sorted((j for j in self._jobs.values() if j.is_finished), key=lambda j: j.finished or 0.0)
        for job in finished:
            if now - (job.finished or now) > self.result_ttl_s:
                del self._jobs[job.id]
        finished = [j for j in finished if j.id in self._jobs]
        excess = len(finished) - self.max_jobs_kept
        for job in finished[:max(0, excess)]:
            del self._jobs[job.id]


def _speaker_name(speaker_model: Any) -> str | None:
    if speaker_model is None:
        return None
    return str(getattr(speaker_model, "description", None) or getattr(speaker_model, "name", None)
               or type(speaker_model).__name__)


def _finalize(job: Job) -> None:
    for finalizer in job.finalizers:
        try:
            finalizer(job)
        except Exception as exc:  # noqa: BLE001 - the transcript stands; the failure is reported with it
            log.warning("job %s: %s", job.id, exc)
            job.warnings.append(str(exc))


class _AllCancelled:
    """A cancel flag for jobs decoded together: set once every one of them is cancelled."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def is_set(self) -> bool:
        return all(j.cancel.is_set() for j in self.jobs)
