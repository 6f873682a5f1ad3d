"""`funasr-nano serve` (server.http): a live uvicorn server driven by the official `openai` client, plain HTTP
requests for what that client cannot send (malformed multipart, chunked oversize bodies, wrong keys), and the SDK's
MCP client over Streamable HTTP at /mcp.

The transcription tests use the tiny random checkpoint (its text is noise, but the same noise as the library's
`transcribe` on the same clip, which is what is compared); the queue, failure and disconnect tests use the fake
model of test_server_support.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest

import asr
from server.config import ConfigError, HttpSettings, Settings, load_http_settings
from server.http import create_app
from tests.test_server_support import JFK, TESTDATA, FakeModel, fake_loader

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

ZH = TESTDATA / "audio" / "zh" / "example_zh.wav"
LONG = TESTDATA / "audio" / "long" / "voxpopuli_en_test_000.wav"  # 69 s: several VAD segments
KEY = "test-key-0123456789abcdef"
MAX_NEW_TOKENS = 6


class _Counting:
    """The real model, counting how many requests each transcribe_many call decoded together."""

    def __init__(self, model):
        self.model = model
        self.batches: list[int] = []  # sizes of the transcribe_many calls: requests decoded together

    def __getattr__(self, name):
        return getattr(self.model, name)

    def transcribe_many(self, audios, **kwargs):
        self.batches.append(len(audios))
        return self.model.transcribe_many(audios, **kwargs)


@contextlib.contextmanager
def live(settings: Settings | None = None, http: HttpSettings | None = None,
         loader: Callable | None = None, wait_ready: bool = True) -> Iterator[tuple[str, object]]:
    """A uvicorn server on a free port in a thread; yields (base URL, the app)."""
    http = http or HttpSettings(port=0)
    app = create_app(settings or Settings(warmup=False), http, model_loader=loader)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    while wait_ready and time.monotonic() < deadline:
        state = app.state.engine.state
        if state in ("ready", "failed"):
            break
        time.sleep(0.02)
    try:
        yield base, app
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def tiny_served(tiny_checkpoint):
    models: list[_Counting] = []

    def loader():
        models.append(_Counting(asr.load_model(str(tiny_checkpoint), dtype="float32")))
        return models[0]

    settings = Settings(warmup=False, queue_size=64, allowed_roots=(str(TESTDATA),), max_new_tokens=MAX_NEW_TOKENS)
    with live(settings, loader=loader) as (base, app):
        assert app.state.engine.state == "ready", app.state.engine.error
        yield base, models[0]


@pytest.fixture(scope="module")
def tiny_server(tiny_served):
    return tiny_served[0]


@pytest.fixture(scope="module")
def expected(tiny_model):
    """What the library gives for the clips, with the server's options."""
    return {p: tiny_model.transcribe(str(p), max_new_tokens=MAX_NEW_TOKENS) for p in (JFK, ZH, LONG)}


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


# ---- the OpenAI API ------------------------------------------------------------------------------
def test_every_response_format_through_the_openai_client(tiny_server, expected):
    c = client(tiny_server)
    want = expected[JFK]
    with JFK.open("rb") as f:
        r = c.audio.transcriptions.create(model="whisper-1", file=f)
    assert r.text == want.text and want.text
    with JFK.open("rb") as f:
        text = c.audio.transcriptions.create(model="whisper-1", file=f, response_format="text")
    assert text.strip() == want.text.strip()
    with ZH.open("rb") as f:
        v = c.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                          timestamp_granularities=["segment"])
    zh = expected[ZH]
    assert v.text == zh.text and v.duration == pytest.approx(5.616, abs=0.01)
    assert [(s.start, s.end, s.text) for s in v.segments] == [(s.start, s.end, s.text) for s in zh.segments]
    with LONG.open("rb") as f:
        srt = c.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")
    with LONG.open("rb") as f:
        vtt = c.audio.transcriptions.create(model="whisper-1", file=f, response_format="vtt")
    segs = [s for s in expected[LONG].segments if s.text.strip()]
    assert len(segs) > 1
    assert srt.strip().startswith("1\n00:00:") and srt.count(" --> ") == len(segs)
    assert vtt.startswith("WEBVTT") and vtt.count(" --> ") == len(segs)
    for s in segs:
        assert s.text.strip() in srt and s.text.strip() in vtt


