"""`funasr-nano serve`: the resident model over HTTP, with OpenAI's transcription API.

Endpoints: POST /v1/audio/transcriptions (OpenAI-compatible; multipart upload), GET /v1/models, GET /health,
GET /metrics (Prometheus text), and the MCP server over Streamable HTTP at /mcp. Everything runs on the same
`server.worker.Engine` as the stdio MCP server - one model thread, one bounded queue - and the same intake
(`server.intake`: the duration cap, in-memory or streamed decoding, silence check) with the same typed errors,
answered here as OpenAI-shaped error JSON with the matching status code.

Safety: 127.0.0.1 by default; another address needs an API key (compared in constant time) unless --no-auth says
otherwise; the upload's size is enforced while it is received; the upload is decoded from the one descriptor of an
unnamed temporary file; CORS is off unless origins are configured.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asr.audio.io import AudioFile
from asr.errors import ASRError, AudioDecodeError, AudioNotFoundError, AudioTooLargeError, InvalidOptionError
from asr.languages import resolve as resolve_language
from asr.model.prompt import clean_hotwords
from asr.options import parse_speakers
from asr.types import TranscriptionResult
from asr.writers import joined_text, to_srt, to_vtt

from . import __version__
from .config import HttpSettings, Settings
from .intake import AudioAPI, decode, default_loader, model_input
from .worker import Engine, EngineUnavailable, Job, Model

log = logging.getLogger(__name__)

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MAX_HOTWORDS = 100
MAX_FIELD_BYTES = 64 * 1024  # any form field but the file
STREAM_POLL_S = 0.05
PUBLIC_PATHS = ("/health",)  # answered without the API key (load balancers probe it)


# ---- errors -------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered as OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
             429: "rate_limit_error", 499: "request_cancelled", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        if self.status == 429:
            headers = {"Retry-After": "1"}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _asr_error(exc: ASRError, source: str) -> ApiError:
    """The library's typed errors as HTTP statuses."""
    message = str(exc)
    text = message if source in message else f"{source}: {message}"
    if isinstance(exc, AudioTooLargeError):
        return ApiError(413, text, code="audio_too_large", param="file")
    if isinstance(exc, AudioDecodeError | AudioNotFoundError):
        return ApiError(415, text, code="unsupported_audio", param="file")
    if isinstance(exc, InvalidOptionError):
        return ApiError(422, message, code="invalid_option")
    return ApiError(400, text, code="invalid_audio", param="file")


class _BodyTooLarge(Exception):
    pass


# ---- metrics ------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one app (its own registry: nothing global)."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("funasr_transcription_requests", "Transcription requests by outcome",
                                ["outcome"], registry=r)
        self.latency = Histogram("funasr_transcription_seconds", "Wall time of a transcription request",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180, 600), registry=r)
        self.rtf = Histogram("funasr_real_time_factor", "Processing time / audio duration of a transcription",
                             buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2), registry=r)
        self.audio = Counter("funasr_audio_seconds", "Seconds of audio transcribed", registry=r)
        queue = Gauge("funasr_queue_length", "Transcriptions waiting for the model", registry=r)
        queue.set_function(lambda: engine.counts()[0])
        running = Gauge("funasr_running", "Transcriptions on the model thread now", registry=r)
        running.set_function(lambda: engine.counts()[1])
        ready = Gauge("funasr_model_ready", "1 when the model is loaded and ready", registry=r)
        ready.set_function(lambda: 1.0 if engine.state == "ready" else 0.0)


# ---- the app ------------------------------------------------------------------------------------
@dataclass
class HttpState:
    settings: Settings
    http: HttpSettings
    engine: Engine
    audio: AudioAPI
    metrics: Metrics
    decode_limiter: anyio.CapacityLimiter


