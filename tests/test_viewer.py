"""The transcript viewer (server/viewer/transcript.html, an MCP App) in a real headless Chromium.

A small host page (tests/fixtures/apps_host.html) speaks the host side of the MCP Apps bridge: it answers the view's
`ui/initialize`, sends the tool input and a recorded tool result (tests/fixtures/viewer_result.json), and answers
the view's `tools/call` requests with scripted results. The subtitle files the viewer makes in the browser must be
byte for byte what asr/writers.py writes.

Needs Playwright for Python and a Chromium binary (Debian: `apt-get install chromium`; elsewhere set CHROMIUM to
its path, or use Playwright's own); the browser tests skip, saying why, when either is missing. UPDATE_SCREENSHOT=1 rewrites docs/viewer.png.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from asr.types import Segment as AsrSegment
from asr.types import TranscriptionResult
from asr.writers import to_srt, to_txt, to_vtt
from server.schemas import TranscriptionOutput
from server.viewer import VIEWER_URI, viewer_apps, viewer_html

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
RESULT = json.loads((FIXTURES / "viewer_result.json").read_text(encoding="utf-8"))
SCREENSHOT = ROOT / "docs" / "viewer.png"
STEM = "standup-2025-06-12"  # of RESULT["source"]
TIMEOUT_MS = 8000


def chromium_path() -> str | None:
    candidates = [os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                  shutil.which("chromium-browser"), shutil.which("google-chrome")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def tool_result(out: dict) -> dict:
    """A CallToolResult as the server sends it: a text header and the structured result."""
    return {"content": [{"type": "text", "text": f"Transcript of {out['source']} ({out['status']})"}],
            "structuredContent": out}


def running(fraction: float, message: str) -> dict:
    return tool_result({
        "status": "running", "job_id": RESULT["job_id"], "source": RESULT["source"], "duration_s": RESULT["duration_s"],
        "model": RESULT["model"], "warnings": [],
        "progress": {"done_s": round(fraction * RESULT["duration_s"], 2), "total_s": RESULT["duration_s"],
                     "fraction": fraction, "queue_position": 0, "message": message},
        "next_step": "The transcript is not ready yet. Call get_transcript ...",
    })


def expected(out: dict) -> dict[str, str]:
    """What asr/writers.py writes for this result (one segment over the whole audio when it has none)."""
    segments = [AsrSegment(start=s["start"], end=s["end"], text=s["text"]) for s in out.get("segments") or []]
    if not segments:
        segments = [AsrSegment(start=0.0, end=out["duration_s"], text=out["text"])]
    result = TranscriptionResult(text=out["text"], language=out.get("language"), segments=segments)
    return {"srt": to_srt(result), "vtt": to_vtt(result), "txt": to_txt(result)}


# ---- the browser and the host page --------------------------------------------------------------------------

class _Handler(SimpleHTTPRequestHandler):
    """Serves the host page and the viewer, and nothing else."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        if path == "/host.html":
            body, kind = (FIXTURES / "apps_host.html").read_bytes(), "text/html; charset=utf-8"
        elif path == "/viewer.html":
            body, kind = viewer_html().encode("utf-8"), "text/html; charset=utf-8"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(FIXTURES)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        exe = chromium_path() or (p.chromium.executable_path if Path(p.chromium.executable_path).is_file() else None)
        if exe is None:
            pytest.skip("Chromium is not installed (apt-get install chromium, or set CHROMIUM to its path)")
        b = p.chromium.launch(executable_path=exe, headless=True)
        yield b
        b.close()