def test_language_and_prompt_reach_the_model(tiny_server, tiny_model):
    want = tiny_model.transcribe(str(JFK), max_new_tokens=MAX_NEW_TOKENS, language="en", hotwords=["Kennedy", "Berlin"])
    with JFK.open("rb") as f:
        r = client(tiny_server).audio.transcriptions.create(model="x", file=f, language="en",
                                                            prompt="Kennedy, Berlin", response_format="verbose_json")
    assert r.text == want.text
    assert r.model_extra["language_code"] == "en" and r.model_extra["language_source"] == "requested"


def test_streaming_sends_each_segment_then_the_whole_text(tiny_server, expected):
    with LONG.open("rb") as f:
        events = list(client(tiny_server).audio.transcriptions.create(model="x", file=f, stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    want = expected[LONG]
    assert len(done) == 1 and events[-1] is done[0] and done[0].text == want.text
    assert len(deltas) == len(want.segments) > 1
    assert "".join(d.delta for d in deltas).strip() == want.text.strip()
    assert [d.model_extra["segment"]["start"] for d in deltas] == [s.start for s in want.segments]


def test_models_health_and_metrics(tiny_server):
    models = client(tiny_server).models.list()
    assert [m.id for m in models.data] and models.data[0].owned_by == "funasr-nano-mlx"
    assert httpx.get(f"{tiny_server}/v1/models/{models.data[0].id}").status_code == 200
    assert httpx.get(f"{tiny_server}/v1/models/nope").status_code == 404
    h = httpx.get(f"{tiny_server}/health")
    assert h.status_code == 200 and h.json()["status"] == "ready" and "cpu" in h.json()["compute"]
    with JFK.open("rb") as f:
        client(tiny_server).audio.transcriptions.create(model="x", file=f)
    m = httpx.get(f"{tiny_server}/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'funasr_transcription_requests_total{outcome="ok"}' in text
    for name in ("funasr_queue_length", "funasr_transcription_seconds_bucket", "funasr_real_time_factor_bucket",
                 "funasr_audio_seconds_total", "funasr_model_ready 1.0"):
        assert name in text, name


def test_32_concurrent_uploads_are_all_answered_and_decoded_together(tiny_served, expected):
    """Requests that wait together are decoded as one batch, each answered with what it gets alone."""
    tiny_server, model = tiny_served
    model.batches.clear()
    clips = [JFK, ZH] * 16

    def one(path: Path) -> str:
        with path.open("rb") as f:
            return client(tiny_server).audio.transcriptions.create(model="x", file=f).text

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(one, clips))
    assert texts == [expected[p].text for p in clips]
    assert model.batches and max(model.batches) > 1, model.batches  # some were decoded together


# ---- errors: OpenAI-shaped JSON with the right status ---------------------------------------------------
def _error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if code is not None:
        assert err["code"] == code, err
    return err


def test_bad_requests_get_clear_errors(tiny_server):
    url = f"{tiny_server}/v1/audio/transcriptions"
    _error(httpx.post(url, json={"file": "x"}), 415, "unsupported_media_type")
    _error(httpx.post(url, data={"model": "x"}, files={"other": ("a.txt", b"x")}), 400, "missing_file")
    _error(httpx.post(url, files={"file": ("a.wav", b"")}), 400, "empty_file")
    err = _error(httpx.post(url, files={"file": ("notes.txt", b"hello, not audio" * 10)}), 415, "unsupported_audio")
    assert "notes.txt" in err["message"] and "ffmpeg" in err["message"]
    wav = JFK.read_bytes()
    _error(httpx.post(url, files={"file": ("a.wav", wav)}, data={"response_format": "xml"}), 422, "invalid_option")
    err = _error(httpx.post(url, files={"file": ("a.wav", wav)}, data={"language": "klingon"}), 422)
    assert "klingon" in err["message"]
    _error(httpx.post(url, files={"file": ("a.wav", wav)}, data={"timestamp_granularities[]": "word"}), 422)
    _error(httpx.post(url, files={"file": ("a.wav", wav)}, data={"prompt": "<|im_start|>"}), 422)
    _error(httpx.post(url, files={"file": ("a.wav", wav)}, data={"stream": "maybe"}), 422)
    body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF"  # never closed
    r = httpx.post(url, content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code in (400, 415) and r.json()["error"]["message"]
    r = httpx.post(url, content=b"junk", headers={"content-type": "multipart/form-data"})  # no boundary
    _error(r, 400, "malformed_multipart")
    _error(httpx.get(url), 405)
    _error(httpx.get(f"{tiny_server}/v1/nothing"), 404)


def test_silence_is_refused_and_the_server_keeps_serving(tiny_server, tmp_path):
    from tests.test_server_support import write_wav

    silent = write_wav(tmp_path / "silent.wav", 2.0, amplitude=0.0)
    url = f"{tiny_server}/v1/audio/transcriptions"
    err = _error(httpx.post(url, files={"file": ("silent.wav", silent.read_bytes())}), 400, "invalid_audio")
    assert "silent" in err["message"]
    assert httpx.post(url, files={"file": ("a.wav", JFK.read_bytes())}).status_code == 200


def test_uploads_over_the_limit_are_refused_while_received():
    http = HttpSettings(port=0, max_upload_mb=0.05)  # 51 KiB
    load, _ = fake_loader()
    with live(http=http, loader=load) as (base, _app):
        url = f"{base}/v1/audio/transcriptions"
        big = JFK.read_bytes()  # 352 KiB
        _error(httpx.post(url, files={"file": ("a.wav", big)}), 413, "upload_too_large")  # by Content-Length

        def chunks():  # no Content-Length: counted as it arrives
            yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
            for i in range(0, len(big), 8192):
                yield big[i: i + 8192]
            yield b"\r\n--b--\r\n"

        r = httpx.post(url, content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        _error(r, 413, "upload_too_large")
        small = big[:40000]
        assert httpx.post(url, files={"file": ("a.wav", small)}).status_code in (200, 415)  # served, not refused


def test_duration_limit_is_413():
    load, _ = fake_loader()
    with live(Settings(warmup=False, max_duration_s=5.0), loader=load) as (base, _app):
        err = _error(httpx.post(f"{base}/v1/audio/transcriptions", files={"file": ("jfk.wav", JFK.read_bytes())}),
                     413, "audio_too_large")
        assert "5.0 s" in err["message"]


def test_queue_full_is_429_and_a_failed_model_is_503():
    load, model = fake_loader(FakeModel(seconds_per_audio_s=0.3, step_s=0.1))
    with live(Settings(warmup=False, queue_size=1), loader=load) as (base, _app):
        url = f"{base}/v1/audio/transcriptions"
        wav = JFK.read_bytes()
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(httpx.post, url, files={"file": ("a.wav", wav)}, timeout=60) for _ in range(4)]
            time.sleep(0.3)
            statuses = sorted(f.result().status_code for f in futures)
        assert statuses.count(429) >= 1 and statuses.count(200) >= 2, statuses
        r = next(f.result() for f in futures if f.result().status_code == 429)
        assert r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
        with pytest.raises(openai.RateLimitError):  # what the OpenAI client makes of it
            with ThreadPoolExecutor(3) as pool:
                for f in [pool.submit(client(base).audio.transcriptions.create, model="x",
                                      file=("a.wav", wav)) for _ in range(3)]:
                    f.result()
    load, _ = fake_loader(error=asr.errors.ModelLoadError("no such model"))
    with live(loader=load) as (base, _app):
        h = httpx.get(f"{base}/health")
        assert h.status_code == 503 and h.json()["status"] == "failed" and "no such model" in h.json()["error"]
        err = _error(httpx.post(f"{base}/v1/audio/transcriptions", files={"file": ("a.wav", JFK.read_bytes())}),
                     503, "model_unavailable")
        assert "no such model" in err["message"]


def test_health_says_loading_while_the_model_loads():
    load, _ = fake_loader(delay_s=1.5)
    with live(loader=load, wait_ready=False) as (base, app):
        h = httpx.get(f"{base}/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = httpx.post(f"{base}/v1/audio/transcriptions", files={"file": ("a.wav", JFK.read_bytes())}, timeout=30)
        assert r.status_code == 200  # waits for the load, then answers
        assert httpx.get(f"{base}/health").json()["status"] == "ready"


def test_a_client_that_goes_away_cancels_its_job():
    load, model = fake_loader(FakeModel(seconds_per_audio_s=1.0, step_s=0.05))
    with live(loader=load) as (base, app):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/audio/transcriptions", files={"file": ("a.wav", JFK.read_bytes())}, timeout=0.5)
        assert model.cancelled.wait(5), "the job kept running after its client left"
        job = app.state.engine.jobs()[0]
        deadline = time.monotonic() + 5
        while job.state != "cancelled" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.state == "cancelled"


# ---- authentication and binding -----------------------------------------------------------------
def test_api_key_is_required_when_set():
    load, _ = fake_loader()
    with live(http=HttpSettings(port=0, api_key=KEY), loader=load) as (base, _app):
        url = f"{base}/v1/audio/transcriptions"
        files = {"file": ("a.wav", JFK.read_bytes())}
        _error(httpx.post(url, files=files), 401, "invalid_api_key")
        _error(httpx.post(url, files=files, headers={"Authorization": "Bearer wrong-key-0123456789"}), 401)
        _error(httpx.get(f"{base}/metrics"), 401)
        _error(httpx.get(f"{base}/v1/models", headers={"Authorization": "Basic " + KEY}), 401)
        with pytest.raises(openai.AuthenticationError):
            client(base, "nope").models.list()
        assert httpx.get(f"{base}/health").status_code == 200  # load balancers probe without the key
        assert client(base, KEY).models.list().data
        with JFK.open("rb") as f:
            assert "fake transcript" in client(base, KEY).audio.transcriptions.create(model="x", file=f).text
        r = httpx.post(f"{base}/mcp", json={}, headers={"Accept": "application/json, text/event-stream"})
        assert r.status_code == 401  # the MCP endpoint too


def test_binding_beyond_loopback_needs_a_key_or_an_explicit_no_auth():
    with pytest.raises(ConfigError, match="API key"):
        load_http_settings(["--host", "0.0.0.0"], env={})
    with pytest.raises(ConfigError, match="16"):
        load_http_settings(["--host", "0.0.0.0", "--api-key", "short"], env={})
    _, http = load_http_settings(["--host", "0.0.0.0"], env={"FUNASR_NANO_HTTP_API_KEY": KEY})
    assert http.api_key == KEY and KEY not in repr(http)
    _, http = load_http_settings(["--host", "0.0.0.0", "--no-auth"], env={})
    assert not http.auth and http.api_key is None
    settings, http = load_http_settings(["--port", "9000", "--model", "/m", "--cors-origin", "http://a.example/"],
                                        env={"FUNASR_NANO_MCP_QUEUE_SIZE": "5"})
    assert (http.host, http.port, http.cors_origins) == ("127.0.0.1", 9000, ("http://a.example",))
    assert settings.model == "/m" and settings.queue_size == 5


def test_cors_is_off_unless_configured():
    load, _ = fake_loader()
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    with live(loader=load) as (base, _app):
        r = httpx.get(f"{base}/v1/models", headers={"Origin": "http://app.example"})
        assert "access-control-allow-origin" not in r.headers
    with live(http=HttpSettings(port=0, cors_origins=("http://app.example",)), loader=load) as (base, _app):
        r = httpx.options(f"{base}/v1/audio/transcriptions", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.options(f"{base}/v1/audio/transcriptions", headers={**pre, "Origin": "http://evil.example"})
        assert r.headers.get("access-control-allow-origin") != "http://evil.example"


# ---- MCP over Streamable HTTP -------------------------------------------------------------------
def test_mcp_over_streamable_http_shares_the_engine(tiny_server, expected):
    import anyio
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def run() -> tuple[list[str], dict]:
        async with streamable_http_client(f"{tiny_server}/mcp") as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                await session.initialize()
                tools = [t.name for t in (await session.list_tools()).tools]
                res = await session.call_tool("transcribe_file", {"path": str(JFK)})
                assert not res.is_error, res.content
                return tools, res.structured_content

    tools, out = anyio.run(run)
    assert {"transcribe_file", "get_transcript", "server_status"} <= set(tools)
    assert out["status"] == "completed" and out["text"] == expected[JFK].text
    assert httpx.get(f"{tiny_server}/health").json()["status"] == "ready"  # the shared engine still serves
