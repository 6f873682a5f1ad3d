"""The MCP server: tools, their schemas, and the glue between calls and the model worker.

Tools: transcribe_file, transcribe_url (unless --url-policy off), list_languages, get_transcript,
cancel_transcription, server_status. A transcription call decodes and checks the audio off the
event loop, queues a job on the single model thread, reports progress while it waits, and answers
with the transcript - or, past the call budget, with a job handle that get_transcript resolves.
"""

# No `from __future__ import annotations`: the SDK reads these signatures at registration.

import base64
import contextlib
import inspect
import logging
import os
import sys
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
from mcp.server import MCPServer
from mcp.server.mcpserver import Context, ListRoots, Resolve
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp.types import CallToolResult, Icon, ListRootsResult, ResourceLink, TextContent, ToolAnnotations
from mcp.types.version import SUPPORTED_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field

from asr.audio.io import AudioFile
from asr.errors import ASRError, InvalidOptionError
from asr.languages import resolve as resolve_language
from asr.model.prompt import clean_hotwords
from asr.options import parse_speakers
from asr.writers import joined_text, render

from . import __version__
from .config import Settings
from .fetch import Fetcher, FetchError, Resolver
from .intake import AudioAPI, decode, default_loader, model_input
from .outputs import estimate_tokens, safe_stem, write_transcripts
from .paths import CheckedDir, PathPolicy, PathRefused, roots_from_uris
from .schemas import (
    CancelOutput,
    JobSummary,
    LanguagesOutput,
    Limits,
    ModelInfo,
    Page,
    Progress,
    Protocol,
    Segment,
    StatusOutput,
    Timings,
    TranscriptionOutput,
)
from .tasks import SUBMIT_ONLY, Tasks, TasksExtension
from .viewer import VIEWER_URI, viewer_apps
from .wire import REPLACEMENT
from .worker import Engine, EngineUnavailable, Job, Model

log = logging.getLogger(__name__)

MAX_HOTWORDS = 100
POLL_S = 0.05
HEARTBEAT_S = 2.0
MODERN_PROTOCOL = "2026-07-28"
STOP_WAIT_S = 1.0  # at shutdown, how long the model thread may take to notice a cancel (the process then ends anyway)  # from this revision on, roots are asked via an input-required round trip


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    paths: PathPolicy
    fetcher: Fetcher
    audio: AudioAPI
    decode_limiter: anyio.CapacityLimiter
    tasks: dict = field(default_factory=dict)  # task id -> server.tasks.TaskRecord


# ---- helpers ----------------------------------------------------------------------------------
def _state(ctx: Context) -> AppState:
    return ctx.request_context.lifespan_context


def _model_info(engine: Engine) -> ModelInfo | None:
    info = engine.info
    if info is None:
        return None
    return ModelInfo(name=info.name, variant=info.variant, dtype=info.dtype, quantization=info.quantization,
                     speaker_model=info.speaker_model)


def _public_url(url: str) -> str:
    """The URL without credentials, query or fragment (those may hold secrets) - for display and logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 literal keeps its brackets
            host = f"[{host}]"
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "(malformed URL)"
    if not parts.scheme and not parts.netloc:  # no scheme: shown as given, up to its query
        return parts.path
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else f"//{host}{parts.path}"


def _valid_text(**fields: Any) -> None:
    """Refuse arguments holding U+FFFD: the stdin wire puts it in place of a lone UTF-16 surrogate (server.wire), which
    is no character at all, so the call is answered with the reason instead of acting on mangled text."""
    for name, value in fields.items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and REPLACEMENT in text:
                raise ToolError(f"The {name} holds invalid text (a lone UTF-16 surrogate such as \\ud800, shown as "
                                f"{REPLACEMENT!r}). Send it again as valid Unicode.")


def _clean_hotwords(hotwords: list[str] | None) -> list[str] | None:
    """The library's hotword validation (asr.model.prompt.clean_hotwords) as a tool error; repeats are dropped."""
    try:
        return list(dict.fromkeys(clean_hotwords(hotwords))) or None
    except ASRError as exc:
        raise ToolError(f"Invalid hotwords: {exc}") from None


