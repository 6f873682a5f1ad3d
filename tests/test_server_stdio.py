"""The server as a real subprocess over stdio: spawn, initialize, list tools, call every tool.

One test runs `main()` with the fake model (fast; checks the stdout guard and that the handshake
does not wait for the model); the other spawns the `funasr-nano-mcp` console script on a tiny
random-weight checkpoint and a real clip, as Claude Desktop would (2025-11-25 handshake).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

import asr
from server.schemas import CancelOutput, LanguagesOutput, StatusOutput, TranscriptionOutput
from tests.test_server_support import JFK, REPO, http_server, send_body

pytestmark = pytest.mark.anyio

TOOLS = {"transcribe_file", "transcribe_url", "list_languages", "get_transcript", "cancel_transcription",
         "server_status"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def call_every_tool(client: Client, port: int, *, expect_text: str | None, expect_dtype: str,
                          language: str = "en") -> TranscriptionOutput:
    tools = (await client.list_tools()).tools
    assert {t.name for t in tools} == TOOLS

    langs = await client.call_tool("list_languages", {})  # waits for the model to load
    assert not langs.is_error, text_of(langs)
    codes = [lg.code for lg in LanguagesOutput.model_validate(langs.structured_content).languages]
    assert codes[:3] == ["zh", "en", "ja"]

    seen: list[float] = []

    async def on_progress(progress, total, message):
        seen.append(progress)

    result = await client.call_tool("transcribe_file", {"path": str(JFK), "language": language},
                                    progress_callback=on_progress)
    assert not result.is_error, text_of(result)
    out = TranscriptionOutput.model_validate(result.structured_content)
    assert out.status == "completed" and out.source == str(JFK)
    if language != "auto":
        assert out.language == "en" and out.language_source == "requested" and out.language_name == "English"
    else:  # a random-weight model writes any script: whatever it is, the result says how it was found
        assert out.language_source in ("detected", "unknown")
        assert (out.language_method is not None) == (out.language_source == "detected")
    assert out.duration_s == pytest.approx(11.0, abs=0.01)
    assert out.model.variant == "nano" and out.model.dtype == expect_dtype
    assert out.timings.processing_s > 0 and out.timings.real_time_factor > 0
    assert isinstance(out.text, str)
    if expect_text is not None:
        assert out.text == expect_text
    assert text_of(result).split("\n", 1)[0].startswith(f"Transcript of {JFK}")
    assert seen == sorted(seen) and len(set(seen)) == len(seen)

    bad = await client.call_tool("transcribe_file", {"path": "/etc/passwd"})
    assert bad.is_error and "outside the folders" in text_of(bad)

    url = await client.call_tool("transcribe_url", {"url": f"http://127.0.0.1:{port}/jfk.wav"})
    assert not url.is_error, text_of(url)
    url_out = TranscriptionOutput.model_validate(url.structured_content)
    assert url_out.status == "completed" and url_out.timings.download_s is not None
    assert url_out.duration_s == pytest.approx(11.0, abs=0.01)

    got = await client.call_tool("get_transcript", {"job_id": out.job_id})
    assert not got.is_error
    again = TranscriptionOutput.model_validate(got.structured_content)
    assert again.text == out.text and again.job_id == out.job_id

    cancel = await client.call_tool("cancel_transcription", {"job_id": out.job_id})
    assert CancelOutput.model_validate(cancel.structured_content).status == "completed"

    status = StatusOutput.model_validate((await client.call_tool("server_status", {})).structured_content)
    assert status.model_state == "ready" and len(status.jobs) == 2
    assert status.url_policy == "allowlist"
    assert status.compute and status.runtime  # the fake model reports one; the tiny model the CPU backend's
    if status.runtime.audio != "fake":
        assert status.compute.startswith("cpu backend on cpu") and status.runtime.backend == "cpu"
    return out


def _params(command: str, args: list[str], env: dict[str, str]) -> StdioServerParameters:
    # the environment that chooses the server's compute paths follows the test run's
    passed = {k: v for k, v in os.environ.items() if k in ("FUNASR_NANO_BACKEND", "FUNASR_NANO_BLAS")}
    return StdioServerParameters(command=command, args=args, env={**passed, **env}, cwd=str(REPO))


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_stdio_with_fake_model(tmp_path, mode):
    errlog = tmp_path / "stderr.txt"
    args = ["-c", "from tests.test_server_support import run_fake_server; run_fake_server()",
            "--allowed-root", str(JFK.parent), "--url-policy", "allowlist", "--url-allow-host", "127.0.0.1"]
    params = _params(sys.executable, args, {"FAKE_LOAD_S": "1.0", "FUNASR_NANO_MCP_LOG_LEVEL": "INFO"})
    with http_server({"/jfk.wav": send_body(JFK.read_bytes())}) as (port, _), errlog.open("w") as err:
        with anyio.fail_after(60):
            async with Client(stdio_client(params, errlog=err), mode=mode) as client:
                await client.list_tools()
                status = StatusOutput.model_validate(
                    (await client.call_tool("server_status", {})).structured_content)
                assert status.model_state in ("starting", "loading")  # the handshake did not wait for it
                await call_every_tool(client, port, expect_text="fake transcript of 11.00 seconds",
                                      expect_dtype="bfloat16")
    logged = errlog.read_text()
    assert "fake model: stray stdout while loading" in logged  # diverted to stderr, not the wire
    assert "fake transcript" not in logged  # logs never hold transcripts
    assert "ready after" in logged


def _console_script() -> tuple[str, list[str]]:
    found = shutil.which("funasr-nano-mcp") or shutil.which("funasr-nano-mcp", path=str(Path(sys.executable).parent))
    if found:
        return found, []
    return sys.executable, ["-m", "server"]  # the same entry point when the package is not installed


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tools.checkpoint import write_checkpoint

    out = tmp_path_factory.mktemp("tiny") / "Fun-ASR-Nano-tiny"
    write_checkpoint(out, size="tiny")
    return out


async def test_stdio_console_script_with_tiny_model(tmp_path, tiny_model):
    command, pre = _console_script()
    env = {"FUNASR_NANO_MCP_MODEL": str(tiny_model), "FUNASR_NANO_MCP_ALLOWED_ROOTS": str(JFK.parent),
           "FUNASR_NANO_MCP_URL_POLICY": "allowlist", "FUNASR_NANO_MCP_URL_ALLOW_HOSTS": "127.0.0.1"}
    errlog = tmp_path / "stderr.txt"
    with http_server({"/jfk.wav": send_body(JFK.read_bytes())}) as (port, _), errlog.open("w") as err:
        with anyio.fail_after(120):
            async with Client(stdio_client(_params(command, pre, env), errlog=err), mode="legacy") as client:
                # random weights: 'auto' lets the repetition guard end the garbage early (faster than 'en')
                # dtype auto on a CPU: bf16 where the CPU backend computes it faster (Numba's kernels or MKL)
                from asr.backends.cpu.runners import auto_dtype

                out = await call_every_tool(client, port, expect_text=None, language="auto",
                                            expect_dtype=auto_dtype("llm", asr.RuntimeOptions()))
    assert out.model.name.endswith("Fun-ASR-Nano-tiny") and out.timings.generated_tokens > 0
    logged = errlog.read_text()
    assert "ready after" in logged
    if out.text and len(out.text) > 8:
        assert out.text not in logged
