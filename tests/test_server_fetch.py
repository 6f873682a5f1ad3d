"""The URL matrix for transcribe_url, against local HTTP servers on 127.0.0.1 and a fake resolver.

The default policy must refuse every local target before connecting; the policy is relaxed only in
the tests that need to reach the local server (allowlisted names, or `any` for the size/time caps).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import anyio
import pytest
from mcp import Client

from server.app import create_server
from server.config import Settings
from server.fetch import Fetcher, FetchError, address_problem
from server.schemas import TranscriptionOutput
from tests.test_server_support import (
    FakeModel,
    endless,
    fake_loader,
    http_server,
    redirect,
    send_body,
    wav_bytes,
)

pytestmark = pytest.mark.anyio

WAV = wav_bytes(1.5)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def fake_resolver(table: dict[str, list[str]]):
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("no such host")
        return table[host]

    return resolve


RESOLVE = fake_resolver({
    "media.test": ["127.0.0.1"],
    "evil.test": ["93.184.216.34", "127.0.0.1"],  # one public, one loopback: refused
    "meta.test": ["169.254.169.254"],
    "lan.test": ["192.168.1.20"],
    "v6.test": ["::ffff:127.0.0.1"],
    "public.test": ["93.184.216.34"],
})


async def fetch(fetcher: Fetcher, url: str) -> bytes:
    async with fetcher.download(url) as dl:
        return dl.path.read_bytes()


async def refused(fetcher: Fetcher, url: str) -> str:
    with pytest.raises(FetchError) as info:
        await fetch(fetcher, url)
    return str(info.value)


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.0.1", "private"), ("fd00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("100.64.0.1", "carrier-grade"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("::ffff:127.0.0.1", "IPv4-mapped"), ("::ffff:8.8.8.8", "IPv4-mapped"), ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("2002:7f00:1::", "6to4 address around a loopback"), ("2002:c0a8:101::", "6to4 address around a private"),
    ("64:ff9b::7f00:1", "NAT64 address around a loopback"), ("240.0.0.1", "reserved"), ("192.0.2.1", "private"), ("198.18.0.1", "private"),
    ("8.8.8.8", None), ("93.184.216.34", None), ("2606:4700:4700::1111", None), ("2002:808:808::", None),
    ("64:ff9b::808:808", None),
])
def test_address_classes(address, expected):
    problem = address_problem(ipaddress.ip_address(address))
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem


async def test_default_policy_refuses_local_targets_without_connecting():
    with http_server({"/a.wav": send_body(WAV)}) as (port, seen):
        f = Fetcher(resolver=RESOLVE)
        for url in (f"http://127.0.0.1:{port}/a.wav", f"http://[::1]:{port}/a.wav", f"http://0.0.0.0:{port}/a.wav",
                    f"http://media.test:{port}/a.wav", f"http://evil.test:{port}/a.wav", "http://meta.test/latest",
                    "http://169.254.169.254/latest/meta-data/", "http://lan.test/a.wav", "http://v6.test/a.wav",
                    "http://10.0.0.1/a.wav", "http://100.100.100.200/a.wav", f"http://[::ffff:127.0.0.1]:{port}/"):
            msg = await refused(f, url)
            assert "Refused" in msg and "--url-allow-host" in msg, (url, msg)
        msg = await refused(Fetcher(), f"http://localhost:{port}/a.wav")  # the real resolver: loopback
        assert "loopback" in msg
        assert seen == []  # nothing ever reached the local server


async def test_bad_urls():
    f = Fetcher(resolver=RESOLVE)
    cases = {
        "ftp://example.com/a.wav": "Only http:// and https://", "file:///etc/passwd": "Only http:// and https://",
        "gopher://x/": "Only http", "javascript:alert(1)": "Only http", "example.com/a.wav": "Only http",
        "http://user:pw@public.test/a.wav": "credentials", "": "empty", "http:///a.wav": "no host name",
        "http://public.test:99999/": "malformed", "http://exa mple.com/": "malformed",
        "http://nosuch.test/a.wav": "could not be found",
    }
    for url, expected in cases.items():
        assert expected in await refused(f, url), url
    assert "disabled" in await refused(Fetcher(policy="off"), "https://example.com/a.wav")
    assert "allowlist" in await refused(Fetcher(policy="allowlist", resolver=RESOLVE), "http://public.test/a.wav")


async def test_allowlisted_name_connects_to_the_checked_address(tmp_path):
    with http_server({"/a.wav": send_body(WAV), "/here": redirect("/a.wav")}) as (port, seen):
        f = Fetcher(allow_hosts=["media.test"], resolver=RESOLVE, tmp_dir=str(tmp_path))
        assert await fetch(f, f"http://media.test:{port}/a.wav?sig=1") == WAV
        # the pinned connection still carries the name: Host header (and SNI for https)
        assert seen[-1] == {"path": "/a.wav?sig=1", "host": f"media.test:{port}"}
        assert await fetch(f, f"http://media.test:{port}/here") == WAV  # relative redirect, re-checked
        assert list(tmp_path.iterdir()) == []  # the private temp folder is gone


async def test_redirects_into_local_targets_are_refused():
    with http_server({}) as (port, _):
        routes = {
            "/to-loopback": redirect(f"http://127.0.0.1:{port}/secret"),
            "/to-evil": redirect(f"http://evil.test:{port}/secret"),
            "/to-meta": redirect("http://169.254.169.254/latest/meta-data/", status=307),
            "/to-file": redirect("file:///etc/passwd", status=301),
            "/loop": redirect("/loop"),
        }
        with http_server(routes) as (port2, seen):
            f = Fetcher(allow_hosts=["media.test"], resolver=RESOLVE)
            for path, expected in (("/to-loopback", "loopback"), ("/to-evil", "loopback"),
                                   ("/to-meta", "link-local"), ("/to-file", "Only http"), ("/loop", "redirected more")):
                assert expected in await refused(f, f"http://media.test:{port2}{path}"), path
            assert "/secret" not in [s["path"] for s in seen]
            assert sum(s["path"] == "/loop" for s in seen) == 6  # the first request + 5 redirects


def truncated(h) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "5000")
    h.end_headers()
    h.wfile.write(b"\0" * 1000)
    h.close_connection = True


async def test_caps_status_and_content_type(tmp_path):
    routes = {
        "/big-declared": send_body(b"\0" * (3 * 2**20)),
        "/big-chunked": endless(),
        "/truncated": truncated,
        "/slow": endless(chunk=b"\0" * 100, delay_s=0.2),
        "/missing": send_body(b"SECRET-BODY", "text/plain", status=404),
        "/teapot": send_body(b"SECRET-BODY", "application/octet-stream", status=500),
        "/page": send_body(b"<html>SECRET-BODY</html>", "text/html"),
        "/empty": send_body(b""),
        "/ok": send_body(WAV),
    }
    with http_server(routes) as (port, _):
        # relaxed on purpose: the limits are what is under test here
        f = Fetcher(policy="any", max_bytes=2**20, timeout_s=1.5, tmp_dir=str(tmp_path))
        base = f"http://127.0.0.1:{port}"
        assert "3.0 MiB, over" in await refused(f, base + "/big-declared")
        assert "larger than" in await refused(f, base + "/big-chunked")
        assert "failed while downloading" in await refused(f, base + "/truncated")
        with anyio.fail_after(10):
            assert "did not finish within" in await refused(f, base + "/slow")
        for path, expected in (("/missing", "HTTP 404 (Not Found)"), ("/teapot", "HTTP 500"),
                               ("/page", "text/html"), ("/empty", "empty")):
            msg = await refused(f, base + path)
            assert expected in msg and "SECRET" not in msg, (path, msg)
        assert await fetch(f, base + "/ok") == WAV
        assert "Could not connect" in await refused(f, "http://127.0.0.1:9/nothing-listens")
        assert list(tmp_path.iterdir()) == []  # every temp folder was removed, after failures too


async def test_environment_proxies_are_ignored(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    with http_server({"/a.wav": send_body(WAV)}) as (port, seen):
        f = Fetcher(allow_hosts=["media.test"], resolver=RESOLVE)
        assert await fetch(f, f"http://media.test:{port}/a.wav") == WAV
        assert seen[0]["path"] == "/a.wav"  # direct, not via the (dead) proxy


# ---- through the MCP tool -------------------------------------------------------------------------
def url_server(root: Path, **settings):
    loader, _ = fake_loader(FakeModel())
    return create_server(Settings(allowed_roots=[root], **settings), model_loader=loader,
                         resolver=RESOLVE)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_transcribe_url_tool(tmp_path, mode):
    with http_server({"/talk.wav": send_body(WAV), "/notes.wav": send_body(b"hello " * 100)}) as (port, _):
        default = url_server(tmp_path)
        async with Client(default, mode=mode) as client:
            result = await client.call_tool("transcribe_url", {"url": f"http://127.0.0.1:{port}/talk.wav"})
            assert result.is_error and "loopback" in result.content[0].text
            result = await client.call_tool("transcribe_url", {"url": f"http://media.test:{port}/talk.wav"})
            assert result.is_error and "Refused" in result.content[0].text
        allowed = url_server(tmp_path, url_allow_hosts=["media.test"])
        async with Client(allowed, mode=mode) as client:
            url = f"http://media.test:{port}/talk.wav?token=SECRET"
            result = await client.call_tool("transcribe_url", {"url": url})
            assert not result.is_error, result.content[0].text
            out = TranscriptionOutput.model_validate(result.structured_content)
            assert out.status == "completed" and out.text == "fake transcript of 1.50 seconds"
            assert out.source == f"http://media.test:{port}/talk.wav"  # no query string (tokens) echoed
            assert "SECRET" not in result.content[0].text
            assert out.timings.download_s is not None and out.timings.download_s >= 0
            bad = await client.call_tool("transcribe_url", {"url": f"http://media.test:{port}/notes.wav"})
            text = bad.content[0].text
            assert bad.is_error and f"the download from http://media.test:{port}/notes.wav" in text  # the URL
            assert "funasr-nano-mcp-" not in text and "/tmp" not in text  # the private temp path is not shown
            good = await client.call_tool("transcribe_url", {"url": url})
            assert not good.is_error