class _Reporter:
    """Sends progress notifications whose values strictly increase (a spec requirement)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.last: float | None = None
        self.last_time = 0.0
        self.last_msg: str | None = None

    async def send(self, value: float, total: float | None, message: str) -> None:
        now = time.monotonic()
        if self.last is not None and value <= self.last:
            quiet = now - self.last_time < (0.5 if message != self.last_msg else HEARTBEAT_S)
            if quiet:
                return
            value = self.last + 1e-3  # a heartbeat: no new audio done, but still alive
        if total is not None and value > total:
            total = None
        self.last, self.last_time, self.last_msg = value, now, message
        await self.ctx.report_progress(value, total, message)


def _job_status(job: Job, engine: Engine) -> tuple[float, str]:
    if job.state == "queued":
        if engine.state in ("starting", "loading"):
            return job.done_s, f"waiting for the model to load ({engine.load_elapsed_s:.0f} s so far)"
        if engine.state == "warming":
            return job.done_s, "waiting for the model to warm up"
        ahead = engine.position(job)
        return job.done_s, f"queued: {ahead} transcription(s) ahead" if ahead else "starting"
    return job.done_s, f"{job.message}: {job.done_s:.0f} of {job.duration_s:.0f} s of audio"


def _raise_for_failure(job: Job) -> None:
    if job.state == "failed":
        raise ToolError(f"Transcribing {job.source} failed: {job.error}")
    if job.state == "cancelled":
        raise ToolError(f"The transcription of {job.source} was cancelled ({job.error}). Call the tool again to retry.")


def _output(job: Job, engine: Engine, *, include_segments: bool, budget: int = 8000, offset: int | None = None,
            limit: int | None = None) -> TranscriptionOutput:
    """The job as a tool result. A finished transcript of more than about `budget` tokens, or any explicit page
    (offset/limit), is cut at segment boundaries: `text` then holds the page (the first ~budget/4 tokens when no page
    was asked for), `page` says which segments, and the whole stays readable through transcript_uri."""
    model = _model_info(engine)
    if not job.is_finished:
        done, message = _job_status(job, engine)
        total = max(job.duration_s, 1e-9)
        return TranscriptionOutput(
            status="running" if job.state == "running" else "queued", job_id=job.id, source=job.source,
            duration_s=round(job.duration_s, 3), model=model,
            progress=Progress(done_s=round(done, 2), total_s=round(job.duration_s, 2),
                              fraction=round(min(1.0, done / total), 4), queue_position=engine.position(job),
                              message=message),
            next_step=f"The transcript is not ready yet. Call get_transcript with job_id={job.id!r} to wait for it "
            "(or cancel_transcription to stop it).",
        )
    _raise_for_failure(job)
    result = job.result
    assert result is not None
    t = result.timings
    names = {lang.code: lang.name for lang in engine.info.languages} if engine.info else {}
    processing = t.total_s
    total_s = (job.download_s or 0.0) + job.audio_decode_s + job.queue_wait_s + processing
    timings = Timings(
        queue_wait_s=round(job.queue_wait_s, 4), load_wait_s=round(job.load_wait_s, 4),
        download_s=None if job.download_s is None else round(job.download_s, 4),
        audio_decode_s=round(max(job.audio_decode_s, t.audio_decode_s), 4), features_s=round(t.features_s, 4),
        encoder_s=round(t.encoder_s, 4), adaptor_s=round(t.adaptor_s, 4), prefill_s=round(t.prefill_s, 4),
        decode_s=round(t.decode_s, 4), processing_s=round(processing, 4), total_s=round(total_s, 4),
        real_time_factor=round(t.real_time_factor or (processing / job.duration_s if job.duration_s else 0.0), 4),
        prompt_tokens=t.prompt_tokens, generated_tokens=t.generated_tokens,
        prefill_tokens_per_s=round(t.prefill_tokens_per_s, 2), decode_tokens_per_s=round(t.decode_tokens_per_s, 2),
    )
    segs = result.segments
    text, page, shown = joined_text(segs, result.text), None, segs
    if offset is not None or limit is not None or estimate_tokens(result.text) > budget:
        start = offset or 0
        if start > len(segs) or (start == len(segs) and segs):
            raise ToolError(f"offset {start} is past the end: the transcript of job {job.id} has {len(segs)} "
                            f"segment(s) (offsets 0 to {max(0, len(segs) - 1)}).")
        allowance = budget if (offset is not None or limit is not None) else max(200, budget // 4)
        end, used = start, 0.0
        while end < len(segs) and (limit is None or end - start < limit):
            cost = estimate_tokens(segs[end].text) + 1
            if end > start and used + cost > allowance:
                break
            used += cost
            end += 1
        shown = segs[start:end]
        text = joined_text(shown, None if len(segs) > 1 else result.text)
        if start > 0 or end < len(segs):
            page = Page(offset=start, count=end - start, total=len(segs), next_offset=end if end < len(segs) else None)
    segments = None
    if include_segments:
        segments = [Segment(start=round(s.start, 3), end=round(s.end, 3), text=s.text,
                            speaker=getattr(s, "speaker", None)) for s in shown]
    uri = f"transcript://{job.id}/txt"
    next_step = None
    if page is not None and page.next_offset is not None:
        next_step = (f"This is part of a long transcript (segments {page.offset}-{page.offset + page.count - 1} of "
                     f"{page.total}, about {estimate_tokens(result.text):,.0f} tokens in all). Call get_transcript "
                     f"with job_id={job.id!r} and offset={page.next_offset} for the next part, or read the resource "
                     f"{uri} (also /srt, /vtt, /json).")
    return TranscriptionOutput(
        status="completed", job_id=job.id, source=job.source, text=text, language=result.language,
        language_name=names.get(result.language or ""), language_source=result.language_source,
        language_method=result.language_method, duration_s=round(job.duration_s, 3),
        finish_reason=result.finish_reason, timings=timings, model=model,
        warnings=[*job.warnings, *(w for w in result.warnings if w not in job.warnings)],
        segments=segments, text_complete=page is None, page=page, segment_count=len(segs), transcript_uri=uri,
        files=list(job.files), next_step=next_step,
    )


def _render(out: TranscriptionOutput) -> str:
    if out.status != "completed":
        p = out.progress
        where = f"{p.done_s:.0f} of {p.total_s:.0f} s of audio done" if p else ""
        ahead = f", {p.queue_position} job(s) ahead" if p and p.queue_position else ""
        return (f"Transcription of {out.source} is still {out.status} (job {out.job_id}: {where}{ahead}). "
                f"Call get_transcript with job_id=\"{out.job_id}\" to wait for the result.")
    if out.language:
        how = out.language_source if out.language_source != "detected" else f"detected by {out.language_method}"
        lang = f"{out.language_name or out.language} ({out.language}, {how})"
    else:
        lang = "language unknown"
    t, m = out.timings, out.model
    model = f"{m.name} {m.dtype}{f' q{m.quantization}' if m.quantization else ''}" if m else "?"
    header = (f"Transcript of {out.source} - {lang}; {out.duration_s:.1f} s of audio in {t.processing_s:.1f} s "
              f"(RTF {t.real_time_factor:.2f}, waited {t.queue_wait_s:.1f} s); {model}:")
    lines = [header, out.text if out.text else "(no speech recognised)"]
    if out.segments:
        lines.append("Segments:")
        lines += [f"[{s.start:.2f}-{s.end:.2f}]{f' {s.speaker}:' if s.speaker else ''} {s.text}" for s in out.segments]
    if out.page is not None:
        lines.append(out.next_step or f"[End of the transcript: segments {out.page.offset}-"
                     f"{out.page.offset + out.page.count - 1} of {out.page.total}.]")
    if out.files:
        lines.append("Written: " + ", ".join(out.files))
    lines += [f"Warning: {w}" for w in out.warnings]
    return "\n".join(lines)


def _tool_result(text: str, out: BaseModel) -> CallToolResult:
    """A tool answer: `text` for the model to read, `out` as the structured result."""
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=out.model_dump(mode="json"))


RENDITIONS = {"txt": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt", "json": "application/json"}


def _result(out: TranscriptionOutput) -> CallToolResult:
    result = _tool_result(_render(out), out)
    if out.status == "completed" and not out.text_complete:  # the whole, one read away
        result.content += [ResourceLink(type="resource_link", uri=f"transcript://{out.job_id}/{fmt}",
                                        name=f"transcript-{out.job_id}.{fmt}", mime_type=mime,
                                        title=f"Whole transcript of {out.source} ({fmt})")
                           for fmt, mime in RENDITIONS.items()]
    return result


async def _follow(ctx: Context, state: AppState, job: Job, *, deadline: float, include_segments: bool) -> CallToolResult:
    """Wait for `job` until `deadline` with progress; cancel it if the call is cancelled. A call being turned into
    a task (server.tasks) answers at once: the task follows the job."""
    if SUBMIT_ONLY.get():
        deadline = 0.0
    reporter = _Reporter(ctx)
    try:
        while not job.done.is_set() and time.monotonic() < deadline:
            done, message = _job_status(job, state.engine)
            await reporter.send(done, job.duration_s or None, message)
            await anyio.sleep(POLL_S)
    except BaseException:
        # cancelled by the client (or the server is going down): stop the work, not just the wait
        if not job.is_finished:
            state.engine.cancel(job.id)
            log.info("job %s cancelled with its call", job.id)
        raise
    return _result(_output(job, state.engine, include_segments=include_segments,
                           budget=state.settings.max_inline_tokens))


def _task_result(state: AppState, job: Job, include_segments: bool) -> dict:
    """A finished job as the CallToolResult a task hands back (a failure is a tool error, as from the tool)."""
    try:
        result = _result(_output(job, state.engine, include_segments=include_segments,
                                 budget=state.settings.max_inline_tokens))
    except ToolError as exc:
        result = CallToolResult(content=[TextContent(type="text", text=str(exc))], is_error=True)
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


def _check_engine(state: AppState) -> None:
    if state.engine.state == "failed":
        raise ToolError(state.engine.failure_message())


def _check_options(state: AppState, language: str, hotwords: list[str] | None, speakers=None) -> None:
    """The options the loaded model can check before any audio is read (before the load, the job checks them)."""
    info = state.engine.info
    if speakers is not None:
        try:
            parse_speakers(speakers)
        except InvalidOptionError as exc:
            raise ToolError(str(exc)) from None
        if info is not None and info.speaker_model is None:
            raise ToolError("This server has no speaker model, so it cannot tell who spoke when. The user can add one "
                            "with --speaker-model (FUNASR_NANO_MCP_SPEAKER_MODEL): the CAM++ model "
                            "iic/speech_campplus_sv_zh-cn_16k-common. Call again without speakers.")
    if info is not None:
        try:
            resolve_language(language, info.variant)
            clean_hotwords(hotwords, info.special_tokens)
        except ASRError as exc:
            raise ToolError(f"Invalid options: {exc}") from None
    if hotwords and len(hotwords) > MAX_HOTWORDS:
        raise ToolError(f"Too many hotwords ({len(hotwords)}); pass at most {MAX_HOTWORDS} of the rarest terms.")


async def _decode_async(state: AppState, file: AudioFile, source: str) -> Any:
    """_decode on a worker thread; the file is closed if the call fails or is cancelled (a job that gets it closes
    it when it ends)."""
    try:
        return await anyio.to_thread.run_sync(lambda: decode(state.settings, state.audio, file), abandon_on_cancel=True,
                                              limiter=state.decode_limiter)
    except ASRError as exc:
        file.close()
        message = str(exc)
        if file.name in message or source in message:
            raise ToolError(f"Cannot transcribe: {message}") from None
        raise ToolError(f"Cannot transcribe {source}: {message}") from None
    except BaseException:
        file.close()
        raise


@contextlib.contextmanager
def _closed_on_failure(outputs: "_Outputs | None") -> Iterator[None]:
    """The output folder is released when the call fails before its job takes it over."""
    try:
        yield
    except BaseException:
        if outputs is not None:
            outputs.close()
        raise


async def _submit(state: AppState, job: Job, outputs: "_Outputs | None" = None) -> Job:
    if outputs is not None:
        outputs.attach(job)
    try:
        return state.engine.submit(job)
    except EngineUnavailable as exc:
        if isinstance(job.audio, AudioFile):
            job.audio.close()
        raise ToolError(str(exc)) from None


ICON = Icon(src="data:image/svg+xml;base64," + base64.b64encode(
    (Path(__file__).parent / "assets" / "icon.svg").read_bytes()).decode(), mime_type="image/svg+xml", sizes=["any"])
PROTOCOL_REVISIONS = list(SUPPORTED_PROTOCOL_VERSIONS)
# the viewer renders these tools' results (`ui/resourceUri`: the older key some hosts still read); its polling
# calls get_transcript, so every tool stays visible to both the model and the app
VIEWER_META = {"ui": {"resourceUri": VIEWER_URI}, "ui/resourceUri": VIEWER_URI}
TRANSPORTS = ["stdio (funasr-nano-mcp)", "Streamable HTTP at /mcp (funasr-nano serve)"]


class _Outputs:
    """Where a job's transcript files go: an opened folder, written by the model thread once the transcript is
    there (before the job is marked completed, so the result lists the files) and closed when the job ends."""

    def __init__(self, folder: CheckedDir, stem: str, formats: tuple[str, ...]):
        self.folder, self.stem, self.formats = folder, stem, formats
        self._closed = False

    def write(self, job: Job) -> None:
        try:
            if job.result is not None:
                paths = write_transcripts(self.folder.fd, self.folder.path, self.stem, job.result, self.formats)
                job.files += [str(p) for p in paths]
        except OSError as exc:
            raise RuntimeError(f"the transcript could not be saved in {self.folder.path}: {exc.strerror or exc}; "
                               "it is in this result only") from None
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.folder.fd)

    def attach(self, job: Job) -> None:
        job.finalizers.append(self.write)
        job.listeners.append(self.close)


async def _outputs(state: AppState, output_dir: str | None, audio_path: Path | None, stem: str,
                   narrowed: list[Path] | None) -> _Outputs | None:
    """The folder to save a transcript into: the call's output_dir (inside the allowed folders; '.' = beside the
    audio), else the server's --output-dir, else none."""
    s = state.settings
    if output_dir is None or not output_dir.strip():
        if s.output_dir is None:
            return None
        policy = PathPolicy([s.output_dir], max_bytes=s.max_file_bytes, allow_hidden=True)
        raw, narrowed = str(s.output_dir), None
    else:
        policy = state.paths
        raw = output_dir.strip()
        if raw == ".":
            if audio_path is None:
                raise ToolError("output_dir '.' means the audio file's own folder, which a URL does not have; pass an "
                                "absolute folder path inside the allowed folders.")
            raw = str(audio_path.parent)
    try:
        folder = await anyio.to_thread.run_sync(lambda: policy.check_dir(raw, narrowed))
    except PathRefused as exc:
        raise ToolError(str(exc)) from None
    return _Outputs(folder, stem, s.output_formats)


