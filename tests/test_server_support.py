"""Shared helpers for the server tests (no tests here): a fake model, WAV writers, local HTTP servers.

The fake model stands in for `asr.load_model(...)` so the MCP layer can be tested fast; it records
which thread loaded and ran it, honours `cancel` and reports progress like the real one.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import soundfile as sf

import asr  # noqa: F401  (before anything that could import mlx)
from asr.audio.io import AudioFile, iter_audio_blocks, probe
from asr.errors import ModelLoadError, TranscriptionCancelled
from asr.languages import detect_from_text, languages, resolve
from asr.types import RuntimeInfo, Segment, Timings, TranscriptionResult

REPO = Path(__file__).resolve().parents[1]
TESTDATA = Path(__file__).resolve().parent / "data"
JFK = TESTDATA / "audio" / "en" / "jfk.wav"


class FakeModel:
    """Behaves like the loaded model: `transcribe` walks the audio in steps, reporting progress."""

    def __init__(self, variant: str = "nano", seconds_per_audio_s: float = 0.0, step_s: float = 1.0,
                 fail: Exception | None = None):
        self.variant = variant
        self.name = "Fun-ASR-Nano-2512" if variant == "nano" else "Fun-ASR-MLT-Nano-2512"
        self.dtype = "bfloat16"
        self.quantization = None
        self.runtime = SimpleNamespace(info=RuntimeInfo(backend="mlx", device="cpu", audio="fake", llm="fake"))
        self.special_tokens = frozenset({"<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>"})
        self.seconds_per_audio_s = seconds_per_audio_s
        self.step_s = step_s
        self.fail = fail
        self.threads: set[str] = set()
        self.calls: list[dict] = []
        self.batch_sizes: list[int] = []
        self.many_calls: list[int] = []  # how many audios each transcribe_many call got
        self.cancelled = threading.Event()
        self.read_sha256: list[str] = []  # of each file handed to transcribe as an opened AudioFile
        self.inputs: list[tuple] = []  # (audio, max_duration_s) of each call
        self.started = threading.Event()
        self.warmed = False

    @property
    def languages(self):
        return languages(self.variant)

    def warmup(self, batch_size: int = 16) -> None:
        self.threads.add(threading.current_thread().name)
        self.warmed = True
        self.warm_batch_size = batch_size

    def transcribe(self, audio, *, language=None, hotwords=None, itn=True, max_new_tokens=512, batch_size=16,
                   progress=None, cancel=None, max_duration_s=None, on_segment=None,
                   speakers=None) -> TranscriptionResult:
        self.threads.add(threading.current_thread().name)
        self.calls.append({"language": language, "hotwords": hotwords, "itn": itn})
        self.inputs.append((audio, max_duration_s))
        self.batch_sizes.append(batch_size)
        self.started.set()
        t0 = time.perf_counter()
        if isinstance(audio, AudioFile):  # a streamed file: what the model reads from it is what it was handed
            digest = hashlib.sha256()
            with audio.reader() as r:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    digest.update(chunk)
            self.read_sha256.append(digest.hexdigest())
            duration = probe(audio).duration_s
            if duration is None:  # read it through, in blocks, as the real model's VAD pass does
                duration = sum(len(b) for b in iter_audio_blocks(audio, max_duration_s=max_duration_s)) / 16000
        else:
            duration = float(audio.duration_s)
        lang = resolve(language, self.variant)
        done = 0.0
        while done < duration:
            if cancel is not None and cancel.is_set():
                self.cancelled.set()
                raise TranscriptionCancelled("cancelled")
            step = min(self.step_s, duration - done)
            time.sleep(step * self.seconds_per_audio_s)
            done += step
            if progress is not None:
                progress(done, duration, "decoding")
        if self.fail is not None:
            raise self.fail
        text = f"fake transcript of {duration:.2f} seconds"
        if hotwords:
            text += " with " + " ".join(hotwords)
        total = time.perf_counter() - t0
        detected = detect_from_text(text, self.variant)
        if on_segment is not None:
            on_segment(Segment(start=0.0, end=duration, text=text, token_ids=[1, 2, 3]))
        return TranscriptionResult(
            text=text,
            language=lang.code if lang else detected,
            language_source="requested" if lang else ("detected" if detected else "unknown"),
            language_method=None if lang else "script-heuristic",
            segments=[Segment(start=0.0, end=duration, text=text, token_ids=[1, 2, 3])],
            token_ids=[1, 2, 3],
            finish_reason="stop",
            timings=Timings(audio_decode_s=0.0, features_s=0.001, encoder_s=0.002, adaptor_s=0.0005,
                            prefill_s=0.003, decode_s=0.004, total_s=total, audio_duration_s=duration,
                            prompt_tokens=40, generated_tokens=3, prefill_tokens_per_s=1000.0,
                            decode_tokens_per_s=750.0, real_time_factor=total / duration if duration else 0.0),
            warnings=[],
        )


    def transcribe_many(self, audios, *, on_segment=None, **kwargs) -> list[TranscriptionResult]:
        self.many_calls.append(len(audios))
        return [self.transcribe(a, on_segment=None if on_segment is None else (lambda s, i=i: on_segment(i, s)),
                                **kwargs) for i, a in enumerate(audios)]


def fake_loader(model: FakeModel | None = None, delay_s: float = 0.0,
                error: Exception | None = None) -> tuple[Callable[[], FakeModel], FakeModel]:
    model = model or FakeModel()
    load_threads: list[str] = []

    def load() -> FakeModel:
        load_threads.append(threading.current_thread().name)
        model.threads.add(threading.current_thread().name)
        time.sleep(delay_s)
        if error is not None:
            raise error
        return model

    load.threads = load_threads  # type: ignore[attr-defined]
    return load, model


def write_wav(path: Path, seconds: float, freq: float = 440.0, amplitude: float = 0.3, sr: int = 16000) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


def duration_less_webm(path: Path, samples: np.ndarray, repeat: int = 1, rate: int = 16000) -> Path:
    """Opus in WebM as browsers record it (MediaRecorder): written live, so the file says no duration. The samples
    are encoded once and their packets written `repeat` times back to back (an hour takes a second)."""
    import av
    import soxr

    pcm = np.clip(soxr.resample(np.asarray(samples, np.float32), rate, 48000) * 32767, -32768, 32767).astype(np.int16)
    frame = 960  # 20 ms at 48 kHz
    usable = len(pcm) // frame * frame
    with av.open(str(path), "w", format="webm", options={"live": "1"}) as out:
        stream = out.add_stream("libopus", rate=48000)
        stream.layout = "mono"
        packets = []
        for i in range(0, usable, frame):
            f = av.AudioFrame.from_ndarray(pcm[None, i:i + frame], format="s16", layout="mono")
            f.sample_rate, f.pts = 48000, i
            packets += stream.encode(f)
        packets += stream.encode(None)
        base = packets[0].time_base
        shift = round(usable / 48000 / base)
        for k in range(repeat):
            for p in packets:
                q = av.Packet(bytes(p))
                q.pts, q.dts, q.time_base, q.stream = p.pts + k * shift, p.dts + k * shift, base, stream
                out.mux(q)
    return path


def wav_bytes(seconds: float, freq: float = 440.0) -> bytes:
    import io

    buf = io.BytesIO()
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ---- a local HTTP server ---------------------------------------------------------------------------
Route = Callable[[http.server.BaseHTTPRequestHandler], None]


@contextlib.contextmanager
def http_server(routes: dict[str, Route]) -> Iterator[tuple[int, list[dict]]]:
    """Serve `routes` on 127.0.0.1:<port>; yields (port, requests seen)."""
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            seen.append({"path": self.path, "host": self.headers.get("Host")})
            route = routes.get(self.path.split("?")[0])
            if route is None:
                self.send_response(404)
                self.send_header("Content-Length", "9")
                self.end_headers()
                self.wfile.write(b"not found")
                return
            try:
                route(self)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.handle_error = lambda *_args: None  # clients hanging up on purpose is not news
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1], seen
    finally:
        srv.shutdown()
        srv.server_close()


def send_body(body: bytes, content_type: str = "audio/wav", status: int = 200) -> Route:
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return route


def redirect(location: str, status: int = 302) -> Route:
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def endless(chunk: bytes = b"\0" * 65536, delay_s: float = 0.0) -> Route:
    """A chunked body that never ends, optionally slow."""

    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "audio/wav")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for _ in range(100000):
            h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            h.wfile.flush()
            if delay_s:
                time.sleep(delay_s)

    return route


# ---- a stdio server with the fake model (for the subprocess test) --------------------------------
def run_fake_server() -> None:
    """`python -c 'from tests.test_server_support import run_fake_server; run_fake_server()' [flags]`.

    Runs the real `main()` with the fake model, which writes to stdout while loading: that text must
    end up on stderr, not in the protocol stream.
    """
    from server.__main__ import main

    def load() -> FakeModel:
        print("fake model: stray stdout while loading")  # noqa: T201 - proves stdout is guarded
        time.sleep(float(os.environ.get("FAKE_LOAD_S", "0")))
        return FakeModel(seconds_per_audio_s=float(os.environ.get("FAKE_RTF", "0")))

    main(sys.argv[1:], model_loader=load)


def load_error() -> ModelLoadError:
    return ModelLoadError("no model at /nonexistent: pass a model directory or a Hugging Face repo id")
