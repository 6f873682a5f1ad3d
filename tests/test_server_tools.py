"""The MCP server through the SDK's in-memory client, in both protocol eras, with a fake model.

`mode="auto"` speaks the 2026-07-28 per-request protocol; `mode="legacy"` the 2025-11-25 initialize
handshake that Claude Desktop uses.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.types import ListRootsResult, Root
from pydantic import FileUrl

from server.app import create_server
from server.config import Settings
from server.schemas import CancelOutput, LanguagesOutput, StatusOutput, TranscriptionOutput
from tests.test_server_support import JFK, REPO, FakeModel, fake_loader, load_error, write_wav

pytestmark = pytest.mark.anyio

MODES = ["auto", "legacy"]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "audio"
    d.mkdir()
    return d


def make(root: Path, model: FakeModel | None = None, delay_s: float = 0.0, error: Exception | None = None,
         **settings):
    loader, model = fake_loader(model, delay_s=delay_s, error=error)
    settings.setdefault("allowed_roots", [root, JFK.parent])
    return create_server(Settings(**settings), model_loader=loader), model


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def test_tools_schemas_and_annotations(root, mode):
    server, _ = make(root)
    async with Client(server, mode=mode) as client:
        assert "transcribe_file" in (client.instructions or "")
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"transcribe_file", "transcribe_url", "list_languages", "get_transcript",
                          "cancel_transcription", "server_status"}
    for tool in tools.values():
        assert tool.title and tool.annotations and tool.annotations.title == tool.title
        assert tool.description and len(tool.description) > 40
        assert tool.output_schema and tool.output_schema["type"] == "object"
        # nothing lets the caller choose a model, a path to weights or raw model kwargs
        props = tool.input_schema.get("properties", {})
        assert not {"model", "model_path", "dtype", "kwargs", "model_kwargs", "ctx", "roots"} & set(props)
    f = tools["transcribe_file"]
    # output_dir saves new files (never over existing ones): not read-only, not idempotent, not destructive
    assert f.annotations.read_only_hint is False and f.annotations.idempotent_hint is False
    assert f.annotations.open_world_hint is False and f.annotations.destructive_hint is False
    u = tools["transcribe_url"]
    assert u.annotations.open_world_hint is True and u.annotations.read_only_hint is False
    assert tools["cancel_transcription"].annotations.destructive_hint is True
    for name in ("list_languages", "get_transcript", "server_status"):
        assert tools[name].annotations.read_only_hint
    schema = f.input_schema
    assert schema["required"] == ["path"]
    props = schema["properties"]
    assert props["language"]["default"] == "auto" and "list_languages" in props["language"]["description"]
    assert props["itn"]["default"] is True and props["include_segments"]["default"] is False
    hot = props["hotwords"]["anyOf"][0]
    assert hot["type"] == "array" and hot["items"]["type"] == "string" and hot["maxItems"] == 100
    for p in props.values():
        assert p.get("description")
    out = f.output_schema["properties"]
    for key in ("status", "job_id", "text", "language", "language_source", "language_method", "duration_s",
                "timings", "model", "warnings", "segments", "progress"):
        assert key in out
    assert tools["get_transcript"].input_schema["required"] == ["job_id"]


async def test_transcribe_file_field_by_field(root, mode):
    server, model = make(root)
    async with Client(server, mode=mode) as client:
        result = await client.call_tool("transcribe_file", {"path": str(JFK)})
    assert not result.is_error, text_of(result)
    out = TranscriptionOutput.model_validate(result.structured_content)
    assert out.status == "completed" and len(out.job_id) == 12
    assert out.source == str(JFK)
    assert out.text == "fake transcript of 11.00 seconds"
    assert out.language == "en" and out.language_name == "English"
    assert out.language_source == "detected" and out.language_method == "script-heuristic"
    assert out.duration_s == pytest.approx(11.0, abs=0.01)
    assert out.finish_reason == "stop" and out.warnings == [] and out.segments is None
    assert out.progress is None and out.next_step is None
    assert out.model.model_dump() == {"name": "Fun-ASR-Nano-2512", "variant": "nano", "dtype": "bfloat16",
                                      "quantization": None, "speaker_model": None}
    t = out.timings
    assert t.download_s is None
    assert t.features_s == 0.001 and t.encoder_s == 0.002 and t.adaptor_s == 0.0005
    assert t.prefill_s == 0.003 and t.decode_s == 0.004
    assert t.prompt_tokens == 40 and t.generated_tokens == 3
    assert t.prefill_tokens_per_s == 1000.0 and t.decode_tokens_per_s == 750.0
    assert 0 <= t.load_wait_s <= t.queue_wait_s and t.audio_decode_s > 0
    assert t.total_s >= t.processing_s + t.queue_wait_s
    header, body = text_of(result).split("\n", 1)
    assert header.startswith(f"Transcript of {JFK}") and "English (en, detected" in header
    assert "11.0 s of audio" in header and "RTF" in header and "Fun-ASR-Nano-2512" in header
    assert body == "fake transcript of 11.00 seconds"
    assert model.threads == {"funasr-mlx-worker"}  # loaded, warmed up and run on the one MLX thread
    assert model.warmed


async def test_options_reach_the_model(root, mode):
    server, model = make(root)
    async with Client(server, mode=mode) as client:
        result = await client.call_tool("transcribe_file", {
            "path": str(JFK), "language": "English", "hotwords": [" Kubernetes ", "Dr. Nguyen", "Kubernetes"],
            "itn": False, "include_segments": True})
        assert not result.is_error, text_of(result)
        out = TranscriptionOutput.model_validate(result.structured_content)
        assert out.language == "en" and out.language_source == "requested" and out.language_method is None
        assert out.segments is not None and out.segments[0].start == 0.0 and out.segments[0].end == 11.0
        assert "token_ids" not in result.structured_content["segments"][0]
        assert "Segments:\n[0.00-11.00]" in text_of(result)
        assert model.calls[-1] == {"language": "en", "hotwords": ["Kubernetes", "Dr. Nguyen"], "itn": False}
        for spelling in ("zh", "中文", "Chinese", "yue", "auto"):
            result = await client.call_tool("transcribe_file", {"path": str(JFK), "language": spelling})
            assert not result.is_error, (spelling, text_of(result))
        assert [c["language"] for c in model.calls[-5:]] == ["zh", "zh", "zh", "yue", None]
        assert set(model.batch_sizes) == {16}  # the server's --batch-size default


async def test_batch_size_setting_reaches_the_model(root, mode):
    server, model = make(root, batch_size=4)
    async with Client(server, mode=mode) as client:
        result = await client.call_tool("transcribe_file", {"path": str(JFK)})
        assert not result.is_error, text_of(result)
    assert model.batch_sizes == [4] and model.warm_batch_size == 4


async def test_unknown_language_lists_valid_ones(root, mode):
    server, model = make(root)
    async with Client(server, mode=mode) as client:
        await client.call_tool("list_languages", {})  # the model is loaded: checked before queueing
        result = await client.call_tool("transcribe_file", {"path": str(JFK), "language": "klingon"})
    assert result.is_error
    msg = text_of(result)
    assert "klingon" in msg and "auto" in msg
    for code in ("zh", "en", "ja", "yue"):
        assert f"{code} (" in msg
    assert model.calls == []


async def test_list_languages_nano_and_mlt(root, mode):
    server, _ = make(root)
    async with Client(server, mode=mode) as client:
        result = await client.call_tool("list_languages", {})
    assert not result.is_error
    out = LanguagesOutput.model_validate(result.structured_content)
    codes = [lg.code for lg in out.languages]
    assert codes[:3] == ["zh", "en", "ja"] and "yue" in codes and len(codes) == 10
    assert {lg.code: lg.prompt_name for lg in out.languages}["en"] == "英文"
    assert out.model.variant == "nano" and "auto" in out.auto
    assert "en: English [英文]" in text_of(result)

    server, _ = make(root, model=FakeModel(variant="mlt"))
    async with Client(server, mode=mode) as client:
        result = await client.call_tool("list_languages", {})
        out = LanguagesOutput.model_validate(result.structured_content)
        assert len(out.languages) == 31 and out.model.name == "Fun-ASR-MLT-Nano-2512"
        assert {"ko", "de", "fr"} - {lg.code for lg in out.languages} == {"de", "fr"}  # MLT has no de/fr
        bad = await client.call_tool("transcribe_file", {"path": str(JFK), "language": "German"})
        assert bad.is_error and "ko (Korean" in text_of(bad)


async def test_progress_increases_and_loading_waits(root, mode):
    clip = write_wav(root / "six.wav", 6.0)
    server, _ = make(root, model=FakeModel(seconds_per_audio_s=0.04, step_s=0.5), delay_s=0.4)
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress, total, message):
        seen.append((progress, total, message))

    async with Client(server, mode=mode) as client:
        result = await client.call_tool("transcribe_file", {"path": str(clip)}, progress_callback=on_progress)
    assert not result.is_error
    values = [p for p, _, _ in seen]
    assert len(values) >= 5
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values
    assert seen[0][2].startswith("waiting for the model to load")
    assert any("of 6 s of audio" in (m or "") for _, _, m in seen)
    assert all(total is None or p <= total for p, total, _ in seen)


async def test_long_audio_returns_handle_then_transcript(root, mode):
    clip = write_wav(root / "long.wav", 10.0)
    server, _ = make(root, model=FakeModel(seconds_per_audio_s=0.08), call_budget_s=0.3)
    async with Client(server, mode=mode) as client:
        first = await client.call_tool("transcribe_file", {"path": str(clip)})
        assert not first.is_error
        handle = TranscriptionOutput.model_validate(first.structured_content)
        assert handle.status in ("queued", "running") and handle.text is None
        assert handle.progress is not None and handle.progress.total_s == 10.0
        assert handle.job_id in handle.next_step and "get_transcript" in text_of(first)
        peek = await client.call_tool("get_transcript", {"job_id": handle.job_id, "wait": False})
        assert TranscriptionOutput.model_validate(peek.structured_content).status in ("queued", "running")
        final = None
        for _ in range(20):
            got = await client.call_tool("get_transcript", {"job_id": handle.job_id})
            final = TranscriptionOutput.model_validate(got.structured_content)
            if final.status == "completed":
                break
        assert final.status == "completed" and final.text == "fake transcript of 10.00 seconds"
        assert final.job_id == handle.job_id and final.timings.processing_s >= 0.5
        missing = await client.call_tool("get_transcript", {"job_id": "0123456789ab"})
        assert missing.is_error and "No transcription job" in text_of(missing)


async def test_cancelled_call_stops_the_work(root, mode):
    clip = write_wav(root / "slow.wav", 20.0)
    server, model = make(root, model=FakeModel(seconds_per_audio_s=0.5))
    async with Client(server, mode=mode) as client:
        async with anyio.create_task_group() as tg:
            async def call():
                await client.call_tool("transcribe_file", {"path": str(clip)})

            tg.start_soon(call)
            await anyio.to_thread.run_sync(model.started.wait, 10)
            tg.cancel_scope.cancel()
        await anyio.to_thread.run_sync(model.cancelled.wait, 5)
        assert model.cancelled.is_set()
        status = StatusOutput.model_validate((await client.call_tool("server_status", {})).structured_content)
        assert [j.status for j in status.jobs] == ["cancelled"]
        model.seconds_per_audio_s = 0.0
        again = await client.call_tool("transcribe_file", {"path": str(JFK)})  # still serving
        assert not again.is_error


async def test_cancel_transcription_tool(root, mode):
    clip = write_wav(root / "slow.wav", 20.0)
    server, model = make(root, model=FakeModel(seconds_per_audio_s=0.5), call_budget_s=0.2)
    async with Client(server, mode=mode) as client:
        handle = TranscriptionOutput.model_validate(
            (await client.call_tool("transcribe_file", {"path": str(clip)})).structured_content)
        result = await client.call_tool("cancel_transcription", {"job_id": handle.job_id})
        out = CancelOutput.model_validate(result.structured_content)
        assert out.job_id == handle.job_id and out.status == "cancelled"
        assert model.cancelled.is_set()
        got = await client.call_tool("get_transcript", {"job_id": handle.job_id})
        assert got.is_error and "cancelled" in text_of(got)
        unknown = await client.call_tool("cancel_transcription", {"job_id": "nope"})
        assert unknown.is_error


async def test_eight_concurrent_calls(root, mode):
    clips = [write_wav(root / f"c{i}.wav", 1.0 + i / 10, freq=300 + 50 * i) for i in range(8)]
    server, model = make(root, model=FakeModel(seconds_per_audio_s=0.02))
    results: dict[int, object] = {}
    async with Client(server, mode=mode) as client:
        async def one(i: int) -> None:
            results[i] = await client.call_tool("transcribe_file", {"path": str(clips[i])})

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(one, i)
    waits = []
    for i in range(8):
        assert not results[i].is_error, text_of(results[i])
        out = TranscriptionOutput.model_validate(results[i].structured_content)
        assert out.status == "completed" and out.source == str(clips[i])
        assert out.text == f"fake transcript of {1.0 + i / 10:.2f} seconds"
        waits.append(out.timings.queue_wait_s)
    assert len({TranscriptionOutput.model_validate(r.structured_content).job_id for r in results.values()}) == 8
    assert len(model.calls) == 8  # each transcribed once, on the one model: queued, or decoded together
    assert max(waits) > 0.02 or max(model.many_calls, default=1) > 1


async def test_queue_is_bounded(root, mode):
    clip = write_wav(root / "slow.wav", 10.0)
    server, model = make(root, model=FakeModel(seconds_per_audio_s=0.3), queue_size=1, call_budget_s=0.1)
    async with Client(server, mode=mode) as client:
        a = await client.call_tool("transcribe_file", {"path": str(clip)})
        await anyio.to_thread.run_sync(model.started.wait, 5)
        b = await client.call_tool("transcribe_file", {"path": str(clip)})
        c = await client.call_tool("transcribe_file", {"path": str(clip)})
        assert not a.is_error and not b.is_error
        assert TranscriptionOutput.model_validate(b.structured_content).status == "queued"
        assert c.is_error and "busy" in text_of(c)
        for r in (a, b):
            await client.call_tool("cancel_transcription", {"job_id": r.structured_content["job_id"]})


async def test_bad_calls_between_good_ones(root, mode, tmp_path):
    (root / "notes.wav").write_text("this is not audio at all, just text " * 20)
    (root / "empty.wav").write_bytes(b"")
    write_wav(root / "silent.wav", 2.0, amplitude=0.0)
    write_wav(root / "long.wav", 13.0)
    (root / "folder").mkdir()
    server, _ = make(root, max_duration_s=12)
    bad = {
        str(root / "missing.wav"): "does not exist",
        str(tmp_path / "elsewhere.wav"): "outside the folders",
        "relative/clip.wav": "relative path",
        str(root / "folder"): "folder",
        str(root / "notes.wav"): "Cannot transcribe",
        str(root / "empty.wav"): "Cannot transcribe",
        str(root / "silent.wav"): "silent",
        str(root / "long.wav"): "limit",
    }
    async with Client(server, mode=mode) as client:
        assert not (await client.call_tool("transcribe_file", {"path": str(JFK)})).is_error
        for path, expected in bad.items():
            result = await client.call_tool("transcribe_file", {"path": path})
            assert result.is_error, path
            assert expected in text_of(result), (path, text_of(result))
            assert result.structured_content is None
        wrong_type = await client.call_tool("transcribe_file", {"path": str(JFK), "itn": "maybe"})
        assert wrong_type.is_error
        assert not (await client.call_tool("transcribe_file", {"path": str(JFK)})).is_error


async def test_model_that_cannot_load_is_reported(root, mode, caplog):
    server, _ = make(root, error=load_error(), delay_s=0.2)
    with anyio.fail_after(10):
        async with Client(server, mode=mode) as client:
            first = await client.call_tool("transcribe_file", {"path": str(JFK)})  # waits for the load, then fails
            later = await client.call_tool("transcribe_file", {"path": str(JFK)})
            langs = await client.call_tool("list_languages", {})
            status = StatusOutput.model_validate((await client.call_tool("server_status", {})).structured_content)
    for result in (first, later, langs):
        assert result.is_error
        assert "could not be loaded" in text_of(result) and "/nonexistent" in text_of(result)
        assert "--model" in text_of(result)
    assert status.model_state == "failed" and "/nonexistent" in status.model_error
    assert any("failed to load" in r.getMessage() for r in caplog.records)


async def test_unexpected_error_is_logged_not_leaked(root, mode, caplog):
    server, _ = make(root, model=FakeModel(fail=RuntimeError("secret internals")))
    caplog.set_level(logging.INFO)
    async with Client(server, mode=mode) as client:
        result = await client.call_tool("transcribe_file", {"path": str(JFK)})
        assert result.is_error and "internal error" in text_of(result)
        assert "secret internals" not in text_of(result)
        status = await client.call_tool("server_status", {})
        assert not status.is_error
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "secret internals" in str(logged[0].exc_info[1])
    assert not any("fake transcript" in r.getMessage() for r in caplog.records)  # logs never hold transcripts


async def test_client_roots_only_narrow(root, mode):
    inner = root / "inner"
    inner.mkdir()
    inside = write_wav(inner / "a.wav", 1.0)
    beside = write_wav(root / "b.wav", 1.0)

    async def roots_callback(_context):
        return ListRootsResult(roots=[Root(uri=FileUrl(inner.as_uri())), Root(uri=FileUrl("file:///"))])

    server, _ = make(root, allowed_roots=[root])
    async with Client(server, mode=mode, list_roots_callback=roots_callback) as client:
        assert not (await client.call_tool("transcribe_file", {"path": str(inside)})).is_error
        refused = await client.call_tool("transcribe_file", {"path": str(beside)})
        assert not refused.is_error  # file:/// does not widen, and the configured root still allows it
    async def narrow_callback(_context):
        return ListRootsResult(roots=[Root(uri=FileUrl(inner.as_uri()))])

    async with Client(server, mode=mode, list_roots_callback=narrow_callback) as client:
        assert not (await client.call_tool("transcribe_file", {"path": str(inside)})).is_error
        refused = await client.call_tool("transcribe_file", {"path": str(beside)})
        assert refused.is_error and "narrowed by the client" in text_of(refused)
    async with Client(server, mode=mode) as client:  # no roots capability: configured roots only
        assert not (await client.call_tool("transcribe_file", {"path": str(beside)})).is_error

    async def http_only(_context):  # roots declared, but no local folder among them
        return ListRootsResult(roots=[Root(uri=FileUrl("file://fileserver/share/music"))])

    async def nothing(_context):
        return ListRootsResult(roots=[])

    for callback in (http_only, nothing):  # fail closed: the client shares no local folder, so none may be read
        async with Client(server, mode=mode, list_roots_callback=callback) as client:
            refused = await client.call_tool("transcribe_file", {"path": str(inside)})
            assert refused.is_error and "shares no local folder" in text_of(refused)
    ignoring, _ = make(root, allowed_roots=[root], client_roots="ignore")
    async with Client(ignoring, mode=mode, list_roots_callback=narrow_callback) as client:
        assert not (await client.call_tool("transcribe_file", {"path": str(beside)})).is_error


async def test_broken_roots_answer_falls_back_to_configured_roots(root, caplog):
    clip = write_wav(root / "b.wav", 1.0)

    async def broken(_context):
        raise RuntimeError("client bug")

    server, _ = make(root, allowed_roots=[root])
    async with Client(server, mode="legacy", list_roots_callback=broken) as client:
        result = await client.call_tool("transcribe_file", {"path": str(clip)})
        assert not result.is_error, text_of(result)
        outside = await client.call_tool("transcribe_file", {"path": str(JFK)})
        assert outside.is_error  # the configured roots still apply
    assert any("roots/list failed" in r.getMessage() for r in caplog.records)


async def test_server_status_and_url_tool_off(root, mode):
    server, _ = make(root, url_policy="off", max_file_mb=5, batch_size=8)
    async with Client(server, mode=mode) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "transcribe_url" not in names
        await client.call_tool("list_languages", {})
        result = await client.call_tool("server_status", {})
    out = StatusOutput.model_validate(result.structured_content)
    assert out.model_state == "ready" and out.model.name == "Fun-ASR-Nano-2512"
    assert out.url_policy == "off" and out.limits.max_file_mb == 5 and out.limits.batch_size == 8
    assert out.allowed_roots == [str(root.resolve()), str(JFK.parent.resolve())]
    assert out.queued == 0 and out.running == 0
    assert "Model ready" in text_of(result)


def test_importing_server_is_silent():
    code = "import server, server.app, server.fetch, server.paths, server.worker, server.config, server.__main__"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