# ---- the server ---------------------------------------------------------------------------------
LanguageArg = Annotated[str, Field(
    description="Spoken language: 'auto' (default, detect) or a code/name from list_languages, e.g. 'en', "
    "'zh', 'ja', 'yue', 'English', '中文'. Setting it helps when the language is known.",
    max_length=64,
)]
HotwordsArg = Annotated[list[Annotated[str, Field(min_length=1, max_length=100)]] | None, Field(
    description="Optional rare words, names or jargon expected in the audio (e.g. ['Kubernetes', 'Dr. Nguyen']); "
    "they bias recognition towards these spellings.",
    max_length=MAX_HOTWORDS,
)]
ItnArg = Annotated[bool, Field(
    description="Inverse text normalisation: true (default) writes numbers, dates and punctuation in written "
    "form ('fifty' -> '50'); false keeps the spoken form.",
)]
OutputDirArg = Annotated[str | None, Field(
    description="Optional: also save the transcript as files (.txt, .srt, .vtt, .json) into this folder, which must "
    "be inside the allowed folders; '.' means the audio file's own folder. Existing files are never overwritten "
    "(a ' (2)' name is used instead); the paths are returned in `files`.",
    max_length=4096,
)]
SpeakersArg = Annotated[int | Literal["auto"] | None, Field(
    description="Who spoke when: 'auto' to find the speakers, or their number (1-15). The transcript then has one "
    "line a turn ('S1: ...') and segments carry a speaker. Needs the server's speaker model (server_status: "
    "model.speaker_model). Default: no speaker labels.",
)]
SegmentsArg = Annotated[bool, Field(
    description="Also return time-stamped segments (start/end seconds). Default false: the plain transcript.",
)]