def create_app(
    settings: Settings | None = None,
    http: HttpSettings | None = None,
    *,
    model_loader: Callable[[], Model] | None = None,
    audio_api: AudioAPI | None = None,
) -> Starlette:
    """The ASGI app. `model_loader` replaces `asr.load_model` (tests, embedding); it runs on the engine's thread."""
    settings = settings or Settings()
    http = http or HttpSettings()
    http.check()
    engine = Engine(model_loader or default_loader(settings), queue_size=settings.queue_size,
                    warmup=settings.warmup, batch_size=settings.batch_size, result_ttl_s=settings.result_ttl_s,
                    max_jobs_kept=settings.max_jobs_kept, max_duration_s=settings.max_duration_s,
                    max_new_tokens=settings.max_new_tokens)
    state = HttpState(settings=settings, http=http, engine=engine, audio=audio_api or AudioAPI.default(),
                      metrics=Metrics(engine), decode_limiter=anyio.CapacityLimiter(2))

    mcp_routes: list = []
    mcp_server = None
    if http.mcp:
        from .app import create_server

        mcp_server = create_server(settings, engine=engine, audio_api=audio_api)
        mcp_app = mcp_server.streamable_http_app(streamable_http_path="/mcp", host=http.host,
                                                 max_request_body_size=1024 * 1024)
        mcp_routes = list(mcp_app.routes)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        engine.start()  # loads in the background: /health says "loading" meanwhile
        try:
            if mcp_server is not None:
                async with mcp_server.session_manager.run():
                    yield
            else:
                yield
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: engine.stop(timeout=1.0))

    async def models(request: Request) -> Response:
        return await _models(state)

    async def model(request: Request) -> Response:
        return await _model(state, request.path_params["model_id"])

    async def health(request: Request) -> Response:
        return await _health(state)

    async def metrics(request: Request) -> Response:
        return await _metrics(state)

    routes = [
        Route("/v1/audio/transcriptions", _Transcriptions(state), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *mcp_routes,
    ]
    middleware = []
    if http.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(http.cors_origins),
                                     allow_methods=["GET", "POST", "DELETE"],
                                     allow_headers=["Authorization", "Content-Type", "Mcp-Session-Id",
                                                    "Mcp-Protocol-Version"],
                                     expose_headers=["Mcp-Session-Id"]))
    if http.api_key is not None:
        middleware.append(Middleware(_BearerAuth, key=http.api_key))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.engine = engine  # for embedding and tests (the app owns it)
    return app


async def _not_found(request: Request, exc: Exception) -> Response:
    return ApiError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found").response()


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed").response()