@pytest.fixture
def host(browser, site):
    """Opens the host page; `start(config)` loads the viewer; returns (page, the viewer's frame) after that."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 800, "height": 600}, accept_downloads=True,
                                  permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    requests: list[str] = []
    errors: list[str] = []
    context.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)

    def start(tool_result: dict, *, tool_name: str = "transcribe_file", call_results: list | None = None,
              capabilities: dict | None = None, theme: str = "light"):
        page.goto(f"{site}/host.html")
        page.evaluate("config => startHost(config)", {
            "viewerUrl": "/viewer.html", "toolName": tool_name, "toolInput": {"path": RESULT["source"]},
            "toolResult": tool_result, "callResults": call_results or [], "hostCapabilities": capabilities or {},
            "theme": theme,
        })
        page.wait_for_function("window.hostLog.initialized")
        return page, page.frame_locator("#frame")

    yield start, errors
    context.close()
    # the viewer reached nothing but the host's two files: it needs no network
    assert {u for u in requests if u.startswith("http")} <= {f"{site}/host.html", f"{site}/viewer.html"}, requests


def download(page, frame, label: str) -> tuple[str, str]:
    with page.expect_download() as info:
        frame.get_by_role("button", name=label).click()
    d = info.value
    return d.suggested_filename, Path(d.path()).read_text(encoding="utf-8")


def copied(page, frame) -> str:
    """Clicks Copy and reads the clipboard (the browser's clipboard outlives a context: clear it first)."""
    from playwright.sync_api import expect

    page.evaluate("navigator.clipboard.writeText('')")
    frame.get_by_role("button", name="Copy").click()
    expect(frame.locator("#done")).to_have_text("Copied")
    return page.evaluate("navigator.clipboard.readText()")


def host_log(page) -> dict:
    return page.evaluate("window.hostLog")


# ---- the server side ----------------------------------------------------------------------------------------

def test_viewer_is_built_from_its_sources():
    """transcript.html names the hash of what it was built from (server/viewer/src/build.mjs): a source edited without
    `bash tools/build_viewer.sh` fails here."""
    base = ROOT / "server" / "viewer"
    files = sorted(["package-lock.json", *(f"src/{p.name}" for p in (base / "src").iterdir())])
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.encode() + b"\0" + (base / f).read_bytes() + b"\0")
    built = re.search(r"sources-sha256: ([0-9a-f]{64})", viewer_html()[:3000])
    assert built, "transcript.html lacks its sources-sha256 line: rebuild it with bash tools/build_viewer.sh"
    assert built.group(1) == digest.hexdigest(), "server/viewer/ changed since transcript.html was built: " \
        "run bash tools/build_viewer.sh"


def test_fixture_is_a_transcription_output():
    TranscriptionOutput.model_validate(RESULT)
    assert sum(1 for s in RESULT["segments"] if s.get("speaker")) == 2


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_viewer_resource_is_served(anyio_backend):
    from mcp import Client
    from mcp.server import MCPServer

    html = viewer_html()
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert "tools/build_viewer.sh" in html[:2000] and "@modelcontextprotocol/ext-apps" in html[:2000]
    for needle in ("<script src", "<link ", "@import", "https://cdn", "http://cdn"):
        assert needle not in html, f"the viewer must be self-contained, found {needle!r}"

    server = MCPServer("viewer-test", extensions=[viewer_apps()])

    @server.tool(meta={"ui": {"resourceUri": VIEWER_URI}, "ui/resourceUri": VIEWER_URI})
    def get_transcript(job_id: str) -> str:
        return job_id

    async with Client(server) as client:
        tool = (await client.list_tools()).tools[0]
        assert tool.meta["ui"]["resourceUri"] == VIEWER_URI
        listed = {str(r.uri): r for r in (await client.list_resources()).resources}
        assert listed[VIEWER_URI].mime_type == "text/html;profile=mcp-app"
        content = (await client.read_resource(VIEWER_URI)).contents[0]
        assert content.mime_type == "text/html;profile=mcp-app" and content.text == html
        ui = (content.meta or listed[VIEWER_URI].meta)["ui"]
        assert ui["csp"] == {} and ui["permissions"] == {"clipboardWrite": {}}


# ---- in the browser -----------------------------------------------------------------------------------------

