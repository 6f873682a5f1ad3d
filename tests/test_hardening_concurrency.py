"""Concurrency and leaks, through the in-memory MCP client with the fake model (real decoding and fetching).

- 32 concurrent transcriptions are all answered, each with its own correct result (both protocol eras);
- a mixed burst of every tool, valid and invalid, is answered call by call;
- cancelling half of a loaded queue (from the client and with cancel_transcription) leaves no stuck worker:
  the rest completes, the queue drains, and a new call is served at once;
- URL downloads never leave temporary files behind: completed, refused, oversized, endless, timed-out,
  undecodable and cancelled downloads alike;
- the soak command (benchmarks/soak.py) runs and reports flat memory on a short run (the 1,000-call soak is in
  docs/hardening.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

from server.app import create_server
from server.config import Settings
from server.schemas import CancelOutput, StatusOutput, TranscriptionOutput
from tests.test_server_support import (
    REPO,
    FakeModel,
    endless,
    fake_loader,
    http_server,
    redirect,
    send_body,
    wav_bytes,
    write_wav,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def seconds_of(i: int) -> float:
    return 0.5 + 0.05 * i


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_32_concurrent_calls_get_their_own_results(tmp_path, mode):
    clips = [write_wav(tmp_path / f"c{i:02d}.wav", seconds_of(i), freq=200 + 20 * i) for i in range(32)]
    loader, model = fake_loader(FakeModel(seconds_per_audio_s=0.01, step_s=0.25))
    server = create_server(Settings(allowed_roots=[tmp_path], queue_size=32), model_loader=loader)
    results: dict[int, object] = {}
    async with Client(server, mode=mode) as client:
        await client.call_tool("list_languages", {})

        async def one(i: int) -> None:
            results[i] = await client.call_tool("transcribe_file", {"path": str(clips[i]), "hotwords": [f"w{i}"]})

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(32):
                    tg.start_soon(one, i)
        status = StatusOutput.model_validate((await client.call_tool("server_status", {})).structured_content)
    assert len(results) == 32
    ids = set()
    for i, result in results.items():
        assert not result.is_error, text_of(result)
        out = TranscriptionOutput.model_validate(result.structured_content)
        assert out.status == "completed" and out.source == str(clips[i])
        assert out.text == f"fake transcript of {seconds_of(i):.2f} seconds with w{i}"
        ids.add(out.job_id)
    assert len(ids) == 32 and len(model.calls) == 32
    assert status.queued == 0 and status.running == 0 and status.model_state == "ready"


async def test_default_queue_answers_overflow_with_busy(tmp_path):
    """With the default --queue-size 16, a burst of 32 slow calls: each is a correct result or the documented
    'busy' error, never anything else."""
    clips = [write_wav(tmp_path / f"c{i:02d}.wav", 1.0, freq=200 + 20 * i) for i in range(32)]
    loader, _ = fake_loader(FakeModel(seconds_per_audio_s=0.02))
    server = create_server(Settings(allowed_roots=[tmp_path]), model_loader=loader)
    results: list = []
    async with Client(server, mode="legacy") as client:
        await client.call_tool("list_languages", {})

        async def one(i: int) -> None:
            results.append(await client.call_tool("transcribe_file", {"path": str(clips[i])}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(32):
                    tg.start_soon(one, i)
    busy = [r for r in results if r.is_error]
    assert all("busy" in text_of(r) and "--queue-size" in text_of(r) for r in busy)
    done = [TranscriptionOutput.model_validate(r.structured_content) for r in results if not r.is_error]
    assert len(done) >= 16 and all(o.text == "fake transcript of 1.00 seconds" for o in done)


async def test_mixed_burst_of_every_tool(tmp_path):
    good = [write_wav(tmp_path / f"g{i}.wav", seconds_of(i)) for i in range(8)]
    (tmp_path / "text.wav").write_text("not audio " * 50)
    loader, _ = fake_loader(FakeModel(seconds_per_audio_s=0.01))
    server = create_server(Settings(allowed_roots=[tmp_path], queue_size=32, url_policy="off"), model_loader=loader)
    calls: list[tuple[str, dict, str]] = []  # tool, arguments, expected outcome
    for i, clip in enumerate(good):
        calls.append(("transcribe_file", {"path": str(clip)}, f"fake transcript of {seconds_of(i):.2f} seconds"))
    calls += [("transcribe_file", {"path": str(tmp_path / "text.wav")}, "error:Cannot transcribe"),
              ("transcribe_file", {"path": str(tmp_path / "missing.wav")}, "error:does not exist"),
              ("transcribe_file", {"path": "/etc/passwd"}, "error:outside the folders"),
              ("transcribe_file", {"path": str(good[0]), "language": "klingon"}, "error:klingon"),
              ("get_transcript", {"job_id": "0123456789ab"}, "error:No transcription job"),
              ("cancel_transcription", {"job_id": "nope"}, "error:No transcription job"),
              ("transcribe_url", {"url": "http://example.com/a.wav"}, "error:Unknown tool")]
    calls += [("server_status", {}, "status"), ("list_languages", {}, "languages")] * 4
    results: dict[int, object] = {}
    async with Client(server, mode="legacy") as client:
        await client.call_tool("list_languages", {})

        async def one(k: int) -> None:
            name, args, _ = calls[k]
            results[k] = await client.call_tool(name, args)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for k in range(len(calls)):
                    tg.start_soon(one, k)
    for k, (name, _args, expected) in enumerate(calls):
        result = results[k]
        if expected.startswith("error:"):
            assert result.is_error and expected[6:] in text_of(result), (name, text_of(result))
        elif expected == "status":
            StatusOutput.model_validate(result.structured_content)
        elif expected == "languages":
            assert not result.is_error and "en: English" in text_of(result)
        else:
            assert TranscriptionOutput.model_validate(result.structured_content).text == expected


async def test_cancellation_under_load_leaves_no_stuck_worker(tmp_path):
    clips = [write_wav(tmp_path / f"c{i:02d}.wav", 2.0, freq=200 + 20 * i) for i in range(24)]
    model = FakeModel(seconds_per_audio_s=0.05, step_s=0.25)  # 0.1 s of work per call, on one worker
    loader, _ = fake_loader(model)
    server = create_server(Settings(allowed_roots=[tmp_path], queue_size=32, call_budget_s=30), model_loader=loader)
    results: dict[int, object] = {}
    async with Client(server, mode="legacy") as client:
        await client.call_tool("list_languages", {})
        scopes = [anyio.CancelScope() for _ in clips]

        async def one(i: int) -> None:
            with scopes[i]:
                results[i] = await client.call_tool("transcribe_file", {"path": str(clips[i])})

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(len(clips)):
                    tg.start_soon(one, i)
                await anyio.to_thread.run_sync(model.started.wait, 10)
                await anyio.sleep(0.1)
                for i in range(0, len(clips), 2):  # the client gives up on every other call
                    scopes[i].cancel()
        cancelled = [i for i in range(len(clips)) if i not in results]
        assert len(cancelled) >= len(clips) // 2 - 1
        for i in range(1, len(clips), 2):
            out = TranscriptionOutput.model_validate(results[i].structured_content)
            assert out.status == "completed" and out.text == "fake transcript of 2.00 seconds"

        # jobs cancelled with their calls: none left queued or running, the worker free
        with anyio.fail_after(10):
            while True:
                status = StatusOutput.model_validate((await client.call_tool("server_status", {})).structured_content)
                if status.running == 0 and status.queued == 0:
                    break
                await anyio.sleep(0.05)
        states = sorted(j.status for j in status.jobs)
        assert set(states) <= {"completed", "cancelled"} and states.count("completed") >= len(clips) // 2

        again = await client.call_tool("transcribe_file", {"path": str(clips[0])})
        assert TranscriptionOutput.model_validate(again.structured_content).status == "completed"


async def test_cancel_tool_under_load(tmp_path):
    """Sixteen jobs behind handles (short call budget); cancel_transcription on all but two, running or queued:
    the two complete, the rest end cancelled, the queue drains, a new call is served at once."""
    clips = [write_wav(tmp_path / f"c{i:02d}.wav", 2.0, freq=200 + 20 * i) for i in range(16)]
    model = FakeModel(seconds_per_audio_s=0.1, step_s=0.25)
    loader, _ = fake_loader(model)
    server = create_server(Settings(allowed_roots=[tmp_path], queue_size=32, call_budget_s=0.2), model_loader=loader)
    async with Client(server, mode="legacy") as client:
        await client.call_tool("list_languages", {})
        handles = []
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                async def one(i: int) -> None:
                    r = await client.call_tool("transcribe_file", {"path": str(clips[i])})
                    handles.append(TranscriptionOutput.model_validate(r.structured_content))

                for i in range(len(clips)):
                    tg.start_soon(one, i)
        assert len(handles) == 16 and sum(h.status != "completed" for h in handles) >= 12
        keep = {h.job_id for h in handles[:2]}
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                async def cancel(job_id: str) -> None:
                    r = await client.call_tool("cancel_transcription", {"job_id": job_id})
                    assert CancelOutput.model_validate(r.structured_content).status in ("cancelled", "completed",
                                                                                       "running")

                for h in handles[2:]:
                    tg.start_soon(cancel, h.job_id)
        with anyio.fail_after(20):
            for job_id in keep:
                while True:
                    got = await client.call_tool("get_transcript", {"job_id": job_id})
                    out = TranscriptionOutput.model_validate(got.structured_content)
                    if out.status == "completed":
                        assert out.text == "fake transcript of 2.00 seconds"
                        break
            status = StatusOutput.model_validate((await client.call_tool("server_status", {})).structured_content)
            while status.running or status.queued:
                await anyio.sleep(0.05)
                status = StatusOutput.model_validate((await client.call_tool("server_status", {})).structured_content)
        by_id = {j.job_id: j.status for j in status.jobs}
        assert all(by_id[h.job_id] in ("cancelled", "completed") for h in handles)
        assert sum(by_id[h.job_id] == "cancelled" for h in handles) >= 10
        model.seconds_per_audio_s = 0.0
        with anyio.fail_after(5):
            again = await client.call_tool("get_transcript", {"job_id": (await client.call_tool(
                "transcribe_file", {"path": str(clips[0])})).structured_content["job_id"]})
        assert TranscriptionOutput.model_validate(again.structured_content).status == "completed"


# --- temporary files of URL downloads --------------------------------------------------------------------------
def _slow(body: bytes, delay_s: float):
    def route(h) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "audio/wav")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for i in range(0, len(body), 1024):
            h.wfile.write(body[i:i + 1024])
            h.wfile.flush()
            time.sleep(delay_s)

    return route


async def test_downloads_never_leave_temp_files(tmp_path):
    private = tmp_path / "tmp"  # where the fetcher makes its folders
    private.mkdir()
    wav = wav_bytes(1.0)
    routes = {"/ok.wav": send_body(wav), "/big.wav": send_body(b"\0" * (3 << 20)), "/endless.wav": endless(),
              "/slow.wav": _slow(wav, 0.05), "/text.wav": send_body(b"not audio " * 500, "audio/wav"),
              "/page.html": send_body(b"<html></html>", "text/html"), "/empty.wav": send_body(b""),
              "/loop.wav": redirect("/loop.wav")}
    loader, _ = fake_loader(FakeModel(seconds_per_audio_s=0.02))
    with http_server(routes) as (port, _seen):
        server = create_server(Settings(allowed_roots=[tmp_path], url_policy="allowlist",
                                        url_allow_hosts=["127.0.0.1"], max_download_mb=1, download_timeout_s=1.0,
                                        queue_size=64), model_loader=loader, download_dir=str(private))
        base = f"http://127.0.0.1:{port}"
        paths = ["/ok.wav", "/big.wav", "/endless.wav", "/slow.wav", "/text.wav", "/page.html", "/empty.wav",
                 "/loop.wav", "/missing.wav"]
        outcomes: list[tuple[str, bool]] = []
        async with Client(server, mode="legacy") as client:
            await client.call_tool("list_languages", {})

            async def one(path: str, cancel_after: float | None) -> None:
                with anyio.move_on_after(cancel_after) if cancel_after else anyio.CancelScope():
                    r = await client.call_tool("transcribe_url", {"url": base + path})
                    outcomes.append((path, r.is_error))
                    assert "funasr-nano-mcp-" not in text_of(r)  # the private temp path is never shown

            with anyio.fail_after(60):
                for _round in range(3):
                    async with anyio.create_task_group() as tg:
                        for path in paths:
                            tg.start_soon(one, path, None)
                        tg.start_soon(one, "/slow.wav", 0.2)  # cancelled mid-download
                        tg.start_soon(one, "/endless.wav", 0.1)
        ok = [err for path, err in outcomes if path == "/ok.wav"]
        assert ok == [False, False, False]
        assert all(err for path, err in outcomes if path != "/ok.wav" and path != "/slow.wav")
    with anyio.fail_after(10):
        while list(private.iterdir()):  # abandoned decodes finish in their threads within moments
            await anyio.sleep(0.05)
    assert not list(private.iterdir())


# --- the soak command ---------------------------------------------------------------------------------------------
def _soak(tmp_path: Path, *args: str) -> dict:
    report = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--model", "fake", "--quiet", "--work",
                           str(tmp_path / "work"), "--json", str(report), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(report.read_text())
    assert got["failures"] == 0 and got["temp_dirs_left"] == 0 and got["clean_shutdown"]
    assert got["concurrent"]["answered"] == got["concurrent"]["correct"] == 32
    assert got["cancellation"]["cancelled"] >= 4 and got["cancellation"]["next_call_s"] < 10
    return got


def test_soak_command_short_run(tmp_path):
    """The soak tool itself, briefly (250 calls; RSS within 10 % - the FFmpeg import and the job history fill
    up over the first ~300 calls, so the 5 % bound is for the full run below and in docs/hardening.md)."""
    got = _soak(tmp_path, "--calls", "250", "--warmup", "100", "--long-clip-s", "30", "--max-growth-pct", "10")
    assert got["calls"] >= 250 + 32


@pytest.mark.slow
def test_soak_1000_calls(tmp_path):
    """The issue's soak: 1,000 sequential calls, RSS growth <= 5 % after warm-up (fake model, ~1 min)."""
    got = _soak(tmp_path, "--calls", "1000", "--warmup", "100")
    assert got["rss_growth_pct"] <= 5.0 and got["calls"] >= 1000


