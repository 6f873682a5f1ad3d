"""The small defects of the adversarial pass (issue: reliability and security, point 6), each checked as it now
behaves: special tokens in hotwords, lone surrogates on the wire, what messages name, and the CLI's outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mcp import Client

from asr.audio.io import probe
from asr.errors import AudioDecodeError, InvalidOptionError
from server.app import _public_url, create_server
from server.config import Settings
from server.paths import PathPolicy, PathRefused
from tests.test_hardening_protocol import RawServer, clean_exit
from tests.test_server_support import JFK, REPO, fake_loader, http_server, send_body, wav_bytes, write_wav

SPECIAL = ["<think>", "</think>", "<tool_call>", "<tool_response>", "a<|im_start|>b"]


@pytest.mark.parametrize("word", SPECIAL)
def test_hotwords_with_special_tokens_are_refused(tiny_model, word):
    """Every special (added) token of the model's tokenizer, not a hand list: each would be encoded as one control
    token inside the prompt."""
    assert "<think>" in tiny_model.special_tokens and len(tiny_model.special_tokens) >= 20
    with pytest.raises(InvalidOptionError, match="special token"):
        tiny_model.transcribe(JFK, hotwords=["fine", word], max_new_tokens=2)


@pytest.mark.anyio
async def test_the_server_refuses_them_too():
    loader, _ = fake_loader()
    server = create_server(Settings(allowed_roots=[JFK.parent]), model_loader=loader)
    async with Client(server, mode="legacy") as client:
        await client.call_tool("list_languages", {})  # loaded: the tokenizer's special tokens are known
        out = await client.call_tool("transcribe_file", {"path": str(JFK), "hotwords": ["<think>"]})
        assert out.is_error and "special token" in out.content[0].text


@pytest.fixture
def raw(tmp_path):
    server = RawServer(tmp_path)
    server.initialize()
    yield server
    server.kill()


@pytest.mark.parametrize("arguments", [
    '{"name": "transcribe_file", "arguments": {"path": "/tmp/\\ud800.wav"}}',
    '{"name": "transcribe_file", "arguments": {"path": "JFK", "language": "\\udfff"}}',
    '{"name": "transcribe_file", "arguments": {"path": "JFK", "hotwords": ["x\\ud83d"]}}',
    '{"name": "get_transcript", "arguments": {"job_id": "\\udc00\\udc00"}}',
])
def test_lone_surrogates_are_answered(raw, arguments):
    """A lone UTF-16 surrogate anywhere in a request used to get no answer at all (the JSON parser refused the line
    and lost its id): now the call is answered with an error that names the problem, and the server goes on."""
    params = arguments.replace("JFK", str(JFK)).encode()
    raw.send(b'{"jsonrpc": "2.0", "id": "s", "method": "tools/call", "params": ' + params + b"}\n")
    answer = raw.wait_for("s", timeout=10)
    assert answer["result"]["isError"] and "lone UTF-16 surrogate" in answer["result"]["content"][0]["text"]
    raw.send(b'{"jsonrpc": "2.0", "id": "p", "method": "ping", "params": {"_meta": {"note": "\\ud800"}}}\n')
    assert raw.wait_for("p")["result"] == {}
    ok = raw.request("tools/call", {"name": "transcribe_file", "arguments": {"path": str(JFK), "hotwords": ["\U0001f600"]}})
    assert not ok["result"]["isError"]  # a valid surrogate pair (an emoji) is text like any other
    clean_exit(raw, raw.finish())


def test_messages_name_the_problem(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "loop1").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop1")
    policy = PathPolicy([root], max_bytes=2**20)
    with pytest.raises(PathRefused, match="symlink loop"):
        policy.check(str(root / "loop1"))
    with pytest.raises(PathRefused, match="home folder of 'nosuchuser12345'"):
        policy.check("~nosuchuser12345/talk.wav")
    many = tmp_path / "many.wav"  # a header declaring 65,535 channels
    many.write_bytes(wav_bytes(0.1))
    data = bytearray(many.read_bytes())
    data[22:24] = (65535).to_bytes(2, "little")
    many.write_bytes(bytes(data))
    with pytest.raises(AudioDecodeError) as info:
        probe(many)
    assert "0 channels" not in str(info.value) and "channel" in str(info.value)
    assert _public_url("http://[::1]:8080/a.wav?token=1") == "http://[::1]:8080/a.wav"
    assert _public_url("example.com/talk.mp3?token=1") == "example.com/talk.mp3"


def _raw_response(head: bytes, body: bytes):
    def route(h):
        h.wfile.write(head + body)
        h.wfile.flush()
        h.close_connection = True

    return route


@pytest.mark.anyio
async def test_broken_http_framing_is_named(tmp_path):
    """Content-Length: -1 is an invalid response, not a network error; a body longer than its Content-Length is
    refused (HTTP framing would silently cut it); and a download's warnings name the URL, never the temp path."""
    from tests.test_server_fetch import RESOLVE

    wav = wav_bytes(1.0)
    truncated = wav[:44] + wav[44:20000]  # a header claiming 1 s, 0.6 s of samples
    routes = {"/minus.wav": _raw_response(b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nContent-Length: -1\r\n\r\n",
                                          wav),
              "/longer.wav": _raw_response(f"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nContent-Length: {len(wav)}"
                                           "\r\n\r\n".encode(), wav + b"\0" * 5000),
              "/cut.wav": send_body(truncated)}
    with http_server(routes) as (port, _):
        loader, _ = fake_loader()
        server = create_server(Settings(allowed_roots=[tmp_path], url_allow_hosts=["media.test"]),
                               model_loader=loader, resolver=RESOLVE)
        async with Client(server, mode="legacy") as client:
            minus = await client.call_tool("transcribe_url", {"url": f"http://media.test:{port}/minus.wav"})
            assert minus.is_error and "invalid HTTP response" in minus.content[0].text
            longer = await client.call_tool("transcribe_url", {"url": f"http://media.test:{port}/longer.wav"})
            assert longer.is_error and "Content-Length" in longer.content[0].text
            cut = await client.call_tool("transcribe_url", {"url": f"http://media.test:{port}/cut.wav"})
            warnings = cut.structured_content["warnings"]
            assert warnings and all(f"http://media.test:{port}/cut.wav" in w and "/tmp" not in w for w in warnings)