def test_completed_transcript(host):
    from playwright.sync_api import expect

    start, errors = host
    page, frame = start(tool_result(RESULT))
    rows = frame.locator("li.seg")
    expect(rows).to_have_count(4)

    # header, times, speakers, warnings
    expect(frame.locator("#source")).to_have_text(f"{STEM}.m4a")
    expect(frame.locator("#meta")).to_contain_text("English (en)")
    expect(frame.locator("#meta")).to_contain_text("0:16")
    expect(frame.locator("#meta")).to_contain_text("4 segments")
    expect(rows.locator(".time")).to_have_text(["00:00.0–00:03.2", "00:03.2–00:07.9", "00:07.9–00:12.3",
                                                "00:12.3–00:15.8"])
    expect(rows.nth(0).locator(".text")).to_have_text("Good morning, everyone. Let's start with the release.")
    expect(frame.locator(".spk:not(.spk-none)")).to_have_text(["S1", "S2"])
    colours = frame.locator(".spk:not(.spk-none)").evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert colours[0] != colours[1]
    expect(frame.locator("#warnings li")).to_have_text(RESULT["warnings"])
    expect(frame.locator("#progress")).to_be_hidden()

    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        page.locator("#frame").screenshot(path=str(SCREENSHOT))

    # search: case-insensitive, filters and highlights, counts
    search = frame.get_by_role("searchbox")
    search.fill("RELEASE")
    expect(frame.locator("#count")).to_have_text("3 matches in 3 of 4 segments")
    expect(rows.locator("visible=true")).to_have_count(3)
    expect(frame.locator("li.seg mark")).to_have_text(["release", "release", "release"])
    search.fill("ship it")
    expect(frame.locator("#count")).to_have_text("1 match in 1 of 4 segments")
    expect(rows.locator("visible=true").locator(".text")).to_have_text(["Great, let's ship it on Friday."])
    search.fill("zebra")
    expect(frame.locator("#count")).to_have_text("No matches")
    expect(rows.locator("visible=true")).to_have_count(0)
    search.fill("")
    expect(rows.locator("visible=true")).to_have_count(4)
    expect(frame.locator("#count")).to_have_text("")

    # copy
    assert copied(page, frame) == RESULT["text"]

    # downloads, made in the browser: exactly what asr/writers.py writes
    want = expected(RESULT)
    assert want["srt"].startswith("1\n00:00:00,000 --> 00:00:03,240\nGood morning")
    for fmt in ("srt", "vtt", "txt"):
        name, text = download(page, frame, f".{fmt}")
        assert name == f"{STEM}.{fmt}"
        assert text == want[fmt], fmt

    assert host_log(page)["calls"] == []  # a complete result needs nothing more from the server
    assert errors == []


def test_progress_then_transcript(host):
    from playwright.sync_api import expect

    start, errors = host
    page, frame = start(running(0.25, "transcribing: 4 of 16 s of audio"), call_results=[
        running(0.6, "transcribing: 10 of 16 s of audio"),
        tool_result(RESULT),
    ])
    bar = frame.get_by_role("progressbar")
    expect(bar).to_have_attribute("aria-valuenow", "25")
    expect(frame.locator("#progress-msg")).to_have_text("Transcribing · 25% · transcribing: 4 of 16 s of audio")
    expect(frame.locator("#fill")).to_have_attribute("style", "width: 25%;")
    expect(frame.locator("li.seg")).to_have_count(0)
    expect(frame.locator("#toolbar")).to_be_hidden()

    expect(bar).to_have_attribute("aria-valuenow", "60")  # after the first poll, ~2 s
    expect(frame.locator("#progress-msg")).to_contain_text("10 of 16 s")
    expect(frame.locator("li.seg")).to_have_count(4)  # after the second
    expect(frame.locator("#progress")).to_be_hidden()
    expect(frame.locator(".spk:not(.spk-none)")).to_have_text(["S1", "S2"])

    args = {"job_id": RESULT["job_id"], "wait": False, "include_segments": True}
    assert host_log(page)["calls"] == [{"name": "get_transcript", "arguments": args}] * 2
    page.wait_for_timeout(2500)  # polling has stopped
    assert len(host_log(page)["calls"]) == 2
    assert errors == []