class _BearerAuth:
    """Every path but /health needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app: ASGIApp, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            what = "a wrong API key" if header else "no API key"
            await ApiError(401, f"this server needs an API key and the request had {what}: send "
                           "'Authorization: Bearer <key>' (the key the server was started with)",
                           code="invalid_api_key").response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ---- small endpoints ----------------------------------------------------------------------------
def _model_id(state: HttpState) -> str:
    info = state.engine.info
    return info.name if info is not None else (state.settings.model or "FunAudioLLM/Fun-ASR-Nano-2512")


def _model_card(state: HttpState) -> dict:
    return {"id": _model_id(state), "object": "model", "created": 0, "owned_by": "funasr-nano-mlx"}


async def _models(state: HttpState) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def _model(state: HttpState, model_id: str) -> Response:
    if model_id != _model_id(state):
        return ApiError(404, f"model {model_id!r} is not served here; GET /v1/models lists the one that is",
                        code="model_not_found").response()
    return JSONResponse(_model_card(state))


async def _health(state: HttpState) -> Response:
    engine = state.engine
    status = {"ready": "ready", "failed": "failed", "stopped": "stopped"}.get(engine.state, "loading")
    queued, running = engine.counts()
    body: dict[str, Any] = {"status": status, "model": _model_id(state), "version": __version__,
                            "queued": queued, "running": running, "load_elapsed_s": round(engine.load_elapsed_s, 2)}
    if engine.info is not None:
        body["compute"] = engine.info.compute
    if engine.error:
        body["error"] = engine.error
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


async def _metrics(state: HttpState) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ---- POST /v1/audio/transcriptions --------------------------------------------------------------
@dataclass
class _Request:
    file: UploadFile
    source: str
    language: str | None
    hotwords: list[str] | None
    response_format: str
    stream: bool
    speakers: int | str | None = None


class _Transcriptions:
    """The endpoint as a plain ASGI app, so that the body's size is counted while it is received."""

    def __init__(self, state: HttpState):
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        limit = state.http.max_upload_bytes + MAX_FIELD_BYTES * 8  # the file plus the small fields and framing
        length = dict(scope.get("headers") or ()).get(b"content-length")
        started = time.monotonic()
        if length is not None and length.isdigit() and int(length) > limit:
            response = self._too_large()
        else:
            received = 0

            async def limited() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise _BodyTooLarge
                return message

            request = Request(scope, limited)
            try:
                response = await self._handle(request, started)
            except _BodyTooLarge:
                response = self._too_large()
            except ApiError as exc:
                response = exc.response()
            except ClientDisconnect:
                state.metrics.requests.labels("disconnected").inc()
                return
        if response.status_code >= 400:
            state.metrics.requests.labels(_outcome(response.status_code)).inc()
        await response(scope, receive, send)

    def _too_large(self) -> Response:
        mb = self.state.http.max_upload_mb
        return ApiError(413, f"the upload is over this server's {mb:g} MiB limit (--max-upload-mb); send a shorter "
                        "or more compressed recording", code="upload_too_large", param="file").response()

    async def _handle(self, request: Request, started: float) -> Response:
        state = self.state
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise ApiError(415, f"send the audio as multipart/form-data with a 'file' field (got content-type "
                           f"{ctype or 'none'!r})", code="unsupported_media_type")
        if state.engine.state == "failed":
            raise ApiError(503, state.engine.failure_message(), code="model_unavailable")
        try:
            form = await request.form(max_files=1, max_fields=32, max_part_size=MAX_FIELD_BYTES)
        except (MultiPartException, HTTPException) as exc:
            detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
            raise ApiError(400, f"malformed multipart body: {detail}", code="malformed_multipart") from None
        try:
            req = self._options(form)
            file = await self._open(req.file, req.source)
        finally:
            await form.close()
        received = time.monotonic()
        audio = await self._decode(file, req.source)
        job = Job(source=req.source, audio=model_input(audio), duration_s=float(audio.duration_s),
                  language=req.language, hotwords=req.hotwords, itn=True, speakers=req.speakers,
                  download_s=received - started,
                  audio_decode_s=time.monotonic() - received, warnings=list(getattr(audio, "warnings", None) or []))
        try:
            state.engine.submit(job)
        except EngineUnavailable as exc:
            if isinstance(job.audio, AudioFile):
                job.audio.close()
            status = 429 if exc.reason == "busy" else 503
            raise ApiError(status, str(exc), code="queue_full" if status == 429 else "model_unavailable") from None
        if req.stream:
            return StreamingResponse(self._events(request, job, started), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await self._wait(request, job)
        result = self._result(job)
        self._record(job, result, started)
        return _render(req.response_format, result, job, state)

    def _options(self, form) -> _Request:
        def field(name: str, default: str | None = None) -> str | None:
            value = form.get(name)
            if value is None:
                return default
            if not isinstance(value, str):
                raise ApiError(422, f"'{name}' must be a text field, not a file", param=name, code="invalid_field")
            return value.strip()

        upload = form.get("file")
        if upload is None:
            raise ApiError(400, "no 'file' field: send the audio as multipart/form-data field 'file'", param="file",
                           code="missing_file")
        if isinstance(upload, str):
            raise ApiError(422, "'file' must be a file part (with a filename), not a text field", param="file",
                           code="invalid_field")
        fmt = (field("response_format") or "json").lower()
        if fmt not in RESPONSE_FORMATS:
            raise ApiError(422, f"response_format {fmt!r} is not one of {', '.join(RESPONSE_FORMATS)}",
                           param="response_format", code="invalid_option")
        granularities = [g.strip() for g in form.getlist("timestamp_granularities[]") + form.getlist(
            "timestamp_granularities") if isinstance(g, str) and g.strip()]
        if any(g not in ("segment", "word") for g in granularities) or "word" in granularities:
            raise ApiError(422, f"timestamp_granularities {granularities} not supported: only 'segment' (times come "
                           "with each segment of verbose_json, srt and vtt)", param="timestamp_granularities[]",
                           code="invalid_option")
        stream = (field("stream") or "false").lower()
        if stream not in ("true", "false", "1", "0"):
            raise ApiError(422, f"stream must be true or false, not {stream!r}", param="stream", code="invalid_option")
        try:
            speakers = parse_speakers(field("speakers") or None)
        except InvalidOptionError as exc:
            raise ApiError(422, str(exc), param="speakers", code="invalid_option") from None
        if speakers is not None and self.state.engine.info is not None and self.state.engine.info.speaker_model is None:
            raise ApiError(422, "this server has no speaker model (start it with --speaker-model), so speakers= is "
                           "unavailable", param="speakers", code="no_speaker_model")
        language = field("language") or None
        if language is not None and language.lower() == "auto":
            language = None
        hotwords = self._hotwords(field("prompt") or "")
        info = self.state.engine.info
        try:
            if info is not None:
                resolve_language(language, info.variant)
                clean_hotwords(hotwords, info.special_tokens)
            else:
                clean_hotwords(hotwords)
        except ASRError as exc:
            raise ApiError(422, str(exc), code="invalid_option",
                           param="language" if "language" in str(exc).lower() else "prompt") from None
        name = os.path.basename(upload.filename or "") or "upload"
        return _Request(file=upload, source=f"upload {name!r}", language=language, hotwords=hotwords,
                        response_format=fmt, stream=stream in ("true", "1"), speakers=speakers)

    @staticmethod
    def _hotwords(prompt: str) -> list[str] | None:
        """OpenAI's `prompt` (text to guide the model) as hotwords: its comma-, semicolon- or line-separated terms."""
        words = [w.strip() for part in prompt.replace(";", ",").splitlines() for w in part.split(",")]
        words = list(dict.fromkeys(w for w in words if w))
        if len(words) > MAX_HOTWORDS:
            raise ApiError(422, f"the prompt holds {len(words)} terms; pass at most {MAX_HOTWORDS} (comma-separated "
                           "names and jargon to favour)", param="prompt", code="invalid_option")
        if any(len(w) > 100 for w in words):
            raise ApiError(422, "a prompt term is over 100 characters; the prompt is read as comma-separated "
                           "hotwords (names, jargon), not as free text", param="prompt", code="invalid_option")
        return words or None

    async def _open(self, upload: UploadFile, source: str) -> AudioFile:
        """The upload as an AudioFile: a second descriptor of the parser's unnamed temporary file (no path to it
        exists, so nothing can be swapped in between checks and reads)."""
        if upload.size is not None and upload.size > self.state.http.max_upload_bytes:
            raise _BodyTooLarge
        if not upload.size:
            raise ApiError(400, f"{source} is empty: send the audio's bytes in the 'file' field", param="file",
                           code="empty_file")

        def dup() -> AudioFile:
            upload.file.flush()
            fd = os.dup(upload.file.fileno())  # a SpooledTemporaryFile rolls over to an unnamed file here
            return AudioFile(fd, source)

        return await anyio.to_thread.run_sync(dup)

    async def _decode(self, file: AudioFile, source: str) -> Any:
        state = self.state
        try:
            return await anyio.to_thread.run_sync(
                lambda: decode(state.settings, state.audio, file, max_bytes=state.http.max_upload_bytes),
                abandon_on_cancel=True, limiter=state.decode_limiter)
        except ASRError as exc:
            file.close()
            raise _asr_error(exc, source) from None
        except BaseException:
            file.close()
            raise

    async def _wait(self, request: Request, job: Job) -> None:
        """Until the job ends; a client that goes away cancels it."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        job.listeners.append(lambda: loop.call_soon_threadsafe(done.set))
        if job.done.is_set():
            return
        try:
            while not done.is_set():
                with anyio.move_on_after(1.0):
                    await done.wait()
                if not done.is_set() and await request.is_disconnected():
                    self.state.engine.cancel(job.id)
                    raise ClientDisconnect
        except BaseException:
            if not job.is_finished:
                self.state.engine.cancel(job.id)
            raise

    def _result(self, job: Job) -> TranscriptionResult:
        if job.state == "completed" and job.result is not None:
            return job.result
        if job.state == "cancelled":
            raise ApiError(503, f"the transcription of {job.source} was cancelled ({job.error})", code="cancelled")
        error = job.error or "unknown error"
        status = 413 if "limit" in error and "duration" in error else 500
        raise ApiError(status, f"transcribing {job.source} failed: {error}", code="transcription_failed")

    def _record(self, job: Job, result: TranscriptionResult, started: float) -> None:
        m = self.state.metrics
        m.requests.labels("ok").inc()
        m.latency.observe(time.monotonic() - started)
        duration = job.duration_s or result.timings.audio_duration_s
        if duration:
            m.audio.inc(duration)
            m.rtf.observe(result.timings.total_s / duration)

    async def _events(self, request: Request, job: Job, started: float) -> AsyncIterator[str]:
        """Server-sent events: `transcript.text.delta` per segment as it is decoded (with its times), then
        `transcript.text.done` with the whole text - or one `error` event."""
        sent = 0
        try:
            while True:
                finished = job.done.is_set()
                segments = job.segments
                while sent < len(segments):
                    seg = segments[sent]
                    text = seg.text.strip()
                    delta = text if sent == 0 or not text else " " + text
                    sent += 1
                    yield _sse({"type": "transcript.text.delta", "delta": delta,
                                "segment": {"id": sent - 1, "start": seg.start, "end": seg.end, "text": seg.text}})
                if finished:
                    break
                if await request.is_disconnected():
                    self.state.engine.cancel(job.id)
                    return
                await anyio.sleep(STREAM_POLL_S)
            try:
                result = self._result(job)
            except ApiError as exc:
                self.state.metrics.requests.labels(_outcome(exc.status)).inc()
                yield _sse({"type": "error", **exc.body()})
                return
            self._record(job, result, started)
            yield _sse({"type": "transcript.text.done", "text": result.text, "usage": _usage(job, result),
                        "language": result.language, "duration": round(job.duration_s, 3),
                        "warnings": _warnings(job, result)})
        finally:
            if not job.is_finished:
                self.state.engine.cancel(job.id)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _outcome(status: int) -> str:
    return {401: "unauthorized", 413: "too_large", 429: "busy", 503: "unavailable"}.get(
        status, "server_error" if status >= 500 else "client_error")


def _usage(job: Job, result: TranscriptionResult) -> dict:
    return {"type": "duration", "seconds": math.ceil(job.duration_s or result.timings.audio_duration_s)}


def _warnings(job: Job, result: TranscriptionResult) -> list[str]:
    return [*job.warnings, *(w for w in result.warnings if w not in job.warnings)]


def _render(fmt: str, result: TranscriptionResult, job: Job, state: HttpState) -> Response:
    if fmt == "text":
        return PlainTextResponse(joined_text(result.segments, result.text).strip() + "\n")
    if fmt == "srt":
        return PlainTextResponse(to_srt(result), media_type="application/x-subrip")
    if fmt == "vtt":
        return PlainTextResponse(to_vtt(result), media_type="text/vtt")
    warnings = _warnings(job, result)
    if fmt == "json":
        body: dict[str, Any] = {"text": joined_text(result.segments, result.text), "usage": _usage(job, result)}
        if warnings:
            body["warnings"] = warnings
        return JSONResponse(body)
    names = {lang.code: lang.name for lang in state.engine.info.languages} if state.engine.info else {}
    body = {
        "task": "transcribe",
        "language": names.get(result.language or "", result.language or "unknown").lower(),
        "duration": round(job.duration_s or result.timings.audio_duration_s, 3),
        "text": joined_text(result.segments, result.text),
        "segments": [{"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text, "tokens": s.token_ids,
                      "temperature": 0.0, **({"speaker": s.speaker} if s.speaker else {})}
                     for i, s in enumerate(result.segments)],
        "usage": _usage(job, result),
        # beyond OpenAI's fields: what the client may want to know
        "language_code": result.language,
        "language_source": result.language_source,
        "finish_reason": result.finish_reason,
        "warnings": warnings,
        "timings": {"upload_s": round(job.download_s or 0.0, 4), "audio_decode_s": round(job.audio_decode_s, 4),
                    "queue_wait_s": round(job.queue_wait_s, 4), "processing_s": round(result.timings.total_s, 4),
                    "real_time_factor": round(result.timings.real_time_factor, 4)},
        "runtime": result.runtime.model_dump() if result.runtime is not None else None,
    }
    return JSONResponse(body)


# ---- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None, *, model_loader: Callable[[], Model] | None = None) -> None:
    """`funasr-nano serve [options]`: serve until SIGINT/SIGTERM. Ends through os._exit (see server.__main__._end:
    the model thread may still be inside MLX)."""
    import uvicorn

    from .__main__ import _end, _setup_logging
    from .config import ConfigError, load_http_settings

    try:
        settings, http = load_http_settings(sys.argv[2:] if argv is None else argv)
    except ConfigError as exc:
        print(f"funasr-nano serve: {exc}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
    _setup_logging(settings.log_level)
    app = create_app(settings, http, model_loader=model_loader)
    where = f"http://{'[' + http.host + ']' if ':' in http.host else http.host}:{http.port}"
    log.info("serving on %s (auth: %s; MCP at %s/mcp: %s); the model loads in the background (GET /health)", where,
             "API key" if http.api_key else "none", where, "on" if http.mcp else "off")
    if not http.loopback and http.api_key is None:
        log.warning("--no-auth on %s: anyone who can reach this port can use the model", http.host)
    code = 0
    try:
        uvicorn.run(app, host=http.host, port=http.port, log_level=settings.log_level.lower(), lifespan="on",
                    timeout_graceful_shutdown=2, access_log=False)
    except BaseException as exc:  # noqa: BLE001
        log.error("the server stopped: %s", exc)
        code = 1
    _end(code)