def test_cli_outputs(tiny_checkpoint, tmp_path):
    def cli(*args: str, stdin=None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "asr.cli", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=300)

    two = cli("transcribe", str(JFK), str(JFK), "-m", str(tiny_checkpoint), "--max-new-tokens", "2", "-f", "json")
    assert two.returncode == 0, two.stderr
    parsed = json.loads(two.stdout)  # one JSON document for two files
    assert [r["file"] for r in parsed] == [str(JFK), str(JFK)] and "text" in parsed[0]
    srt = cli("transcribe", str(JFK), str(JFK), "-m", str(tiny_checkpoint), "-f", "srt")
    assert srt.returncode == 2 and "needs -o" in srt.stderr
    # an invalid language is refused before the model loads (this model directory does not exist)
    bad = cli("transcribe", str(JFK), "-m", str(tmp_path / "no-model"), "-l", "xx")
    assert bad.returncode == 2 and "xx" in bad.stderr and "no-model" not in bad.stderr
    head = subprocess.run(f"{sys.executable} -m asr.cli languages --variant mlt | head -n 2", shell=True, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert len(head.stdout.splitlines()) == 2 and "Traceback" not in head.stderr and "BrokenPipe" not in head.stderr


def test_example_without_a_model_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "examples/transcribe.py", str(JFK)], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_example_shows_warnings(tiny_checkpoint, tmp_path):
    silent = write_wav(tmp_path / "tone.wav", 2.0, amplitude=0.001)
    out = subprocess.run([sys.executable, "examples/transcribe.py", str(silent), str(tiny_checkpoint)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "warning: no speech detected" in out.stderr, out.stderr


@pytest.mark.anyio
async def test_tool_descriptions_have_no_docstring_indentation():
    loader, _ = fake_loader()
    async with Client(create_server(Settings(allowed_roots=[JFK.parent]), model_loader=loader)) as client:
        tools = (await client.list_tools()).tools
    assert tools and all(not line.startswith(" ") for t in tools for line in t.description.splitlines())


@pytest.fixture
def anyio_backend():
    return "asyncio"