def test_text_only_and_errors(host):
    from playwright.sync_api import expect

    start, _ = host
    text_only = {**copy.deepcopy(RESULT), "segments": None, "warnings": [], "text": "Hello there. Hello again."}
    gone = {"isError": True, "content": [{"type": "text", "text": "No transcription job '7f3c9a1e2b4d'."}]}
    page, frame = start(tool_result(text_only), call_results=[gone])
    expect(frame.locator("#plain")).to_have_text(text_only["text"])
    expect(frame.locator("#segments")).to_be_hidden()
    expect(frame.locator("#warnings")).to_be_hidden()
    frame.get_by_role("searchbox").fill("hello")
    expect(frame.locator("#count")).to_have_text("2 matches")
    expect(frame.locator("#plain mark")).to_have_count(2)
    # it asked for the segments once (transcribe_file leaves them out by default), was refused, keeps the text
    expect(frame.locator("#status")).to_be_hidden()
    assert host_log(page)["calls"] == [{"name": "get_transcript", "arguments": {
        "job_id": RESULT["job_id"], "wait": False, "include_segments": True}}]
    want = expected(text_only)
    assert want["srt"] == "1\n00:00:00,000 --> 00:00:15,840\nHello there. Hello again.\n"
    for fmt in ("srt", "vtt", "txt"):
        assert download(page, frame, f".{fmt}")[1] == want[fmt], fmt

    # an error result
    page, frame = start({"isError": True, "content": [{"type": "text", "text": "Transcribing x.wav failed: boom"}]})
    expect(frame.get_by_role("alert")).to_have_text("Transcribing x.wav failed: boom")
    expect(frame.locator("#toolbar")).to_be_hidden()

    # polling that fails
    page, frame = start(running(0.1, "starting"), call_results=[{"jsonrpcError": {"code": -32603, "message": "gone"}}])
    expect(frame.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "10")
    expect(frame.get_by_role("alert")).to_contain_text("Could not get the transcript: ")
    expect(frame.get_by_role("alert")).to_contain_text("gone")
    expect(frame.locator("#progress")).to_be_hidden()


def test_long_transcript_pages_and_host_downloads(host):
    """A long transcript comes a page at a time: the viewer fetches the rest, and downloads through the host when
    the host offers ui/download-file (sandboxed frames usually may not download)."""
    from playwright.sync_api import expect

    start, errors = host
    segs = RESULT["segments"]
    first = {**copy.deepcopy(RESULT), "segments": segs[:2], "text": "page one", "text_complete": False,
             "page": {"offset": 0, "count": 2, "total": 4, "next_offset": 2}}
    second = {**copy.deepcopy(RESULT), "segments": segs[2:], "text": "page two", "text_complete": False,
              "page": {"offset": 2, "count": 2, "total": 4, "next_offset": None}}
    page, frame = start(tool_result(first), tool_name="get_transcript", call_results=[tool_result(second)],
                        capabilities={"downloadFile": {}}, theme="dark")
    expect(frame.locator("li.seg")).to_have_count(4)
    expect(frame.locator("#status")).to_be_hidden()
    assert frame.locator("html").get_attribute("data-theme") == "dark"
    assert host_log(page)["calls"] == [{"name": "get_transcript", "arguments": {
        "job_id": RESULT["job_id"], "wait": False, "include_segments": True, "offset": 2}}]

    frame.get_by_role("button", name=".srt").click()
    expect(frame.locator("#done")).to_have_text(f"Saved {STEM}.srt")
    [request] = host_log(page)["downloads"]
    [content] = request["contents"]
    assert content["type"] == "resource"
    assert content["resource"]["uri"] == f"file:///{STEM}.srt"
    assert content["resource"]["mimeType"] == "application/x-subrip"
    assert content["resource"]["text"] == expected(RESULT)["srt"]
    assert copied(page, frame) == "page one page two"
    assert errors == []