async def test_a_file_swapped_for_a_symlink_while_queued_or_running_is_never_read_outside(tmp_path):
    """Long files (here WebM without a duration, which the model streams) wait in the queue holding the descriptor
    the check opened. A loop swaps the file for a symlink to a file outside the allowed folder and back while calls
    arrive, queue and run: whatever is refused, every transcription reads the file that was checked, never the one
    outside (before, a queued long-file job opened the path again when it started)."""
    import hashlib
    import os
    import threading

    import soundfile as sf

    from tests.test_server_support import TESTDATA, duration_less_webm

    root, outside = tmp_path / "shared", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    x, _ = sf.read(TESTDATA / "audio" / "en" / "jfk.wav", dtype="float32")
    inside = duration_less_webm(root / "meeting.webm", x[: 16000 * 4])
    secret = duration_less_webm(outside / "secret.webm", x[16000 * 4: 16000 * 9])
    inside_sha = hashlib.sha256(inside.read_bytes()).hexdigest()
    stash = root / "stash.webm"
    loader, model = fake_loader(FakeModel(seconds_per_audio_s=0.02, step_s=0.5))
    server = create_server(Settings(allowed_roots=[root], queue_size=64, call_budget_s=0.2), model_loader=loader)
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.replace(inside, stash)
            inside.symlink_to(secret)
            time.sleep(0.001)
            inside.unlink()
            os.replace(stash, inside)
            time.sleep(0.001)

    jobs, refused = [], 0
    async with Client(server, mode="legacy") as client:
        await client.call_tool("list_languages", {})  # the model is loaded
        swapper = threading.Thread(target=swap)
        swapper.start()
        try:
            with anyio.fail_after(120):
                for _ in range(60):
                    result = await client.call_tool("transcribe_file", {"path": str(inside)})
                    if result.is_error:
                        refused += 1
                    else:
                        jobs.append(TranscriptionOutput.model_validate(result.structured_content).job_id)
        finally:
            stop.set()
            swapper.join()
        with anyio.fail_after(120):
            for job_id in jobs:
                while True:
                    out = TranscriptionOutput.model_validate(
                        (await client.call_tool("get_transcript", {"job_id": job_id})).structured_content)
                    if out.status == "completed":
                        break
    assert len(jobs) >= 10, f"only {len(jobs)} of 60 calls got past the swapping ({refused} refused)"
    assert model.read_sha256 == [inside_sha] * len(jobs)