def create_server(
    settings: Settings | None = None,
    *,
    model_loader: Callable[[], Model] | None = None,
    audio_api: AudioAPI | None = None,
    resolver: Resolver | None = None,
    network: Callable[[str], Any] | None = None,
    download_dir: str | None = None,
    divert_stdout: bool = False,
    engine: Engine | None = None,
) -> MCPServer:
    """Build the MCP server. `model_loader`, `audio_api`, `resolver`, `network` and `download_dir` are seams for
    tests and embedding; `engine` serves from an engine that another front end owns, starts and stops (the HTTP
    app's, for MCP over Streamable HTTP) instead of the server's own.

    `divert_stdout` (for stdio serving) points `sys.stdout` at stderr while the server runs, so that
    text printed into Python's stdout buffer cannot reach the wire, not even when flushed at exit.
    """
    settings = settings or Settings()
    loader = model_loader or default_loader(settings)
    shared_engine = engine
    paths_policy = PathPolicy(settings.allowed_roots, max_bytes=settings.max_file_bytes,
                              allow_hidden=settings.allow_hidden)

    @asynccontextmanager
    async def lifespan(_server: MCPServer) -> AsyncIterator[AppState]:
        own = shared_engine is None  # else the HTTP app's engine, which that app starts and stops
        engine = shared_engine or Engine(
            loader, queue_size=settings.queue_size, warmup=settings.warmup, batch_size=settings.batch_size,
            result_ttl_s=settings.result_ttl_s, max_jobs_kept=settings.max_jobs_kept,
            max_duration_s=settings.max_duration_s, max_new_tokens=settings.max_new_tokens)
        if own:
            engine.start()  # loads in the background: the handshake is not held up
        fetcher = Fetcher(policy=settings.url_policy, allow_hosts=settings.url_allow_hosts,
                          max_bytes=settings.max_download_bytes, timeout_s=settings.download_timeout_s,
                          resolver=resolver, network=network, tmp_dir=download_dir)
        state = AppState(settings=settings, engine=engine, paths=paths_policy, fetcher=fetcher,
                         audio=audio_api or AudioAPI.default(), decode_limiter=anyio.CapacityLimiter(2))
        saved_stdout = sys.stdout
        if divert_stdout:  # the SDK has already moved the wire off fd 1; now the Python object too
            sys.stdout.flush()
            sys.stdout = sys.stderr
        try:
            yield state
        finally:
            if own:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(lambda: engine.stop(timeout=STOP_WAIT_S))
            if divert_stdout:
                sys.stdout = saved_stdout

    # the transcript viewer (MCP Apps; hosts without Apps get the text result) and tasks for long transcriptions
    extensions = [viewer_apps(), TasksExtension()]
    mcp_extensions = [e.identifier for e in extensions]
    roots_text = ", ".join(str(r) for r in paths_policy.roots)
    url_text = {
        "public": "transcribe_url fetches http(s) links from public internet hosts",
        "allowlist": "transcribe_url fetches only from the hosts the user allowed",
        "any": "transcribe_url fetches http(s) links, including local-network hosts",
        "off": "fetching URLs is disabled",
    }[settings.url_policy]
    mcp = MCPServer(
        name="funasr-nano",
        title="Fun-ASR-Nano speech-to-text (local)",
        description="Private speech-to-text on this computer: Fun-ASR-Nano (zh/en/ja and Chinese dialects; the MLT "
        "model: 31 languages) on MLX. Transcribes local audio/video files and links; long results in pages and "
        "as transcript:// resources; optional .txt/.srt/.vtt/.json files.",
        icons=[ICON],
        version=__version__,
        extensions=extensions,
        middleware=[Tasks(render=_task_result, progress=lambda state, job: _job_status(job, state.engine)[1],
                          ttl_ms=int(settings.result_ttl_s * 1000))],
        instructions=(
            "Private, on-device speech-to-text (Fun-ASR-Nano on MLX); audio never leaves this computer. "
            f"transcribe_file reads audio/video files by absolute path inside: {roots_text}. {url_text}. "
            "Long audio: if a result has status 'queued' or 'running', call get_transcript with its job_id "
            "to wait for the transcript. list_languages shows the language codes the loaded model accepts."
        ),
        lifespan=lifespan,
        log_level=settings.log_level,
    )

    async def client_roots(ctx: Context) -> ListRoots | ListRootsResult | None:
        """The client's roots, asked only when it declared them and the policy lets them narrow access.

        Client roots can only narrow the configured ones, so when a handshake-era client fails to
        answer, the configured roots still apply (logged) rather than failing the call.
        """
        if settings.client_roots != "narrow":
            return None
        caps = ctx.client_capabilities
        if caps is None or caps.roots is None:
            return None
        if (ctx.protocol_version or "") >= MODERN_PROTOCOL:
            return ListRoots()  # asked through the per-request input-required round trip
        try:
            with anyio.fail_after(5), warnings.catch_warnings():
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                return await ctx.session.list_roots()
        except Exception as exc:  # noqa: BLE001 - a broken roots answer must not break transcription
            log.warning("the client declared roots but roots/list failed (%s); using the configured roots only",
                        type(exc).__name__)
            return None

    ClientRoots = Annotated[ListRootsResult | None, Resolve(client_roots)]

    def tool(**options: Any) -> Callable[[Callable], Callable]:
        """mcp.tool with the function's docstring as the description, its indentation removed."""
        return lambda fn: mcp.tool(description=inspect.cleandoc(fn.__doc__ or ""), **options)(fn)

    # ---- transcription tools ----------------------------------------------------------------
    @tool(
        title="Transcribe an audio file",
        meta=VIEWER_META,
        # not read-only: with output_dir it saves transcript files (new ones only: never destructive)
        annotations=ToolAnnotations(title="Transcribe an audio file", read_only_hint=False, destructive_hint=False,
                                    idempotent_hint=False, open_world_hint=False),
    )
    async def transcribe_file(
        path: Annotated[str, Field(
            description=f"Absolute path of an audio or video file on this computer (wav, mp3, m4a, flac, ogg, "
            f"opus, webm, mp4, ...), inside one of: {roots_text}", max_length=4096)],
        ctx: Context,
        roots: ClientRoots,
        language: LanguageArg = "auto",
        hotwords: HotwordsArg = None,
        itn: ItnArg = True,
        include_segments: SegmentsArg = False,
        output_dir: OutputDirArg = None,
        speakers: SpeakersArg = None,
    ) -> Annotated[CallToolResult, TranscriptionOutput]:
        """Transcribe speech in a local audio or video file to text, privately on this computer.

        Returns the transcript with its language, duration, timings and model. Audio that takes longer than
        about 45 s to process comes back as a job handle (status 'queued'/'running'): then call
        get_transcript with that job_id.
        """
        start = time.monotonic()
        _valid_text(path=path, language=language, hotwords=hotwords, output_dir=output_dir)
        state = _state(ctx)
        _check_engine(state)
        hotwords = _clean_hotwords(hotwords)
        _check_options(state, language, hotwords, speakers)
        # the client's answer narrows, even when it lists no file:// folder at all: then nothing may be read
        narrowed = roots_from_uris(str(r.uri) for r in roots.roots) if roots is not None else None
        try:
            checked = await anyio.to_thread.run_sync(lambda: state.paths.check(path, narrowed))
        except PathRefused as exc:
            raise ToolError(str(exc)) from None
        try:
            outputs = await _outputs(state, output_dir, checked.path, safe_stem(checked.path.name), narrowed)
        except BaseException:
            checked.file.close()
            raise
        with _closed_on_failure(outputs):
            decode_start = time.monotonic()
            audio = await _decode_async(state, checked.file, path)
            job = Job(source=path, audio=model_input(audio), duration_s=float(audio.duration_s), language=language,
                      hotwords=hotwords, itn=itn, speakers=speakers, audio_decode_s=time.monotonic() - decode_start,
                      warnings=list(getattr(audio, "warnings", None) or []))
            await _submit(state, job, outputs)
        return await _follow(ctx, state, job, deadline=start + settings.call_budget_s,
                             include_segments=include_segments)

    if settings.url_policy != "off":

        @tool(
            title="Transcribe audio from a URL",
            meta=VIEWER_META,
            annotations=ToolAnnotations(title="Transcribe audio from a URL", read_only_hint=False,
                                        destructive_hint=False, idempotent_hint=False, open_world_hint=True),
        )
        async def transcribe_url(
            url: Annotated[str, Field(
                description="Direct http:// or https:// link to an audio or video file (not a web page). "
                f"Downloads are capped at {settings.max_download_mb:.0f} MiB and "
                f"{settings.download_timeout_s:.0f} s.", max_length=8192)],
            ctx: Context,
            language: LanguageArg = "auto",
            hotwords: HotwordsArg = None,
            itn: ItnArg = True,
            include_segments: SegmentsArg = False,
            output_dir: OutputDirArg = None,
            speakers: SpeakersArg = None,
        ) -> Annotated[CallToolResult, TranscriptionOutput]:
            """Download an audio or video file from a public http(s) link and transcribe its speech on this computer.

            Returns the transcript with its language, duration, timings and model. Long audio comes back as a job
            handle (status 'queued'/'running'): then call get_transcript with that job_id.
            """
            start = time.monotonic()
            _valid_text(url=url, language=language, hotwords=hotwords, output_dir=output_dir)
            state = _state(ctx)
            _check_engine(state)
            hotwords = _clean_hotwords(hotwords)
            _check_options(state, language, hotwords, speakers)
            source = _public_url(url)
            outputs = await _outputs(state, output_dir, None, safe_stem(urlsplit(source).path), None)
            reporter = _Reporter(ctx)

            async def on_bytes(done: int, total: int | None) -> None:
                of = f" of {total / 2**20:.1f}" if total else ""
                await reporter.send(0.0, None, f"downloading: {done / 2**20:.1f}{of} MiB")

            with _closed_on_failure(outputs):
                try:
                    async with state.fetcher.download(url, progress=on_bytes) as dl:
                        log.info("downloaded %d bytes from %s in %.2f s", dl.size_bytes, urlsplit(source).hostname,
                                 dl.seconds)
                        # opened before the download's folder is deleted: the job reads this descriptor, and
                        # messages name the URL, never the private temporary path
                        file = AudioFile(os.open(dl.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)),
                                         f"the download from {source}", path=dl.path.name)
                except FetchError as exc:
                    raise ToolError(f"Cannot fetch {source}: {exc}") from None
                decode_start = time.monotonic()
                audio = await _decode_async(state, file, source)
                decode_s = time.monotonic() - decode_start
                job = Job(source=source, audio=model_input(audio), duration_s=float(audio.duration_s),
                          language=language, hotwords=hotwords, itn=itn, speakers=speakers, download_s=dl.seconds,
                          audio_decode_s=decode_s, warnings=list(getattr(audio, "warnings", None) or []))
                await _submit(state, job, outputs)
            return await _follow(ctx, state, job, deadline=start + settings.call_budget_s,
                                 include_segments=include_segments)

    @tool(
        title="Get a transcript by job id",
        meta=VIEWER_META,
        annotations=ToolAnnotations(title="Get a transcript by job id", read_only_hint=True, destructive_hint=False,
                                    idempotent_hint=True, open_world_hint=False),
    )
    async def get_transcript(
        job_id: Annotated[str, Field(description="the job_id returned by transcribe_file or transcribe_url",
                                     min_length=1, max_length=64)],
        ctx: Context,
        wait: Annotated[bool, Field(description="wait (with progress, up to about 45 s) for an unfinished job; "
                                    "false returns its status at once")] = True,
        include_segments: SegmentsArg = False,
        offset: Annotated[int | None, Field(
            description="read a long transcript in pages: the first segment to return (a result's "
            "page.next_offset); the page holds up to `limit` segments and about --max-inline-tokens tokens",
            ge=0)] = None,
        limit: Annotated[int | None, Field(description="at most this many segments in the page", ge=1,
                                           le=100_000)] = None,
    ) -> Annotated[CallToolResult, TranscriptionOutput]:
        """Fetch the transcript of a transcription that was still running, waiting for it if needed.

        Returns the same result as transcribe_file; if the job is still not finished, the status and progress
        with the same job_id (call again). Finished results are kept for a limited time.
        """
        _valid_text(job_id=job_id)
        state = _state(ctx)
        job = state.engine.get(job_id.strip())
        if job is None:
            raise ToolError(
                f"No transcription job {job_id!r}. Job ids come from transcribe_file/transcribe_url results; finished "
                f"results are kept for {settings.result_ttl_s / 60:.0f} min and are lost when the server restarts. "
                "Transcribe the audio again."
            )
        deadline = time.monotonic() + (settings.call_budget_s if wait else 0.0)
        reporter = _Reporter(ctx)
        while wait and not job.done.is_set() and time.monotonic() < deadline:
            done, message = _job_status(job, state.engine)
            await reporter.send(done, job.duration_s or None, message)
            await anyio.sleep(POLL_S)
        return _result(_output(job, state.engine, include_segments=include_segments,
                               budget=state.settings.max_inline_tokens, offset=offset, limit=limit))

    @mcp.resource("transcript://{job_id}/{fmt}", name="transcript", title="Whole transcript of a job",
                  description="The whole transcript of a finished transcription: fmt is txt, srt, vtt or json. Kept "
                  f"for {settings.result_ttl_s / 60:.0f} min after the job ends, and lost when the server restarts.",
                  mime_type="text/plain")
    async def transcript_resource(job_id: str, fmt: str, ctx: Context) -> str:
        if fmt not in RENDITIONS:
            raise ResourceNotFoundError(f"no rendition {fmt!r}: use txt, srt, vtt or json "
                                        f"(transcript://{job_id}/txt)")
        job = _state(ctx).engine.get(job_id)
        if job is None:
            raise ResourceNotFoundError(f"no transcription job {job_id!r}: finished results are kept for "
                                        f"{settings.result_ttl_s / 60:.0f} min and are lost when the server restarts")
        if not job.is_finished:
            raise ResourceError(f"job {job_id} is still {job.state}; call get_transcript to wait for it")
        if job.result is None:
            raise ResourceError(f"job {job_id} ended {job.state} without a transcript: {job.error}")
        return render(job.result, fmt)

    @tool(
        title="Cancel a transcription",
        annotations=ToolAnnotations(title="Cancel a transcription", read_only_hint=False, destructive_hint=True,
                                    idempotent_hint=True, open_world_hint=False),
    )
    async def cancel_transcription(
        job_id: Annotated[str, Field(description="the job_id of a queued or running transcription",
                                     min_length=1, max_length=64)],
        ctx: Context,
    ) -> Annotated[CallToolResult, CancelOutput]:
        """Stop a queued or running transcription and discard its partial work."""
        _valid_text(job_id=job_id)
        state = _state(ctx)
        job = state.engine.cancel(job_id.strip())
        if job is None:
            raise ToolError(f"No transcription job {job_id!r} (it may have finished and expired, or never existed).")
        with anyio.move_on_after(2.0):
            while not job.done.is_set():
                await anyio.sleep(POLL_S)
        if job.state == "cancelled":
            message = f"Job {job.id} is cancelled."
        elif job.state in ("completed", "failed"):
            message = f"Job {job.id} had already {job.state}; nothing to cancel."
        else:
            message = f"Job {job.id} is stopping; it will be cancelled within moments."
        out = CancelOutput(job_id=job.id, status=job.state, message=message)
        return _tool_result(message, out)

    # ---- information tools -------------------------------------------------------------------
    @tool(
        title="List supported languages",
        annotations=ToolAnnotations(title="List supported languages", read_only_hint=True, destructive_hint=False,
                                    idempotent_hint=True, open_world_hint=False),
    )
    async def list_languages(ctx: Context) -> Annotated[CallToolResult, LanguagesOutput]:
        """List the languages the loaded model accepts: ISO code, English name and the model's own prompt name.

        Any of these spellings, or 'auto', can be passed as language= to the transcription tools.
        """
        state = _state(ctx)
        engine = state.engine
        reporter = _Reporter(ctx)
        deadline = time.monotonic() + settings.call_budget_s
        while engine.info is None and engine.state != "failed" and time.monotonic() < deadline:
            await reporter.send(0.0, None, f"waiting for the model to load ({engine.load_elapsed_s:.0f} s so far)")
            await anyio.sleep(POLL_S)
        _check_engine(state)
        if engine.info is None:
            raise ToolError(f"The model is still loading ({engine.load_elapsed_s:.0f} s so far); call again shortly.")
        info = engine.info
        langs = list(info.languages)
        out = LanguagesOutput(
            model=_model_info(engine), languages=langs,
            auto="language='auto' (the default) lets the model choose; the result then says which language was "
            "detected from the transcript and how.",
        )
        text = (f"{info.name} ({info.variant}) accepts {len(langs)} languages - code: name [prompt name]; "
                "pass language='auto' to detect:\n"
                + "\n".join(f"{lg.code}: {lg.name} [{lg.prompt_name}]" + (f" - {lg.note}" if lg.note else "")
                            for lg in langs))
        return _tool_result(text, out)

    @tool(
        title="Server status",
        annotations=ToolAnnotations(title="Server status", read_only_hint=True, destructive_hint=False,
                                    idempotent_hint=True, open_world_hint=False),
    )
    async def server_status(ctx: Context) -> Annotated[CallToolResult, StatusOutput]:
        """Show whether the model is loaded, the transcription queue and recent jobs, and the server's limits
        (allowed folders, URL policy, size and duration caps)."""
        state = _state(ctx)
        engine = state.engine
        now = time.monotonic()
        queued, running = engine.counts()
        jobs = [JobSummary(job_id=j.id, status=j.state, source=j.source, duration_s=round(j.duration_s, 2),
                           done_s=round(j.done_s, 2), age_s=round(now - j.submitted, 1), error=j.error)
                for j in engine.jobs()]
        out = StatusOutput(
            server_version=__version__, model_state=engine.state, model=_model_info(engine),
            model_error=engine.error, compute=engine.info.compute if engine.info else None,
            runtime=engine.info.runtime if engine.info else None,
            load_elapsed_s=round(engine.load_elapsed_s, 2), queued=queued,
            running=running, jobs=jobs, allowed_roots=[str(r) for r in state.paths.roots],
            url_policy=settings.url_policy,
            limits=Limits(max_file_mb=settings.max_file_mb, max_duration_s=settings.max_duration_s,
                          max_download_mb=settings.max_download_mb, download_timeout_s=settings.download_timeout_s,
                          call_budget_s=settings.call_budget_s, queue_size=settings.queue_size,
                          result_ttl_s=settings.result_ttl_s, batch_size=settings.batch_size),
            protocol=Protocol(revisions=PROTOCOL_REVISIONS, negotiated=ctx.protocol_version,
                              extensions=sorted(mcp_extensions), transports=TRANSPORTS),
        )
        m = out.model
        model = f"{m.name} ({m.variant}, {m.dtype})" if m else "no model yet"
        text = (f"Model {engine.state}: {model}" + (f" - {engine.error}" if engine.error else "")
                + f"; {running} running, {queued} queued, {len(jobs)} job(s) known. "
                f"Allowed folders: {', '.join(out.allowed_roots)}. URL policy: {settings.url_policy}.")
        return _tool_result(text, out)

    return mcp
